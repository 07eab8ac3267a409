"""The baselines' shared training loop, batched inference and labelled variants, against plain references."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hist_st.errors import InputError
from hist_st.methods import get_method, method_option_names
from hist_st.methods.trainer import batched, fit_epochs, minibatches


def _data(n: int = 50, c: int = 4, g: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, c, generator=gen), torch.randn(n, g, generator=gen)


def _net(c: int = 4, g: int = 3) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(c, 8), torch.nn.GELU(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(8, g))


def test_fit_epochs_equals_a_plain_loop():
    """Same seed, same batches, same steps: parameters and per-epoch losses bit-identical to a loop written
    out by hand (the one mlp had before the loop was shared), dropout included."""
    x, y = _data()
    ref, net = _net(), _net()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    gen_ref, hist_ref = torch.Generator().manual_seed(3), []
    torch.manual_seed(7)
    for _ in range(4):
        ref.train()
        perm, total = torch.randperm(len(x), generator=gen_ref), 0.0
        for i in range(0, len(x), 16):
            idx = perm[i : i + 16]
            loss = F.mse_loss(ref(x[idx]), y[idx])
            opt_ref.zero_grad(set_to_none=True)
            loss.backward()
            opt_ref.step()
            total += float(loss.detach()) * len(idx)
        hist_ref.append(total / len(x))

    opt, gen = torch.optim.AdamW(net.parameters(), lr=1e-2), torch.Generator().manual_seed(3)
    torch.manual_seed(7)
    hist = fit_epochs([net], opt, lambda epoch: minibatches(torch.randperm(len(x), generator=gen), 16),
                      lambda idx: (F.mse_loss(net(x[idx]), y[idx]), len(idx)), epochs=4)
    assert hist == hist_ref
    for a, b in zip(ref.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fit_epochs_step_budget_clipping_and_callbacks():
    x, y = _data()
    net = _net()
    steps, epochs = [], []
    hist = fit_epochs([net], torch.optim.SGD(net.parameters(), lr=0.1),
                      lambda e: minibatches(torch.arange(50), 20),
                      lambda idx: (F.mse_loss(net(x[idx]), y[idx]), len(idx)), epochs=5, max_steps=4,
                      on_step=lambda v, w: steps.append(w), on_epoch=epochs.append)
    assert steps == [20, 20, 10, 20] and epochs == [0, 1] and len(hist) == 2  # the cut epoch is recorded too

    # clip_norm: one step with a huge gradient moves the parameters by lr * clip_norm in total (SGD).
    net = _net()
    before = torch.cat([p.detach().flatten() for p in net.parameters()])
    fit_epochs([net], torch.optim.SGD(net.parameters(), lr=1.0), lambda e: [torch.arange(50)],
               lambda idx: (1e6 * F.mse_loss(net(x[idx]), y[idx]), 1), epochs=1, clip_norm=0.5)
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert float((after - before).norm()) == pytest.approx(0.5, rel=1e-4)


def test_minibatches_and_batched():
    order = np.random.default_rng(0).permutation(11)
    parts = list(minibatches(order, 4))
    np.testing.assert_array_equal(np.concatenate(parts), order)
    assert [len(p) for p in parts] == [4, 4, 3]
    assert [len(p) for p in minibatches(order, 5, min_size=2)] == [5, 5]  # a single leftover spot is skipped
    x, _ = _data(n=37)
    net = _net().eval()
    with torch.no_grad():
        torch.testing.assert_close(batched(net, x, 10), net(x))
    out = batched(lambda a: a.numpy() * 2, x, 8)
    assert isinstance(out, np.ndarray) and out.shape == (37, 4)
    np.testing.assert_allclose(out, x.numpy() * 2)
    assert not batched(net, x, 10).requires_grad


@pytest.mark.parametrize(("variant", "parent", "changed"), [
    ("ridge-robust", "ridge", {"min_std": 1e-3}),
    ("stnet-lite0", "stnet", {"backbone": "efficientnet_lite0", "targets": "log1p", "select_epoch": "final"}),
])
def test_variants_keep_every_option_with_their_defaults(variant, parent, changed):
    """A labelled variant has its parent's options (the registry reads them from the signature), other
    defaults for the ones it changes, and records what it was built with."""
    assert method_option_names(variant) == method_option_names(parent)
    v, p = get_method(variant), get_method(parent)
    assert {k: v.options[k] for k in changed} == changed
    assert {k for k in v.options if v.options[k] != p.options[k]} == set(changed)
    sig = inspect.signature(type(v).__init__)
    assert {k: sig.parameters[k].default for k in changed} == changed
    first = next(iter(method_option_names(parent) & set(v.options) - set(changed)))
    assert get_method(variant, **{first: p.options[first]}).options == v.options
    with pytest.raises(TypeError):
        get_method(variant, no_such_option=1)


def test_stnet_reads_a_densenet_file_with_torchvision_keys(tmp_path):
    """A DenseNet-121 state dict saved with torchvision's old ``norm.1``-style keys (its released file) loads
    into the backbone: every feature weight equal, the classifier dropped."""
    import torchvision

    from hist_st.methods.stnet import _build_backbone

    torch.manual_seed(0)
    ref = torchvision.models.densenet121(weights=None)
    old = {k: v for k, v in ref.state_dict().items() if "num_batches_tracked" not in k}  # as in that file
    for a, b in (("norm1", "norm.1"), ("norm2", "norm.2"), ("conv1", "conv.1"), ("conv2", "conv.2")):
        old = {k.replace(a, b) if "denselayer" in k else k: v for k, v in old.items()}
    assert any(".norm.1." in k for k in old)
    torch.save(old, tmp_path / "w.pth")
    model, n = _build_backbone("densenet121", tmp_path / "w.pth")
    assert n == 1024 and isinstance(model.classifier, torch.nn.Identity)
    got = model.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith("classifier.") and "num_batches_tracked" not in k:
            torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(InputError, match="not a DenseNet-121 state dict"):
        _build_backbone("densenet121", tmp_path / "bad.pth")


def test_stnet_random_dihedral_draws_one_transform_per_image():
    """Image i gets rotation op % 4 of (mirrored when op >= 4) x[i], op drawn uniformly from 0..7."""
    from hist_st.methods.stnet import _random_dihedral

    x = torch.randn(200, 3, 5, 5)
    ops = np.random.default_rng(4).integers(0, 8, size=200)
    expected = torch.stack([torch.rot90(torch.flip(im, dims=(-1,)) if op >= 4 else im, int(op % 4),
                                        dims=(-2, -1)) for im, op in zip(x, ops)])
    torch.testing.assert_close(_random_dihedral(x, np.random.default_rng(4)), expected, rtol=0, atol=0)
    assert set(ops.tolist()) == set(range(8))
    # The input's memory layout is kept (patches arrive channels-last; a CNN's rounding depends on it).
    cl = x.to(memory_format=torch.channels_last)
    assert _random_dihedral(cl, np.random.default_rng(4)).stride() == cl.stride()
