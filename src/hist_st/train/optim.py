"""AdamW without torch's compile machinery: the same update, 0.18 GB less memory per training process.

`torch.optim.AdamW.step` and four `Optimizer` methods are wrapped so that `torch.compile` skips them;
the wrappers import ``torch._dynamo`` (and with it ``sympy``) on their first call, 0.18-0.19 GB of Python
modules in every training process (`docs/results/speed.md`). `LeanAdamW` calls the same methods
without those wrappers: the update is bit for bit torch's (fused kernel included), its state dict is
AdamW's, and nothing of ``torch._dynamo`` is imported. Where this torch has no such wrappers,
`make_adamw` returns a plain `torch.optim.AdamW`.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["LeanAdamW", "make_adamw"]

_OPTIMIZER_METHODS = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


def _unwrapped(owner: type, name: str):
    return getattr(getattr(owner, name, None), "__wrapped__", None)


def _available() -> bool:
    return all(_unwrapped(torch.optim.Optimizer, m) for m in _OPTIMIZER_METHODS) and bool(
        _unwrapped(torch.optim.AdamW, "step")
    )


class LeanAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` whose methods skip the compile-time wrappers (see the module docstring)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:  # noqa: D102
        _unwrapped(torch.optim.Optimizer, "add_param_group")(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        _unwrapped(torch.optim.Optimizer, "zero_grad")(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return _unwrapped(torch.optim.Optimizer, "state_dict")(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        _unwrapped(torch.optim.Optimizer, "load_state_dict")(self, state_dict)

    def step(self, closure=None):  # noqa: D102
        with torch.no_grad():  # what the skipped wrapper sets (AdamW is not differentiable here)
            return _unwrapped(torch.optim.AdamW, "step")(self, closure)


def make_adamw(params, **kwargs: Any) -> torch.optim.AdamW:
    """`LeanAdamW` where this torch allows it, else `torch.optim.AdamW` (same arguments)."""
    if _available() and not kwargs.get("differentiable", False):
        return LeanAdamW(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)
