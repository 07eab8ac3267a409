"""Prediction with a trained model: `Slide` in, `Slide` with ``predicted`` counts out.

```python
from hist_st.train import load_bundle, predict_slide
bundle = load_bundle("runs/exp1/model.pt")
out = predict_slide(bundle, slide, mc_samples=20)     # out.predicted, out.predicted_std [N, G]
```

`predict_slide` needs only the slide's spot coordinates and its embedding ``obsm['X_<bundle.embedding>']``
(counts are optional), so an H&E-only slide whose embeddings were just computed from the image goes
through the same function.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from hist_st.errors import InputError
from hist_st.lattice import continuous_coords, to_lattice
from hist_st.memory import malloc_policy
from hist_st.outputs import fresh_folder
from hist_st.slide import Slide, atomic_path, is_prediction, read_cohort_slide, write_prepared
from hist_st.train.checkpoint import ModelBundle
from hist_st.train.coarse import supervision_record
from hist_st.train.data import list_slides

__all__ = ["predict_log1p", "mc_log1p_samples", "predict_slide", "predict_folder", "lattice_unit_for", "check_outputs",
           "check_gene_overlap"]


def lattice_unit_for(bundle: ModelBundle, slide: Slide) -> float | None:
    """Lattice unit (um) for ``slide``: the model's unit for its technology, else the slide's own."""
    if slide.technology in bundle.lattice_unit_um:
        return float(bundle.lattice_unit_um[slide.technology])
    if slide.lattice_unit_um is not None:
        return float(slide.lattice_unit_um)
    return bundle.unit_for(slide.technology)


@torch.no_grad()
def predict_log1p(
    bundle: ModelBundle, slide: Slide, *, mc_samples: int = 0, seed: int = 0, log1p_samples: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Log1p-space predictions for every spot of ``slide`` (no augmentation).

    Args:
        bundle: Trained model bundle.
        slide: The slide (needs coordinates and ``bundle.embedding``).
        mc_samples: 0: one deterministic pass (dropout off). K > 0: K passes with dropout on
            (Monte Carlo dropout); the mean of the K log1p predictions is returned, plus the std of
            the K count-space predictions ``relu(expm1(.))``.
        seed: Seed of the MC-dropout passes (the global torch RNG is restored afterwards).
        log1p_samples: With ``mc_samples``: return the K log1p passes themselves ``[K, N, G]`` (and None).

    Returns:
        ``(mean_log1p [N, G] float32, count_std [N, G] float32 or None)``.
    """
    malloc_policy()  # HIST_ST_MALLOC=fixed: freed tensors leave the process (hist_st.memory)

    if mc_samples < 0:
        raise InputError("predict", f"mc_samples must be >= 0, got {mc_samples}")
    if bundle.embedding not in slide.embeddings:
        raise InputError(
            f"slide {slide.slide_id!r}",
            f"has no embedding {bundle.embedding!r} (obsm['X_{bundle.embedding}']) that the model reads; "
            f"available: {sorted(slide.embeddings) or 'none'}",
        )
    feats = torch.from_numpy(np.asarray(slide.embeddings[bundle.embedding], dtype=np.float32))
    in_dim = getattr(getattr(bundle.model, "cfg", None), "in_dim", None) or getattr(
        getattr(bundle.model, "config", None), "in_dim", None
    )
    if in_dim is not None and feats.shape[1] != in_dim:
        raise InputError(
            f"slide {slide.slide_id!r}",
            f"embedding {bundle.embedding!r} has width {feats.shape[1]}, the model expects {in_dim}",
        )
    if bundle.feature_mean is not None:
        feats = (feats - bundle.feature_mean.cpu()) / bundle.feature_std.cpu()
    xy = continuous_coords(slide, lattice_unit_for(bundle, slide))
    lat = to_lattice(xy, source=f"slide {slide.slide_id!r}")
    model = bundle.model
    device = bundle.device
    batch = model.make_batch(torch.from_numpy(lat), feats).to(device)
    amp = bundle.amp

    def run() -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            return model(batch).float()

    was_training = model.training
    try:
        if mc_samples == 0:
            model.eval()
            return run().cpu().numpy(), None
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
        torch.manual_seed(seed)
        model.train()
        total = None
        samples = []
        count_mean = count_m2 = None  # Welford: no [K, N, G] stack of the count-space passes
        for k in range(mc_samples):
            y = run()
            total = y.clone() if total is None else total.add_(y)
            if log1p_samples:
                samples.append(y.cpu())
                continue
            c = torch.relu_(torch.expm1(y))
            if count_mean is None:
                count_mean, count_m2 = c, torch.zeros_like(c)
                continue
            delta = c - count_mean
            count_mean.add_(delta, alpha=1.0 / (k + 1))
            count_m2.addcmul_(delta, c.sub_(count_mean))
            del delta, c
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        if log1p_samples:
            return torch.stack(samples).numpy(), None
        mean = (total / mc_samples).cpu().numpy()
        std = count_m2.div_(mc_samples).sqrt_().cpu().numpy()
        return mean, std
    finally:
        model.train(was_training)


def mc_log1p_samples(bundle: ModelBundle, slide: Slide, mc_samples: int, *, seed: int = 0) -> np.ndarray:
    """The ``mc_samples`` Monte Carlo dropout passes in log1p space, float32 ``[K, N, G]``."""
    if mc_samples < 1:
        raise InputError("mc_samples", f"must be >= 1, got {mc_samples}")
    samples, _ = predict_log1p(bundle, slide, mc_samples=mc_samples, seed=seed, log1p_samples=True)
    return samples


def predict_slide(bundle: ModelBundle, slide: Slide, *, mc_samples: int = 0, seed: int = 0) -> Slide:
    """Predict ``slide`` and return a new `Slide` holding the predictions.

    Returns:
        A `Slide` with ``genes = bundle.genes``, ``predicted = relu(expm1(mean log1p))`` ``[N, G]``
        float32, ``predicted_std`` (MC dropout, count space) when ``mc_samples > 0``, the measured counts
        of those genes when the input slide has them all (else None), the same coordinates, embeddings and
        metadata (less ``prepare_key``: a prediction file is never a finished prepared slide), and
        ``meta['prediction']`` recording the model's genes/embedding/unit/mc_samples.

    Raises:
        InputError: The predictions are not finite (a damaged model or embeddings); nothing is returned.
    """
    mean, std = predict_log1p(bundle, slide, mc_samples=mc_samples, seed=seed)
    with np.errstate(over="ignore", invalid="ignore"):  # checked just below
        predicted = np.maximum(np.expm1(mean), 0.0).astype(np.float32)
    bad = int((~np.isfinite(predicted)).sum()) + (int((~np.isfinite(std)).sum()) if std is not None else 0)
    if bad:
        finite = mean[np.isfinite(mean)]
        peak = f"; largest finite log1p prediction {finite.max():.3g}" if finite.size else ""
        raise InputError(
            f"slide {slide.slide_id!r}",
            f"{bad} predicted value(s) are NaN or infinite{peak}; the model or the slide's embeddings are "
            "damaged - nothing was written",
        )
    counts = None
    if slide.counts is not None:
        pos = {str(g): i for i, g in enumerate(slide.genes)}
        if all(g in pos for g in bundle.genes):
            counts = sp.csr_matrix(slide.counts)[:, [pos[g] for g in bundle.genes]].astype(np.float32)
    meta = dict(slide.meta)
    meta.pop("prepare_key", None)
    meta["prediction"] = {
        "embedding": bundle.embedding,
        "lattice_unit_um": lattice_unit_for(bundle, slide),
        "mc_samples": int(mc_samples),
        "space": "counts = relu(expm1(log1p prediction))",
    }
    if str((bundle.config or {}).get("supervise", "spot")) != "spot":  # super-resolution: say what "fine" means

        pitches = dict(bundle.spot_pitch_um)  # an H&E-only slide: the only training technology's pitch
        pitch = pitches.get(slide.technology, next(iter(pitches.values())) if len(pitches) == 1 else None)
        meta["prediction"]["supervision"] = supervision_record(bundle.config, pitch)
    return slide.on_spots(
        slide.spatial,
        slide.barcodes,
        genes=np.asarray(bundle.genes, dtype=object),
        counts=counts,
        array_coords=slide.array_coords,
        lattice=slide.lattice,
        embeddings=dict(slide.embeddings),
        spot_pitch_um=slide.spot_pitch_um,
        lattice_unit_um=slide.lattice_unit_um,
        patch_outside=slide.patch_outside,
        predicted=predicted,
        predicted_std=std.astype(np.float32) if std is not None else None,
        meta=meta,
        obs=slide.obs,
        spatial_images=dict(slide.spatial_images),
        scalefactors=dict(slide.scalefactors),
    )


def check_gene_overlap(bundle: ModelBundle, slide: Slide, source: str | Path | None = None) -> str | None:
    """Refuse a slide that shares no gene with the model; return a warning when it shares under half.

    Slides without measured genes (H&E only) pass.
    """
    if not len(slide.genes):
        return None
    have = {str(g) for g in slide.genes}
    shared = sum(str(g) in have for g in bundle.genes)
    src = source or f"slide {slide.slide_id!r}"
    if shared == 0:
        raise InputError(
            src,
            f"shares none of the model's {len(bundle.genes)} genes (e.g. {', '.join(map(str, bundle.genes[:3]))}) "
            f"with its {len(have)} measured genes (e.g. {', '.join(sorted(have)[:3])}); another species or panel?",
        )
    if shared < 0.5 * len(bundle.genes):
        return (
            f"{src}: only {shared} of the model's {len(bundle.genes)} genes were measured on this slide; "
            "comparisons with its measured expression cover those genes only"
        )
    return None


def predict_folder(
    bundle: ModelBundle,
    slides_dir: str | Path,
    out_dir: str | Path,
    *,
    slide_ids: Sequence[str] | None = None,
    mc_samples: int = 0,
    seed: int = 0,
    progress: bool = True,
    log=None,
) -> list[Path]:
    """Predict every prepared slide of ``slides_dir`` and write ``out_dir/<slide_id>.h5ad``.

    A slide with measured genes must share genes with the model (`check_gene_overlap`): none is an
    error (another species or panel?), under half a warning through ``log``. All or nothing: predictions
    are written under temporary names and renamed once every slide has succeeded; a failure removes them
    (and ``out_dir`` when this call created it).

    Args:
        bundle: The trained model (`hist_st.train.checkpoint.load_bundle`).
        slides_dir: Folder of prepared slides.
        out_dir: Output folder of the prediction files.
        slide_ids: Only these slides (default: all).
        mc_samples, seed: MC-dropout passes for ``predicted_std`` and their seed.
        progress: Show a progress bar.
        log: Called with warnings (default: none shown).

    Returns:
        The written prediction files, in slide order.

    Raises:
        InputError: An output would replace a prepared slide (the input itself or another one already in
            ``out_dir``; only earlier prediction files are replaced), or an input is a prediction file.
            Checked for every slide before anything is written.
    """
    from tqdm.auto import tqdm

    paths = list_slides(slides_dir, slide_ids)
    out = Path(out_dir)
    check_outputs(paths, out)
    staged: list[tuple[Path, Path]] = []  # (temporary, final): all slides or none reach their final names
    with fresh_folder(out):
        try:
            for path in tqdm(paths, desc="predict", unit="slide", disable=not progress, leave=False):
                slide = read_cohort_slide(path)
                warning = check_gene_overlap(bundle, slide, path)
                if warning and log is not None:
                    log(f"WARNING: {warning}")
                pred = predict_slide(bundle, slide, mc_samples=mc_samples, seed=seed)
                final, tmp = atomic_path(out / f"{path.stem}.h5ad")
                staged.append((tmp, final))
                write_prepared(pred, tmp)
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, final in staged:
            os.replace(tmp, final)
    return [final for _, final in staged]


def check_outputs(inputs: Sequence[Path], out_dir: Path) -> None:
    """Refuse, naming both paths, when a prediction of ``inputs`` would replace a prepared slide.

    ``out_dir/<stem>.h5ad`` may replace an earlier prediction file; never the input itself, nor a
    prepared slide already there.
    """
    for path in inputs:
        dest = out_dir / f"{Path(path).stem}.h5ad"
        if not dest.exists():
            continue
        if dest.resolve() == Path(path).resolve():
            raise InputError(
                dest, f"the prediction would overwrite the prepared slide it predicts ({path}); "
                "predictions never replace inputs: choose another --out folder",
            )
        if not is_prediction(dest):
            raise InputError(
                dest, f"already holds a prepared slide (not a prediction file); the prediction of {path} would "
                "replace it: choose another --out folder",
            )
