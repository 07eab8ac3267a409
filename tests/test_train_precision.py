"""Issue 15: bf16 autocast on the CPU (``amp_cpu``) and the memory-lean MC-dropout std of `predict_log1p`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hist_st.train import load_config, train
from hist_st.train.predict import predict_log1p
from hist_st.train.toy import write_toy_cohort

TINY = ["model.dim=32", "model.heads=4", "progress=false", "genes.n_top=8", "device=cpu", "epochs=2"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_toy_cohort(tmp_path_factory.mktemp("toy"), n_slides=2, n_spots=120, n_genes=12, dim=16)


@pytest.fixture(scope="module")
def bundle(cohort):
    return train(load_config(None, TINY + ["model.dropout=0.2"]), cohort).bundle


def test_mc_count_std_equals_the_std_of_the_stacked_passes(bundle, cohort):
    from hist_st.train.data import load_slides

    slide = load_slides(cohort)[0]
    mean, std = predict_log1p(bundle, slide, mc_samples=5, seed=3)
    passes, _ = predict_log1p(bundle, slide, mc_samples=5, seed=3, log1p_samples=True)
    assert passes.shape[0] == 5
    np.testing.assert_allclose(mean, passes.mean(0), rtol=1e-5, atol=1e-6)
    counts = np.maximum(np.expm1(passes.astype(np.float64)), 0)
    np.testing.assert_allclose(std, counts.std(0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(std, 0)  # dropout made the passes differ


def test_amp_cpu_trains_in_bf16_and_predicts_close_to_fp32(cohort):
    fp32 = train(load_config(None, TINY), cohort)
    bf16 = train(load_config(None, [*TINY, "amp_cpu=true"]), cohort)
    assert bf16.bundle.amp and not fp32.bundle.amp
    assert np.isfinite([h["loss"] for h in bf16.history]).all()
    assert bf16.history[0]["loss"] == pytest.approx(fp32.history[0]["loss"], rel=0.05)
    from hist_st.train.data import load_slides

    slide = load_slides(cohort)[0]
    a, _ = predict_log1p(fp32.bundle, slide)
    b, _ = predict_log1p(bf16.bundle, slide)
    assert a.dtype == b.dtype == np.float32
    assert np.abs(a - b).max() < 0.1  # bf16 trunk, float32 head: same model up to bf16 rounding
    with torch.no_grad():
        assert not torch.equal(fp32.bundle.model.head.weight, bf16.bundle.model.head.weight)


def test_amp_cpu_warns_on_a_cpu_without_native_bf16(cohort, monkeypatch):
    """bf16 products without AVX512-BF16 or AMX run in PyTorch's reference loop (~1 GFLOP/s): say so."""
    from hist_st.train import loop

    monkeypatch.setattr(loop, "native_bf16_cpu", lambda: False)
    with pytest.warns(UserWarning, match="no native bfloat16 products .* set amp_cpu=false"):
        train(load_config(None, [*TINY, "epochs=1", "amp_cpu=true"]), cohort)
