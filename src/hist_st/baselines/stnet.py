"""ST-Net: an ImageNet CNN fine-tuned end to end on raw spot patches (He et al., Nat. Biomed. Eng. 2020)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hist_st.baselines.base import Baseline, log1p_targets, register, torch_device
from hist_st.errors import InputError
from hist_st.slide import Slide

__all__ = ["STNetBaseline", "PatchSource", "image_patch_source", "dihedral8"]

#: A callable returning uint8 patches ``[N, P, P, 3]`` centred on ``slide``'s spots, in spot order.
PatchSource = Callable[[Slide], np.ndarray]


def image_patch_source(size_px: int = 224, um_per_px: float = 0.5) -> PatchSource:
    """Default `PatchSource`: cut patches from ``slide.image`` with `hist_st.wsi.extract_patches`.

    Args:
        size_px, um_per_px: Patch geometry (default 224 px at 0.5 um/px, as HEST and ST-Net's 224 window).
    """

    def source(slide: Slide) -> np.ndarray:
        from hist_st.wsi import PatchParams, extract_patches

        if not slide.image:
            raise InputError(
                f"slide {slide.slide_id!r}",
                "stnet needs the H&E image (slide.image is empty); pass patches=...",
            )
        if not Path(slide.image).exists():
            raise InputError(slide.image, "H&E image not found (needed by the stnet baseline)")
        patches, _ = extract_patches(
            slide.image, slide.spatial, slide.um_per_px, PatchParams(size_px, um_per_px)
        )
        return patches

    return source


def dihedral8(x):
    """The 8 rotations / reflections of an image batch ``[B, 3, H, W]`` -> list of 8 tensors."""
    import torch

    out = []
    for flip in (False, True):
        y = torch.flip(x, dims=(-1,)) if flip else x
        for k in range(4):
            out.append(torch.rot90(y, k, dims=(-2, -1)))
    return out


def _random_dihedral(x, rng: np.random.Generator):
    """Apply an independently drawn dihedral transform to each image of ``x`` ``[B, 3, H, W]``."""
    import torch

    ops = rng.integers(0, 8, size=x.shape[0])
    out = torch.empty_like(x)
    for op in np.unique(ops):
        sel = torch.from_numpy(np.flatnonzero(ops == op))
        y = x[sel]
        if op >= 4:
            y = torch.flip(y, dims=(-1,))
        out[sel] = torch.rot90(y, int(op % 4), dims=(-2, -1))
    return out


def _build_backbone(name: str, weights: str | Path | None):
    """Return ``(module mapping [B,3,H,W] -> [B,F], F)`` with ImageNet weights."""
    import torch

    if name == "efficientnet_lite0":
        from hist_st.encoders import efficientnet_lite0_model

        model = efficientnet_lite0_model(weights)  # packaged ImageNet weights when weights is None
        return model, int(model.num_features)
    if name == "densenet121":
        import torchvision

        if weights is None:
            raise InputError(
                "stnet",
                "DenseNet-121 needs ImageNet weights: pass weights='/path/densenet121.pth' "
                "(torchvision's densenet121-a639ec97.pth or a timm state dict); nothing is downloaded",
            )
        path = Path(weights)
        if not path.is_file():
            raise InputError(path, "DenseNet-121 weights file not found")
        model = torchvision.models.densenet121(weights=None)
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        # torchvision's released file uses the old "norm.1" style keys; map them like torchvision does.
        import re

        pat = re.compile(
            r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
        )
        sd = {(pat.sub(r"\1\2", k)): v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("classifier.")]
        if missing or unexpected:
            raise InputError(
                path, f"not a DenseNet-121 state dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        n = model.classifier.in_features
        model.classifier = torch.nn.Identity()
        return model, int(n)
    raise ValueError(f"unknown stnet backbone {name!r}; choose efficientnet_lite0 or densenet121")


@register("stnet")
class STNetBaseline(Baseline):
    """ST-Net: end-to-end fine-tuning of an ImageNet CNN with a linear head on raw spot patches.

    Published defaults, from ``bryanhe/ST-Net`` (README command for the main results:
    ``--model densenet121 --pretrain --lr 1e-6 --batch 32 --average --window 224``, 50 epochs;
    ``stnet/parser.py``: SGD, momentum 0.9, weight decay 0; ``stnet/cmd/run_spatial.py``):

    - backbone: ImageNet-pretrained CNN; here EfficientNet-Lite0 with its packaged weights by default (the
      same CNN that produces HiST's embeddings), DenseNet-121 (ST-Net's) when ``weights`` is given;
    - head: one linear layer, weights zeroed and bias set to the training mean expression (ST-Net does
      exactly this, so training starts from the `mean` baseline);
    - input: 224 px patches normalised by per-channel mean / std estimated on training patches; training
      augmentation: random horizontal / vertical flips and a random 90-degree rotation;
    - loss: ``sum((pred - y) ** 2) / G`` summed over the batch (ST-Net's reduction), targets ``log1p`` counts
      (ST-Net additionally normalised counts per spot; HiST's targets are used here);
    - SGD, lr 1e-6, momentum 0.9, batch 32, 50 epochs, the final epoch's model (ST-Net logged test metrics
      every epoch; nothing is selected on test slides here);
    - ``tta=True``: average over the 8 dihedral transforms at test time (ST-Net's ``--average``).

    On CPU this is slow (a forward+backward of EfficientNet-Lite0 on 224 px is ~0.1 s per patch on 2
    cores); ``epochs`` / ``max_steps`` bound the cost and `fit_seconds_` records it.

    Args:
        backbone: ``"efficientnet_lite0"`` or ``"densenet121"``.
        weights: Backbone weights file (required for DenseNet-121; None = packaged EfficientNet-Lite0).
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
        self,
        backbone: str = "efficientnet_lite0",
        weights: str | Path | None = None,
        patches: PatchSource | None = None,
        input_size: int = 224,
        lr: float = 1e-6,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        batch_size: int = 32,
        epochs: int = 50,
        max_steps: int | None = None,
        tta: bool = True,
        device: str = "auto",
    ) -> None:
        super().__init__(
            backbone=backbone,
            weights=str(weights) if weights else None,
            input_size=input_size,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            batch_size=batch_size,
            epochs=epochs,
            max_steps=max_steps,
            tta=tta,
            device=device,
        )
        self.backbone, self.weights = backbone, weights
        self.patches = patches if patches is not None else image_patch_source()
        self.input_size, self.lr, self.momentum, self.weight_decay = input_size, lr, momentum, weight_decay
        self.batch_size, self.epochs, self.max_steps, self.tta, self.device = (
            batch_size,
            epochs,
            max_steps,
            tta,
            torch_device(device),
        )
        self.model_ = None
        self.norm_: tuple[np.ndarray, np.ndarray] | None = None
        self.fit_seconds_: float | None = None

    def _get_patches(self, slide: Slide) -> np.ndarray:
        p = np.asarray(self.patches(slide))
        if p.dtype != np.uint8 or p.ndim != 4 or p.shape[-1] != 3 or p.shape[0] != slide.n_spots:
            raise InputError(
                f"slide {slide.slide_id!r}",
                f"patch source returned {p.dtype} {p.shape}; expected uint8 [{slide.n_spots}, P, P, 3]",
            )
        return p

    def _to_input(self, patches_u8: np.ndarray):
        """uint8 ``[B, P, P, 3]`` -> normalised float ``[B, 3, S, S]`` on the device."""
        import torch
        import torch.nn.functional as F

        assert self.norm_ is not None
        x = torch.from_numpy(patches_u8).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.input_size:
            x = F.interpolate(
                x,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        mean = torch.as_tensor(self.norm_[0], device=x.device).view(1, 3, 1, 1)
        std = torch.as_tensor(self.norm_[1], device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _fit(self, slides: list[Slide], rng: np.random.Generator, seed: int) -> None:
        import torch

        t0 = time.perf_counter()
        assert self.genes_ is not None
        imgs = np.concatenate([self._get_patches(s) for s in slides], axis=0)
        y = np.concatenate([log1p_targets(s, self.genes_) for s in slides], axis=0)
        # ST-Net estimates the per-channel mean / std on (a dozen batches of) training patches.
        sample = (
            imgs[rng.choice(len(imgs), size=min(len(imgs), 384), replace=False)].astype(np.float64) / 255.0
        )
        self.norm_ = (
            sample.mean(axis=(0, 1, 2)).astype(np.float32),
            (sample.std(axis=(0, 1, 2)) + 1e-6).astype(np.float32),
        )

        body, n_feat = _build_backbone(self.backbone, self.weights)
        head = torch.nn.Linear(n_feat, len(self.genes_))
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.from_numpy(y.mean(axis=0)))
        model = torch.nn.Sequential(body, head).to(self.device)
        opt = torch.optim.SGD(
            model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        yt = torch.from_numpy(y)
        g = len(self.genes_)
        step = 0
        done = False
        for _ in range(self.epochs):
            model.train()
            perm = rng.permutation(len(imgs))
            for i in range(0, len(perm), self.batch_size):
                idx = perm[i : i + self.batch_size]
                x = self._to_input(imgs[idx])
                # Training augmentation (ST-Net): random h/v flips and a random 90-degree rotation per
                # patch, i.e. a uniformly drawn element of the dihedral group of the square.
                x = _random_dihedral(x, rng)
                pred = model(x)
                loss = ((pred - yt[idx].to(self.device)) ** 2).sum() / g  # ST-Net: summed over the batch
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                # Per-spot value, comparable across batch sizes.
                self.history_.append(float(loss.detach()) / len(idx))
                step += 1
                if self.max_steps is not None and step >= self.max_steps:
                    done = True
                    break
            if done:
                break
        self.model_ = model.eval()
        self.fit_seconds_ = time.perf_counter() - t0

    def _predict(self, slide: Slide) -> np.ndarray:
        import torch

        assert self.model_ is not None
        imgs = self._get_patches(slide)
        outs = []
        with torch.no_grad():
            for i in range(0, len(imgs), self.batch_size):
                x = self._to_input(imgs[i : i + self.batch_size])
                if self.tta:
                    outs.append(torch.stack([self.model_(v) for v in dihedral8(x)]).mean(dim=0))
                else:
                    outs.append(self.model_(x))
        return torch.cat(outs, dim=0).cpu().numpy()
