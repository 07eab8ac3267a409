"""`hist-st bench speed` on a tiny setting: every field is there and plausible, plots are written."""

from __future__ import annotations

import json

from hist_st.bench.speed import SpeedSettings, format_row, measure
from hist_st.cli import main


def test_measure_reports_time_memory_and_flops() -> None:
    model = {"dim": 32, "heads": 4}
    for mode in ("infer", "train"):
        r = measure(SpeedSettings(spots=300, genes=16, mode=mode, in_dim=24, threads=1, repeats=1, model=model))
        # peak RSS is monotonic per process: in a shared pytest worker it may equal an earlier peak
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
