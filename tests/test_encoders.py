"""Patch encoders: packaged EfficientNet-Lite0 weights classify a natural image; no silent random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hist_st.embed import embed_batches
from hist_st.encoders import Encoder, get_encoder, list_encoders
from hist_st.errors import InputError


@pytest.fixture(scope="module")
def lite0() -> Encoder:
    return get_encoder("efficientnet-lite0", device="cpu")


def test_packaged_weights_classify_cat():
    from PIL import Image
    from skimage import data

    from hist_st.encoders import efficientnet_lite0_model

    model = efficientnet_lite0_model(classifier=True)
    enc = Encoder("x", model, 1000)
    img = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224), Image.Resampling.BILINEAR))[None]
    with torch.inference_mode():
        probs = model(enc.preprocess(img)).softmax(-1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"top ImageNet class {top} is not a cat"
    assert float(probs[281:286].sum()) > 0.5


def test_features_batched_and_deterministic(lite0):
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, size=(5, 112, 112, 3), dtype=np.uint8)  # resized to 224 inside
    a, outside = embed_batches(lite0, [(patches[:2], np.zeros(2, bool)), (patches[2:], np.ones(3, bool))])
    b = lite0.encode(patches)
    assert outside.tolist() == [False, False, True, True, True]
    assert a.shape == (5, 1280) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert np.isfinite(a).all()


def test_registry_and_missing_weights(tmp_path, monkeypatch):
    assert "efficientnet-lite0" in list_encoders() and "uni" in list_encoders()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HIST_ST_UNI_WEIGHTS", raising=False)
    with pytest.raises(InputError, match="--weights"):
        get_encoder("uni")
    with pytest.raises(InputError, match="--weights"):
        get_encoder("timm:resnet18")
    with pytest.raises(InputError, match="unknown encoder"):
        get_encoder("nope")
    with pytest.raises(InputError, match="not found"):
        get_encoder("timm:resnet18", weights=tmp_path / "missing.pth")


def test_timm_encoder_with_weights_file(tmp_path):
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    enc = get_encoder("timm:resnet18", weights=path, device="cpu")
    assert enc.dim == 512 and enc.name == "timm-resnet18"
    out = enc.encode(np.zeros((2, 64, 64, 3), np.uint8))
    assert out.shape == (2, 512)
    # a file for another architecture is refused, not half-loaded
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(InputError, match="missing"):
        get_encoder("timm:resnet18", weights=bad)


def test_bf16_classifier_still_finds_the_cat():
    """The explicit bf16 setting (`Encoder.with_precision`) keeps ImageNet classification of a real image."""
    from PIL import Image
    from skimage import data

    from hist_st.encoders import efficientnet_lite0_model

    model = efficientnet_lite0_model(classifier=True)
    img = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224), Image.Resampling.BILINEAR))[None]
    fp32 = Encoder("x", model, 1000)
    bf16 = fp32.with_precision("bf16")
    assert bf16.cache_key != fp32.cache_key and fp32.cache_key.count("|") == 4  # fp32 key unchanged
    a = torch.from_numpy(fp32.encode(img)).softmax(-1)[0]
    b = torch.from_numpy(bf16.encode(img)).softmax(-1)[0]
    assert 281 <= int(b.argmax()) <= 285 and int(a.argmax()) == int(b.argmax())
    with pytest.raises(InputError, match="fp32 or bf16"):
        fp32.with_precision("fp16")
