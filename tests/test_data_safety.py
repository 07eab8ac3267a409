"""Nothing lost, nothing silently accepted (issue 11): one test per reported case, on broken copies of
shared or toy data made in a temporary folder."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from hist_st.cli import main
from hist_st.errors import InputError
from hist_st.slide import is_prediction, read_prepared, remove_stale_temporaries, write_prepared
from hist_st.train.checkpoint import content_hash, load_bundle, load_checkpoint, save_checkpoint
from hist_st.train.toy import toy_slide, write_toy_cohort

TINY = ["--genes", "hvg:6", "model.dim=16", "model.heads=2", "epochs=2", "--no-progress"]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_toy_cohort(tmp_path_factory.mktemp("toy"), n_slides=3, n_spots=60, n_genes=10, dim=8)


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--slides", str(cohort), "--out", str(out), "--ids", "toy00,toy01", *TINY]) == 0
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# --- 1. data loss ------------------------------------------------------------------------------------
def test_predict_never_overwrites_a_prepared_slide(cohort, run, tmp_path, capsys):
    c = _copy(cohort, tmp_path / "cohort")
    before = _sha(c / "toy02.h5ad")
    code = main(["predict", "--model", str(run), "--slides", str(c), "--ids", "toy02", "--out", str(c), "--no-progress"])
    assert code == 2
    err = _err(capsys)
    assert "would overwrite the prepared slide it predicts" in err and str(c / "toy02.h5ad") in err
    assert _sha(c / "toy02.h5ad") == before
    # predictions go elsewhere; they are marked, carry no prepare key and are never read as prepared slides
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run), "--slides", str(c), "--out", str(out), "--no-progress"]) == 0
    pred = read_prepared(out / "toy02.h5ad")
    assert is_prediction(pred) and is_prediction(out / "toy02.h5ad") and not is_prediction(c / "toy02.h5ad")
    assert "prepare_key" not in pred.meta
    # a prepared slide already in the output folder is not replaced either (naming both paths)
    other = _copy(cohort, tmp_path / "other")
    assert main(["predict", "--model", str(run), "--slides", str(c), "--out", str(other), "--no-progress"]) == 2
    err = _err(capsys)
    assert "already holds a prepared slide" in err and str(c / "toy00.h5ad") in err
    # ... but an earlier prediction may be replaced
    assert main(["predict", "--model", str(run), "--slides", str(c), "--out", str(out), "--no-progress"]) == 0
    # a prediction file inside a cohort is refused by training and by prepare's cohort step, not taken as done
    shutil.copyfile(out / "toy01.h5ad", c / "toy01.h5ad")
    assert main(["train", "--slides", str(c), "--out", str(tmp_path / "r2"), *TINY]) == 2
    assert "is a prediction file" in _err(capsys) and not (tmp_path / "r2").exists()
    from hist_st.cohort import finalise_cohort
    from hist_st.prepared import existing_key
    from hist_st.wsi import PatchParams

    meta = dict(pred.meta, prepare_key="abc")  # a prediction file of an older hist-st kept the key
    pred.meta = meta
    write_prepared(pred, c / "toy02.h5ad")
    assert existing_key(c / "toy02.h5ad") is None  # never "already prepared"
    with pytest.raises(InputError, match="is a prediction file"):
        finalise_cohort(c, ["toy00", "toy01"], encoder_name="toy", encoder_dim=8, params=PatchParams(32, 1.0))


# --- 2. corrupt weights ------------------------------------------------------------------------------
def _flip_inside(path, tensor: torch.Tensor, n: int = 64) -> None:
    raw = bytearray(path.read_bytes())
    blob = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = raw.find(blob)
    assert at > 0, "tensor bytes not found in the file"
    start = at + len(blob) // 2 - n // 2
    for i in range(start, start + n):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_flipped_bytes_in_weights_are_refused(cohort, run, tmp_path, capsys):
    model = tmp_path / "model.pt"
    shutil.copyfile(run / "model.pt", model)
    _flip_inside(model, load_checkpoint(model)["model"]["head.weight"])
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(model), "--slides", str(cohort), "--out", str(out), "--no-progress"]) == 2
    assert "content hash mismatch" in _err(capsys) and not out.exists()


def test_non_finite_weights_and_predictions_are_never_written(cohort, run, tmp_path):
    ckpt = load_checkpoint(run)
    ckpt["model"]["head.weight"][0, 0] = float("inf")
    with pytest.raises(InputError, match="weights are not finite"):
        save_checkpoint(tmp_path / "bad.pt", ckpt)
    assert not (tmp_path / "bad.pt").exists()
    legacy = {k: v for k, v in ckpt.items() if k not in ("sha256", "kind")}  # no hash: older hist-st
    torch.save(legacy, tmp_path / "legacy.pt")
    with pytest.raises(InputError, match="NaN or infinite"):
        load_checkpoint(tmp_path / "legacy.pt")
    # a model whose predictions overflow (log1p 200 -> expm1 = inf in float32): nothing is written
    from hist_st.train.predict import predict_folder

    bundle = load_bundle(run)
    with torch.no_grad():
        bundle.model.head.bias.fill_(200.0)
    with pytest.raises(InputError, match="NaN or infinite"):
        predict_folder(bundle, cohort, tmp_path / "pred", progress=False)
    assert not (tmp_path / "pred").exists()
    # the last slide fails (absurd embeddings): the two before it are not left behind either
    c = _copy(cohort, tmp_path / "c")
    s = read_prepared(c / "toy02.h5ad")
    s.embeddings["toy"] = s.embeddings["toy"] * np.float32(1e30)
    write_prepared(s, c / "toy02.h5ad")
    (tmp_path / "pred2").mkdir()
    with pytest.raises(InputError, match="slide 'toy02'.*NaN or infinite"):
        predict_folder(load_bundle(run), c, tmp_path / "pred2", progress=False)
    assert list((tmp_path / "pred2").iterdir()) == []


def test_unreadable_checkpoint_never_suggests_weights_only_false(tmp_path, capsys):
    import argparse

    torch.save({"format": "hist-st-checkpoint", "obj": argparse.Namespace(a=1)}, tmp_path / "evil.pt")  # a class
    with pytest.raises(InputError) as info:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only=False" not in str(info.value) and "pickled objects" in str(info.value)
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(InputError, match="truncated, corrupt or not a checkpoint"):
        load_checkpoint(tmp_path / "trunc.pt")


def test_model_file_is_slim_and_hash_covers_both_files(cohort, tmp_path):
    from hist_st.train import load_config, train

    cfg = load_config(None, ["model.dim=16", "model.heads=2", "genes.n_top=6", "epochs=3", "progress=false"])
    train(cfg, cohort, out_dir=tmp_path / "r", stop_after_epoch=1)
    model, resume = torch.load(tmp_path / "r" / "model.pt"), torch.load(tmp_path / "r" / "resume.pt")
    assert model["kind"] == "model" and "optimizer" not in model and resume["kind"] == "resume"
    assert model["sha256"] == content_hash(model) and resume["sha256"] == content_hash(resume)
    assert (tmp_path / "r" / "model.pt").stat().st_size < (tmp_path / "r" / "resume.pt").stat().st_size
    for a, b in zip(model["model"].values(), resume["model"].values()):
        assert torch.equal(a, b)
    # an older checkpoint holding both parts still loads for prediction and for resuming, also as the
    # model.pt of an older run folder resumed with `train --resume`
    legacy = {k: v for k, v in resume.items() if k not in ("sha256", "kind")}
    torch.save(legacy, tmp_path / "old.pt")
    assert load_bundle(tmp_path / "old.pt").genes == [str(g) for g in model["genes"]]
    done = train(cfg, cohort, out_dir=tmp_path / "r2", resume=tmp_path / "old.pt")
    assert len(done.history) == 3 and not (tmp_path / "r2" / "resume.pt").exists()
    old_run = tmp_path / "old_run"
    old_run.mkdir()
    torch.save(legacy, old_run / "model.pt")
    argv = ["train", "--slides", str(cohort), "--out", str(old_run), "--resume", "--no-progress"]
    assert main(argv) == 0
    assert torch.load(old_run / "model.pt")["epoch"] == 3


# --- 3. resume accepts a different run --------------------------------------------------------------
@pytest.fixture()
def half_run(cohort, tmp_path):
    from hist_st.train import load_config, train

    cfg = load_config(None, ["model.dim=16", "model.heads=2", "genes.n_top=6", "epochs=3", "progress=false"])
    out = tmp_path / "half"
    train(cfg, cohort, slide_ids=["toy00", "toy01"], out_dir=out, stop_after_epoch=1)
    return out


def test_resume_refuses_other_slides_and_overrides(cohort, half_run, capsys):
    base = ["train", "--slides", str(cohort), "--out", str(half_run), "--resume", "--no-progress"]
    before = _sha(half_run / "resume.pt")
    assert main([*base, "--ids", "toy00,toy02"]) == 2
    err = _err(capsys)
    assert "slides: checkpoint [toy00, toy01], now [toy00, toy02]" in err and "--accept-changes" in err
    assert main([*base, "--ids", "toy00,toy01", "model.dim=128", "lr=0.01", "seed=5"]) == 2
    err = _err(capsys)
    assert "model.dim: checkpoint 16, now 128" in err and "lr: checkpoint 0.0001, now 0.01" in err
    assert "seed: checkpoint 0, now 5" in err and "cannot change in a resumed run" in err
    assert _sha(half_run / "resume.pt") == before
    # the same run continues (runtime keys may differ) ...
    assert main([*base, "threads=1"]) == 0  # without --ids: the checkpoint's slides
    assert torch.load(half_run / "model.pt")["epoch"] == 3 and not (half_run / "resume.pt").exists()
    assert main(base) == 0  # finished: nothing to resume
    assert "already finished" in capsys.readouterr().out


def test_resume_accepts_listed_changes_with_the_flag(cohort, half_run, capsys):
    argv = ["train", "--slides", str(cohort), "--out", str(half_run), "--resume", "--ids", "toy00,toy02",
            "augment.dropout=0.1", "--no-progress"]
    assert main(argv) == 2
    assert main([*argv, "--accept-changes"]) == 0
    ckpt = torch.load(half_run / "model.pt")
    assert ckpt["slides"] == ["toy00", "toy02"] and ckpt["config"]["augment"]["dropout"] == 0.1
    log = json.loads((half_run / "accepted_changes.json").read_text())
    assert set(log[0]["changes"]) == {"slides", "augment.dropout"} and log[0]["resumed_after_epoch"] == 1
    assert ckpt["accepted_changes"][0]["changes"] == log[0]["changes"]


def test_train_into_an_existing_run_is_refused(cohort, run, capsys):
    before = _sha(run / "model.pt")
    assert main(["train", "--slides", str(cohort), "--out", str(run), *TINY]) == 2
    assert "a checkpoint of an earlier run is already here" in _err(capsys)
    assert _sha(run / "model.pt") == before


# --- 4 and 7. silently accepted input, misleading messages (her2st copies) --------------------------
@pytest.fixture()
def c2(her2st_dir, tmp_path):
    """Counts and spot table of the real her2st section C2 (187 spots), copied for tampering."""
    (tmp_path / "ST-cnts").mkdir()
    (tmp_path / "ST-spotfiles").mkdir()
    shutil.copyfile(her2st_dir / "ST-cnts" / "C2.tsv.gz", tmp_path / "ST-cnts" / "C2.tsv.gz")
    shutil.copyfile(her2st_dir / "ST-spotfiles" / "C2_selection.tsv", tmp_path / "ST-spotfiles" / "C2_selection.tsv")
    return tmp_path


def _read_c2(root):
    from hist_st.io.legacy_st import read_legacy_st

    return read_legacy_st(root / "ST-cnts" / "C2.tsv.gz", root / "ST-spotfiles" / "C2_selection.tsv")


def _edit_spots(root, fn):
    import pandas as pd

    path = root / "ST-spotfiles" / "C2_selection.tsv"
    df = pd.read_csv(path, sep="\t")
    df = fn(df)
    df.to_csv(path, sep="\t", index=False)
    return df


def test_her2st_spot_table_problems_are_named(c2):
    import pandas as pd

    assert _read_c2(c2).n_spots == 187

    def duplicate(df):  # a second row for one spot, 50 px to the right
        row = df.loc[[df.index[df["selected"] == 1][5]]].copy()
        row["pixel_x"] += 50
        return pd.concat([df, row])

    _edit_spots(c2, duplicate)
    with pytest.raises(InputError, match=r"spot \d+x\d+ is listed 2 times with different pixel coordinates"):
        _read_c2(c2)


def test_her2st_misplaced_and_nan_spots(c2):
    import pandas as pd

    original = pd.read_csv(c2 / "ST-spotfiles" / "C2_selection.tsv", sep="\t")
    i = original.index[original["selected"] == 1][7]
    spot = f"{int(round(original.loc[i, 'x']))}x{int(round(original.loc[i, 'y']))}"
    _edit_spots(c2, lambda df: df.assign(pixel_x=df.pixel_x.where(df.index != i, df.pixel_x + 20000)))
    with pytest.raises(InputError, match=f"1 spot\\(s\\) lie more than half a spot pitch.*spot {spot}"):
        _read_c2(c2)
    _edit_spots(c2, lambda df: original.assign(pixel_y=original.pixel_y.where(original.index != i, np.nan)))
    with pytest.raises(InputError, match=rf"missing, non-numeric or infinite 'pixel_y' \(line\(s\) \[{i + 2}\]\)"):
        _read_c2(c2)
    extra = original.iloc[[0]].assign(x=99, y=99, selected=0, pixel_y=np.nan)  # not under tissue: unused
    _edit_spots(c2, lambda df: pd.concat([original, extra]))
    assert _read_c2(c2).n_spots == 187


def test_her2st_barcode_mismatch_counts_every_row(c2):
    path = c2 / "ST-cnts" / "C2.tsv.gz"
    lines = gzip.open(path, "rt").read().splitlines()
    lines = [lines[0]] + ["99x99" + line[line.index("\t"):] if i % 2 else f"{90 + i}x{90 + i}" + line[line.index("\t"):]
                          for i, line in enumerate(lines[1:])]
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="more than one count row"):
        _read_c2(c2)
    lines = [lines[0]] + [f"{90 + i}x{90 + i}" + line[line.index("\t"):] for i, line in enumerate(lines[1:])]
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="none of the 187 count rows matches a selected spot"):
        _read_c2(c2)


def test_splits_and_ids_are_validated_before_training(cohort, tmp_path, capsys):
    cases = {
        "dup": ({"folds": [{"train": ["toy00", "toy00"], "test": ["toy01"]}]}, "lists slide(s) more than once: toy00"),
        "string": ({"folds": [{"train": "toy00", "test": ["toy01"]}]}, "got the string 'toy00'"),
        "empty-test": ({"folds": [{"train": ["toy00"], "test": ["toy01"]}, {"train": ["toy01"], "test": []}]},
                       "fold 1 'test' is empty"),
        "no-folds": ({"folds": []}, "holds no folds"),
        "unknown": ([{"train": ["toy00"], "test": ["C9"]}], "not in the cohort: C9"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        out = tmp_path / f"cv-{name}"
        assert main(["cv", "--slides", str(cohort), "--out", str(out), "--splits", str(path), *TINY]) == 2, name
        err = _err(capsys)
        assert message in err and str(path) in err, (name, err)
        assert not out.exists()
    (tmp_path / "bad.json").write_text('{"folds": [')
    assert main(["cv", "--slides", str(cohort), "--out", str(tmp_path / "c"), "--splits", str(tmp_path / "bad.json"),
                 *TINY]) == 2
    assert "not valid JSON (line 1" in _err(capsys)
    for extra, message in ((["--baselines", "nope"], "unknown baseline(s) nope"), (["--mc-samples", "-2"], "must be >= 0")):
        assert main(["cv", "--slides", str(cohort), "--out", str(tmp_path / "c"), "--folds", "2", *extra, *TINY]) == 2
        assert message in _err(capsys) and not (tmp_path / "c").exists()
    assert main(["train", "--slides", str(cohort), "--out", str(tmp_path / "t"), "--ids", "toy00,toy01,toy00", *TINY]) == 2
    assert "listed more than once: toy00" in _err(capsys) and not (tmp_path / "t").exists()


# --- 6. tracebacks instead of errors -----------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [("model.heads=0", "model.heads must be an integer >= 1, got 0"),
     ("model.half_window=0", "model.half_window must be an integer >= 1, got 0"),
     ("model.dropout=1.5", "model.dropout must lie in [0, 1), got 1.5"),
     ("lr=nan", "lr must be a finite number > 0"),
     ("augment.strength_end=3", "augment.strength_end must lie in [0, 1]"),
     ("betas=0.9", "betas: expected a list, got 0.9"),
     ("device=banana", "unknown device 'banana'"),
     ("lr=1e10", "training diverged: the loss became NaN or infinite")],
)
def test_config_values_are_validated_up_front(cohort, tmp_path, capsys, override, message):
    assert main(["train", "--slides", str(cohort), "--out", str(tmp_path / "r"), *TINY[:-1], override, "--no-progress"]) == 2
    assert message in _err(capsys) and not (tmp_path / "r").exists()


# --- 8. leftovers -------------------------------------------------------------------------------------
def test_stale_temporaries_are_removed_and_failed_runs_leave_no_folder(cohort, tmp_path, capsys):
    target = tmp_path / "s.h5ad"
    dead = 2**22 + 12345  # above the usual pid_max: no such process
    stale = [tmp_path / ".s.h5ad.abcd1234.tmp", tmp_path / f".s.h5ad.{dead}-0badc0de-xyz12345.tmp"]
    from hist_st import slide as slide_mod

    live = tmp_path / f".s.h5ad.{os.getpid()}-{slide_mod._PROCESS_TOKEN}-live0001.tmp"  # this process, in use
    other = tmp_path / ".s.h5ad.gz.abcd1234.tmp"  # another file's temporary
    for p in [*stale, live, other]:
        p.write_bytes(b"half")
    write_prepared(toy_slide("s", 30), target)
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()
    assert remove_stale_temporaries(target) == []
    # a failing cv (no such embedding) leaves no output folder behind
    out = tmp_path / "cv"
    assert main(["cv", "--slides", str(cohort), "--out", str(out), "--folds", "2", "embedding=uni", *TINY]) == 2
    assert "has no embedding 'uni'" in _err(capsys)
    assert not out.exists()


def test_background_checkpoint_is_a_snapshot_and_resumes_bit_identically(cohort, tmp_path):
    """Issue 15 item 4: the resume state is written in the background from a snapshot; a run that dies
    after it resumes to the same weights as an uninterrupted run."""
    from hist_st.train import load_config, train
    from hist_st.train.checkpoint import BackgroundWriter

    writer = BackgroundWriter()
    w = torch.ones(256, 256)
    writer.submit(tmp_path / "snap.pt", {"model": {"w": w}, "model_config": {}, "genes": [], "embedding": "x"},
                  kind="model")
    w.zero_()  # training goes on and changes the weights in place
    assert writer.wait() == tmp_path / "snap.pt"
    assert torch.equal(load_checkpoint(tmp_path / "snap.pt")["model"]["w"], torch.ones(256, 256))

    cfg = load_config(None, ["model.dim=16", "model.heads=2", "genes.n_top=6", "epochs=3", "progress=false",
                             "checkpoint_every=1", "lr=1e-3"])
    full = train(cfg, cohort)

    def die(record):
        if record["epoch"] == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, cohort, out_dir=tmp_path / "r", on_epoch=die)
    assert torch.load(tmp_path / "r" / "resume.pt")["epoch"] == 1 and not (tmp_path / "r" / "model.pt").exists()
    resumed = train(cfg, cohort, out_dir=tmp_path / "r", resume=tmp_path / "r")
    for a, b in zip(resumed.bundle.model.state_dict().values(), full.bundle.model.state_dict().values()):
        assert torch.equal(a, b)
    # a run that fails before its first checkpoint leaves no folder
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, cohort, out_dir=tmp_path / "r2", on_epoch=lambda r: die({"epoch": 2}))
    assert not (tmp_path / "r2").exists()


def test_kill_9_during_training_then_resume_is_bit_identical(cohort, tmp_path):
    """kill -9 while `train` runs (possibly during a background checkpoint write), then `--resume`: the
    final weights equal an uninterrupted run's, and no temporary file is left behind."""
    import signal
    import subprocess
    import sys
    import time

    args = ["--genes", "hvg:6", "model.dim=16", "model.heads=2", "epochs=8", "checkpoint_every=1", "threads=1",
            "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}

    def cli(out, *extra):
        return [sys.executable, "-m", "hist_st.cli", "train", "--slides", str(cohort), "--out", str(out), *extra, *args]

    subprocess.run(cli(tmp_path / "full"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cli(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "resume.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert torch.load(tmp_path / "killed" / "resume.pt")["epoch"] < 8
    subprocess.run(cli(tmp_path / "killed", "--resume"), check=True, env=env, capture_output=True)
    a, b = torch.load(tmp_path / "full" / "model.pt"), torch.load(tmp_path / "killed" / "model.pt")
    assert a["epoch"] == b["epoch"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert not list((tmp_path / "killed").glob(".*.tmp")) and not (tmp_path / "killed" / "resume.pt").exists()


def test_cohort_manifest_is_validated(cohort, tmp_path, capsys):
    c = _copy(cohort, tmp_path / "c")
    manifest = json.loads((c / "cohort.json").read_text())
    for bad, message in (({**manifest, "hvg": "G01"}, "'hvg' must be a list of gene names"),
                         ({**manifest, "hvg": None}, "'hvg' must be a list of gene names"),
                         ([1, 2], "must hold a JSON object")):
        (c / "cohort.json").write_text(json.dumps(bad))
        assert main(["train", "--slides", str(c), "--out", str(tmp_path / "r"), *TINY]) == 2
        err = _err(capsys)
        assert message in err and str(c / "cohort.json") in err and not (tmp_path / "r").exists()


def test_resume_refuses_re_prepared_slides(cohort, tmp_path, capsys):
    from hist_st.train import load_config, train

    c = _copy(cohort, tmp_path / "c")
    cfg = load_config(None, ["model.dim=16", "model.heads=2", "genes.n_top=6", "epochs=3", "progress=false"])
    train(cfg, c, slide_ids=["toy00", "toy01"], out_dir=tmp_path / "r", stop_after_epoch=1)
    s = read_prepared(c / "toy01.h5ad")
    s.embeddings["toy"] = s.embeddings["toy"] + np.float32(0.01)  # same id, other embeddings
    write_prepared(s, c / "toy01.h5ad")
    argv = ["train", "--slides", str(c), "--out", str(tmp_path / "r"), "--resume", "--no-progress"]
    assert main(argv) == 2
    assert "slide data: changed since the checkpoint for [toy01]" in _err(capsys)
    assert main([*argv, "--accept-changes"]) == 0
    assert "slide data" in json.loads((tmp_path / "r" / "accepted_changes.json").read_text())[0]["changes"]
