"""Property test (issue 11): random corruptions of a prepared cohort, a checkpoint and a splits file give
either the correct result or an `InputError` (exit code 2) - never a traceback, never a partial output.

A fixed number of seeded cases keeps it to seconds. Corruptions: bit flips, truncation, overwritten
byte runs, deleted checkpoint fields, and edits of the splits JSON (deleted keys, strings for lists,
duplicated, unknown or missing ids, shuffled folds).
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

from hist_st.cli import main
from hist_st.errors import InputError
from hist_st.slide import read_prepared
from hist_st.train.checkpoint import load_checkpoint, save_checkpoint
from hist_st.train.data import load_slides
from hist_st.train.splits import read_splits
from hist_st.train.toy import write_toy_cohort

TINY = ["--genes", "hvg:6", "model.dim=16", "model.heads=2", "epochs=1", "--no-progress"]
N_CASES = 10


def corrupt_bytes(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One random corruption of a file's bytes: bit flips, truncation or an overwritten run of bytes."""
    raw = bytearray(data)
    kind = ("flip", "truncate", "overwrite")[int(rng.integers(3))]
    if kind == "flip":
        for pos in rng.integers(0, len(raw), size=int(rng.integers(1, 9))):
            raw[pos] ^= 1 << int(rng.integers(8))
    elif kind == "truncate":
        raw = raw[: int(rng.integers(0, len(raw)))]
    else:
        start = int(rng.integers(0, len(raw) - 64))
        raw[start : start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    return bytes(raw), kind


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prop")
    cohort = write_toy_cohort(root / "cohort", n_slides=3, n_spots=40, n_genes=8, dim=8)
    run = root / "run"
    assert main(["train", "--slides", str(cohort), "--out", str(run), "--ids", "toy00,toy01", *TINY]) == 0
    ref = root / "ref"
    assert main(["predict", "--model", str(run), "--slides", str(cohort), "--out", str(ref), "--ids", "toy02",
                 "--no-progress"]) == 0
    return {"root": root, "cohort": cohort, "run": run, "ref": read_prepared(ref / "toy02.h5ad")}


def _same_slide(a, b) -> bool:
    return (
        a.slide_id == b.slide_id and np.array_equal(a.spatial, b.spatial) and list(a.genes) == list(b.genes)
        and (a.counts != b.counts).nnz == 0 and list(a.barcodes) == list(b.barcodes)
        and all(np.array_equal(a.embeddings[k], b.embeddings[k]) for k in a.embeddings)
        and a.meta == b.meta and a.um_per_px == b.um_per_px
    )


@pytest.mark.parametrize("seed", range(N_CASES))
def test_corrupted_prepared_slide(world, tmp_path, capsys, seed):
    rng = np.random.default_rng([seed, 11])
    cohort = shutil.copytree(world["cohort"], tmp_path / "cohort")
    victim = cohort / f"toy0{seed % 3}.h5ad"
    intact = read_prepared(victim)
    damaged, kind = corrupt_bytes(victim.read_bytes(), rng)
    victim.write_bytes(damaged)
    try:
        slides = load_slides(cohort)
    except InputError as exc:
        assert str(victim) in str(exc), (kind, exc)
    else:  # read without complaint: the damage missed every value (HDF5 free space, padding, unused attributes)
        got = next(s for s in slides if s.slide_id == intact.slide_id)
        assert _same_slide(got, intact), f"{kind}: a damaged slide was read with different content"
    if seed < 3:  # the command line on the same damage: exit 0 or 2, no traceback, no partial output
        out = tmp_path / "run"
        code = main(["train", "--slides", str(cohort), "--out", str(out), *TINY])
        err = capsys.readouterr().err
        assert code in (0, 2) and "Traceback" not in err
        assert (code == 0) == out.exists()


def _predict(world, model, out) -> int:
    return main(["predict", "--model", str(model), "--slides", str(world["cohort"]), "--out", str(out),
                 "--ids", "toy02", "--no-progress"])


@pytest.mark.parametrize("seed", range(N_CASES))
def test_corrupted_checkpoint(world, tmp_path, capsys, seed):
    rng = np.random.default_rng([seed, 13])
    model = tmp_path / "model.pt"
    if seed % 3 == 2:  # a field deleted by a buggy writer that rehashes the rest
        ckpt = load_checkpoint(world["run"])
        fields = sorted(k for k in ckpt if k not in ("format", "version", "sha256", "kind"))
        gone = fields[int(rng.integers(len(fields)))]
        del ckpt[gone]
        save_checkpoint(model, ckpt)
        kind = f"deleted {gone!r}"
    else:
        damaged, kind = corrupt_bytes((world["run"] / "model.pt").read_bytes(), rng)
        model.write_bytes(damaged)
    out = tmp_path / "pred"
    code = _predict(world, model, out)
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err, (kind, err)
    if code == 2:
        assert str(model) in err and not out.exists(), (kind, err)
    else:  # the damage changed nothing the prediction uses
        got = read_prepared(out / "toy02.h5ad")
        np.testing.assert_array_equal(got.predicted, world["ref"].predicted, err_msg=kind)


def corrupt_splits(data: dict, rng: np.random.Generator) -> tuple[object, str]:
    """One random edit of a valid splits dict (some edits keep it valid: shuffled folds)."""
    d = copy.deepcopy(data)
    folds = d["folds"]
    f = folds[int(rng.integers(len(folds)))]
    kind = int(rng.integers(9))
    if kind == 0:
        del f[("train", "test")[int(rng.integers(2))]]
    elif kind == 1:
        f["train"] = f["train"][0]  # a string for a list
    elif kind == 2:
        f["train"] = f["train"] + f["train"][:1]  # an id twice
    elif kind == 3:
        f["test"] = []
    elif kind == 4:
        f["test"] = ["nope"]
    elif kind == 5:
        f["test"] = f["test"] + f["train"][:1]  # train and test overlap
    elif kind == 6:
        rng.shuffle(folds)  # still valid
    elif kind == 7:
        d = {"folds": []}
    else:
        f["fold"] = "zero"
    return d, f"edit {kind}"


@pytest.mark.parametrize("seed", range(3 * N_CASES))
def test_corrupted_splits_file(tmp_path, seed):
    rng = np.random.default_rng([seed, 17])
    ids = ["a", "b", "c", "d"]
    valid = {"k": 2, "folds": [{"fold": 0, "train": ["a", "b"], "test": ["c", "d"]},
                               {"fold": 1, "train": ["c", "d"], "test": ["a", "b"]}]}
    path = tmp_path / "splits.json"
    if seed % 3 == 0:
        damaged, kind = corrupt_bytes(json.dumps(valid).encode(), rng)
        path.write_bytes(damaged)
    else:
        data, kind = corrupt_splits(valid, rng)
        path.write_text(json.dumps(data))
    try:
        folds = read_splits(path, ids)
    except InputError as exc:
        assert str(path) in str(exc), kind
        return
    # accepted: a valid split (the damage kept it valid, e.g. shuffled folds or a flipped bit in a key's case)
    assert folds, kind
    for f in folds:
        assert f["train"] and f["test"] and not set(f["train"]) & set(f["test"]), kind
        assert set(f["train"]) | set(f["test"]) <= set(ids), kind
        assert len(set(f["train"])) == len(f["train"]) and len(set(f["test"])) == len(f["test"]), kind
    if "edit" in kind:
        assert sorted((f["fold"], f["train"], f["test"]) for f in folds) == [(0, ["a", "b"], ["c", "d"]),
                                                                              (1, ["c", "d"], ["a", "b"])]


def test_corruption_sanity():
    """The corruption helper really changes the bytes (else the property test would prove nothing)."""
    rng = np.random.default_rng(0)
    data = bytes(range(256)) * 8
    assert all(corrupt_bytes(data, rng)[0] != data for _ in range(20))
