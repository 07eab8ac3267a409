"""Baselines: one interface, published defaults, and the properties each method must have (tiny sizes)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from hist_st.baselines import get_baseline, list_baselines, log1p_targets
from hist_st.errors import InputError
from hist_st.slide import Slide

EMB = "emb"


def _slide(slide_id: str, n: int = 60, g: int = 12, c: int = 8, seed: int = 0, signal: float = 1.0) -> Slide:
    """Tiny slide whose log-rate is linear in its embedding (learnable signal), genes in shuffled order."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(123).normal(size=(c, g)) * 0.5  # shared across slides
    base = np.linspace(0.5, 3.0, g)
    emb = rng.normal(size=(n, c)).astype(np.float32)
    counts = rng.poisson(np.exp(base + signal * emb @ w)).astype(np.float32)
    genes = np.array([f"G{i}" for i in range(g)], dtype=object)
    perm = rng.permutation(g)  # each slide stores genes in its own order; baselines must pick by name
    side = int(np.ceil(np.sqrt(n)))
    xy = np.stack(np.divmod(np.arange(n), side), axis=1)[:, ::-1].astype(np.float64) * 100.0
    xy += rng.uniform(0, 20, size=xy.shape)  # irregular, non-degenerate neighbourhoods
    return Slide(
        slide_id=slide_id,
        spatial=xy + 50.0,
        barcodes=np.array([f"{slide_id}-{i}" for i in range(n)], dtype=object),
        genes=genes[perm],
        counts=sp.csr_matrix(counts[:, perm]),
        embeddings={EMB: emb},
        um_per_px=1.0,
    ).validate()


GENES = [f"G{i}" for i in (3, 0, 7, 1, 11, 5)]


def _fake_patches(size: int = 32):
    """Patch source whose brightness follows the first embedding dimension (so images carry signal)."""

    def source(slide: Slide) -> np.ndarray:
        rng = np.random.default_rng(len(slide.slide_id))
        level = 128 + 40 * np.tanh(slide.embeddings[EMB][:, :3])  # [N, 3]
        noise = rng.normal(0, 10, size=(slide.n_spots, size, size, 3))
        return np.clip(level[:, None, None, :] + noise, 0, 255).astype(np.uint8)

    return source


FAST = {
    "mean": {},
    "ridge": {},
    "mlp": {"epochs": 3},
    "bleep": {"epochs": 3, "top_k": 5},
    "stnet": {"patches": _fake_patches(), "input_size": 32, "epochs": 1, "max_steps": 2, "batch_size": 16},
    "stflow": {"epochs": 1, "crops_per_slide": 2, "hidden": 32, "pair_hidden": 32, "n_layers": 2},
}


@pytest.fixture(scope="module")
def cohort() -> tuple[list[Slide], Slide]:
    return [_slide("a", seed=1), _slide("b", seed=2)], _slide("test", seed=3)


def test_registry_names():
    assert set(list_baselines()) >= {"mean", "ridge", "mlp", "bleep", "stnet", "stflow"}
    with pytest.raises(ValueError, match="unknown baseline"):
        get_baseline("nope")


@pytest.mark.parametrize("name", sorted(FAST))
def test_every_baseline_fits_and_predicts(name, cohort):
    train, test = cohort
    model = get_baseline(name, **FAST[name]).fit(train, GENES, EMB, seed=0)
    pred = model.predict(test)
    assert pred.shape == (test.n_spots, len(GENES))
    assert pred.dtype == np.float32
    assert np.all(np.isfinite(pred))


def test_synthetic_cohort_runs_every_baseline():
    synthetic = pytest.importorskip("hist_st.data.synthetic")
    slides = [synthetic.make_slide(f"s{i}", n_spots=40, n_genes=10, embed_dim=8, seed=i) for i in range(3)]
    genes = list(map(str, slides[0].genes[:6]))
    for name, opts in FAST.items():
        if name == "stnet":
            continue  # synthetic slides have no image; covered above with a patch source
        pred = get_baseline(name, **opts).fit(slides[:2], genes, synthetic.ENCODER, seed=0).predict(slides[2])
        assert pred.shape == (slides[2].n_spots, 6) and np.all(np.isfinite(pred))


def test_targets_pick_genes_by_name(cohort):
    train, _ = cohort
    s = train[0]
    y = log1p_targets(s, GENES)
    col = list(s.genes).index("G7")
    np.testing.assert_allclose(y[:, 2], np.log1p(s.counts[:, col].toarray().ravel()), rtol=1e-6)
    with pytest.raises(InputError, match="absent"):
        log1p_targets(s, ["G0", "NOPE"])


def test_mean_is_training_mean(cohort):
    train, test = cohort
    pred = get_baseline("mean").fit(train, GENES, EMB).predict(test)
    expected = np.concatenate([log1p_targets(s, GENES) for s in train]).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(pred, np.broadcast_to(expected, pred.shape), rtol=1e-6, atol=1e-6)


def test_ridge_matches_hest_pipeline(cohort):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = cohort
    model = get_baseline("ridge", center_targets=False).fit(train, GENES, EMB, seed=7)
    x = np.concatenate([s.embeddings[EMB] for s in train])
    y = np.concatenate([log1p_targets(s, GENES) for s in train])
    pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=8, random_state=7))])
    z = pipe.fit_transform(x)
    alpha = 100 / (z.shape[1] * y.shape[1])  # HEST: n_features counted after PCA
    reg = Ridge(solver="lsqr", alpha=alpha, random_state=7, fit_intercept=False, max_iter=1000).fit(z, y)
    np.testing.assert_allclose(
        model.predict(test), reg.predict(pipe.transform(test.embeddings[EMB])), rtol=1e-4, atol=1e-4
    )
    assert model.alpha_ == pytest.approx(alpha)


def test_bleep_predicts_averages_of_training_spots(cohort):
    train, test = cohort
    y_train = np.concatenate([log1p_targets(s, GENES) for s in train])
    model = get_baseline("bleep", epochs=2, top_k=3).fit(train, GENES, EMB, seed=0)
    idx = model.neighbours(test)
    assert idx.shape == (test.n_spots, 3)
    np.testing.assert_allclose(model.predict(test), y_train[idx].mean(axis=1), rtol=1e-6)
    # k = 1: every prediction is an actual training spot's expression.
    one = get_baseline("bleep", epochs=2, top_k=1).fit(train, GENES, EMB, seed=0).predict(test)
    dist = ((one[:, None, :] - y_train[None]) ** 2).sum(-1).min(axis=1)
    assert np.all(dist < 1e-10)


def test_bleep_identical_query_retrieves_its_own_spot():
    # With one-hot embeddings and expressions the trained joint space maps each query to its own spot.
    n = 12
    emb = np.eye(n, dtype=np.float32)
    counts = (np.eye(n) * 50).astype(np.float32)
    s = Slide(
        "one",
        spatial=np.arange(2 * n, dtype=float).reshape(n, 2) * 10,
        barcodes=np.arange(n).astype(str),
        genes=np.array([f"g{i}" for i in range(n)], dtype=object),
        counts=sp.csr_matrix(counts),
        embeddings={EMB: emb},
    )
    genes = [f"g{i}" for i in range(n)]
    model = get_baseline("bleep", epochs=300, top_k=1, dropout=0.0, batch_size=n).fit([s], genes, EMB, seed=0)
    np.testing.assert_array_equal(model.neighbours(s)[:, 0], np.arange(n))
    np.testing.assert_allclose(model.predict(s), log1p_targets(s, genes), rtol=1e-6)


def test_stflow_loss_decreases(cohort):
    train, _ = cohort
    model = get_baseline(
        "stflow", epochs=6, crops_per_slide=4, hidden=32, pair_hidden=32, n_layers=2, lr=2e-3
    )
    model.fit(train, GENES, EMB, seed=0)
    assert len(model.history_) == 6
    assert np.mean(model.history_[-2:]) < 0.7 * model.history_[0]


def test_stflow_edges_are_e2_invariant():
    from hist_st.baselines.stflow import STFlowDenoiser, knn_graph

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, g = 40, 6
    xy = rng.uniform(0, 10, size=(n, 2))
    net = STFlowDenoiser(5, g, hidden=16, pair_hidden=16, n_layers=2, n_heads=2).eval()
    feats, x = torch.randn(n, 5), torch.randn(n, g)
    nbr = torch.from_numpy(knn_graph(xy, 8))
    th = 0.7
    # A rotation composed with a mirror, plus a translation.
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) @ np.diag([1.0, -1.0])
    with torch.no_grad():
        a = net(x, feats, torch.from_numpy(xy).float(), nbr, torch.tensor(0.3))
        b = net(x, feats, torch.from_numpy(xy @ rot.T + 3.0).float(), nbr, torch.tensor(0.3))
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-4)


def test_stflow_prior_and_sampling_are_seeded(cohort):
    train, test = cohort
    m = get_baseline(
        "stflow", epochs=1, crops_per_slide=1, hidden=16, pair_hidden=16, n_layers=1, prior="zinb-per-gene"
    )
    m.fit(train, GENES, EMB, seed=3)
    assert m.prior_params_["total_count"].shape == (len(GENES),)
    np.testing.assert_array_equal(m.predict(test), m.predict(test))


def test_stnet_loss_decreases(cohort):
    train, test = cohort
    model = get_baseline(
        "stnet", patches=_fake_patches(), input_size=32, lr=3e-4, batch_size=60, epochs=6, tta=True
    )
    model.fit(train[:1], GENES, EMB, seed=0)  # one full-slide batch per step: the loss curve is not noisy
    h = model.history_
    assert len(h) == 6
    assert np.mean(h[-2:]) < 0.9 * h[0]
    assert model.fit_seconds_ is not None and model.fit_seconds_ > 0
    assert model.predict(test).shape == (test.n_spots, len(GENES))


def test_stnet_densenet_needs_weights(cohort):
    train, _ = cohort
    with pytest.raises(InputError, match="DenseNet-121 needs ImageNet weights"):
        get_baseline("stnet", backbone="densenet121", patches=_fake_patches(), epochs=1).fit(
            train, GENES, EMB
        )


def test_learnable_signal_beats_mean():
    train = [_slide("a", n=150, seed=1), _slide("b", n=150, seed=2)]
    test = _slide("t", n=150, seed=3)
    y = log1p_targets(test, GENES)

    def mse(name, **opts):
        return float(
            ((get_baseline(name, **opts).fit(train, GENES, EMB, seed=0).predict(test) - y) ** 2).mean()
        )

    floor = mse("mean")
    assert mse("ridge", center_targets=True) < 0.7 * floor
    assert mse("mlp", epochs=30) < 0.7 * floor
    # HEST-exact ridge (no intercept, uncentred targets): per-gene Pearson is what HEST reports.
    pred = get_baseline("ridge", center_targets=False).fit(train, GENES, EMB).predict(test)
    pcc = np.mean([np.corrcoef(pred[:, j], y[:, j])[0, 1] for j in range(len(GENES))])
    assert pcc > 0.5


@pytest.mark.parametrize("name", ["mlp", "bleep", "stflow", "stnet"])
def test_device_auto_is_cuda_when_available(name):
    """The default ``device="auto"`` resolves like HiST's (CUDA when available); an explicit device is kept
    and an unavailable one is refused."""
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert get_baseline(name).device == expected
    assert get_baseline(name, device="cpu").device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            get_baseline(name, device="cuda")


@pytest.mark.parametrize("alpha", [0.3, 2.5])
def test_standard_gamma_matches_scipy(alpha):
    """The seeded on-device Gamma sampler against scipy's Gamma CDF (Kolmogorov-Smirnov)."""
    from scipy import stats

    from hist_st.baselines.stflow import standard_gamma

    gen = torch.Generator().manual_seed(0)
    x = standard_gamma(torch.full((20000,), alpha), gen).numpy()
    assert stats.kstest(x, stats.gamma(alpha).cdf).pvalue > 1e-3
    again = standard_gamma(torch.full((20000,), alpha), torch.Generator().manual_seed(0)).numpy()
    np.testing.assert_array_equal(x, again)


def test_sample_zinb_matches_the_zinb_pmf():
    """ZINB draws (torch conventions: mean r * exp(l), zeros inflated with sigmoid(zi)) against scipy's
    negative binomial mixed with a point mass at 0."""
    from scipy import stats

    from hist_st.baselines.stflow import sample_zinb

    r, lg, zi, n = 1.5, 0.7, -1.0, 100000
    x = sample_zinb((n,), r, lg, zi, torch.Generator().manual_seed(1)).numpy()
    pi = 1.0 / (1.0 + np.exp(-zi))
    nb = stats.nbinom(r, 1.0 / (1.0 + np.exp(lg)))
    for k in range(6):
        p = pi * (k == 0) + (1 - pi) * nb.pmf(k)
        assert abs((x == k).mean() - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-4
    assert abs(x.mean() - (1 - pi) * nb.mean()) < 0.03
