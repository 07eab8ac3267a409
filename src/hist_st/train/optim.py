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

__all__ = ["LeanAdamW", "OptimizerInBackward", "make_adamw"]

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


class OptimizerInBackward:
    """Step each parameter as soon as backward has accumulated its gradient, then free that gradient.

    A hook (`torch.Tensor.register_post_accumulate_grad_hook`) runs ``optimizer``'s update on the one
    parameter whose gradient is complete and sets its ``.grad`` to None, so the gradients of the whole model
    (0.134 GB for the default model) never exist at once. The update is the optimiser's own (its ``step``
    on a one-parameter view of the parameter's group: same hyper-parameters, same state), so a run gives
    the same parameters bit for bit as ``backward(); optimizer.step()``; the learning-rate schedule, the
    state dict and resuming work as before. Gradients are gone after backward: this cannot be combined
    with anything that reads or accumulates them between backward and the step (gradient accumulation
    over several slides, gradient averaging across processes, clipping); `hist_st.train.loop` refuses
    those combinations.

    ```python
    opt = make_adamw(groups, lr=1e-4)
    hooks = OptimizerInBackward(opt)          # every parameter of opt
    loss.backward()                           # parameters are updated during this call
    sched.step(); opt.zero_grad(set_to_none=True)
    hooks.remove()                            # back to the ordinary step
    ```

    Args:
        optimizer: Any `torch.optim.Optimizer` whose ``step`` skips parameters without a gradient.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        # Group positions, not the group dicts: `load_state_dict` replaces the dicts (a resumed run).
        self._group_of = {p: i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self._handles = [p.register_post_accumulate_grad_hook(self._step)
                         for p in self._group_of if p.requires_grad]

    @torch.no_grad()
    def _step(self, param: torch.Tensor) -> None:
        opt = self.optimizer
        groups = opt.param_groups
        opt.param_groups = [{**groups[self._group_of[param]], "params": [param]}]  # this parameter only
        try:
            opt.step()
        finally:
            opt.param_groups = groups
        param.grad = None

    def remove(self) -> None:
        """Remove the hooks: gradients accumulate again until ``optimizer.step()``."""
        for h in self._handles:
            h.remove()
        self._handles = []
