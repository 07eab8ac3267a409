"""Coordinate-only augmentation (SPEC 2, paper A.6-A.7) and its strength schedule.

Augmentation perturbs the continuous spot coordinates (in lattice units) *before* they are mapped to
the integer lattice; the patch embeddings stay fixed. The coordinates are centred on their mean,
mirrored, sheared and rotated, a random subset of spots is dropped, and the result is moved back to the
original centroid (`hist_st.lattice.to_lattice` then translates it to a non-negative lattice).

The strength of the schedule is a pure function of the epoch (`schedule_strength`) and is computed in
the main process; every training step carries it to whoever builds the batch (see
`hist_st.train.data.StepKey`). The authors' code mutated the strength on the dataset object in the main
process, which never reached the DataLoader workers, so their 75% spot dropout lasted the whole run.
"""

from __future__ import annotations

import math

import numpy as np

from hist_st.train.config import AugmentConfig

__all__ = ["schedule_strength", "dropout_probability", "transform_probability", "augment_coords", "mirror", "shear", "rotate"]


def schedule_strength(epoch: int, epochs: int, cfg: AugmentConfig) -> float:
    """Augmentation strength at ``epoch`` (0-based) of ``epochs``.

    ``cosine``: ``end + (start - end) * (1 + cos(pi * epoch / (epochs - 1))) / 2`` - ``start`` at the
    first epoch, ``end`` at the last (the paper: 1.0 -> 0.2). ``constant``: ``start`` throughout.
    """
    if cfg.schedule == "constant" or epochs <= 1:
        return float(cfg.strength_start)
    t = min(max(epoch, 0), epochs - 1) / (epochs - 1)
    return float(cfg.strength_end + (cfg.strength_start - cfg.strength_end) * 0.5 * (1.0 + math.cos(math.pi * t)))


def dropout_probability(strength: float, cfg: AugmentConfig) -> float:
    """Spot-dropout probability at a given strength: base dropout x strength, clipped to [0, 1]."""
    cfg = cfg.resolved()
    return float(min(max(cfg.dropout * strength, 0.0), 1.0))


def transform_probability(strength: float, cfg: AugmentConfig) -> float:
    """Probability of applying each geometric transform (mirror, shear, rotate) at a given strength:
    ``p_transform x strength`` with ``schedule_probability`` (the paper), else ``p_transform``."""
    cfg = cfg.resolved()
    p = cfg.p_transform * strength if cfg.schedule_probability else cfg.p_transform
    return float(min(max(p, 0.0), 1.0))


def mirror(xy: np.ndarray, axis: int) -> np.ndarray:
    """Reflect centred coordinates ``[N, 2]`` across ``axis`` (0 negates x, 1 negates y)."""
    out = np.array(xy, dtype=np.float64, copy=True)
    out[:, axis] = -out[:, axis]
    return out


def shear(xy: np.ndarray, factor: float, axis: int) -> np.ndarray:
    """Shear centred coordinates ``[N, 2]``: ``axis`` 0 adds ``factor * y`` to x, axis 1 ``factor * x`` to y."""
    m = np.eye(2)
    m[axis, 1 - axis] = factor
    return xy @ m.T


def rotate(xy: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotate centred coordinates ``[N, 2]`` counter-clockwise by ``angle_rad``."""
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return xy @ np.array([[c, -s], [s, c]]).T


def augment_coords(
    xy: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig, strength: float
) -> tuple[np.ndarray, np.ndarray]:
    """Randomly mirror, shear, rotate and drop spots of one slide.

    Args:
        xy: Continuous spot coordinates ``[N, 2]`` in lattice units.
        rng: The step's random generator (derive it from seed, epoch and slide for reproducibility).
        cfg: Augmentation settings (variant defaults are resolved here).
        strength: Schedule strength from `schedule_strength` (scales dropout and, with
            ``cfg.schedule_probability``, each transform's probability; with ``cfg.schedule_geometry``
            also the shear angle and the rotation deviation).

    Returns:
        ``(xy_aug, keep)``: augmented coordinates of the kept spots ``[M, 2]`` float64, centroid of the
        transformed full set equal to the input centroid, and the kept row indices ``[M]`` int64
        (sorted ascending). With ``cfg.enabled`` False: ``(xy, arange(N))``.
    """
    xy = np.asarray(xy, dtype=np.float64)
    n = xy.shape[0]
    if not cfg.enabled:
        return xy.copy(), np.arange(n, dtype=np.int64)
    cfg = cfg.resolved()
    centre = xy.mean(axis=0)
    z = xy - centre
    geo = strength if cfg.schedule_geometry else 1.0
    p = transform_probability(strength, cfg)
    if cfg.mirror and rng.random() < p:
        if cfg.variant == "paper":
            for axis in (0, 1):
                if rng.random() < 0.5:
                    z = mirror(z, axis)
        else:
            z = mirror(z, 0)
    if cfg.shear and rng.random() < p:
        axis = int(rng.integers(2))
        if cfg.variant == "paper":
            angle = math.radians(cfg.shear_deg) * geo
            factor = math.tan(rng.uniform(-angle, angle))
        else:
            lim = math.tan(math.radians(cfg.shear_deg)) * geo
            factor = rng.uniform(-lim, lim)
        z = shear(z, factor, axis)
    if cfg.rotate and rng.random() < p:
        if cfg.variant == "paper":
            dev = math.radians(cfg.rotate_deg) * geo
            angle = int(rng.integers(4)) * (math.pi / 2) + rng.uniform(-dev, dev)
        else:
            angle = rng.uniform(0.0, 2.0 * math.pi)
        z = rotate(z, angle)
    z = z - z.mean(axis=0)  # shear/rotation of a centred set keep it centred; guard rounding drift
    out = z + centre
    keep = np.arange(n, dtype=np.int64)
    p_drop = min(max(cfg.dropout * strength, 0.0), 1.0)
    if p_drop > 0 and n > cfg.min_spots:
        mask = rng.random(n) >= p_drop
        if mask.sum() < cfg.min_spots:
            mask[:] = False
            mask[rng.choice(n, size=cfg.min_spots, replace=False)] = True
        keep = np.flatnonzero(mask).astype(np.int64)
    return out[keep], keep
