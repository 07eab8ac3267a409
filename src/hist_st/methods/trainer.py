"""The training loop the neural baselines share (mlp, bleep, stnet, stflow) and their batched inference;
each method keeps its own model, loss, optimiser and batches.

```python
gen = torch.Generator().manual_seed(seed)
history = fit_epochs([net], torch.optim.AdamW(net.parameters()), shuffled(n, 256, gen),
                     lambda idx: (F.mse_loss(net(x[idx]), y[idx]), len(idx)), epochs=50)
pred = batched(net, x, 4096)                # [N, G], no gradients
```
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

__all__ = ["fit_epochs", "minibatches", "shuffled", "batched"]

B = TypeVar("B")


def minibatches(order: torch.Tensor | np.ndarray, size: int, min_size: int = 1) -> Iterator[Any]:
    """Consecutive slices of ``order`` (a permutation of spot indices ``[N]``) of ``size`` items; a last
    slice shorter than ``min_size`` is skipped."""
    for i in range(0, len(order), size):
        if len(order[i : i + size]) >= min_size:
            yield order[i : i + size]


def shuffled(n: int, size: int, gen: torch.Generator | np.random.Generator,
             min_size: int = 1) -> Callable[[int], Iterator[Any]]:
    """``epoch -> minibatches`` of a permutation of ``range(n)`` drawn from ``gen`` at the start of each epoch
    (``torch.randperm`` on a torch generator, ``permutation`` on a numpy one), as `fit_epochs` takes them."""
    if isinstance(gen, torch.Generator):
        return lambda epoch: minibatches(torch.randperm(n, generator=gen), size, min_size)
    return lambda epoch: minibatches(gen.permutation(n), size, min_size)


def fit_epochs(
    modules: Sequence[nn.Module], opt: torch.optim.Optimizer, batches: Callable[[int], Iterable[B]],
    loss_fn: Callable[[B], tuple[torch.Tensor, int]], *, epochs: int, max_steps: int | None = None,
    clip_norm: float | None = None, on_step: Callable[[float, int], None] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> list[float]:
    """Train ``modules`` for ``epochs`` epochs (or until ``max_steps`` optimiser steps).

    Args:
        modules: What `opt` updates; put in train mode at the start of every epoch.
        opt: The optimiser.
        batches: ``epoch -> iterable of batches``, called at the start of each epoch (its random draws
            happen there and while iterating, in that order).
        loss_fn: ``batch -> (scalar loss, weight)``; the weight (e.g. the batch's spot count) weighs the
            step's loss in the epoch's mean.
        epochs: Number of epochs.
        max_steps: Stop after this many optimiser steps in all (None: every epoch runs in full).
        clip_norm: Clip the gradient norm of ``modules``' parameters to this before each step.
        on_step: Called after each step with ``(loss, weight)``.
        on_epoch: Called with the epoch index after each epoch (also the one cut short by ``max_steps``).

    Returns:
        Per epoch run, the weighted mean of its steps' losses.
    """
    params = [p for m in modules for p in m.parameters()]
    history: list[float] = []
    step = 0
    for epoch in range(epochs):
        for m in modules:
            m.train()
        total, weight = 0.0, 0
        for batch in batches(epoch):
            loss, w = loss_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            opt.step()
            value = float(loss.detach())
            total, weight, step = total + value * w, weight + w, step + 1
            if on_step is not None:
                on_step(value, w)
            if max_steps is not None and step >= max_steps:
                break
        history.append(total / max(weight, 1))
        if on_epoch is not None:
            on_epoch(epoch)
        if max_steps is not None and step >= max_steps:
            break
    return history


@torch.no_grad()
def batched(fn: Callable[[Any], Any], x: Any, size: int) -> Any:
    """``fn`` applied to ``x`` ``[N, ...]`` in slices of ``size`` rows without gradients; the outputs
    (tensors or arrays ``[n, ...]``) concatenated along the first axis to ``[N, ...]``."""
    parts = [fn(x[i : i + size]) for i in range(0, len(x), size)]
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)
