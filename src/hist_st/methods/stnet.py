"""ST-Net: an ImageNet CNN fine-tuned end to end on raw spot patches (He et al., Nat. Biomed. Eng. 2020)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hist_st.encoders import efficientnet_lite0_model
from hist_st.errors import InputError
from hist_st.methods.base import Method, log1p_targets, options_of, register, variant
from hist_st.methods.trainer import batched, fit_epochs, shuffled
from hist_st.slide import Slide
from hist_st.wsi import PatchParams, extract_patches

__all__ = ["STNetBaseline", "STNetLite0Baseline", "PatchSource", "image_patch_source", "dihedral8",
           "stnet_targets", "inner_folds"]

#: A callable returning uint8 patches ``[N, P, P, 3]`` centred on ``slide``'s spots, in spot order.
PatchSource = Callable[[Slide], np.ndarray]


def image_patch_source(size_px: int = 224, um_per_px: float = 0.5) -> PatchSource:
    """Default `PatchSource`: cut patches from ``slide.image`` with `hist_st.wsi.extract_patches`.

    Args:
        size_px, um_per_px: Patch geometry (default 224 px at 0.5 um/px, as HEST and ST-Net's 224 window).
    """

    def source(slide: Slide) -> np.ndarray:
        if not slide.image:
            raise InputError(f"slide {slide.slide_id!r}",
                             "stnet needs the H&E image (slide.image is empty); pass patches=...")
        if not Path(slide.image).exists():
            raise InputError(slide.image, "H&E image not found (needed by the stnet baseline)")
        params = PatchParams(size_px, um_per_px)
        return extract_patches(slide.image, slide.spatial, slide.um_per_px, params)[0]  # [N, P, P, 3] uint8

    return source


def dihedral8(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 rotations / reflections of an image batch ``[B, 3, H, W]`` -> list of 8 tensors."""
    return [torch.rot90(y, k, dims=(-2, -1)) for y in (x, torch.flip(x, dims=(-1,))) for k in range(4)]


def _random_dihedral(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Apply an independently drawn dihedral transform (one of `dihedral8`'s, uniformly) to each image of
    ``x`` ``[B, 3, H, W]``."""
    ops = torch.from_numpy(rng.integers(0, 8, size=x.shape[0]))
    # Keep x's memory layout (channels-last, from the uint8 patches): the CNN's rounding depends on it.
    return torch.empty_like(x).copy_(torch.stack(dihedral8(x))[ops, torch.arange(x.shape[0])])


#: torchvision's ImageNet DenseNet-121 file (``DenseNet121_Weights.IMAGENET1K_V1``), as ST-Net uses it.
DENSENET121_FILE = "densenet121-a639ec97.pth"


def _build_backbone(name: str, weights: str | Path | None) -> tuple[torch.nn.Module, int]:
    """Return ``(module mapping [B,3,H,W] -> [B,F], F)`` with ImageNet weights: the state dict of a
    ``weights`` file (a DenseNet-121's classifier ignored) or, for None, EfficientNet-Lite0's packaged ones /
    torchvision's DenseNet-121 ones (ST-Net's ``--pretrain``; from torch's cache or downloaded once).

    Raises:
        InputError: A missing or wrong weights file, or DenseNet-121's ImageNet weights neither cached nor
            downloadable (offline), saying what to do.
    """
    if name == "efficientnet_lite0":
        model = efficientnet_lite0_model(weights)
        return model, int(model.num_features)
    if name != "densenet121":
        raise ValueError(f"unknown stnet backbone {name!r}; choose efficientnet_lite0 or densenet121")
    import torchvision
    from torchvision.models import DenseNet121_Weights

    if weights is None:
        try:
            sd = DenseNet121_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
        except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
            cache = Path(torch.hub.get_dir()) / "checkpoints" / DENSENET121_FILE
            raise InputError(
                "stnet",
                f"ST-Net's DenseNet-121 needs torchvision's ImageNet weights, which are not in {cache} and "
                f"could not be downloaded ({type(exc).__name__}: {exc}). Run once with network access "
                f"(torchvision caches the file there), copy {DENSENET121_FILE} to that path or pass "
                f"--baseline-option stnet.weights=/path/{DENSENET121_FILE}; or use the lighter, labelled "
                "variant --methods stnet-lite0 (EfficientNet-Lite0 with packaged weights)",
            ) from None
    elif not Path(weights).is_file():
        raise InputError(weights, "DenseNet-121 weights file not found")
    else:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        sd = sd["state_dict"] if isinstance(sd, dict) and "state_dict" in sd else sd
    model = torchvision.models.densenet121(weights=None)
    # torchvision's released file uses the old "norm.1" style keys; map them like torchvision does.
    pat = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                     r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    sd = {pat.sub(r"\1\2", k): v for k, v in sd.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        problem = f"not a DenseNet-121 state dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
        raise InputError(weights or DENSENET121_FILE, problem)
    n, model.classifier = model.classifier.in_features, torch.nn.Identity()
    return model, int(n)


def stnet_targets(slide: Slide, genes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """ST-Net's targets ``log((1 + y) / (n + Z))`` and each spot's ``log(n + Z)``.

    ``n`` is the number of genes the slide measures and ``Z`` the spot's total count over all of them
    (``stnet/datasets/spatial.py``, ``norm="norm"``, ``gene_transform="log"``), so
    ``log1p(y) = target + log(n + Z)``.

    Returns:
        ``(targets [N, G] float32, log_scale [N] float64)``.
    """
    y = log1p_targets(slide, genes)  # `InputError` for a slide without counts
    total = np.asarray(slide.counts.sum(axis=1), dtype=np.float64).ravel()
    log_scale = np.log(slide.counts.shape[1] + total)
    return (y - log_scale[:, None]).astype(np.float32), log_scale


def inner_folds(slides: list[Slide], k: int) -> list[list[int]]:
    """ST-Net's inner folds for choosing the epoch: training patients sorted, patient ``i`` in fold
    ``i mod k`` (``bin/cross_validate.py``). With fewer than 2 patients (e.g. every training slide from
    one patient), slides take the patients' place. Returns the slide indices of each validation fold."""
    patients = [s.patient if s.patient is not None else s.slide_id for s in slides]
    units = sorted(set(patients))
    if len(units) < 2:
        patients, units = [s.slide_id for s in slides], sorted(s.slide_id for s in slides)
    k = max(2, min(k, len(units)))
    return [[i for i, p in enumerate(patients) if p in units[f::k]] for f in range(k)]


@register("stnet")
class STNetBaseline(Method):
    """ST-Net: end-to-end fine-tuning of an ImageNet CNN with a linear head on raw spot patches.

    Published defaults, from ``bryanhe/ST-Net`` (README command for the main results:
    ``--model densenet121 --pretrain --lr 1e-6 --batch 32 --average --window 224``, 50 epochs;
    ``stnet/parser.py``: SGD, momentum 0.9, weight decay 0; ``stnet/cmd/run_spatial.py``):

    - backbone: ST-Net's DenseNet-121 with torchvision's ImageNet weights (`_build_backbone`), or a given
      ``weights`` file; the lighter variant is `STNetLite0Baseline` (``stnet-lite0``);
    - head: one linear layer, weights zeroed and bias set to the training mean expression (ST-Net does
      exactly this, so training starts from the `mean` baseline);
    - input: 224 px patches normalised by per-channel mean / std estimated on training patches; training
      augmentation: random horizontal / vertical flips and a random 90-degree rotation;
    - loss: ``sum((pred - y) ** 2) / G`` summed over the batch (ST-Net's reduction); targets
      ``log((1 + y) / (n + Z))`` (`stnet_targets`, ST-Net's), or ``targets="log1p"`` (HiST's). For the
      tables, a ``stnet`` prediction is mapped back to ``log1p`` space by adding the training spots' mean
      ``log(n + Z)``, since a test spot's total count is not known from its image;
    - the epoch is chosen as ST-Net does (``select_epoch="inner-cv"``, ``bin/cross_validate.py``): the one
      with the lowest summed squared error on the held-out training patients of `inner_folds`; then one
      model is trained on all training slides for that many epochs (constant-lr SGD: ST-Net's checkpoint of
      that epoch). Nothing is selected on test slides; ``select_epoch="final"`` keeps the last epoch;
    - ``tta=True``: average over the 8 dihedral transforms at test time (ST-Net's ``--average``).

    On CPU this is slow; ``epochs`` / ``max_steps`` bound the cost and `fit_seconds_` records it.

    Args:
        backbone: ``"densenet121"`` (ST-Net) or ``"efficientnet_lite0"``.
        weights: Backbone weights file; None = torchvision's ImageNet DenseNet-121 / packaged
            EfficientNet-Lite0.
        targets: ``"stnet"`` (``log((1 + y) / (n + Z))``) or ``"log1p"``.
        select_epoch: ``"inner-cv"`` (ST-Net) or ``"final"``.
        n_inner_folds: Inner folds for ``inner-cv``.
        patches: `PatchSource`; None cuts them from ``slide.image`` (`image_patch_source`).
        input_size: Resize patches to this side before the CNN (224 = no resize for 224 px patches).
        lr, momentum, weight_decay, batch_size, epochs: SGD training (ST-Net defaults above).
        max_steps: Stop after this many optimiser steps (None = all epochs).
        tta: 8-fold dihedral test-time averaging.
        device: ``auto`` (CUDA when available, else CPU) or a torch device string.
    """

    uses_embeddings = False
    uses_patches = True

    def __init__(
        self, backbone: str = "densenet121", weights: str | Path | None = None,
        patches: PatchSource | None = None, input_size: int = 224, lr: float = 1e-6, momentum: float = 0.9,
        weight_decay: float = 0.0, batch_size: int = 32, epochs: int = 50, max_steps: int | None = None,
        tta: bool = True, device: str = "auto", targets: str = "stnet", select_epoch: str = "inner-cv",
        n_inner_folds: int = 4,
    ) -> None:
        options = options_of(locals())
        if targets not in ("stnet", "log1p"):
            raise InputError("stnet", f"targets must be 'stnet' or 'log1p', got {targets!r}")
        if select_epoch not in ("inner-cv", "final"):
            raise InputError("stnet", f"select_epoch must be 'inner-cv' or 'final', got {select_epoch!r}")
        del options["patches"]  # a callable: not an option that identifies a run
        super().__init__(**{**options, "weights": str(weights) if weights else None})
        self.patches = patches if patches is not None else image_patch_source()

    def _get_patches(self, slide: Slide) -> np.ndarray:
        p = np.asarray(self.patches(slide))
        if p.dtype != np.uint8 or p.ndim != 4 or p.shape[-1] != 3 or p.shape[0] != slide.n_spots:
            raise InputError(f"slide {slide.slide_id!r}", f"patch source returned {p.dtype} {p.shape}; "
                                                          f"expected uint8 [{slide.n_spots}, P, P, 3]")
        return p

    def _to_input(self, patches_u8: np.ndarray) -> torch.Tensor:
        """uint8 ``[B, P, P, 3]`` -> normalised float ``[B, 3, S, S]`` on the device."""
        x = torch.from_numpy(patches_u8).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                              align_corners=False)
        mean, std = (torch.as_tensor(v, device=x.device).view(1, 3, 1, 1) for v in self.norm_)
        return (x - mean) / std

    def _targets(self, slide: Slide) -> tuple[np.ndarray, np.ndarray]:
        """The slide's training targets ``[N, G]`` and per-spot ``log(n + Z)`` ``[N]`` (log1p: zeros)."""
        if self.targets == "stnet":
            return stnet_targets(slide, self.genes_)
        return log1p_targets(slide, self.genes_), np.zeros(slide.n_spots)

    def _fit(self, slides: list[Slide], rng: np.random.Generator, seed: int) -> None:
        t0 = time.perf_counter()
        imgs_by_slide = [self._get_patches(s) for s in slides]
        imgs = np.concatenate(imgs_by_slide, axis=0)
        y_by_slide, scales = zip(*(self._targets(s) for s in slides))  # per slide, reused by the inner folds
        y = np.concatenate(y_by_slide)
        self.log_scale_ = float(np.concatenate(scales).mean())
        # ST-Net estimates the per-channel mean / std on (a dozen batches of) training patches.
        sample = imgs[rng.choice(len(imgs), size=min(len(imgs), 384), replace=False)] / 255.0  # float64
        self.norm_ = (sample.mean(axis=(0, 1, 2)).astype(np.float32),
                      (sample.std(axis=(0, 1, 2)) + 1e-6).astype(np.float32))
        inner = self.select_epoch == "inner-cv" and len(slides) > 1
        sse = np.zeros(self.epochs)  # per epoch, summed over the held-out training patients of `inner_folds`
        for f, val in enumerate(inner_folds(slides, self.n_inner_folds) if inner else []):
            train_i = [i for i in range(len(slides)) if i not in val]
            x_tr, x_val = (np.concatenate([imgs_by_slide[i] for i in idx]) for idx in (train_i, val))
            y_tr, y_val = (np.concatenate([y_by_slide[i] for i in idx]) for idx in (train_i, val))
            inner_rng = np.random.default_rng([seed, f + 1])
            sse += self._train(x_tr, y_tr, inner_rng, self.epochs, held_out=(x_val, y_val))[1]
        self.inner_sse_ = sse.tolist() if inner else []
        self.best_epoch_ = int(np.argmin(sse)) + 1 if inner else self.epochs
        self.model_ = self._train(imgs, y, rng, self.best_epoch_)[0]
        self.fit_seconds_ = time.perf_counter() - t0

    def _train(self, imgs: np.ndarray, y: np.ndarray, rng: np.random.Generator, epochs: int,
               held_out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[torch.nn.Module, np.ndarray]:
        """SGD fine-tuning of backbone + linear head on ``imgs [N, P, P, 3]`` uint8, targets ``y [N, G]``.

        Returns:
            The model and, with ``held_out`` (patches, targets), their summed squared error per epoch
            ``[epochs]`` (without: zeros, and each step's per-spot loss is appended to ``history_``).
        """
        body, n_feat = _build_backbone(self.backbone, self.weights)
        head = torch.nn.Linear(n_feat, len(self.genes_))
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.from_numpy(y.mean(axis=0)))
        model = torch.nn.Sequential(body, head).to(self.device)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        yt, g = torch.from_numpy(y), len(self.genes_)
        sse = np.zeros(epochs)

        def loss(idx: np.ndarray) -> tuple[torch.Tensor, int]:
            # Training augmentation (ST-Net): random h/v flips and a random 90-degree rotation per patch,
            # i.e. a uniformly drawn element of the dihedral group of the square.
            pred = model(_random_dihedral(self._to_input(imgs[idx]), rng))
            return ((pred - yt[idx].to(self.device)) ** 2).sum() / g, len(idx)  # ST-Net: sum over the batch

        def score(epoch: int) -> None:
            model.eval()
            pred = batched(lambda xb: self._forward(model, xb), held_out[0], self.batch_size)
            sse[epoch] = float(((pred - held_out[1]) ** 2).sum())

        record = (lambda value, n: self.history_.append(value / n)) if held_out is None else None  # per spot
        fit_epochs([model], opt, shuffled(len(imgs), self.batch_size, rng), loss, epochs=epochs,
                   max_steps=self.max_steps, on_step=record, on_epoch=None if held_out is None else score)
        return model.eval(), sse

    def _forward(self, model: torch.nn.Module, patches_u8: np.ndarray) -> np.ndarray:
        """Model output for uint8 patches (8-fold dihedral average with ``tta``), in target space."""
        x = self._to_input(patches_u8)
        out = torch.stack([model(v) for v in dihedral8(x)]).mean(dim=0) if self.tta else model(x)
        return out.cpu().numpy()

    def _predict(self, slide: Slide) -> np.ndarray:
        out = batched(lambda xb: self._forward(self.model_, xb), self._get_patches(slide), self.batch_size)
        return (out + self.log_scale_).astype(np.float32)  # log1p space (0 for log1p targets)


@register("stnet-lite0")
@variant(backbone="efficientnet_lite0", targets="log1p", select_epoch="final")
class STNetLite0Baseline(STNetBaseline):
    """The lighter, labelled ST-Net variant (not ST-Net's setting): EfficientNet-Lite0 with its packaged
    ImageNet weights (the CNN behind HiST's embeddings), ``log1p`` targets, the final epoch. Options as
    `STNetBaseline`."""
