"""The one benchmark harness (`hist_st.bench.harness`) and what uses it: Table 1 (`run_efficiency`), Figure 3
(`run_scaling`) and ``bench speed``. Correctness only: nothing here is a timing."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from hist_st.bench.efficiency import (
    SyntheticSlides,
    Workers,
    format_efficiency_table,
    measure,
    run_efficiency,
    timing_key,
)
from hist_st.bench.harness import GB, PeakMemory, run_isolated
from hist_st.bench.scaling import run_scaling
from hist_st.bench.speed import SpeedSettings
from hist_st.bench.speed import measure as speed_measure
from hist_st.cli import main
from hist_st.data.synthetic import make_cohort

TINY = ["model.dim=16", "model.heads=2", "model.levels=11-1", "progress=false"]
#: Record fields that hold a time or a memory reading (they differ between any two runs).
MEASURED = ("seconds", "_s", "_gb", "gflops", "fraction", "_per_slide", "_per_1k")


def _fixed(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not any(m in k for m in MEASURED)}


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def test_peak_memory_on_the_cpu_counts_a_known_allocation_per_phase():
    """A phase that touches 400 MB shows about 400 MB over its start; the next phase, after it is freed, does
    not inherit that peak (the high-water mark is reset per phase). The margin (10%) allows for pages of the
    process (shared libraries) that leave its resident set while the phase runs."""
    size = 400_000_000
    with PeakMemory("cpu") as big:
        a = np.ones(size // 8)
        del a
    rec = big.record("train_")
    assert set(rec) == {"train_rss_before_gb", "train_rss_peak_gb", "train_rss_delta_gb"}
    assert rec["train_rss_before_gb"] > 0 and rec["train_rss_delta_gb"] >= 0.9 * size / GB
    assert rec["train_rss_peak_gb"] == pytest.approx(rec["train_rss_before_gb"] + rec["train_rss_delta_gb"])
    if not _can_reset_peak():
        pytest.skip("/proc/self/clear_refs is not writable here: the peak is the process's so far")
    with PeakMemory("cpu") as small:
        b = np.ones(size // 80)
        del b
    assert small.rss_peak - small.rss_before < 0.5 * size


def test_speed_records_are_the_same_in_process_and_through_the_harness():
    """``bench speed`` runs `measure` through `run_isolated`: the record of one tiny setting has the same
    fields and the same non-measured values either way, with the CPU memory fields."""
    s = SpeedSettings(spots=120, genes=8, mode="train", in_dim=16, threads=1, repeats=1, model={"dim": 16, "heads": 2})
    here = speed_measure(s)
    there = run_isolated("hist_st.bench.speed", dataclasses.asdict(s), timeout=300, threads=1)
    assert "error" not in there and set(here) == set(there) and _fixed(here) == _fixed(there)
    for r in (here, there):
        assert r["peak_rss_gb"] >= r["import_rss_gb"] > 0 and "cuda_reserved_gb" not in r


def test_table1_and_figure3_measure_one_spec_alike(tmp_path):
    """Table 1 on synthetic slides and Figure 3 at the same size run the same worker spec through the same
    harness: the same `timing_key`, records with the same fields and the same non-measured values, and the
    memory fields of one `PeakMemory` per phase on the CPU."""
    workers = Workers(methods=["hist"], epochs=1, overrides=TINY, device="cpu", threads=1, timeout=300, progress=False)
    t1 = run_efficiency(tmp_path / "t1", workers=workers, synthetic=SyntheticSlides(n_train=2, n_spots=40, n_genes=6))
    f3 = run_scaling(tmp_path / "f3", workers=workers, spots=[40], genes_list=[], fixed_genes=6, n_train=2)
    (a,), (b,) = t1["records"], f3["records"]
    assert t1["key"] == f3["key"] and "error" not in a and "error" not in b
    assert set(b) - set(a) == {"axis", "target_spots"} and set(a) <= set(b)
    assert _fixed(a) == {k: v for k, v in _fixed(b).items() if k not in ("axis", "target_spots")}
    for r in (a, b):
        for phase in ("train", "infer"):
            assert r[f"{phase}_rss_peak_gb"] >= r[f"{phase}_rss_before_gb"] > 0
            assert r[f"{phase}_rss_delta_gb"] == pytest.approx(r[f"{phase}_rss_peak_gb"] - r[f"{phase}_rss_before_gb"])
        assert r["train_mem_gb"] == r["train_rss_delta_gb"] and r["infer_mem_gb"] == r["infer_rss_delta_gb"]


def test_a_failing_worker_is_recorded_not_raised():
    rec = run_isolated("hist_st.bench.efficiency", {"method": "mean", "data": {"cohort": "/nonexistent"}},
                       timeout=300, label={"method": "mean"})
    assert rec["method"] == "mean" and rec["error"].startswith("exit ")


def test_efficiency_measure_in_process():
    data = {"synthetic": {"n_train": 2, "n_test": 1, "n_spots": 60, "n_genes": 10, "embed_dim": 8, "seed": 0}}
    recs = [measure({"method": m, "data": data, "epochs": 1, "overrides": TINY, "device": "cpu"})
            for m in ("hist", "mean")]
    for r in recs:
        assert r["train_s_per_slide"] > 0 and r["infer_s_per_slide"] > 0
        assert r["train_rss_peak_gb"] > 0 and r["n_genes"] == 10
    table = format_efficiency_table(recs + [{"method": "stflow", "error": "timeout"}])
    assert "| hist |" in table and "failed: timeout" in table


def test_table1_reuse_ignores_the_epochs_option():
    """Table 1 times its own epochs, so a baseline's ``epochs`` option does not make it stale."""

    def spec(**opts):
        return {"method": "stnet", "data": {"cohort": "."}, "epochs": 1, "baseline_options": opts}

    assert timing_key([spec(epochs=5, tta=False)]) == timing_key([spec(tta=False)]) != timing_key([spec()])
    assert timing_key([spec()], timeout=1) != timing_key([spec()], timeout=2)


def test_efficiency_on_a_cohort_records_what_it_measured(tmp_path):
    """Table 1 on a prepared cohort times fold 0's slides and records the cohort, genes, folds and seed, so a
    report does not reuse it for another gene set or split."""
    cohort = tmp_path / "cohort"
    make_cohort(cohort, n_slides=4, n_spots=(60, 90), n_genes=16, embed_dim=8, seed=3)
    workers = Workers(methods=["mean"], seed=5, epochs=1, device="cpu", threads=1, progress=False)
    res = run_efficiency(tmp_path / "t1", workers=workers, cohort=cohort, genes="he:12", folds=2)
    (rec,) = res["records"]
    assert "error" not in rec and rec["n_genes"] == 12 and rec["n_test_slides"] == 2
    saved = json.loads((tmp_path / "t1" / "efficiency.json").read_text())
    assert saved["key"] == res["key"]
    kw = dict(cohort=cohort, genes="he:12", folds=2, reuse=True)
    assert run_efficiency(tmp_path / "t1", workers=workers, **kw) == saved  # the same key: reused
    other = run_efficiency(tmp_path / "t1", workers=dataclasses.replace(workers, seed=6), **kw)  # measured again
    assert other["key"] != saved["key"]


def test_scaling_figure_records_and_skips_after_timeout(tmp_path):
    """Figure 3 on synthetic slides: one worker process per (method, size); a method that fails at one size
    is not run at larger sizes of that axis; the settings are recorded so a report can tell stale results."""
    workers = Workers(methods=["hist"], epochs=1, overrides=TINY, device="cpu", timeout=120, progress=False)
    res = run_scaling(tmp_path, workers=workers, spots=[40, 80], genes_list=[6], fixed_genes=6, fixed_spots=40)
    ok = [r for r in res["records"] if "error" not in r]
    assert {(r["axis"], r["target_spots"], r["n_genes"]) for r in ok} == {("spots", 40, 6), ("spots", 80, 6),
                                                                         ("genes", 40, 6)}
    assert all(r["infer_s_per_slide"] > 0 for r in ok)
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert res["options"] == {"spots": [40, 80], "genes_list": [6], "timeout": 120} and res["seed"] == 0

    res = run_scaling(tmp_path / "t", workers=dataclasses.replace(workers, timeout=0.01), spots=[40, 80],
                      genes_list=[], fixed_genes=6)
    assert len(res["records"]) == 1 and "timed out" in res["records"][0]["error"]  # 80 spots not attempted


def test_bench_efficiency_cli_writes_table1_and_figure3(tmp_path, capsys):
    out = tmp_path / "eff"
    argv = ["bench", "efficiency", "--out", str(out), "--methods", "mean", "--spots", "40", "--n-genes", "6",
            "--epochs", "1", "--threads", "1", "--device", "cpu", "--no-progress", "--scaling", "--scaling-spots", "40",
            "--scaling-genes", "6", "--fixed-genes", "6", "--fixed-spots", "40"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Efficiency (Table 1)" in text and "| mean |" in text and "Figure 3:" in text
    saved = json.loads((out / "efficiency.json").read_text())
    assert saved["command"].startswith("hist-st ") and saved["methods"] == ["mean"]
    assert len(json.loads((out / "scaling" / "scaling.json").read_text())["records"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["bench", "efficiency", "--methods", "hist,foo"], "--methods: unknown method 'foo'"),
    (["bench", "speed", "--modes", "infer,fit"], "--modes: 'infer,fit': give infer and/or train"),
])
def test_bench_cli_refuses_bad_options(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_workers_train_hist_with_the_config_yaml_and_key_its_content(tmp_path):
    """``bench efficiency --config`` reaches every HiST worker (it was ignored), and the timing key follows
    the YAML's content, not its path; without a YAML the specs (and the keys of earlier runs) are as before."""
    from hist_st.bench.efficiency import _method

    yaml = tmp_path / "hist.yaml"
    yaml.write_text("model:\n  dim: 16\n  heads: 2\n")
    w = Workers(methods=["hist"], config=yaml, overrides=["model.levels=11-1"], device="cpu", progress=False)
    spec = w.specs(SyntheticSlides().data(0))[0]
    method, _ = _method(spec, "cpu", "emb")
    assert (method.config.model.dim, method.config.model.heads) == (16, 2)
    assert "config" not in Workers(methods=["hist"], device="cpu").specs({"synthetic": True})[0]
    key = timing_key([spec])
    yaml.write_text("model:\n  dim: 32\n  heads: 2\n")
    assert timing_key(w.specs(SyntheticSlides().data(0))) != key
