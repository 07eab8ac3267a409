"""`hist-st train / predict / cv` end to end on a tiny cohort, and clear errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hist_st.cli import main
from hist_st.cli.train import LOG
from hist_st.slide import read_prepared
from hist_st.train.toy import write_toy_cohort

TINY = ["--genes", "hvg:6", "model.dim=32", "model.heads=4", "epochs=1", "--no-progress"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_toy_cohort(tmp_path_factory.mktemp("toy"), n_slides=4, n_spots=90, n_genes=10, dim=16)


def test_train_then_predict(cohort, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--slides", str(cohort), "--out", str(run), "--ids", "toy00,toy01", *TINY]) == 0
    assert "checkpoint" in capsys.readouterr().out
    assert {"model.pt", "config.yaml", "genes.txt", "history.json"} <= {p.name for p in run.iterdir()}
    assert main(["train", "--slides", str(cohort), "--out", str(run), "--resume", *TINY]) == 0  # already done
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run / "model.pt"), "--slides", str(cohort), "--out", str(out),
                 "--ids", "toy02", "--mc-samples", "2", "--no-progress"]) == 0
    pred = read_prepared(out / "toy02.h5ad")
    genes = (run / "genes.txt").read_text().split()
    assert list(pred.genes) == genes
    assert pred.predicted.shape == (pred.n_spots, len(genes)) and np.all(pred.predicted >= 0)
    assert pred.predicted_std.shape == pred.predicted.shape
    assert pred.counts is not None  # the measured counts travel with the predictions (layers['measured_counts'])
    capsys.readouterr()
    assert main(["predict", "--model", str(run / "model.pt"), "--slides", str(cohort), "--out", str(out),
                 "--ids", "toy03", "--genes", ",".join(genes[:2]), "--no-progress"]) == 0
    maps = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["maps"]
    assert maps == [str(out / "toy03_maps.png")] and (out / "toy03_maps.png").stat().st_size > 1000
    assert main(["predict", "--model", str(run / "model.pt"), "--slides", str(cohort), "--out", str(out),
                 "--genes", "NOPE", "--no-progress"]) == 2
    assert "not among the model's" in capsys.readouterr().err


def test_cv_end_to_end(cohort, tmp_path, capsys):
    out = tmp_path / "cv"
    code = main(["cv", "--slides", str(cohort), "--out", str(out), "--folds", "2", "--group-by", "patient",
                 "--baselines", "ridge,mean", *TINY])
    assert code == 0
    printed = capsys.readouterr().out
    assert "pooled R2" in printed and "per-gene PCC" in printed and "ridge" in printed
    for name in ("splits.json", "metrics.json", "table.md", "loss_curves.png", "config.yaml", "genes.txt",
                 "versions.json"):
        assert (out / name).is_file(), name
    splits = json.loads((out / "splits.json").read_text())
    assert splits["group_by"] == "patient" and len(splits["folds"]) == 2
    for f in splits["folds"]:
        fold = json.loads((out / f"fold_{f['fold']}" / "metrics.json").read_text())
        assert set(fold["metrics"]) == {"HiST", "ridge", "mean"}
        for sid in f["test"]:
            assert read_prepared(out / f"fold_{f['fold']}" / "predictions" / f"{sid}.h5ad").predicted is not None
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["methods"]["HiST"]) >= {"pooled", "per_gene"}
    # the same folds again, from the saved file
    assert main(["cv", "--slides", str(cohort), "--out", str(tmp_path / "cv2"), "--splits", str(out / "splits.json"),
                 "--no-predictions", *TINY]) == 0
    assert json.loads((tmp_path / "cv2" / "splits.json").read_text())["folds"] == splits["folds"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--slides", "{missing}", "--out", "{tmp}/r"], "slide folder not found"),
        (["train", "--slides", "{cohort}", "--out", "{tmp}/r", "epochz=3"], "unknown key"),
        (["train", "--slides", "{cohort}", "--out", "{tmp}/r", "--ids", "toy00,nope"], "no prepared slide file"),
        (["predict", "--model", "{tmp}/none.pt", "--slides", "{cohort}", "--out", "{tmp}/p"], "checkpoint not found"),
        (["cv", "--slides", "{cohort}", "--out", "{tmp}/c", "--folds", "9"], "needs at least 9 slides"),
        (["cv", "--slides", "{cohort}", "--out", "{tmp}/c", "genes.n_top=250"], "use --genes hvg:250"),
        (["train", "--slides", "{cohort}", "--out", "{tmp}/r", "genes.ranking=highly_expressed"], "use --genes he:2000"),
        (["train", "--slides", "{cohort}", "--out", "{tmp}/r", "--genes", "top:5"], "unknown gene ranking 'top'"),
        (["train", "--slides", "{cohort}", "--out", "{tmp}/r", "epochs"], "not of the form key=value"),
    ],
)
def test_cli_errors_are_clear(cohort, tmp_path, capsys, argv, message):
    argv = [a.format(missing=tmp_path / "missing", tmp=tmp_path, cohort=cohort) for a in argv]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_log_lines_go_to_the_current_stderr(capsys):
    """Warnings of prepare/predict go to ``sys.stderr`` as it is when they are written, not as it was when the
    CLI was imported (a closed stream there failed a later in-process call: "I/O operation on closed file")."""
    LOG("a warning line")
    assert "a warning line" in capsys.readouterr().err
