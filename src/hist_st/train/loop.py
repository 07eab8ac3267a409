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

import contextlib
import dataclasses
import math
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hist_st.errors import InputError
from hist_st.memory import malloc_policy, trim_heap
from hist_st.model import HiST
from hist_st.model.config import LEGACY_VALUES
from hist_st.runtime import native_bf16_cpu, package_versions, resolve_device, seed_everything, set_threads
from hist_st.slide import Slide
from hist_st.train.augment import dropout_probability, schedule_strength
from hist_st.train.checkpoint import (
    MODEL_FILE,
    RESUME_FILE,
    BackgroundWriter,
    ModelBundle,
    lattice_type_for,
    load_resume_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    training_inputs,
)
from hist_st.train.coarse import (
    CoarseAugmentedSlides,
    block_factor,
    coarse_head_bias,
    coarse_slide_data,
    coarse_transform,
)
from hist_st.train.config import TrainConfig, config_from_dict, config_to_dict, save_config
from hist_st.train.data import (
    AugmentedSlides,
    KeySampler,
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
)
from hist_st.train.loss import head_loss
from hist_st.train.optim import OptimizerInBackward, make_adamw
from hist_st.train.resume import (
    ACCEPTED_LOG,
    RUNTIME_KEYS,
    changed_data,
    check_resume,
    data_fingerprint,
    flatten,
    record_accepted,
    resume_differences,
)

__all__ = ["TrainResult", "train", "build_optimizer", "forward_loss", "param_groups", "step_in_backward",
           "finish_step"]

CHECKPOINT = MODEL_FILE
RESUME = RESUME_FILE


@dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
        bundle: The trained model and everything needed to predict (`ModelBundle`).
        history: One record per epoch: ``epoch`` (1-based), ``loss`` (mean training MSE over the epoch's
            steps and ranks), ``lr`` (at the epoch's end), ``strength``, ``dropout``, ``seconds``.
        step_losses: Every step's loss on this rank, in order (this run only).
        checkpoint: Path of the last checkpoint written (``model.pt`` at the run's end, ``resume.pt``
            before), or None.
        config: The resolved config (``model.in_dim`` / ``model.n_genes`` filled from the data).
    """

    bundle: ModelBundle
    history: list[dict[str, float]]
    step_losses: list[float]
    checkpoint: Path | None
    config: TrainConfig
    slide_ids: list[str] = field(default_factory=list)


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
    the same update, 3-7x faster than the per-tensor loop, which matters for small slides. The optimiser
    is `hist_st.train.optim.LeanAdamW` (AdamW without torch's compile wrappers: 0.18 GB less memory).
    """
    groups = param_groups(model, cfg.weight_decay)
    try:
        opt = make_adamw(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)
    except (RuntimeError, TypeError):
        opt = make_adamw(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps), eta_min=0.0)
    return opt, sched


def step_in_backward(
    opt: torch.optim.Optimizer, cfg: TrainConfig, info: DistInfo | None = None
) -> OptimizerInBackward | None:
    """The hooks that update each parameter during backward when ``cfg.optimizer_in_backward`` asks for it.

    Returns:
        `OptimizerInBackward` on ``opt`` (remove it when training ends), or None (the ordinary step).

    Raises:
        InputError: Several processes (their gradients are averaged after backward, before the step).
    """
    if not cfg.optimizer_in_backward:
        return None
    if info is not None and info.world_size > 1:
        raise InputError("config", f"optimizer_in_backward=true updates each parameter during backward, but "
                         f"{info.world_size} processes must average their gradients first; set "
                         f"optimizer_in_backward=false for multi-process training")
    return OptimizerInBackward(opt)


def finish_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    info: DistInfo | None = None,
    in_backward: bool = False,
) -> None:
    """End an optimiser step after backward: average gradients over processes and update the parameters
    (unless ``in_backward``: `step_in_backward` did that already), advance the schedule, free the gradients."""
    if not in_backward:
        if info is not None:
            average_gradients(model.parameters(), info)
        opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def forward_loss(
    model: torch.nn.Module, item: dict[str, Any], device: torch.device, amp: bool
) -> torch.Tensor:
    """MSE between the model's log1p predictions and the log1p targets of the step's kept spots.

    An item with ``groups`` (coarse supervision, `hist_st.train.coarse`) compares the fine predictions
    summed per coarse spot in count space with the coarse targets (the sum is the ``transform`` of
    `head_loss`, applied gene chunk by gene chunk).

    Under bf16 autocast (``amp``: on CUDA, or on the CPU when the run asked for it) the trunk runs in
    bfloat16, but the head and the loss run in float32: bfloat16 log1p outputs would be quantised in
    steps of 0.016-0.031 (issue 16). For HiST the head and loss go gene chunk by gene chunk
    (`hist_st.train.loss.head_loss`), so no ``[N, G]`` prediction or gradient is kept.
    """
    batch = item["batch"].to(device)
    target = item["target"].to(device, non_blocking=True)
    groups = item.get("groups")
    transform = None if groups is None else coarse_transform(groups.to(device), int(target.shape[0]))
    chunked = hasattr(model, "features") and hasattr(model, "head")
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
        out = model.features(batch) if chunked else model(batch)
    if chunked:
        return head_loss(out, model.head, target, transform=transform)
    pred = out.float() if transform is None else transform(out.float())
    return F.mse_loss(pred, target.float())


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


def _technology_records(slides: Sequence[Slide]) -> dict[str, Any]:
    units: dict[str, float] = {}
    pitch: dict[str, float] = {}
    measured: dict[str, list[float]] = {}
    for s in slides:
        if s.lattice_unit_um is not None:
            units.setdefault(s.technology, float(s.lattice_unit_um))
        if s.spot_pitch_um is not None:
            pitch.setdefault(s.technology, float(s.spot_pitch_um))
        if (s.meta.get("spot_grid") or {}).get("pitch_um") and s.lattice_unit_um == s.spot_pitch_um:
            measured.setdefault(s.technology, []).append(float(s.meta["spot_grid"]["pitch_um"]))
    for tech, values in measured.items():  # measured grids: the median pitch of the training slides
        units[tech] = pitch[tech] = float(np.median(values))
    kinds = {}
    for s in slides:  # measured grid type (hist_st.lattice.geometry) wins over the technology's
        kind = (s.meta.get("spot_grid") or {}).get("kind")
        if kind in ("hex", "square"):
            kinds.setdefault(s.technology, kind)
    out = {"unit_um": units, "spot_pitch_um": pitch, "technologies": sorted({s.technology for s in slides})}
    if kinds:
        types = {str(t): lattice_type_for(t) for t in out["technologies"]}
        out["lattice_type"] = {t: v for t, v in {**types, **kinds}.items() if v}
    return out


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


def _save(out: Path, full: dict[str, Any], writer: BackgroundWriter, *, final: bool, finished: bool) -> Path:
    """Save a checkpoint of the run in ``out``; returns the file that now holds the latest state.

    Mid-run: the resume state (``resume.pt``) is written in the background (``writer``), so training goes
    on while the disk works. When the run stops: the final model (``model.pt``, no optimiser state) is
    written before returning, and the resume state too unless the run finished all its epochs (then an
    older ``resume.pt`` is removed: nothing is left to resume).
    """
    if not final:
        writer.submit(out / RESUME, full, kind="resume")
        return out / RESUME
    writer.wait()
    if not finished:
        save_checkpoint(out / RESUME, full, kind="resume")
    path = save_checkpoint(out / CHECKPOINT, full, kind="model")
    if finished:
        (out / RESUME).unlink(missing_ok=True)
    return path


def _resumed_config(
    requested: TrainConfig,
    ckpt: dict[str, Any],
    source: str | Path,
    slide_ids: Sequence[str],
    genes: Sequence[str] | None,
    accept: bool,
) -> tuple[TrainConfig, dict[str, str]]:
    """The config a resumed run uses: the checkpoint's, plus ``requested``'s runtime keys and accepted changes.

    Raises:
        InputError: The request differs from the checkpoint (`hist_st.train.resume.check_resume`).
    """
    try:
        data = dict(ckpt["config"])
        if isinstance(data.get("model"), dict):  # a checkpoint saved before an option existed: its old value
            data["model"] = {**{k: v for k, v in LEGACY_VALUES.items() if k not in data["model"]},
                             "residual_dropout": data["model"].get("dropout", 0.05), **data["model"]}
        saved = config_from_dict(data)
    except (InputError, TypeError) as exc:
        raise InputError(source, f"the checkpoint's config is invalid ({exc})") from None
    saved_dict = config_to_dict(saved)
    diffs = resume_differences(saved_dict, config_to_dict(requested), ckpt.get("slides"), slide_ids,
                               [str(g) for g in ckpt["genes"]], genes)
    accepted = check_resume(diffs, source, accept)
    new = flatten(config_to_dict(requested))
    for key in [*accepted, *RUNTIME_KEYS]:
        if key in new:
            node = saved_dict
            *parents, leaf = key.split(".")
            for k in parents:
                node = node[k]
            node[leaf] = new[key]
    return config_from_dict(saved_dict), accepted


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
    accept_changes: bool = False,
    overwrite: bool = False,
) -> TrainResult:
    """Train a HiST model on prepared slides.

    Args:
        cfg: The run's configuration.
        slides: A folder of prepared slides (``<id>.h5ad`` + optional ``cohort.json``) or `Slide` records.
        slide_ids: Train only on these slides (default: all; when resuming from a folder, the
            checkpoint's slides).
        out_dir: Run directory: ``config.yaml`` (resolved), ``genes.txt``, ``resume.pt`` (restorable
            state, rewritten every ``cfg.checkpoint_every`` epochs; removed once all epochs are done),
            ``model.pt`` (the final model without optimiser state, written when the run stops),
            ``history.json``. None writes nothing. A folder that already holds a checkpoint is refused
            unless ``resume`` or ``overwrite`` is given; a folder this call created is removed again when
            the run fails before its first checkpoint.
        resume: Resume state to continue from (``resume.pt``, a run folder, or an older full checkpoint).
            The request (slides, ``genes``, ``cfg``) must match the checkpoint (`hist_st.train.resume`);
            runtime keys (device, threads, workers, progress, checkpoint_every) come from ``cfg``.
        genes: Explicit gene list (e.g. chosen once for all CV folds); default from ``cfg.genes``.
        manifest: Cohort manifest for dataset-scope gene rankings (read from the folder when a path).
        stop_after_epoch: Stop after this many completed epochs (the schedule still spans
            ``cfg.epochs``); used to test and demonstrate resuming.
        dist_info: Process-group info; default: join torchrun's group when launched by torchrun.
        on_epoch: Called on every rank with each epoch's history record.
        desc: Progress-bar label.
        accept_changes: Continue a resumed run despite acceptable differences (slides, augmentation,
            seed, amp, gradient checkpointing); recorded in ``out_dir/accepted_changes.json`` and the
            checkpoint.
        overwrite: Replace the checkpoint of an earlier run in ``out_dir``.

    Returns:
        A `TrainResult`.

    Raises:
        InputError: Bad slides or genes, a resume request that differs from its checkpoint, an output
            folder holding another run.
    """

    allocator = malloc_policy()  # HIST_ST_MALLOC=fixed...: freed activations leave the process (hist_st.memory)
    info = dist_info or init_distributed(cfg.device)
    device = resolve_device(cfg.device, info.local_rank)
    set_threads(cfg.threads, "threads")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and resume is None and not overwrite:
        earlier = [p for p in (out / CHECKPOINT, out / RESUME) if p.is_file()]
        if earlier:
            raise InputError(
                earlier[0], "a checkpoint of an earlier run is already here; resume it (--resume) or choose "
                "another --out folder (nothing was written)",
            )
    ckpt = load_resume_state(resume) if resume is not None else None
    if ckpt is not None and slide_ids is None and isinstance(slides, (str, Path)) and ckpt.get("slides"):
        slide_ids = [str(s) for s in ckpt["slides"]]  # resuming a folder run: its slides unless told otherwise

    # --- data -------------------------------------------------------------------------------------
    train_slides, folder_manifest = _resolve_slides(slides, slide_ids)
    accepted: dict[str, str] = {}
    if ckpt is not None:
        cfg, accepted = _resumed_config(cfg, ckpt, resume, [s.slide_id for s in train_slides], genes,
                                        accept_changes)
        genes = [str(g) for g in ckpt["genes"]]
    seed_everything(cfg.seed)
    manifest = manifest if manifest is not None else folder_manifest
    emb = str(ckpt["embedding"]) if ckpt is not None else embedding_key(train_slides, cfg.embedding)
    if genes is None:
        genes = select_genes(train_slides, cfg.genes, manifest)
    genes = [str(g) for g in genes]
    block = block_factor(cfg.supervise)
    raw = [prepare_slide(s, genes, emb) if block == 1 else coarse_slide_data(s, genes, emb, block)
           for s in train_slides]
    data_record = {d.slide_id: data_fingerprint(d.xy, d.features, d.target) for d in raw}
    if ckpt is not None:  # same ids, other content (e.g. the cohort was re-prepared) is a different run too
        accepted.update(check_resume(changed_data(ckpt.get("data"), data_record), resume, accept_changes))
    all_feats = torch.cat([d.features for d in raw]).double()
    feature_mean = all_feats.mean(0).float()
    feature_std = all_feats.std(0, unbiased=False).clamp_min(1e-6).float()
    target_mean = torch.cat([d.target for d in raw]).double().mean(0).float()
    if block > 1:  # a fine token carries about 1 / members of its coarse spot's counts
        members = torch.cat([torch.bincount(d.groups[d.groups >= 0], minlength=len(d.target)) for d in raw])
        target_mean = coarse_head_bias(torch.cat([d.target for d in raw]), members)
    if ckpt is not None:  # a resumed run keeps the statistics it started with
        norm = ckpt["norm"]
        feature_mean, feature_std, target_mean = norm["feature_mean"], norm["feature_std"], norm["target_mean"]
    if cfg.standardise_features:
        data = [dataclasses.replace(d, features=(d.features - feature_mean) / feature_std) for d in raw]
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
    hooks = step_in_backward(opt, cfg, info)  # before anything is written: refuses several processes
    start_epoch, step = 0, 0
    history: list[dict[str, float]] = []
    changes: list[dict[str, Any]] = []
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
            history = [dict(h) for h in ckpt.get("history", [])]
            set_rng_state(ckpt["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise InputError(resume, f"the resume state cannot be restored ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from None
        changes = [dict(c) for c in ckpt.get("accepted_changes", [])]
        if accepted:
            changes.append({"resumed_after_epoch": start_epoch, "changes": dict(accepted)})

    lattice_rec = _technology_records(train_slides)
    created = out is not None and not out.exists()
    if out is not None and info.is_master:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "genes.txt").write_text("\n".join(genes) + "\n")
        if accepted:
            record_accepted(out, accepted, start_epoch)
        elif ckpt is None:  # a new run (or --overwrite): no change log of an earlier run
            (out / ACCEPTED_LOG).unlink(missing_ok=True)

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
            "data": data_record,
            "accepted_changes": changes,
            "world_size": info.world_size,
            "versions": package_versions(),
        }

    # --- loop ----------------------------------------------------------------------------------------
    dataset = (AugmentedSlides if block == 1 else CoarseAugmentedSlides)(data, cfg.augment, model.make_batch)
    amp = (bool(cfg.amp) and device.type == "cuda") or (bool(cfg.amp_cpu) and device.type == "cpu")
    if amp and device.type == "cpu" and native_bf16_cpu() is False:
        warnings.warn("amp_cpu=true: this CPU has no native bfloat16 products (no AVX512-BF16 or AMX), so PyTorch "
                      "runs them in a reference loop, many times slower than float32; set amp_cpu=false", stacklevel=2)
    step_losses: list[float] = []
    last_ckpt: Path | None = None
    end_epoch = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
    bar = _progress(range(start_epoch, end_epoch), cfg.progress and info.is_master, desc, cfg.epochs, start_epoch)
    writer = BackgroundWriter()
    model.train()
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            strength = schedule_strength(epoch, cfg.epochs, cfg.augment)  # main process, from the epoch
            keys = epoch_keys(len(data), epoch, cfg.seed, strength, info.rank, info.world_size)
            losses = []
            opt.zero_grad(set_to_none=True)
            for i, item in enumerate(_iterate(dataset, keys, cfg.num_workers)):
                loss = forward_loss(model, item, device, amp)
                if not torch.isfinite(loss):
                    raise InputError(
                        f"slide {item['slide_id']!r}", f"training diverged: the loss became NaN or infinite at "
                        f"epoch {epoch + 1} (lr {cfg.lr:g}); lower lr, or check this slide's embeddings and counts",
                    )
                (loss / cfg.slides_per_step).backward()
                losses.append(float(loss.detach()))
                if (i + 1) % cfg.slides_per_step == 0 or i + 1 == len(keys):
                    finish_step(model, opt, sched, info, in_backward=hooks is not None)
                    if allocator.trim:
                        trim_heap()
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
                last_ckpt = _save(out, payload(done), writer, final=done == end_epoch, finished=done == cfg.epochs)
        writer.wait()
    except Exception:
        with contextlib.suppress(Exception):
            writer.wait()
        if created and info.is_master and not any((out / n).is_file() for n in (CHECKPOINT, RESUME)):
            shutil.rmtree(out, ignore_errors=True)  # a failed run leaves no half-written folder
        raise
    finally:
        if hooks is not None:
            hooks.remove()  # the returned model trains like any other
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
        lattice_type=dict(lattice_rec.get("lattice_type") or {}),
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
