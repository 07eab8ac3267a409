"""HiST model: every configuration variant runs, trains and has the symmetries of the lattice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hist_st.lattice import to_lattice
from hist_st.model import HiST, HiSTConfig, parse_levels

VARIANTS = {
    "paper": {},
    "authors": {"tokens": ("max", "mean", "fixed"), "token_transition": True, "fuse": "refine-fuse"},
    "rope": {"positional": "rope"},
    "alibi": {"positional": "alibi"},
    "no-positional": {"positional": "none"},
    "additive-skip": {"skip": "additive"},
    "no-skip": {"skip": "none"},
    "no-resample": {"resample": False},
    "no-resample-refine-fuse": {"resample": False, "fuse": "refine-fuse"},
    "no-shift": {"shifted": False},
    "no-token": {"tokens": ()},
    "two-tokens-gelu": {"tokens": ("learned", "learned"), "activation": "gelu"},
    "deep": {"levels": "1111-111"},
    "neighbour-impl": {"attn_impl": "neighbour"},
    "before-issue-16": {"head_norm": True, "mca_proj": "shared"},
    "authors-token-path": {"tokens": ("max", "mean", "fixed"), "token_update": "block"},
    "zero-head": {"head_init": "zero"},
}


def _slide(n: int = 300, extent: float = 30.0, seed: int = 0, c: int = 16):
    rng = np.random.default_rng(seed)
    lat = to_lattice(rng.uniform(0, extent, size=(n, 2)))
    return lat, torch.as_tensor(rng.normal(size=(n, c)), dtype=torch.float32)


def _model(**kw) -> HiST:
    """A small untrained model with a random head: its output depends on its input (with the default zero
    head it would be the bias at every spot, and the symmetry tests below would hold trivially)."""
    torch.manual_seed(0)
    base = dict(in_dim=16, n_genes=7, dim=32, heads=4, dropout=0.0, attn_dropout=0.0, head_init="random")
    return HiST(HiSTConfig(**{**base, **kw}))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_forward_backward(name: str) -> None:
    model = _model(**VARIANTS[name])
    lat, feats = _slide()
    y = model(model.make_batch(lat, feats))
    assert y.shape == (len(lat), 7) and torch.isfinite(y).all()
    y.square().mean().backward()
    # The last block's token update only feeds `return_tokens` (the calibration-token analysis).
    last = f"decoder.{len(model.decoder) - 1}.{len(model.decoder[-1]) - 1}.attn."
    unused = {last + name for name in ("q_tok.weight", "q_tok.bias", "kv_tok.weight", "kv_tok.bias",
                                       "proj_tok.weight", "proj_tok.bias")}  # fmt: skip
    last_ffn = f"decoder.{len(model.decoder) - 1}.{len(model.decoder[-1]) - 1}.token_ffn."
    unused |= {n for n, _ in model.named_parameters() if n.startswith(last_ffn)}
    missing = [
        n
        for n, p in model.named_parameters()
        if n not in unused and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert not missing, f"parameters without a finite gradient: {missing}"



AUTOCAST_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", AUTOCAST_DEVICES)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_trains_under_bfloat16_autocast(name: str, device: str) -> None:
    """A CUDA training step runs under bfloat16 autocast (``TrainConfig.amp``): every variant must run,
    give finite gradients and stay close to its float32 output (here under the CPU's autocast too)."""
    model = _model(**VARIANTS[name]).to(device)
    lat, feats = _slide()
    batch = model.make_batch(lat, feats).to(device)
    y32 = model(batch)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y16 = model(batch)
    y16.float().square().mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    scale = y32.abs().max().item()
    assert (y16.float() - y32).abs().max().item() < 0.05 * scale + 0.05


def test_output_equivariant_to_row_permutation() -> None:
    model = _model().eval()
    lat, feats = _slide()
    perm = torch.randperm(len(lat), generator=torch.Generator().manual_seed(1))
    y = model(model.make_batch(lat, feats))
    y_perm = model(model.make_batch(lat[perm.numpy()], feats[perm]))
    torch.testing.assert_close(y_perm, y[perm], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positional", ["rpb", "alibi", "rope"])
def test_output_invariant_to_lattice_shifts(positional: str) -> None:
    model = _model(positional=positional).eval()
    lat, feats = _slide()
    n_levels = model.num_levels
    step = 2**n_levels * 2 * model.cfg.half_window  # a shift that maps every level's windows onto windows
    y = model(model.make_batch(lat, feats))
    for shift in ([step, 0], [0, 2 * step], [3 * step, step]):
        y2 = model(model.make_batch(lat + np.array(shift), feats))
        torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-4)


def test_non_aligned_shift_changes_windows() -> None:
    model = _model().eval()
    lat, feats = _slide()
    y = model(model.make_batch(lat, feats))
    y2 = model(model.make_batch(lat + np.array([1, 0]), feats))
    assert not torch.allclose(y, y2)


def test_head_bias_init_and_tokens() -> None:
    model = _model()
    mean = torch.linspace(0, 3, 7)
    model.init_head_bias(mean)
    torch.testing.assert_close(model.head.bias.detach(), mean)
    lat, feats = _slide()
    y, tokens = model(model.make_batch(lat, feats), return_tokens=True)
    assert tokens.shape == (1, 32)
    with pytest.raises(ValueError):
        model.init_head_bias(torch.zeros(3))


def test_config_round_trip_and_validation() -> None:
    cfg = HiSTConfig(in_dim=8, n_genes=3, tokens=("max", "mean"), positional="alibi")
    assert HiSTConfig.from_dict(cfg.to_dict()) == cfg
    assert parse_levels("111-21") == ((1, 1, 1), (2, 1))
    for bad in [{"levels": "11-21"}, {"positional": "sine"}, {"tokens": ("median",)}, {"dim": 30, "heads": 4}]:
        with pytest.raises(ValueError):
            HiSTConfig(in_dim=8, n_genes=3, **bad)
    with pytest.raises(ValueError, match="unknown keys"):
        HiSTConfig.from_dict({"in_dim": 8, "n_genes": 3, "width": 5})


def test_single_spot_and_isolated_tokens() -> None:
    model = _model().eval()
    for lat in (np.array([[0, 0]]), np.array([[0, 0], [40, 40], [80, 3]])):
        feats = torch.randn(len(lat), 16)
        y = model(model.make_batch(lat, feats))
        assert torch.isfinite(y).all()


def test_loss_falls_when_fitting_a_slide() -> None:
    model = _model()
    lat, feats = _slide()
    target = torch.tanh(feats[:, :7]) + 1.0
    batch = model.make_batch(lat, feats)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = (model(batch) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize("mode", ["ffn", "block", "level0"])
@pytest.mark.parametrize("chunk", [2048, 37])
def test_grad_checkpointing_gives_identical_gradients(mode: str, chunk: int) -> None:
    """Same gradients with recomputation; ``chunk`` 37: the recomputed FFN's backward in uneven token chunks."""
    lat, feats = _slide()
    grads = []
    for m in ("none", mode):
        model = _model()
        model.set_grad_checkpointing(m)
        for blk in model.modules():
            if hasattr(blk, "ffn_chunk"):
                blk.ffn_chunk = chunk
        model(model.make_batch(lat, feats)).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_block_recompute_replays_dropout_and_keeps_only_block_inputs() -> None:
    """``block`` (`RecomputedBlock`): with attention and residual dropout active, the recomputed forward
    draws the forward's masks, so the gradients are the plain blocks'; ``level0`` recomputes only the
    full-resolution blocks, so it keeps the level-1 blocks' activations but none of level 0's."""
    lat, feats = _slide()
    grads, saved = {}, {}
    for mode in ("none", "block", "level0"):
        model = _model(attn_dropout=0.2, residual_dropout=0.1)
        model.set_grad_checkpointing(mode)
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes: list = sizes) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        torch.manual_seed(5)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = model(model.make_batch(lat, feats))
        y.square().mean().backward()
        grads[mode] = [p.grad for p in model.parameters() if p.grad is not None]
        saved[mode] = sum(sizes)
    for mode in ("block", "level0"):
        assert len(grads[mode]) == len(grads["none"])
        for a, b in zip(grads["none"], grads[mode]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert saved["block"] < saved["level0"] < saved["none"]
    levels = {m.checkpoint for m in (*model.encoder[1], *model.decoder[0])}
    assert levels == {"none"} and {m.checkpoint for m in model.encoder[0]} == {"block"}


@pytest.mark.parametrize("name", ["paper", "authors-token-path", "two-tokens-gelu"])
def test_inference_path_matches_training_path(name: str) -> None:
    """No-grad inference (chunked FFN, in-place activation) gives the autograd path's output and tokens, and
    leaves every block's input as it was."""
    model = _model(**VARIANTS[name]).eval()
    lat, feats = _slide()
    batch = model.make_batch(lat, feats)
    y, tokens = model(batch, return_tokens=True)
    for m in model.modules():
        if hasattr(m, "ffn_chunk"):
            m.ffn_chunk = 37  # several uneven chunks
    with torch.inference_mode():
        got, got_tokens = model(batch, return_tokens=True)
        torch.testing.assert_close(got, y.detach(), rtol=1e-5, atol=1e-5)
        if tokens is not None:
            torch.testing.assert_close(got_tokens, tokens.detach(), rtol=1e-5, atol=1e-5)
        blk, level = model.encoder[0][0], batch.levels[0]
        x = torch.randn(len(lat), 32)
        t = model._initial_tokens(x)
        x0, t0 = x.clone(), None if t is None else t.clone()
        out, _ = blk(x, level, t)
        assert torch.equal(x, x0) and (t is None or torch.equal(t, t0)) and out.data_ptr() != x.data_ptr()


def test_config_saved_before_issue_16_rebuilds_the_same_model() -> None:
    """A model config saved without the options added in issue 16 describes the model of that time:
    LayerNorm before the head, MCA sharing W-MSA's q/k/v, residual dropout equal to ``dropout``."""
    new = HiSTConfig(in_dim=8, n_genes=3, dim=16, heads=2)
    old = {k: v for k, v in new.to_dict().items() if k not in ("residual_dropout", "head_norm", "mca_proj",
                                                                "token_update", "head_init")}  # fmt: skip
    legacy = HiSTConfig.from_dict(old)
    assert (legacy.head_norm, legacy.mca_proj, legacy.token_update, legacy.head_init) == (True, "shared", "attn",
                                                                                          "random")
    assert legacy.residual_dropout == legacy.dropout == 0.05
    assert isinstance(HiST(legacy).norm_out, torch.nn.LayerNorm)
    # Defaults (the paper's text): no head LayerNorm, no residual dropout, MCA with its own projections; the
    # head starts at zero (inner validation on training slides).
    assert (new.head_norm, new.residual_dropout, new.mca_proj, new.token_update) == (False, 0.0, "separate", "attn")
    assert new.head_init == "zero" and HiST(new).head.weight.abs().max() == 0
    model = HiST(new)
    assert isinstance(model.norm_out, torch.nn.Identity)
    attn = model.encoder[0][0].attn
    assert attn.kv_mca is not None and attn.q_mca is None and attn.proj_tok is None  # one token: no query


def test_zero_head_starts_at_the_training_means_and_learns() -> None:
    """head_init=zero (the default): the first prediction is the head bias (the training means) at every spot,
    whatever the input; one AdamW step moves the head's weights off zero, and from then on the backbone gets
    gradient. A config saved before the option existed rebuilds the random head it was trained with."""
    from hist_st.errors import InputError

    model = _model(head_init="zero")
    means = torch.linspace(0.1, 3.0, 7)
    model.init_head_bias(means)
    lat, feats = _slide()
    batch = model.make_batch(lat, feats)
    torch.testing.assert_close(model(batch), means.expand(len(lat), 7), rtol=0, atol=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    target = torch.randn(len(lat), 7)
    (model(batch) - target).square().mean().backward()
    assert model.in_proj.weight.grad.abs().max() == 0  # a zero head passes no gradient back yet
    opt.step()
    opt.zero_grad()
    assert model.head.weight.abs().min() > 0
    (model(batch) - target).square().mean().backward()
    assert model.in_proj.weight.grad.abs().max() > 0
    old = {k: v for k, v in HiSTConfig(in_dim=8, n_genes=3, dim=16, heads=2).to_dict().items() if k != "head_init"}
    assert HiSTConfig.from_dict(old).head_init == "random"
    with pytest.raises(InputError, match="model.head_init='ones': choose one of random, zero, small"):
        HiSTConfig(in_dim=8, n_genes=3, dim=16, heads=2, head_init="ones")
    # small: the random draw at a tenth of the other layers' std (0.02); the backbone gets gradient at once
    torch.manual_seed(0)
    big = HiST(HiSTConfig(in_dim=8, n_genes=2000, dim=64, heads=2, head_init="small"))
    assert float(big.head.weight.std()) == pytest.approx(0.002, rel=0.03)
    assert float(big.head.weight.abs().max()) < 6 * 0.002

@pytest.mark.parametrize("device", AUTOCAST_DEVICES)
def test_head_runs_in_float32_under_autocast(device: str) -> None:
    """Issue 16, item 6: under bfloat16 autocast the head still computes in float32, so predictions are
    not quantised to bfloat16's 8-bit mantissa (steps of 1/64-1/32 at log1p values 2-4)."""
    model = _model().to(device)
    model.init_head_bias(torch.linspace(2.0, 4.0, 7))
    lat, feats = _slide(n=400)
    batch = model.make_batch(lat, feats).to(device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = model(batch)
    assert y.dtype == torch.float32
    rounded = y.to(torch.bfloat16).float()
    assert not torch.equal(rounded, y)  # values between bfloat16 steps exist
    distinct = [len(torch.unique(y[:, g])) for g in range(y.shape[1])]
    assert min(distinct) > 0.9 * len(lat)


def test_residual_dropout_is_separate_from_input_dropout() -> None:
    """``residual_dropout=0`` (default) with ``dropout>0``: in training mode the blocks are deterministic;
    only the input projection's dropout is random."""
    model = _model(dropout=0.5, residual_dropout=0.0).train()
    lat, feats = _slide()
    batch = model.make_batch(lat, feats)
    x = model.in_proj(batch.feats)
    level = batch.levels[0]
    blk = model.encoder[0][0]
    tok = model._initial_tokens(x)
    a, _ = blk(x, level, tok)
    b, _ = blk(x, level, tok)
    torch.testing.assert_close(a, b)
    noisy = _model(dropout=0.0, residual_dropout=0.5).train().encoder[0][0]
    assert not torch.allclose(noisy(x, level, tok)[0], noisy(x, level, tok)[0])


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_recomputed_ffn_saves_no_hidden_layer_and_matches_autograd(activation: str) -> None:
    """Issue 15: ``grad_checkpointing="ffn"`` keeps no ``[N, 4d]`` tensor for backward, same gradients."""
    lat, feats = _slide()
    grads, shapes = [], []
    for mode in ("none", "ffn"):
        model = _model(activation=activation)
        model.set_grad_checkpointing(mode)
        seen: list[tuple[int, ...]] = []

        def pack(t: torch.Tensor, seen: list = seen) -> torch.Tensor:
            seen.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = model(model.make_batch(lat, feats))
        y.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        shapes.append(seen)
    hidden = (len(lat), 4 * 32)
    assert hidden in shapes[0] and hidden not in shapes[1]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_recomputed_ffn_under_bfloat16_autocast() -> None:
    lat, feats = _slide()
    grads = []
    for mode in ("none", "ffn"):
        model = _model()
        model.set_grad_checkpointing(mode)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            y = model(model.make_batch(lat, feats))
        y.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_forward_loss_uses_the_chunked_head_with_the_dense_value_and_gradients() -> None:
    """`forward_loss` (chunked head and loss) equals ``F.mse_loss(model(batch), target)`` and its gradients."""
    from hist_st.train.loop import forward_loss

    lat, feats = _slide()
    target = torch.randn(len(lat), 7)
    model = _model(n_genes=7)
    batch = model.make_batch(lat, feats)
    dense = torch.nn.functional.mse_loss(model(batch), target)
    g_dense = torch.autograd.grad(dense, list(model.parameters()), allow_unused=True)
    chunked = forward_loss(model, {"batch": batch, "target": target}, torch.device("cpu"), False)
    g_chunk = torch.autograd.grad(chunked, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(chunked, dense)
    for a, b in zip(g_dense, g_chunk):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bf16", [False, True])
def test_inference_by_head_halves_matches_all_heads_at_once(bf16: bool) -> None:
    """Issue 15: large-slide inference projects q, k, v and runs the window attention a quarter of the heads at
    a time; the output is the same bit for bit (in float32), and of the same dtype under bf16 autocast."""
    model = _model().eval()
    lat, feats = _slide()
    batch = model.make_batch(lat, feats)
    outs = []
    for tokens in (10**9, 1):
        for m in model.modules():
            if hasattr(m, "head_chunk_tokens"):
                m.head_chunk_tokens = tokens
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outs.append(model.trunk(batch)[0])
    assert outs[0].dtype == outs[1].dtype == (torch.bfloat16 if bf16 else torch.float32)
    if bf16:
        torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    else:
        assert torch.equal(outs[0], outs[1])


def test_batch_built_for_another_window_is_refused():
    """A batch's window partition must be the model's: its relative-position table is sized for it."""
    import numpy as np
    import pytest

    from hist_st.lattice import build_batch
    from hist_st.model import HiST, HiSTConfig

    cfg = HiSTConfig(in_dim=8, n_genes=3, dim=16, heads=2, half_window=3)
    model = HiST(cfg)
    lat = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2)
    feats = np.random.default_rng(0).normal(size=(len(lat), 8)).astype(np.float32)
    assert model(model.make_batch(lat, feats)).shape == (36, 3)
    other = build_batch(lat, feats, num_levels=model.num_levels, half_window=2, shifted=cfg.shifted)
    with pytest.raises(ValueError, match="window half-size 2 .*side 4.*needs 3 \\(side 6\\)"):
        model(other)
