"""`hist-st bench speed` on a tiny setting: every field is there and plausible, plots are written."""

from __future__ import annotations

import json

from hist_st.bench.speed import SpeedSettings, format_row, measure
from hist_st.cli import main


def test_measure_reports_time_memory_and_flops() -> None:
    model = {"dim": 32, "heads": 4}
    for mode in ("infer", "train"):
        r = measure(SpeedSettings(spots=300, genes=16, mode=mode, in_dim=24, threads=1, repeats=1, model=model))
        assert r["seconds"] > 0 and r["peak_rss_gb"] >= r["import_rss_gb"] > 0
        assert r["gflop"] > 0 and r["matmul_gflops"] > 0 and 0 < r["fraction_of_matmul"]
        assert r["tokens_per_level"][0] >= r["tokens_per_level"][1] >= r["tokens_per_level"][2]
        assert "GFLOP/s" in format_row(r)


def test_cli_writes_json_lines_and_plots(tmp_path, capsys) -> None:
    argv = ["bench", "speed", "--out", str(tmp_path), "--spots", "200,400", "--genes", "8", "--modes", "infer",
            "--repeats", "1", "--threads", "1", "--in-dim", "16", "--model", "dim=32", "--model", "heads=4", "--json"]  # fmt: skip
    assert main(argv) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["spots"] for r in lines] == [200, 400] and all("error" not in r for r in lines)
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert len(saved["results"]) == 2 and (tmp_path / "speed_vs_spots.png").stat().st_size > 0


def test_measure_bf16_on_the_cpu_and_the_memory_is_read_before_the_flop_count() -> None:
    r = measure(SpeedSettings(spots=200, genes=8, mode="infer", in_dim=16, threads=1, repeats=1,
                              precision="bf16", model={"dim": 32, "heads": 4}))  # fmt: skip
    assert r["autocast_bf16"] is True and r["matmul_bf16_gflops"] > 0 and r["gflop"] > 0
    assert "[bf16 autocast]" in format_row(r)


def test_bench_host_reports_every_phase(tmp_path, capsys) -> None:
    out = tmp_path / "host.json"
    argv = ["bench", "host", "--her2st", str(tmp_path / "none"), "--spots", "60", "--steps", "3", "--dim", "16",
            "--heads", "2", "--genes", "8", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["slide"].startswith("synthetic") and set(r["phases"]) == {
        "augment", "lattice", "batch", "forward", "backward", "optimizer"}  # fmt: skip
    assert all(v > 0 for v in r["phases"].values()) and r["step_s"] >= max(r["phases"].values())
    assert r["ops_forward"] > 0 and r["ops_backward"] > 0 and "tensor ops" in capsys.readouterr().out


def test_bench_encoder_reports_patches_per_second_and_cosine(tmp_path, capsys) -> None:
    out = tmp_path / "enc.json"
    argv = ["bench", "encoder", "--her2st", str(tmp_path / "none"), "--batch-sizes", "2", "--rounds", "1",
            "--threads", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(out.read_text())
    rows = {row["precision"]: row for row in r["rows"]}
    assert set(rows) == {"fp32", "bf16"} and all(row["patches_per_s"] > 0 for row in rows.values())
    assert rows["fp32"]["cos_min"] > 0.9999 and rows["bf16"]["cos_min"] > 0.9
    assert r["patches"] == "random pixels" and "patches/s" in capsys.readouterr().out


def test_matmul_reference_falls_back_to_the_probe_when_the_product_would_not_fit(monkeypatch) -> None:
    """`matmul_gflops` times a 512 x 512 product first and reports its rate when the full size would take
    longer than the budget (bfloat16 without native CPU support runs at ~1 GFLOP/s), else the full size."""
    from hist_st.bench import harness

    calls = []
    real = harness.timed_steps
    monkeypatch.setattr(harness, "timed_steps", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    assert harness.matmul_gflops("cpu", size=16384, budget_s=1e-9) > 0  # 16384^2 would take minutes
    assert calls == [2]
    calls.clear()
    assert harness.matmul_gflops("cpu", size=768, repeats=3, budget_s=1e9) > 0
    assert calls == [2, 3]
