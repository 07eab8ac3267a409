"""The prediction head and the MSE loss computed gene chunk by gene chunk (memory, issue 15).

A dense head and loss keep the ``[N, G]`` predictions, the difference to the target and their gradient
alive (at N = 5,000 spots and 2,000 genes 40 MB each, at N = 100,000 0.8 GB each). `head_loss` computes
the same mean squared error one chunk of ``chunk`` genes at a time, so only ``[N, chunk]`` tensors ever
exist: without ``transform`` each chunk's gradients are made in forward (`_SSEGradInForward`, three
products per chunk); with one, each chunk's predictions are recomputed in backward (`_RecomputedSSE`).

```python
from hist_st.train.loss import head_loss
feats = model.features(batch)                             # [N, D] float32, after the final norm
loss = head_loss(feats, model.head, target)               # == F.mse_loss(model(batch), target)
loss = head_loss(feats, model.head, coarse, transform=aggregate)   # supervise an aggregation [M, G]
```
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hist_st.model.head import chunked_head

__all__ = ["head_loss", "chunked_head"]  # chunked_head: hist_st.model.head, re-exported


def _chunk_sse(
    features: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    transform: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    """Sum of squared errors of one gene chunk: ``sum((transform(features W^T + b) - target)^2)``."""
    with torch.autocast(device_type=features.device.type, enabled=False):  # float32 even under autocast
        pred = F.linear(features.float(), weight.float(), None if bias is None else bias.float())  # [N, c]
        if transform is not None:
            pred = transform(pred)  # [M, c]
    if pred.shape != target.shape:
        raise ValueError(f"head_loss: the (transformed) prediction chunk has shape {tuple(pred.shape)}, "
                         f"the target chunk {tuple(target.shape)}")
    return (pred - target.float()).square().sum()


class _RecomputedSSE(torch.autograd.Function):
    """`_chunk_sse` that keeps only its inputs and recomputes the chunk's predictions in backward.

    (`torch.utils.checkpoint` would do the same, but its non-reentrant form imports ``torch._dynamo`` and
    ``sympy``, 0.18 GB of modules, on its first call.)
    """

    @staticmethod
    def forward(ctx, features, weight, bias, target, transform):  # noqa: D102
        ctx.transform = transform
        ctx.has_bias = bias is not None
        ctx.save_for_backward(features, weight, bias if bias is not None else weight.new_empty(0), target)
        return _chunk_sse(features, weight, bias, target, transform)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        features, weight, bias, target = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.enable_grad():
            f = features.detach().requires_grad_(need[0])
            w = weight.detach().requires_grad_(need[1])
            b = bias.detach().requires_grad_(need[2]) if ctx.has_bias else None
            sse = _chunk_sse(f, w, b, target, ctx.transform)
            wanted = [t for t, n in zip((f, w, b), need[:3]) if n and t is not None]
            got = iter(torch.autograd.grad(sse, wanted, grad)) if wanted else iter(())
        out = [next(got) if n and t is not None else None for t, n in zip((f, w, b), need[:3])]
        return (*out, None, None)


class _SSEGradInForward(torch.autograd.Function):
    """The whole head's sum of squared errors, gene chunk by gene chunk, with its gradients made in forward.

    The loss is the graph's last operation, so ``d sse / d pred = 2 (pred - target)`` is known as soon as a
    chunk's predictions are: each chunk's input, weight and bias gradients are accumulated at once and the
    chunk is dropped, and backward only scales them by the incoming gradient. That is three products per
    chunk (prediction, input gradient, weight gradient) instead of `_RecomputedSSE`'s four, and still no
    ``[N, G]`` tensor; the held gradients (``[N, D]`` and ``[G, D]``) replace the saved inputs.
    """

    @staticmethod
    def forward(ctx, features, weight, bias, target, chunk):  # noqa: D102
        need = ctx.needs_input_grad
        with torch.autocast(device_type=features.device.type, enabled=False):  # float32 even under autocast
            x, w = features.float(), weight.float()
            b = None if bias is None else bias.float()
            dx = torch.zeros_like(x) if need[0] else None
            dw = torch.empty_like(w) if need[1] else None
            db = torch.empty_like(b) if b is not None and need[2] else None
            total = x.new_zeros(())
            for start in range(0, w.shape[0], chunk):
                sl = slice(start, min(start + chunk, w.shape[0]))
                diff = F.linear(x, w[sl], None if b is None else b[sl]).sub_(target[:, sl].float())  # [N, c]
                total = total + diff.square().sum()
                diff.mul_(2.0)  # d sse / d pred
                if dx is not None:
                    dx.addmm_(diff, w[sl])
                if dw is not None:
                    torch.mm(diff.t(), x, out=dw[sl])
                if db is not None:
                    torch.sum(diff, 0, out=db[sl])
        ctx.grads = (dx, dw, db)
        ctx.dtypes = (features.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if ctx.grads is None:  # freed by the first backward
            raise RuntimeError("head_loss: a second backward through the same loss (retain_graph=True) is not "
                               "supported; compute the loss again")
        out = [None if g is None else (g * grad).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return (*out, None, None)


def head_loss(
    features: Tensor,
    head: nn.Linear,
    target: Tensor,
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    chunk: int = 256,
) -> Tensor:
    """Mean squared error of ``transform(head(features))`` against ``target``, gene chunk by gene chunk.

    For each chunk ``c`` of the head's output genes the float32 log1p prediction ``head(features)[:, c]``
    goes through ``transform`` and its squared error against ``target[:, c]`` is summed; the result is
    the mean over all ``M * G`` entries, equal to ``F.mse_loss(transform(head(features)), target)``.
    No ``[N, G]`` tensor is kept (see the module docstring); gradients flow to ``features``,
    ``head.weight`` and ``head.bias`` (``transform`` is a fixed map: parameters inside it receive no
    gradient).

    Args:
        features: ``[N, D]`` features after the final norm (any float dtype; the head runs in float32).
        head: The ``Linear(D, G)`` prediction head.
        target: ``[M, G]`` log1p targets.
        transform: Maps a prediction chunk ``[N, c]`` to ``[M, c]``, acting on each column alike (e.g. a
            sum over the spots of each coarse region); identity (``M = N``) when None.
        chunk: Genes per chunk.

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: ``chunk < 1``, or the shapes do not match.
    """
    if chunk < 1:
        raise ValueError(f"head_loss: chunk must be >= 1, got {chunk}")
    genes = head.out_features
    if target.dim() != 2 or target.shape[1] != genes:
        raise ValueError(f"head_loss: target has shape {tuple(target.shape)}, expected [M, {genes}]")
    if features.dim() != 2 or features.shape[1] != head.in_features:
        raise ValueError(f"head_loss: features have shape {tuple(features.shape)}, "
                         f"expected [N, {head.in_features}]")
    needs_grad = torch.is_grad_enabled() and (
        features.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    if needs_grad and transform is None and genes > chunk:
        sse = _SSEGradInForward.apply(features, head.weight, head.bias, target, chunk)
        return sse / (target.shape[0] * genes)
    total = features.new_zeros((), dtype=torch.float32)
    for start in range(0, genes, chunk):
        sl = slice(start, min(start + chunk, genes))
        bias = None if head.bias is None else head.bias[sl]
        args = (features, head.weight[sl], bias, target[:, sl], transform)
        if needs_grad and genes > chunk:
            sse = _RecomputedSSE.apply(*args)
        else:
            sse = _chunk_sse(*args)
        total = total + sse
    return total / (target.shape[0] * genes)
