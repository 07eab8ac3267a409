"""The training loop: loss falls, resume reproduces the uninterrupted run, checkpoints, gene selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hist_st.errors import InputError
from hist_st.train import load_bundle, load_checkpoint, load_config, predict_slide, train
from hist_st.train.data import load_slides, select_genes
from hist_st.train.loop import param_groups
from hist_st.train.toy import toy_slide, write_toy_cohort

TINY = ["model.dim=32", "model.heads=4", "progress=false", "genes.n_top=8"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_toy_cohort(tmp_path_factory.mktemp("toy"), n_slides=3, n_spots=120, n_genes=12, dim=16)


def test_loss_falls(cohort):
    cfg = load_config(None, TINY + ["epochs=8", "lr=3e-3", "augment.enabled=false"])
    result = train(cfg, cohort, slide_ids=["toy00", "toy01"])
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to zero


def test_resume_reproduces_uninterrupted_run(cohort, tmp_path):
    cfg = load_config(None, TINY + ["epochs=3", "lr=1e-3", "checkpoint_every=1"])
    full = train(cfg, cohort, out_dir=tmp_path / "full")
    part = train(cfg, cohort, out_dir=tmp_path / "part", stop_after_epoch=2)
    assert len(part.history) == 2
    n2 = len(part.step_losses)
    assert part.step_losses == full.step_losses[:n2]
    assert (tmp_path / "part" / "resume.pt").is_file() and not (tmp_path / "full" / "resume.pt").exists()
    resumed = train(cfg, cohort, out_dir=tmp_path / "part", resume=tmp_path / "part" / "resume.pt")
    assert resumed.step_losses == full.step_losses[n2:]  # exactly, not approximately
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for a, b in zip(resumed.bundle.model.state_dict().values(), full.bundle.model.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_is_self_describing(cohort, tmp_path):
    cfg = load_config(None, TINY + ["epochs=1"])
    result = train(cfg, cohort, out_dir=tmp_path)
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)  # only tensors and primitives
    for key in ("model", "epoch", "config", "genes", "embedding", "lattice", "norm", "model_config", "sha256"):
        assert key in ckpt, key
    assert ckpt["kind"] == "model" and not {"optimizer", "scheduler", "rng"} & set(ckpt)  # slim final model
    assert ckpt["epoch"] == 1 and ckpt["embedding"] == "toy"
    assert ckpt["lattice"]["unit_um"] == {"st": 100.0}
    assert ckpt["config"]["model"]["in_dim"] == 16 and ckpt["config"]["model"]["n_genes"] == 8
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "genes.txt").read_text().split() == ckpt["genes"]
    # head bias starts at the training mean log1p
    slides = load_slides(cohort)
    from hist_st.train.data import log1p_counts

    mean = np.concatenate([log1p_counts(s, ckpt["genes"]) for s in slides]).mean(0)
    np.testing.assert_allclose(ckpt["norm"]["target_mean"].numpy(), mean, rtol=1e-5)
    bundle = load_bundle(tmp_path / "model.pt")
    s = slides[0]
    a = predict_slide(bundle, s).predicted
    b = predict_slide(result.bundle, s).predicted
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    mc = predict_slide(bundle, s, mc_samples=3)
    assert mc.predicted_std.shape == a.shape and (mc.predicted_std >= 0).all()
    assert (a >= 0).all()
    with pytest.raises(InputError, match="width 8, the model expects 16"):
        predict_slide(bundle, toy_slide("w", 50, 12, 8))
    no_emb = toy_slide("e", 50)
    no_emb.embeddings = {"uni": no_emb.embeddings["toy"]}
    with pytest.raises(InputError, match="has no embedding 'toy'"):
        predict_slide(bundle, no_emb)


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and len(decay["params"]) == 1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_gene_selection(cohort):
    from hist_st.train.config import GeneConfig
    from hist_st.train.data import read_manifest

    slides = load_slides(cohort)
    manifest = read_manifest(cohort)
    assert select_genes(slides, GeneConfig(n_top=5), manifest) == manifest["hvg"][:5]
    he = select_genes(slides, GeneConfig(n_top=5, ranking="highly_expressed"), manifest)
    assert he == manifest["highly_expressed"][:5]
    train_only = select_genes(slides[:2], GeneConfig(n_top=5, scope="train-only"), manifest)
    assert len(train_only) == 5 and len(set(train_only)) == 5
    assert select_genes(slides, GeneConfig(genes=("G03", "G01"))) == ["G03", "G01"]
    with pytest.raises(InputError, match="absent"):
        select_genes(slides, GeneConfig(genes=("NOPE",)))


def test_bad_inputs_are_clear(cohort, tmp_path):
    cfg = load_config(None, TINY + ["epochs=1"])
    with pytest.raises(InputError, match="slide folder not found"):
        train(cfg, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no prepared slides"):
        train(cfg, tmp_path / "empty")
    with pytest.raises(InputError, match="no prepared slide file for id"):
        train(cfg, cohort, slide_ids=["toy99"])
    with pytest.raises(InputError, match="has no embedding 'uni'"):
        train(load_config(None, TINY + ["epochs=1", "embedding=uni"]), cohort)
    he = toy_slide("he", 50)
    he.counts = None
    he.genes = np.array([], dtype=object)
    with pytest.raises(InputError, match="H&E-only"):
        train(cfg, [he])
    with pytest.raises(InputError, match="checkpoint not found"):
        train(cfg, cohort, resume=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")


def test_dataloader_workers_give_identical_steps(cohort):
    """Batches built in DataLoader workers equal those built in the main process (same keys, same schedule)."""
    cfg = load_config(None, TINY + ["epochs=2", "genes.genes=[G00,G01,G02]"])
    main_proc = train(cfg, cohort, slide_ids=["toy00", "toy01"])
    workers = train(load_config(None, TINY + ["epochs=2", "genes.genes=[G00,G01,G02]", "num_workers=1"]), cohort,
                    slide_ids=["toy00", "toy01"])  # fmt: skip
    assert workers.step_losses == main_proc.step_losses
