"""The chunked head and loss (`hist_st.train.loss`) against the plain dense head and MSE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hist_st.train.loss import chunked_head, head_loss


def _setup(n=37, d=12, g=50, seed=0):
    torch.manual_seed(seed)
    head = nn.Linear(d, g)
    feats = torch.randn(n, d, requires_grad=True)
    return feats, head


def _grads(loss, feats, head):
    return torch.autograd.grad(loss, [feats, head.weight, head.bias])


@pytest.mark.parametrize("chunk", [1, 7, 16, 50, 256])
def test_head_loss_equals_dense_mse_and_its_gradients(chunk):
    feats, head = _setup()
    target = torch.randn(37, 50).abs()
    dense = F.mse_loss(head(feats), target)
    chunked = head_loss(feats, head, target, chunk=chunk)
    torch.testing.assert_close(chunked, dense, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(chunked, feats, head), _grads(dense, feats, head)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_head_loss_with_a_scatter_sum_transform():
    feats, head = _setup(n=40)
    region = torch.arange(40) % 6  # 40 spots summed into 6 coarse regions
    target = torch.randn(6, 50)

    def aggregate(pred):  # [N, c] -> [6, c], column-wise
        return torch.zeros(6, pred.shape[1]).index_add(0, region, pred)

    dense = F.mse_loss(aggregate(head(feats)), target)
    chunked = head_loss(feats, head, target, transform=aggregate, chunk=8)
    torch.testing.assert_close(chunked, dense, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(chunked, feats, head), _grads(dense, feats, head)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_head_loss_keeps_no_full_prediction_for_backward():
    """The saved tensors of the autograd graph hold no [N, G] tensor (only [N, chunk] in backward)."""
    feats, head = _setup(n=64, d=8, g=120)
    target = torch.randn(64, 120)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = head_loss(feats, head, target, chunk=30)
    assert (64, 120) not in shapes
    loss.backward()  # still differentiable
    assert feats.grad is not None and head.weight.grad.shape == (120, 8)


def test_head_loss_float32_under_bf16_autocast():
    feats, head = _setup()
    target = torch.randn(37, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_loss(feats, head, target, chunk=16)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.mse_loss(head(feats), target), rtol=1e-6, atol=1e-6)


def test_head_loss_rejects_bad_shapes():
    feats, head = _setup()
    with pytest.raises(ValueError, match="target has shape"):
        head_loss(feats, head, torch.zeros(37, 49))
    with pytest.raises(ValueError, match="chunk must be"):
        head_loss(feats, head, torch.zeros(37, 50), chunk=0)
    with pytest.raises(ValueError, match="prediction chunk has shape"):
        head_loss(feats, head, torch.zeros(5, 50), transform=lambda p: p[:4])


def test_chunked_head_equals_dense_head():
    feats, head = _setup(n=101)
    norm = nn.LayerNorm(12)
    with torch.no_grad():
        dense = head(norm(feats))
        torch.testing.assert_close(chunked_head(feats, head, norm, rows=10), dense)
        torch.testing.assert_close(chunked_head(feats.bfloat16(), head, None, rows=7),
                                   head(feats.bfloat16().float()))  # fmt: skip


@pytest.mark.parametrize("need", ["all", "head", "features"])
def test_head_loss_gradients_made_in_forward_match_autograd(need):
    """The chunked path without a transform (gradients made in forward) against the dense head, for each set
    of inputs that needs a gradient, without a bias, and with bfloat16 features (bfloat16 gradient)."""
    feats, head = _setup(n=41, d=10, g=33, seed=3)
    target = torch.randn(41, 33)
    feats.requires_grad_(need != "head")
    head.requires_grad_(need != "features")
    wanted = [t for t in (feats, head.weight, head.bias) if t.requires_grad]
    got = torch.autograd.grad(head_loss(feats, head, target, chunk=8) * 3.0, wanted)
    ref = torch.autograd.grad(F.mse_loss(head(feats), target) * 3.0, wanted)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    nobias = nn.Linear(10, 33, bias=False)
    half = feats.detach().bfloat16().requires_grad_()
    (g,) = torch.autograd.grad(head_loss(half, nobias, target, chunk=8), [half])
    (r,) = torch.autograd.grad(F.mse_loss(nobias(half.float()), target), [half])
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g, r)


def test_head_loss_costs_three_head_products():
    """Forward and backward of the chunked head cost three ``N x D x G`` products (prediction, input and
    weight gradients), not the four of a recomputing backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        macs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mm", "addmm", "addmm_"):
                a, b = args[-2:] if name != "mm" else args[:2]
                self.macs += a.shape[0] * a.shape[1] * b.shape[1]
            return func(*args, **(kwargs or {}))

    n, d, g = 64, 16, 40
    feats, head = _setup(n=n, d=d, g=g)
    with CountMatmuls() as counter:
        head_loss(feats, head, torch.randn(n, g), chunk=8).backward()
    assert counter.macs == 3 * n * d * g


def test_head_loss_refuses_a_second_backward_clearly():
    feats, head = _setup(g=60)
    loss = head_loss(feats, head, torch.randn(37, 60), chunk=16)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
