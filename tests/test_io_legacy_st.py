"""Legacy ST reader (her2st layout): a synthetic section written in the real format, and the real data."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from hist_st.errors import InputError
from hist_st.io import find_her2st_sections, read_her2st_section, read_legacy_st


def write_her2st_section(root, section="A1", n_x=6, n_y=5, px_per_pitch=40.0, genes=None, image=True, seed=0):
    """Write ``section`` of a her2st-layout folder under ``root``; returns the true um/px."""
    rng = np.random.default_rng(seed)
    genes = genes or [f"G{i}" for i in range(12)]
    (root / "ST-cnts").mkdir(parents=True, exist_ok=True)
    (root / "ST-spotfiles").mkdir(parents=True, exist_ok=True)
    rows, sel = [], ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"]
    for x in range(2, 2 + n_x):
        for y in range(3, 3 + n_y):
            nx, ny = x + rng.normal(0, 0.01), y + rng.normal(0, 0.01)
            sel.append(
                f"{x}\t{y}\t{nx:.3f}\t{ny:.3f}\t{(nx - 1) * px_per_pitch:.2f}\t{(ny - 2) * px_per_pitch:.2f}\t1"
            )
            rows.append(f"{x}x{y}\t" + "\t".join(str(v) for v in rng.poisson(3, len(genes))))
    (root / "ST-spotfiles" / f"{section}_selection.tsv").write_text("\n".join(sel) + "\n")
    with gzip.open(root / "ST-cnts" / f"{section}.tsv.gz", "wt") as fh:
        fh.write("\t" + "\t".join(genes) + "\n" + "\n".join(rows) + "\n")
    if image:
        from PIL import Image

        folder = root / "ST-imgs" / section[0] / section
        folder.mkdir(parents=True, exist_ok=True)
        w, h = int((n_x + 1) * px_per_pitch), int((n_y + 1) * px_per_pitch)
        img = rng.integers(120, 230, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{section}_HE.jpg", quality=90)
    return 200.0 / px_per_pitch


def test_read_synthetic_section(tmp_path):
    upp = write_her2st_section(tmp_path, "A1")
    write_her2st_section(tmp_path, "B2", image=False)
    secs = find_her2st_sections(tmp_path)
    assert [s.slide_id for s in secs] == ["A1", "B2"]
    assert secs[0].image is not None and secs[1].image is None and secs[0].patient == "A"
    s = read_her2st_section(secs[0])
    assert s.n_spots == 30 and s.n_genes == 12 and s.technology == "st"
    assert s.um_per_px == pytest.approx(upp, rel=1e-2)
    assert "pixel spacing" in s.meta["um_per_px_source"]
    assert s.spot_pitch_um == 200 and s.lattice_unit_um == 200
    assert s.array_coords[0].tolist() == [3, 2]  # (row, col) = (y, x)
    assert s.counts.dtype == np.float32
    s.validate()


def test_bad_legacy_inputs(tmp_path):
    write_her2st_section(tmp_path, "A1")
    cnt, spots = tmp_path / "ST-cnts" / "A1.tsv.gz", tmp_path / "ST-spotfiles" / "A1_selection.tsv"
    # a count row without a spot position
    lines = spots.read_text().splitlines()
    spots.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(InputError, match="no selected spot"):
        read_legacy_st(cnt, spots)
    spots.write_text("\n".join(lines) + "\n")
    # non-integer counts
    text = gzip.open(cnt, "rt").read().replace("\t3\t", "\t2.5\t", 1)
    with gzip.open(cnt, "wt") as fh:
        fh.write(text)
    with pytest.raises(InputError, match="not integers"):
        read_legacy_st(cnt, spots)
    with pytest.raises(InputError, match="not found"):
        read_legacy_st(tmp_path / "nope.tsv", spots)
    with pytest.raises(InputError, match="her2st-layout"):
        find_her2st_sections(tmp_path / "ST-cnts")


def test_real_her2st_section(her2st_dir):
    secs = {s.slide_id: s for s in find_her2st_sections(her2st_dir)}
    assert len(secs) == 36
    with_image = sorted(k for k, s in secs.items() if s.image is not None)
    assert with_image == ["B4", "C2", "C3", "C4", "C5", "C6"]
    s = read_her2st_section(secs["C5"])
    assert s.n_spots == 181 and s.n_genes > 15000
    assert 0.66 < s.um_per_px < 0.70  # ~292 px per 200 um
