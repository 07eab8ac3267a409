"""Data parallel over 2 gloo processes: averaged gradients equal single-process gradients on the same slides."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hist_st.train.toy import write_toy_cohort

OVERRIDES = ["model.dim=32", "model.heads=4", "model.dropout=0", "model.attn_dropout=0", "progress=false",
             "genes.genes=[G00,G01,G02,G03,G04,G05]", "epochs=1", "lr=1e-3", "device=cpu",
             "model.head_init=random"]  # a zero head would give every other parameter a zero first gradient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(cohort):
    from hist_st.model import HiST
    from hist_st.runtime import seed_everything
    from hist_st.train import load_config
    from hist_st.train.data import AugmentedSlides, load_slides, prepare_slide, select_genes

    cfg = load_config(None, OVERRIDES)
    slides = load_slides(cohort)
    genes = select_genes(slides, cfg.genes, None)
    data = [prepare_slide(s, genes, "toy") for s in slides]
    seed_everything(0)
    model = HiST(cfg.model.__class__(**{**cfg.model.to_dict(), "in_dim": 16, "n_genes": len(genes)}))
    return cfg, model, AugmentedSlides(data, cfg.augment, model.make_batch)


def _worker(rank: int, world: int, port: int, cohort: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from hist_st.train import train
        from hist_st.train.data import epoch_keys
        from hist_st.train.distributed import DistInfo, average_gradients
        from hist_st.train.loop import forward_loss

        info = DistInfo(rank, world, rank, "gloo")
        cfg, model, ds = _setup(cohort)
        (key,) = epoch_keys(len(ds), 0, cfg.seed, 1.0, rank, world)
        forward_loss(model, ds[key], torch.device("cpu"), False).backward()
        average_gradients(model.parameters(), info)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        # the full training loop under the same process group: one step on each rank's slide
        result = train(cfg, cohort, dist_info=info)
        params = {k: v.clone() for k, v in result.bundle.model.state_dict().items()}
        torch.save({"grads": grads, "params": params, "loss": result.history[0]["loss"]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    cohort = write_toy_cohort(tmp_path / "toy", n_slides=2, n_spots=100, n_genes=10, dim=16)
    mp.spawn(_worker, args=(2, _free_port(), str(cohort), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    torch.set_num_threads(1)
    from hist_st.train import load_config, train
    from hist_st.train.data import epoch_keys
    from hist_st.train.loop import forward_loss

    cfg, model, ds = _setup(cohort)
    for key in epoch_keys(len(ds), 0, cfg.seed, 1.0, 0, 1):
        (forward_loss(model, ds[key], torch.device("cpu"), False) / 2).backward()
    for name, p in model.named_parameters():
        # a parameter without a gradient (e.g. the last block's token update) counts as a zero gradient
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(r0["grads"][name], ref, rtol=1e-5, atol=1e-7, msg=name)
        assert torch.equal(r0["grads"][name], r1["grads"][name])

    single = train(load_config(None, OVERRIDES + ["slides_per_step=2"]), cohort)
    assert r0["loss"] == r1["loss"]
    assert abs(r0["loss"] - single.history[0]["loss"]) < 1e-6
    for k, v in single.bundle.model.state_dict().items():
        assert torch.equal(r0["params"][k], r1["params"][k]), k  # ranks stay in sync
        torch.testing.assert_close(r0["params"][k], v, rtol=1e-4, atol=1e-6, msg=k)
