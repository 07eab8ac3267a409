"""The training loop: one importable ``train(cfg, slides)``, read top to bottom.

```python
from hist_st.train import load_config, train
cfg = load_config("my.yaml", ["epochs=50", "model.dim=256"])
result = train(cfg, "cohort/", out_dir="runs/exp1")      # writes runs/exp1/model.pt
result.history[-1]["loss"]
```

Paper defaults (SPEC 2): MSE on log1p counts, AdamW (lr 1e-4, weight decay 1e-4 on >= 2-D parameters
only), cosine annealing to 0 over all optimiser steps, one slide per step, coordinate augmentation with
a cosine strength schedule computed from the epoch in the main process, head bias initialised to the
training slides' mean log1p. Multi-process data parallel when launched by ``torchrun``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hist_st.errors import InputError
from hist_st.slide import Slide
from hist_st.train.augment import dropout_probability, schedule_strength
from hist_st.train.checkpoint import (
    ModelBundle,
    load_checkpoint,
    package_versions,
    rng_state,
    save_checkpoint,
    set_rng_state,
    training_inputs,
)
from hist_st.train.config import TrainConfig, config_from_dict, config_to_dict, save_config
from hist_st.train.data import (
    AugmentedSlides,
    KeySampler,
    SlideData,
    embedding_key,
    epoch_keys,
    load_slides,
    prepare_slide,
    read_manifest,
    select_genes,
)
from hist_st.train.distributed import (
    DistInfo,
    all_reduce_mean,
    average_gradients,
    broadcast_parameters,
    init_distributed,
    resolve_device,
)

__all__ = ["TrainResult", "train", "seed_everything", "build_optimizer", "forward_loss", "param_groups"]

CHECKPOINT = "model.pt"


@dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
        bundle: The trained model and everything needed to predict (`ModelBundle`).
        history: One record per epoch: ``epoch`` (1-based), ``loss`` (mean training MSE over the epoch's
            steps and ranks), ``lr`` (at the epoch's end), ``strength``, ``dropout``, ``seconds``.
        step_losses: Every step's loss on this rank, in order (this run only).
        checkpoint: Path of the last checkpoint written, or None.
        config: The resolved config (``model.in_dim`` / ``model.n_genes`` filled from the data).
    """

    bundle: ModelBundle
    history: list[dict[str, float]]
    step_losses: list[float]
    checkpoint: Path | None
    config: TrainConfig
    slide_ids: list[str] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on parameters with >= 2 dimensions, none on biases, norms, tables' 1-D."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and cosine annealing from ``cfg.lr`` to 0 over ``total_steps`` optimiser steps.

    The fused AdamW kernel is used where torch has it on the parameters' device (CPU since torch 2.4):
    the same update, 3-7x faster than the per-tensor loop, which matters for small slides.
    """
    groups = param_groups(model, cfg.weight_decay)
    try:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps), eta_min=0.0)
    return opt, sched


def forward_loss(
    model: torch.nn.Module, item: dict[str, Any], device: torch.device, amp: bool
) -> torch.Tensor:
    """MSE between the model's log1p predictions and the log1p targets of the step's kept spots.

    Under bf16 autocast the backbone runs in bfloat16, but HiST's head runs in float32 (`HiST.forward`)
    and the loss is computed here outside autocast in float32: bfloat16 log1p outputs would be quantised
    in steps of 0.016-0.031 (issue 16).
    """
    batch = item["batch"].to(device)
    target = item["target"].to(device, non_blocking=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        pred = model(batch)
    return F.mse_loss(pred.float(), target.float())


def _identity(x: Any) -> Any:
    return x


def _iterate(dataset: AugmentedSlides, keys: Sequence[Any], num_workers: int):
    if num_workers <= 0:
        for k in keys:
            yield dataset[k]
        return
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=KeySampler(keys),
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        generator=torch.Generator().manual_seed(0),  # keep the global torch RNG untouched
        persistent_workers=False,
    )
    yield from loader


def _technology_records(slides: Sequence[Slide], cfg_unit: dict[str, float]) -> dict[str, Any]:
    units: dict[str, float] = {}
    pitch: dict[str, float] = {}
    for s in slides:
        if s.lattice_unit_um is not None:
            units.setdefault(s.technology, float(s.lattice_unit_um))
        if s.spot_pitch_um is not None:
            pitch.setdefault(s.technology, float(s.spot_pitch_um))
    units.update(cfg_unit)
    return {"unit_um": units, "spot_pitch_um": pitch, "technologies": sorted({s.technology for s in slides})}


def _resolve_slides(
    slides: str | Path | Sequence[Slide], slide_ids: Sequence[str] | None
) -> tuple[list[Slide], dict[str, Any] | None]:
    if isinstance(slides, (str, Path)):
        return load_slides(slides, slide_ids), read_manifest(slides)
    chosen = list(slides)
    if slide_ids is not None:
        by_id = {s.slide_id: s for s in chosen}
        missing = [i for i in slide_ids if i not in by_id]
        if missing:
            raise InputError("slides", f"no slide with id(s) {missing}")
        chosen = [by_id[i] for i in slide_ids]
    if not chosen:
        raise InputError("slides", "no training slides")
    return sorted(chosen, key=lambda s: s.slide_id), None


def train(
    cfg: TrainConfig,
    slides: str | Path | Sequence[Slide],
    *,
    slide_ids: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    resume: str | Path | None = None,
    genes: Sequence[str] | None = None,
    manifest: dict[str, Any] | None = None,
    stop_after_epoch: int | None = None,
    dist_info: DistInfo | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train a HiST model on prepared slides.

    Args:
        cfg: The run's configuration.
        slides: A folder of prepared slides (``<id>.h5ad`` + optional ``cohort.json``) or `Slide` records.
        slide_ids: Train only on these slides (default: all).
        out_dir: Run directory: ``config.yaml`` (resolved), ``genes.txt``, ``model.pt`` (restorable
            checkpoint, rewritten every ``cfg.checkpoint_every`` epochs and at the end),
            ``history.json``. None writes nothing.
        resume: Checkpoint to continue from (its config, genes and architecture win; ``cfg.epochs`` may
            extend the run only if it equals the checkpoint's).
        genes: Explicit gene list (e.g. chosen once for all CV folds); default from ``cfg.genes``.
        manifest: Cohort manifest for dataset-scope gene rankings (read from the folder when a path).
        stop_after_epoch: Stop after this many completed epochs (the schedule still spans
            ``cfg.epochs``); used to test and demonstrate resuming.
        dist_info: Process-group info; default: join torchrun's group when launched by torchrun.
        on_epoch: Called on every rank with each epoch's history record.
        desc: Progress-bar label.

    Returns:
        A `TrainResult`.
    """
    from hist_st.model import HiST

    info = dist_info or init_distributed(cfg.device)
    device = resolve_device(cfg.device, info)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ckpt = load_checkpoint(resume) if resume is not None else None
    if ckpt is not None:
        saved = config_from_dict(dict(ckpt["config"]))
        if saved.epochs != cfg.epochs:
            raise InputError(resume, f"checkpoint was trained for epochs={saved.epochs}; resume with the same value")
        cfg = dataclasses.replace(saved, device=cfg.device, progress=cfg.progress, num_workers=cfg.num_workers,
                                  threads=cfg.threads)  # fmt: skip
        genes = [str(g) for g in ckpt["genes"]]
    seed_everything(cfg.seed)

    # --- data -------------------------------------------------------------------------------------
    train_slides, folder_manifest = _resolve_slides(slides, slide_ids)
    manifest = manifest if manifest is not None else folder_manifest
    emb = str(ckpt["embedding"]) if ckpt is not None else embedding_key(train_slides, cfg.embedding)
    if genes is None:
        genes = select_genes(train_slides, cfg.genes, manifest)
    genes = [str(g) for g in genes]
    raw = [prepare_slide(s, genes, emb) for s in train_slides]
    all_feats = torch.cat([d.features for d in raw]).double()
    feature_mean = all_feats.mean(0).float()
    feature_std = all_feats.std(0, unbiased=False).clamp_min(1e-6).float()
    target_mean = torch.cat([d.target for d in raw]).double().mean(0).float()
    if ckpt is not None:  # a resumed run keeps the statistics it started with
        norm = ckpt["norm"]
        feature_mean, feature_std, target_mean = norm["feature_mean"], norm["feature_std"], norm["target_mean"]
    if cfg.standardise_features:
        data = [
            SlideData(d.slide_id, d.xy, (d.features - feature_mean) / feature_std, d.target) for d in raw
        ]
    else:
        data = raw
    model_cfg = dataclasses.replace(cfg.model, in_dim=int(raw[0].features.shape[1]), n_genes=len(genes))
    cfg = dataclasses.replace(cfg, model=model_cfg, embedding=emb)

    # --- model, optimiser, schedule -----------------------------------------------------------------
    model = HiST(model_cfg)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    model.init_head_bias(target_mean)
    model.to(device)
    broadcast_parameters(model, info)
    n_local = len(epoch_keys(len(data), 0, cfg.seed, 1.0, info.rank, info.world_size))
    steps_per_epoch = math.ceil(n_local / cfg.slides_per_step)
    opt, sched = build_optimizer(model, cfg, steps_per_epoch * cfg.epochs)
    start_epoch, step = 0, 0
    history: list[dict[str, float]] = []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        history = [dict(h) for h in ckpt.get("history", [])]
        set_rng_state(ckpt["rng"])

    out = Path(out_dir) if out_dir is not None else None
    lattice_rec = _technology_records(train_slides, {})
    if out is not None and info.is_master:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "genes.txt").write_text("\n".join(genes) + "\n")

    inputs_rec = training_inputs(train_slides)  # encoder, weights, patch and stain settings (for --image)

    def payload(epoch: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "model_config": model_cfg.to_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": epoch,
            "step": step,
            "rng": rng_state(),
            "config": config_to_dict(cfg),
            "genes": list(genes),
            "embedding": emb,
            "lattice": lattice_rec,
            "inputs": inputs_rec,
            "norm": {
                "target_mean": target_mean.clone(),
                "feature_mean": feature_mean.clone(),
                "feature_std": feature_std.clone(),
                "standardise_features": bool(cfg.standardise_features),
            },
            "history": history,
            "slides": [s.slide_id for s in train_slides],
            "world_size": info.world_size,
            "versions": package_versions(),
        }

    # --- loop ----------------------------------------------------------------------------------------
    dataset = AugmentedSlides(data, cfg.augment, model.make_batch)
    amp = bool(cfg.amp) and device.type == "cuda"
    step_losses: list[float] = []
    last_ckpt: Path | None = None
    end_epoch = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
    bar = _progress(range(start_epoch, end_epoch), cfg.progress and info.is_master, desc, cfg.epochs, start_epoch)
    model.train()
    for epoch in bar:
        t0 = time.perf_counter()
        strength = schedule_strength(epoch, cfg.epochs, cfg.augment)  # main process, from the epoch
        keys = epoch_keys(len(data), epoch, cfg.seed, strength, info.rank, info.world_size)
        losses = []
        opt.zero_grad(set_to_none=True)
        for i, item in enumerate(_iterate(dataset, keys, cfg.num_workers)):
            loss = forward_loss(model, item, device, amp)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss on slide {item['slide_id']!r} at epoch {epoch + 1}")
            (loss / cfg.slides_per_step).backward()
            losses.append(float(loss.detach()))
            if (i + 1) % cfg.slides_per_step == 0 or i + 1 == len(keys):
                average_gradients(model.parameters(), info)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
        step_losses.extend(losses)
        record = {
            "epoch": epoch + 1,
            "loss": all_reduce_mean(float(np.mean(losses)), info, device),
            "lr": float(sched.get_last_lr()[0]),
            "strength": strength,
            "dropout": dropout_probability(strength, cfg.augment) if cfg.augment.enabled else 0.0,
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        done = epoch + 1
        if out is not None and info.is_master and (done % cfg.checkpoint_every == 0 or done == end_epoch):
            last_ckpt = save_checkpoint(out / CHECKPOINT, payload(done))
    if out is not None and info.is_master:
        import json

        (out / "history.json").write_text(json.dumps(history, indent=1))
    model.eval()
    bundle = ModelBundle(
        model=model,
        genes=list(genes),
        embedding=emb,
        lattice_unit_um=dict(lattice_rec["unit_um"]),
        spot_pitch_um=dict(lattice_rec["spot_pitch_um"]),
        target_mean=target_mean,
        feature_mean=feature_mean if cfg.standardise_features else None,
        feature_std=feature_std if cfg.standardise_features else None,
        config=config_to_dict(cfg),
        device=device,
        meta={"epoch": len(history), "step": step, "history": history},
    )
    return TrainResult(bundle, history, step_losses, last_ckpt, cfg, [s.slide_id for s in train_slides])


def _progress(it, enabled: bool, desc: str, total: int, initial: int):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, initial=initial, unit="epoch", leave=False, dynamic_ncols=True)
