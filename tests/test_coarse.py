"""Coarse supervision (super-resolution training): the aggregated loss against brute force, blocks, data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from hist_st.errors import InputError
from hist_st.train.coarse import (
    CoarseAugmentedSlides,
    block_factor,
    block_groups,
    coarse_head_bias,
    coarse_log1p,
    coarse_loss,
    coarse_transform,
    coarsen_slide,
)


def _brute_loss(pred: torch.Tensor, groups: list[int], target: torch.Tensor) -> torch.Tensor:
    """Per coarse spot and gene, a Python loop: log1p(sum of expm1 of the members) vs the target."""
    terms = []
    for m in range(target.shape[0]):
        for g in range(target.shape[1]):
            total = sum(torch.expm1(pred[i, g]) for i in range(len(groups)) if groups[i] == m)
            total = total if isinstance(total, torch.Tensor) else torch.tensor(0.0, dtype=pred.dtype)
            terms.append((torch.log1p(torch.clamp(total, min=-1 + 1e-6)) - target[m, g]) ** 2)
    return torch.stack(terms).mean()


@pytest.mark.parametrize("seed", [0, 1])
def test_coarse_loss_matches_a_per_spot_loop_values_and_gradients(seed):
    rng = np.random.default_rng(seed)
    n, m, g = 30, 7, 5
    groups = rng.integers(-1, m, n)
    groups[:m] = np.arange(m)  # every coarse spot has a member; some tokens (-1) have none
    pred = torch.tensor(rng.uniform(-0.5, 3.0, (n, g)), dtype=torch.float64, requires_grad=True)
    target = torch.tensor(rng.uniform(0, 5, (m, g)), dtype=torch.float64)
    loss = coarse_loss(pred, torch.from_numpy(groups), target)
    (grad,) = torch.autograd.grad(loss, pred)
    pred2 = pred.detach().clone().requires_grad_(True)
    ref = _brute_loss(pred2, groups.tolist(), target)
    (grad_ref,) = torch.autograd.grad(ref, pred2)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    assert torch.allclose(grad, grad_ref, rtol=1e-10, atol=1e-14)
    assert torch.all(grad[torch.from_numpy(groups < 0)] == 0)  # tokens of no coarse spot get no gradient


def test_one_member_per_spot_is_the_ordinary_loss():
    rng = np.random.default_rng(2)
    pred = torch.tensor(rng.normal(1.0, 1.0, (40, 6)), dtype=torch.float64, requires_grad=True)  # negatives too
    target = torch.tensor(rng.uniform(0, 4, (40, 6)), dtype=torch.float64)
    perm = rng.permutation(40)
    loss = coarse_loss(pred, torch.from_numpy(np.argsort(perm)), target[np.argsort(np.argsort(perm))])
    # token i -> coarse spot argsort(perm)[i]; targets reordered so each token meets its own row again
    ordinary = F.mse_loss(pred, target)
    g1, g2 = torch.autograd.grad(loss, pred)[0], torch.autograd.grad(ordinary, pred)[0]
    assert float(loss.detach()) == pytest.approx(float(ordinary.detach()), rel=1e-12)
    assert torch.allclose(g1, g2, rtol=1e-10)


def test_transform_is_column_wise():
    rng = np.random.default_rng(3)
    groups = torch.from_numpy(rng.integers(0, 5, 25))
    groups[:5] = torch.arange(5)
    pred = torch.tensor(rng.uniform(0, 2, (25, 8)))
    t = coarse_transform(groups, 5)
    full = t(pred)
    assert full.shape == (5, 8)
    assert torch.allclose(torch.cat([t(pred[:, :3]), t(pred[:, 3:])], 1), full)


def test_block_groups_against_a_dictionary():
    rng = np.random.default_rng(4)
    lat = np.unique(rng.integers(0, 9, (60, 2)), axis=0)
    groups, n_children = block_groups(lat, 2)
    blocks = {}
    for i, (a, b) in enumerate(lat):
        blocks.setdefault((a // 2, b // 2), []).append(i)
    assert len(n_children) == len(blocks) and n_children.sum() == len(lat) and n_children.max() <= 4
    for members in blocks.values():
        assert len(set(groups[members])) == 1 and n_children[groups[members[0]]] == len(members)
    assert block_groups(lat, 1)[1].max() == 1


def test_coarse_targets_and_head_bias():
    counts = sp.csr_matrix(np.array([[1, 0], [3, 2], [5, 5], [0, 7]], dtype=np.float32))
    groups = np.array([0, 0, 1, -1])
    t = coarse_log1p(counts, groups, 2)
    assert np.allclose(t, np.log1p([[4, 2], [5, 5]]))
    # members of equal count c: the bias is log1p(c)
    bias = coarse_head_bias(torch.log1p(torch.tensor([[8.0, 4.0], [2.0, 6.0]])), torch.tensor([4, 2]))
    expected = (torch.log1p(torch.tensor([2.0, 1.0])) + torch.log1p(torch.tensor([1.0, 3.0]))) / 2
    assert torch.allclose(bias, expected)


def test_supervise_option_is_validated():
    from hist_st.train import load_config

    assert block_factor("spot") == 1 and block_factor("coarse3") == 3
    assert load_config(None, ["supervise=coarse2"]).supervise == "coarse2"
    for bad in ("coarse1", "fine", "coarse"):
        with pytest.raises(InputError, match="supervise must be 'spot'"):
            load_config(None, [f"supervise={bad}"])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from hist_st.train.data import load_slides
    from hist_st.train.toy import write_toy_cohort

    folder = write_toy_cohort(tmp_path_factory.mktemp("coarse") / "toy", n_slides=3, n_spots=80, n_genes=10, dim=16)
    return folder, load_slides(folder)


def test_coarsen_slide_sums_counts_and_measures_a_coarser_grid(toy):
    _, slides = toy
    s = slides[0]
    c, groups = coarsen_slide(s, 2)
    dense = s.counts.toarray()
    for m in range(c.n_spots):
        assert np.allclose(c.counts.toarray()[m], dense[groups == m].sum(0))
        for name, e in s.embeddings.items():
            assert np.allclose(c.embeddings[name][m], e[groups == m].mean(0), atol=1e-5)
    assert c.meta["spot_grid"]["pitch_um"] == pytest.approx(2 * s.spot_pitch_um, rel=0.02)
    assert c.lattice_unit_um == pytest.approx(c.meta["spot_grid"]["pitch_um"])
    # block centres: each spot lies within one fine pitch (diagonal) of its block's centre
    d_um = np.linalg.norm(s.spatial - c.spatial[groups], axis=1) * s.um_per_px
    assert d_um.max() < 0.75 * s.spot_pitch_um


def test_augmented_items_drop_whole_coarse_spots(toy):
    from hist_st.train.coarse import coarse_slide_data
    from hist_st.train.config import AugmentConfig
    from hist_st.train.data import StepKey

    _, slides = toy
    genes = [str(g) for g in slides[0].genes[:4]]
    d = coarse_slide_data(slides[0], genes, next(iter(slides[0].embeddings)), 2)
    ds = CoarseAugmentedSlides([d], AugmentConfig(dropout=0.5, min_spots=4), lambda lat, f: (lat, f))
    item = ds[StepKey(0, 0, 1.0, 0)]
    lat, feats = item["batch"]
    groups, target = item["groups"].numpy(), item["target"]
    assert len(groups) == len(feats) == item["n_kept"] < d.n_spots  # some coarse spots dropped
    assert sorted(set(groups.tolist())) == list(range(len(target)))
    # map kept tokens back to the original rows (features are unique per token)
    orig = [int(np.flatnonzero((d.features == f).all(1))[0]) for f in feats]
    old = d.groups.numpy()[orig]
    for new_id in range(len(target)):
        olds = set(old[groups == new_id].tolist())
        assert len(olds) == 1
        o = olds.pop()
        assert torch.equal(target[new_id], d.target[o])
        assert (groups == new_id).sum() == (d.groups.numpy() == o).sum()  # all members kept


def test_training_with_coarse_supervision_runs_and_starts_at_the_member_bias(toy):
    from hist_st.train import load_config
    from hist_st.train.coarse import coarse_slide_data
    from hist_st.train.loop import train

    _, slides = toy
    cfg = load_config(None, ["model.dim=16", "model.heads=2", "genes.n_top=5", "epochs=2", "progress=false",
                             "supervise=coarse2"])  # fmt: skip
    res = train(cfg, slides)
    assert len(res.history) == 2 and np.isfinite(res.history[-1]["loss"])
    data = [coarse_slide_data(s, res.bundle.genes, res.bundle.embedding, 2) for s in slides]
    members = torch.cat([torch.bincount(d.groups, minlength=len(d.target)) for d in data])
    assert torch.allclose(res.bundle.target_mean, coarse_head_bias(torch.cat([d.target for d in data]), members))
