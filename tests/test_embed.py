"""`hist_st.embed`: the patch-encoding loop with background reading, identical to encoding batch by batch."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from hist_st.embed import embed_batches, load_cache, prefetch, save_cache
from hist_st.encoders import Encoder, get_encoder

HER2ST = Path("/work/shared/data/her2st")


class _Mean(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _patches(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)


def test_prefetch_keeps_order_runs_on_another_thread_and_raises_the_producers_error():
    threads = []

    def items():
        for i in range(5):
            threads.append(threading.get_ident())
            yield np.full((1, 2, 2, 3), i, np.uint8), np.zeros(1, bool)

    got = [int(b[0, 0, 0, 0]) for b, _ in prefetch(items(), depth=2)]
    assert got == [0, 1, 2, 3, 4] and threading.get_ident() not in threads

    def broken():
        yield _patches(1), np.zeros(1, bool)
        raise RuntimeError("cannot decode JPEG")

    with pytest.raises(RuntimeError, match="cannot decode"):
        list(prefetch(broken(), depth=2))


@pytest.mark.parametrize("depth", [0, 3])
def test_embed_batches_equals_encoding_each_batch(depth):
    enc = Encoder("mean", _Mean(), 3, input_size=16, cpu_fast=False)
    patches = _patches(23)
    batches = [(patches[i : i + 5], np.arange(i, min(i + 5, 23)) % 2 == 0) for i in range(0, 23, 5)]
    timings: dict = {}
    emb, outside = embed_batches(enc, batches, n=23, prefetch_depth=depth, timings=timings,
                                 transform=lambda b: 255 - b)  # fmt: skip
    ref = np.concatenate([enc.encode(255 - b) for b, _ in batches])
    assert np.array_equal(emb, ref)  # bit for bit: the same batches through the same encoder
    assert outside.tolist() == [i % 2 == 0 for i in range(23)]
    assert timings["patches"] == 23 and timings["encode_s"] > 0 and timings["extract_s"] >= 0
    with pytest.raises(ValueError, match="n=30 expected"):
        embed_batches(enc, batches, n=30, prefetch_depth=depth)


def test_cache_round_trip_and_a_damaged_file_is_rebuilt(tmp_path):
    path = tmp_path / "c" / "x.npz"
    emb, out = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32), np.array([0, 1, 0, 0], bool)
    save_cache(path, emb, out)
    got = load_cache(path, 4, {})
    assert got is not None and np.array_equal(got[0], emb) and np.array_equal(got[1], out)
    path.write_bytes(b"not a zip")
    timings: dict = {}
    with pytest.warns(RuntimeWarning, match="damaged embedding cache"):
        assert load_cache(path, 4, timings) is None
    assert timings["cache_rebuilt"] == 1 and not path.exists()


@pytest.mark.skipif(not (HER2ST / "ST-imgs").is_dir(), reason="her2st images not in /work/shared/data/her2st")
def test_bf16_embeddings_of_real_her2st_patches_stay_close_to_fp32():
    """The explicit bf16 encoder setting: cosine similarity to the fp32 embeddings of real H&E patches."""
    from hist_st.io.legacy_st import find_her2st_sections, read_her2st_section
    from hist_st.wsi import PatchParams, iter_patch_batches, open_image

    section = next(s for s in find_her2st_sections(HER2ST) if s.image is not None)
    slide = read_her2st_section(section)

    image = open_image(slide.image, slide.um_per_px)
    try:
        patches, _ = next(iter_patch_batches(image, slide.spatial[:12], slide.um_per_px, PatchParams(), 12))
    finally:
        image.close()
    fp32 = get_encoder("efficientnet-lite0", device="cpu")
    a = torch.from_numpy(fp32.encode(patches))
    b = torch.from_numpy(fp32.with_precision("bf16").encode(patches))
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert float(cos.min()) > 0.98 and float(cos.median()) > 0.99, cos  # measured: min 0.987, median 0.993
