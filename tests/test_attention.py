"""The fast attention paths against a dense masked reference built from coordinates alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hist_st.lattice import build_batch, to_lattice
from hist_st.model import DualPathAttention


def _level(n: int = 150, extent: float = 14.0, shifted: bool = True, seed: int = 0):
    pts = np.random.default_rng(seed).uniform(0, extent, size=(n, 2))
    return build_batch(to_lattice(pts), torch.zeros(n, 1), num_levels=1, shifted=shifted).levels[0]


def _attn(impl: str, positional: str, tokens: bool, seed: int = 0) -> DualPathAttention:
    torch.manual_seed(seed)
    a = DualPathAttention(32, 4, 3, positional=positional, impl=impl, has_tokens=tokens).double().eval()
    if positional == "rpb":
        torch.nn.init.normal_(a.rpb, std=1.0)  # a strong bias makes a wrong offset visible
    return a


@pytest.mark.parametrize("positional", ["rpb", "none", "alibi", "rope"])
@pytest.mark.parametrize("impl", ["window", "neighbour"])
@pytest.mark.parametrize("shifted", [True, False])
def test_fast_paths_equal_dense_reference(positional: str, impl: str, shifted: bool) -> None:
    level = _level(shifted=shifted)
    x = torch.randn(level.num_tokens, 32, dtype=torch.float64)
    tok = torch.randn(2, 32, dtype=torch.float64)
    fast, ref = _attn(impl, positional, True), _attn("dense", positional, True)
    ref.load_state_dict(fast.state_dict())
    out, upd = fast(x, level, tok)
    out_ref, upd_ref = ref(x, level, tok)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(upd, upd_ref)


def test_window_path_gradients_match_reference() -> None:
    level = _level()
    x = torch.randn(level.num_tokens, 32, dtype=torch.float64, requires_grad=True)
    fast, ref = _attn("window", "rpb", False), _attn("dense", "rpb", False)
    ref.load_state_dict(fast.state_dict())
    g_fast = torch.autograd.grad(fast(x, level, None)[0].square().sum(), [x, fast.rpb, fast.qkv.weight])
    g_ref = torch.autograd.grad(ref(x, level, None)[0].square().sum(), [x, ref.rpb, ref.qkv.weight])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b)


def test_dense_reference_is_a_plain_masked_softmax() -> None:
    """The reference itself, against an explicit per-query loop over the window union."""
    level = _level(n=40, extent=9.0)
    a = _attn("dense", "rpb", False)
    x = torch.randn(level.num_tokens, 32, dtype=torch.float64)
    out, _ = a(x, level, None)
    q, k, v = a.qkv(x).view(-1, 3, 4, 8).unbind(1)
    c = level.coords.tolist()
    table = a.rpb.view(4, 11, 11)
    expected = torch.zeros(level.num_tokens, 4, 8, dtype=torch.float64)
    for i, (qi, qj) in enumerate(c):
        keys = [
            j
            for j, (ki, kj) in enumerate(c)
            if (ki // 6, kj // 6) == (qi // 6, qj // 6) or ((ki + 3) // 6, (kj + 3) // 6) == ((qi + 3) // 6, (qj + 3) // 6)
        ]
        logits = torch.stack(
            [(q[i] * k[j]).sum(-1) / np.sqrt(8) + table[:, c[j][0] - qi + 5, c[j][1] - qj + 5] for j in keys], -1
        )
        expected[i] = (torch.softmax(logits, -1)[..., None] * v[keys].transpose(0, 1)).sum(1)
    torch.testing.assert_close(a.proj.weight.new_tensor(0) + out, a.proj(expected.reshape(-1, 32)))


def test_token_update_equals_unfolded_formula() -> None:
    level = _level(n=60)
    a = _attn("window", "rpb", True)
    x = torch.randn(level.num_tokens, 32, dtype=torch.float64)
    tok = torch.randn(3, 32, dtype=torch.float64)
    _, upd = a(x, level, tok)
    q = a.q_tok(tok).view(3, 4, 8)
    kv = a.kv_tok(torch.cat([x, tok])).view(-1, 2, 4, 8)
    p = torch.softmax(torch.einsum("thd,mhd->thm", q, kv[:, 0]) / np.sqrt(8), -1)
    expected = torch.einsum("thm,mhd->thd", p, kv[:, 1]).reshape(3, 32)
    torch.testing.assert_close(upd, expected)


@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_window_attention_function_gradcheck(p_drop: float) -> None:
    """The hand-written backward (recomputed logits, saved dropout masks) against finite differences."""
    from hist_st.model.attention import WindowAttentionFn

    level = _level(n=30, extent=8.0)
    parts = (level.standard, level.shifted)
    qkv = torch.randn(3, 2, level.num_tokens, 4, dtype=torch.float64, requires_grad=True)
    table = torch.randn(2, 121, dtype=torch.float64, requires_grad=True)

    def fn(qkv, table):
        torch.manual_seed(0)  # the same dropout masks in every evaluation
        return WindowAttentionFn.apply(qkv, table, parts, 0.5, p_drop)

    assert torch.autograd.gradcheck(fn, (qkv, table), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("mca_proj", ["separate", "shared"])
def test_calibration_path_equals_unfolded_formula(mca_proj: str) -> None:
    level = _level(n=50)
    torch.manual_seed(0)
    a = DualPathAttention(32, 4, 3, mca_proj=mca_proj).double().eval()
    x = torch.randn(level.num_tokens, 32, dtype=torch.float64)
    for t in (1, 3):
        tok = torch.randn(t, 32, dtype=torch.float64)
        if mca_proj == "shared":  # MCA reuses W-MSA's q/k/v
            q = a.qkv(x).view(-1, 3, 4, 8)[:, 0]
            _, k, v = a.qkv(tok).view(-1, 3, 4, 8).unbind(1)
        else:  # MCA's own projections
            q = a.q_mca(x).view(-1, 4, 8)
            k, v = a.kv_mca(tok).view(-1, 2, 4, 8).unbind(1)
        p = torch.softmax(torch.einsum("nhd,thd->nht", q, k) / np.sqrt(8), -1)
        expected = torch.einsum("nht,thd->nhd", p, v).reshape(-1, 32)
        torch.testing.assert_close(a._calibration(x, tok), expected)


def test_window_attention_finite_when_all_logits_are_very_negative() -> None:
    """Issue 16, item 7: every query's shifted-window keys all lie in its standard window (its shifted row
    is empty) and every logit is -200, below float32's exp range (about -88 around 0). The merge must
    give those empty rows weight 0, not shift them by 0: the output is the plain mean of the values."""
    from hist_st.model.attention import WindowAttentionFn

    coords = np.array([[3, 3], [3, 4], [4, 5], [5, 5], [5, 3]])  # one standard and one shifted window
    level = build_batch(coords, torch.zeros(len(coords), 1), num_levels=1, shifted=True).levels[0]
    n = level.num_tokens
    q = torch.full((2, n, 4), 10.0)
    k = torch.full((2, n, 4), -10.0)  # q.k * 0.5 = -200 for every pair
    v = torch.randn(2, n, 4)
    qkv = torch.stack([q, k, v]).requires_grad_(True)
    out = WindowAttentionFn.apply(qkv, None, (level.standard, level.shifted), 0.5, 0.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, v.mean(1, keepdim=True).expand_as(out))
    out.sum().backward()
    assert torch.isfinite(qkv.grad).all()


def test_token_update_equals_explicit_attention_over_tissue_and_tokens() -> None:
    """The folded (b)mm token update is ``softmax(q_t K^T) V`` over ``[X; Cb]`` with keys/values projected."""
    torch.manual_seed(0)
    a = DualPathAttention(32, 4, 3, n_tokens=3).double()
    x, tok = torch.randn(50, 32, dtype=torch.float64), torch.randn(3, 32, dtype=torch.float64)
    keys = torch.cat([x, tok])
    q = a.q_tok(tok).view(3, 4, 8) * a.scale
    k, v = a.kv_tok(keys).view(-1, 2, 4, 8).unbind(1)  # [N + T, H, Dh]
    expected = torch.einsum("thm,mhc->thc", torch.softmax(torch.einsum("thc,mhc->thm", q, k), -1), v)
    torch.testing.assert_close(a._token_update(x, tok), expected.reshape(3, 32))


@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_window_backward_by_head_halves_gives_the_same_gradients(p_drop: float) -> None:
    """Issue 15: backward on large slides goes half of the heads at a time; the gradients of q, k, v and the
    positional table are the same bit for bit (with and without attention dropout)."""
    from hist_st.lattice import num_rel_offsets
    from hist_st.model.attention import WindowAttentionFn

    level = _level()
    table = torch.randn(4, num_rel_offsets(3) ** 2, requires_grad=True)  # by relative offset, window w = 3
    qkv = torch.randn(3, 4, len(level.coords), 8, requires_grad=True)
    parts = (level.standard, level.shifted)
    dout = torch.randn(4, len(level.coords), 8)
    grads = []
    old = WindowAttentionFn.backward_head_chunk_tokens
    try:
        for tokens in (10**9, 1):
            WindowAttentionFn.backward_head_chunk_tokens = tokens
            torch.manual_seed(0)  # the same dropout masks
            out = WindowAttentionFn.apply(qkv, table, parts, 0.3, p_drop)
            grads.append(torch.autograd.grad(out, (qkv, table), dout))
    finally:
        WindowAttentionFn.backward_head_chunk_tokens = old
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_window_attention_takes_bfloat16_qkv_as_its_float32_copy(p_drop: float) -> None:
    """Issue 15: a bfloat16 qkv (bf16 autocast) is saved as it is and widened window by window; output and
    gradients equal those of the float32 copy it used to receive (gradient rounded to bfloat16 once)."""
    from hist_st.lattice import num_rel_offsets
    from hist_st.model.attention import WindowAttentionFn

    level = _level()
    parts = (level.standard, level.shifted)
    table = torch.randn(4, num_rel_offsets(3) ** 2, requires_grad=True)
    qkv = torch.randn(3, 4, len(level.coords), 8).bfloat16().requires_grad_()
    dout = torch.randn(4, len(level.coords), 8)
    results = []
    for widen in (False, True):
        torch.manual_seed(0)  # the same dropout masks
        out = WindowAttentionFn.apply(qkv.float() if widen else qkv, table, parts, 0.3, p_drop)
        results.append((out, *torch.autograd.grad(out, (qkv, table), dout)))
    assert results[0][0].dtype == torch.float32 and results[0][1].dtype == torch.bfloat16
    for a, b in zip(*results):
        assert torch.equal(a, b)
