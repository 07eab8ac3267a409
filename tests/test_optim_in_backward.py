"""`optimizer_in_backward`: each parameter updated during backward gives the ordinary step's parameters bit
for bit (with the schedule and across a resume), and combinations that need whole gradients are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hist_st.errors import InputError
from hist_st.model import HiST, HiSTConfig
from hist_st.train import load_config, train
from hist_st.train.config import TrainConfig
from hist_st.train.distributed import DistInfo
from hist_st.train.loop import build_optimizer, finish_step, forward_loss, step_in_backward
from hist_st.train.toy import write_toy_cohort

CPU = torch.device("cpu")


def _model() -> HiST:
    torch.manual_seed(0)
    # 300 genes: two loss chunks; a random head, so that the first step's gradients reach every parameter
    return HiST(HiSTConfig(in_dim=8, n_genes=300, dim=16, heads=2, head_init="random"))


def _items(model: HiST, steps: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    lat = np.stack(np.meshgrid(np.arange(14), np.arange(14)), -1).reshape(-1, 2)
    return [{"batch": model.make_batch(lat, torch.randn(196, 8, generator=g)),
             "target": torch.rand(196, 300, generator=g) * 3} for _ in range(steps)]  # fmt: skip


def _run(model, opt, sched, items, in_backward: bool) -> list[float]:
    hooks = step_in_backward(opt, TrainConfig(optimizer_in_backward=in_backward))
    torch.manual_seed(2)  # the input dropout's draws
    losses = []
    for item in items:
        loss = forward_loss(model, item, CPU, False)
        loss.backward()
        if in_backward:  # every gradient was consumed and freed during backward
            assert all(p.grad is None for p in model.parameters())
        finish_step(model, opt, sched, in_backward=hooks is not None)
        losses.append(float(loss.detach()))
    if hooks is not None:
        hooks.remove()
    return losses


def _assert_same(a: HiST, b: HiST, opt_a, opt_b) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k, state in sb["state"].items():
        for key, value in state.items():
            assert torch.equal(sa["state"][k][key], value), (k, key)


def test_bit_identical_to_the_ordinary_step_with_the_schedule():
    ref, lean = _model(), _model()
    items = _items(ref, 4)
    opt_r, sched_r = build_optimizer(ref, TrainConfig(lr=1e-2), 6)
    opt_l, sched_l = build_optimizer(lean, TrainConfig(lr=1e-2), 6)
    losses_r = _run(ref, opt_r, sched_r, items, in_backward=False)
    losses_l = _run(lean, opt_l, sched_l, items, in_backward=True)
    assert losses_l == losses_r and losses_r[-1] != losses_r[0]  # the parameters moved
    assert sched_l.get_last_lr() == sched_r.get_last_lr()
    _assert_same(lean, ref, opt_l, opt_r)


def test_resume_from_an_ordinary_state_continues_bit_identically():
    ref, lean = _model(), _model()
    items = _items(ref, 4)
    opt_r, sched_r = build_optimizer(ref, TrainConfig(lr=1e-2), 6)
    _run(ref, opt_r, sched_r, items[:2], in_backward=False)
    saved = {"model": {k: v.clone() for k, v in ref.state_dict().items()},
             "opt": opt_r.state_dict(), "sched": sched_r.state_dict()}  # fmt: skip
    saved["opt"] = {"state": {k: {n: t.clone() for n, t in s.items()} for k, s in saved["opt"]["state"].items()},
                    "param_groups": saved["opt"]["param_groups"]}  # fmt: skip
    torch.manual_seed(3)
    for item in items[2:]:
        forward_loss(ref, item, CPU, False).backward()
        finish_step(ref, opt_r, sched_r)
    opt_l, sched_l = build_optimizer(lean, TrainConfig(lr=1e-2), 6)
    hooks = step_in_backward(opt_l, TrainConfig(optimizer_in_backward=True))  # attached before loading, as train()
    lean.load_state_dict(saved["model"])
    opt_l.load_state_dict(saved["opt"])  # replaces the group dicts: the hooks must follow
    sched_l.load_state_dict(saved["sched"])
    torch.manual_seed(3)
    for item in items[2:]:
        forward_loss(lean, item, CPU, False).backward()
        finish_step(lean, opt_l, sched_l, in_backward=True)
    hooks.remove()
    _assert_same(lean, ref, opt_l, opt_r)


def test_removed_hooks_leave_the_gradients():
    model = _model()
    opt, sched = build_optimizer(model, TrainConfig(), 2)
    hooks = step_in_backward(opt, TrainConfig(optimizer_in_backward=True))
    hooks.remove()
    before = [p.clone() for p in model.parameters()]
    forward_loss(model, _items(model, 1)[0], CPU, False).backward()
    assert model.head.weight.grad is not None and model.in_proj.weight.grad is not None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_combinations_needing_whole_gradients_are_refused():
    with pytest.raises(InputError, match="slides_per_step=2"):
        TrainConfig(optimizer_in_backward=True, slides_per_step=2)
    opt, _ = build_optimizer(_model(), TrainConfig(), 2)
    with pytest.raises(InputError, match="2 processes must average their gradients"):
        step_in_backward(opt, TrainConfig(optimizer_in_backward=True), DistInfo(world_size=2))
    assert step_in_backward(opt, TrainConfig(), DistInfo(world_size=2)) is None


def test_train_gives_the_same_model(tmp_path):
    cohort = write_toy_cohort(tmp_path / "toy", n_slides=2, n_spots=100, n_genes=12, dim=16)
    base = ["model.dim=16", "model.heads=2", "progress=false", "genes.n_top=8", "epochs=2", "lr=1e-3"]
    ref = train(load_config(None, base), cohort)
    lean = train(load_config(None, [*base, "optimizer_in_backward=true"]), cohort)
    assert lean.step_losses == ref.step_losses
    for a, b in zip(lean.bundle.model.state_dict().values(), ref.bundle.model.state_dict().values()):
        assert torch.equal(a, b)


def test_bench_speed_measures_the_option():
    from hist_st.bench.speed import SpeedSettings, measure

    r = measure(SpeedSettings(spots=200, genes=300, mode="train", in_dim=8, threads=1, repeats=1,
                              model={"dim": 16, "heads": 2}, train={"optimizer_in_backward": True}))  # fmt: skip
    assert r["train"] == {"optimizer_in_backward": True} and r["seconds"] > 0 and r["peak_rss_gb"] > 0
