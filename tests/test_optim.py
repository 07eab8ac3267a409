"""`LeanAdamW`: torch's AdamW update bit for bit, its state dict, and no ``torch._dynamo`` import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hist_st.train.optim import LeanAdamW, make_adamw


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))


@pytest.mark.parametrize("fused", [True, False])
def test_same_updates_and_state_as_torch_adamw(fused):
    a, b = _model(), _model()
    groups = lambda m: [{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.1},  # noqa: E731
                        {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    lean = make_adamw(groups(a), lr=1e-2, betas=(0.9, 0.99), fused=fused)
    ref = torch.optim.AdamW(groups(b), lr=1e-2, betas=(0.9, 0.99), fused=fused)
    assert isinstance(lean, LeanAdamW)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(lean, 5)
    sched_ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref, 5)
    x = torch.randn(4, 6)
    for _ in range(4):
        for m, opt, s in ((a, lean, sched), (b, ref, sched_ref)):
            m(x).square().mean().backward()
            opt.step()
            s.step()
            opt.zero_grad(set_to_none=True)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    sa, sb = lean.state_dict(), ref.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sb["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa["state"][k][name], sb["state"][k][name])
    c = _model()
    other = make_adamw(groups(c), lr=1e-2, fused=fused)
    other.load_state_dict(sb)  # an AdamW state (e.g. an older resume.pt) loads
    assert torch.equal(other.state_dict()["state"][0]["exp_avg"], sb["state"][0]["exp_avg"])


@pytest.mark.parametrize("mode", ["ffn", "block"])
def test_no_dynamo_import_in_a_training_process(mode):
    """A HiST train step (chunked loss over several gene chunks, recomputed FFN or blocks, AdamW, schedule)
    imports no ``torch._dynamo`` (0.18 GB of modules)."""
    code = (
        "import sys, numpy as np, torch\n"
        "from hist_st.model import HiST, HiSTConfig\n"
        "from hist_st.train.config import TrainConfig\n"
        "from hist_st.train.loop import build_optimizer, forward_loss\n"
        "m = HiST(HiSTConfig(in_dim=8, n_genes=600, dim=16, heads=2)); m.set_grad_checkpointing(MODE)\n"
        "o, s = build_optimizer(m, TrainConfig(), 3)\n"
        "lat = np.stack(np.meshgrid(np.arange(12), np.arange(12)), -1).reshape(-1, 2)\n"
        "item = {'batch': m.make_batch(lat, torch.randn(144, 8)), 'target': torch.randn(144, 600)}\n"
        "forward_loss(m, item, torch.device('cpu'), False).backward(); o.step(); s.step(); o.zero_grad()\n"
        "o.state_dict()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code.replace("MODE", repr(mode))], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "False"
