"""`hist_st.cohort`: the one reader/writer of cohort.json and the gene-set spec every command uses."""

from __future__ import annotations

import json

import pytest
import scipy.sparse as sp

from hist_st.cohort import CohortManifest, GeneSet, read_manifest
from hist_st.errors import InputError
from hist_st.harmonise import rank_highly_expressed, rank_hvg
from hist_st.train.config import GeneConfig, load_config, with_gene_set
from hist_st.train.data import load_slides, select_genes
from hist_st.train.toy import write_toy_cohort


@pytest.mark.parametrize(
    ("spec", "ranking", "n", "canonical"),
    [("hvg:2000", "hvg", 2000, "hvg:2000"), ("he:250", "highly_expressed", 250, "he:250"),
     ("highly_expressed:12", "highly_expressed", 12, "he:12"), ("HVG", "hvg", 2000, "hvg:2000"),
     ("hest-bench:50", "hest-bench", 50, "hest-bench:50")],
)
def test_gene_set_spec(spec, ranking, n, canonical):
    gs = GeneSet.parse(spec)
    assert (gs.ranking, gs.n, gs.spec) == (ranking, n, canonical)
    assert gs.label == canonical.replace(":", "")
    assert GeneConfig.from_spec(spec) == GeneConfig(n_top=n, ranking=ranking)


@pytest.mark.parametrize(("spec", "message"), [("top:5", "unknown gene ranking"), ("he:x", "must be an integer"),
                                               ("hvg:0", "must be positive")])
def test_gene_set_spec_errors(spec, message):
    with pytest.raises(InputError, match=f"--genes: .*{message}"):
        GeneSet.parse(spec)


def test_old_gene_overrides_refused_with_the_new_spelling():
    with pytest.raises(InputError, match="genes.n_top=250: .*use --genes hvg:250"):
        with_gene_set(["epochs=3", "genes.n_top=250"])
    with pytest.raises(InputError, match="use --genes he:40"):
        with_gene_set(["genes.ranking=highly_expressed", "genes.n_top=40"], "hvg:10")
    cfg = load_config(None, with_gene_set(["epochs=3", "genes.scope=train-only"], "he:40"))
    assert (cfg.epochs, cfg.genes.n_top, cfg.genes.ranking, cfg.genes.scope) == (3, 40, "highly_expressed", "train-only")


def test_manifest_round_trip_and_validation(tmp_path):
    data = {"slide_ids": ["a", "b"], "patients": {"a": "P1", "b": "P1"}, "genes": ["G1", "G2"], "hvg": ["G2", "G1"]}
    path = CohortManifest.write(tmp_path, data)
    assert path == tmp_path / "cohort.json" and json.loads(path.read_text()) == data
    man = CohortManifest.read(tmp_path)
    assert dict(man) == data and man.slide_ids == ["a", "b"] and man.ranking("hvg") == ["G2", "G1"]
    assert CohortManifest.read(path) == man and read_manifest(tmp_path) == man
    with pytest.raises(InputError, match="no 'highly_expressed' gene ranking"):
        man.ranking("highly_expressed")
    assert CohortManifest.read(tmp_path / "none") is None
    with pytest.raises(InputError, match="cohort manifest not found"):
        CohortManifest.read(tmp_path / "none", required=True)
    with pytest.raises(InputError, match="'hvg' lists a gene more than once"):
        CohortManifest.write(tmp_path / "bad", {**data, "hvg": ["G1", "G1"]})
    assert not (tmp_path / "bad" / "cohort.json").exists()
    (tmp_path / "cohort.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="must hold a JSON object"):
        CohortManifest.read(tmp_path)
    (tmp_path / "cohort.json").write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        CohortManifest.read(tmp_path)


def test_toy_cohort_rankings_are_the_prepare_rankings(tmp_path):
    """The toy cohort's 'hvg' is scanpy's seurat-flavour ranking, as `hist-st prepare` writes it (not plain
    variance), and its 'highly_expressed' the normalised mean expression."""
    folder = write_toy_cohort(tmp_path / "toy", n_slides=3, n_spots=60, n_genes=10, dim=8)
    slides = load_slides(folder)
    genes = [str(g) for g in slides[0].genes]
    mats = [sp.csr_matrix(s.counts) for s in slides]
    man = CohortManifest.read(folder, required=True)
    assert man["hvg"] == rank_hvg(mats, genes)
    assert man["highly_expressed"] == rank_highly_expressed(mats, genes)
    assert select_genes(slides, GeneConfig.from_spec("hvg:4"), man) == rank_hvg(mats, genes)[:4]
