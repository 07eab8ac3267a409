"""`hist-st prepare` across ranks: 2 gloo processes share the slides, rank 0 writes the manifest, and the
cohort equals the one a single process prepares."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hist_st.slide import read_prepared

KW = dict(patch_px=32, patch_um_per_px=3.5, thumbnail_size=64, progress=False, log=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_her2st(root, sections) -> None:
    """A her2st-layout folder: 5 x 4 spots 40 px apart, Poisson counts, a random-texture image."""
    import gzip

    from PIL import Image

    for k, section in enumerate(sections):
        rng = np.random.default_rng(k)
        (root / "ST-cnts").mkdir(parents=True, exist_ok=True)
        (root / "ST-spotfiles").mkdir(parents=True, exist_ok=True)
        rows, sel = [], ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"]
        for x in range(1, 6):
            for y in range(1, 5):
                sel.append(f"{x}\t{y}\t{x}\t{y}\t{x * 40.0:.2f}\t{y * 40.0:.2f}\t1")
                rows.append(f"{x}x{y}\t" + "\t".join(str(v) for v in rng.poisson(4, 5)))
        (root / "ST-spotfiles" / f"{section}_selection.tsv").write_text("\n".join(sel) + "\n")
        with gzip.open(root / "ST-cnts" / f"{section}.tsv.gz", "wt") as fh:
            fh.write("\tG1\tG2\tG3\tG4\tG5\n" + "\n".join(rows) + "\n")
        folder = root / "ST-imgs" / section[0] / section
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(100, 230, size=(200, 240, 3), dtype=np.uint8)).save(folder / "he.png")


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from hist_st.prepare import prepare_cohort
        from hist_st.sources import sources_from_her2st

        rep = prepare_cohort(sources_from_her2st(root), out, device="cpu", **KW)
        with open(f"{out}/../rank{rank}.json", "w") as fh:
            json.dump({"prepared": rep.prepared, "failed": rep.failed, "manifest": str(rep.manifest)}, fh)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_prepare_the_same_cohort_as_one(tmp_path):
    from hist_st.prepare import prepare_cohort
    from hist_st.sources import sources_from_her2st

    root = tmp_path / "raw"
    _write_her2st(root, ["A1", "A2", "B1", "B2", "C1"])
    mp.spawn(_worker, args=(2, _free_port(), str(root), str(tmp_path / "ddp")), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(reports[0]["prepared"]) == ["A1", "A2", "B1", "B2", "C1"] and not reports[0]["failed"]
    assert reports[0]["prepared"] == reports[1]["prepared"]  # every rank returns the merged report
    assert reports[1]["manifest"].endswith("cohort.json")

    torch.set_num_threads(1)
    single = prepare_cohort(sources_from_her2st(root), tmp_path / "one", device="cpu", **KW)
    assert sorted(single.prepared) == sorted(reports[0]["prepared"])
    a = json.loads((tmp_path / "ddp" / "cohort.json").read_text())
    b = json.loads((tmp_path / "one" / "cohort.json").read_text())
    for key in ("slide_ids", "genes", "hvg", "highly_expressed", "embedding_dims"):
        assert sorted(a[key]) == sorted(b[key]) if key == "slide_ids" else a[key] == b[key], key
    for sid in b["slide_ids"]:
        x, y = read_prepared(tmp_path / "ddp" / f"{sid}.h5ad"), read_prepared(tmp_path / "one" / f"{sid}.h5ad")
        np.testing.assert_allclose(x.embeddings["efficientnet-lite0"], y.embeddings["efficientnet-lite0"], atol=1e-5)
        assert x.counts.toarray().tolist() == y.counts.toarray().tolist()
