"""Baselines: one interface, published defaults, and the properties each method must have (tiny sizes)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from hist_st.errors import InputError
from hist_st.methods import get_method, list_methods, log1p_targets
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
    "ridge-robust": {},
    "depth": {},
    # ST-Net's setting (ST-Net targets, epoch by inner CV) on the packaged CNN: DenseNet's weights are offline
    "stnet": {"patches": _fake_patches(), "input_size": 32, "epochs": 2, "max_steps": 2, "batch_size": 16,
              "backbone": "efficientnet_lite0"},
    "stnet-lite0": {"patches": _fake_patches(), "input_size": 32, "epochs": 1, "max_steps": 2, "batch_size": 16},
    "stflow": {"epochs": 1, "crops_per_slide": 2, "hidden": 32, "pair_hidden": 32, "n_layers": 2},
}


@pytest.fixture(scope="module")
def cohort() -> tuple[list[Slide], Slide]:
    return [_slide("a", seed=1), _slide("b", seed=2)], _slide("test", seed=3)


def test_registry_names():
    assert set(list_methods()) >= {"mean", "ridge", "ridge-robust", "depth", "mlp", "bleep", "stnet", "stnet-lite0",
                                   "stflow"}
    with pytest.raises(ValueError, match="unknown baseline"):
        get_method("nope")


@pytest.mark.parametrize("name", sorted(FAST))
def test_every_baseline_fits_and_predicts(name, cohort):
    train, test = cohort
    model = get_method(name, **FAST[name]).fit(train, GENES, EMB, seed=0)
    pred = model.predict(test)
    assert pred.shape == (test.n_spots, len(GENES))
    assert pred.dtype == np.float32
    assert np.all(np.isfinite(pred))


def test_synthetic_cohort_runs_every_baseline():
    synthetic = pytest.importorskip("hist_st.data.synthetic")
    slides = [synthetic.make_slide(f"s{i}", n_spots=40, n_genes=10, embed_dim=8, seed=i) for i in range(3)]
    genes = list(map(str, slides[0].genes[:6]))
    for name, opts in FAST.items():
        if name.startswith("stnet"):
            continue  # synthetic slides have no image; covered above with a patch source
        pred = get_method(name, **opts).fit(slides[:2], genes, synthetic.ENCODER, seed=0).predict(slides[2])
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
    pred = get_method("mean").fit(train, GENES, EMB).predict(test)
    expected = np.concatenate([log1p_targets(s, GENES) for s in train]).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(pred, np.broadcast_to(expected, pred.shape), rtol=1e-6, atol=1e-6)


def test_ridge_matches_hest_pipeline(cohort):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = cohort
    model = get_method("ridge", center_targets=False).fit(train, GENES, EMB, seed=7)
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
    model = get_method("bleep", epochs=2, top_k=3).fit(train, GENES, EMB, seed=0)
    idx = model.neighbours(test)
    assert idx.shape == (test.n_spots, 3)
    np.testing.assert_allclose(model.predict(test), y_train[idx].mean(axis=1), rtol=1e-6)
    # k = 1: every prediction is an actual training spot's expression.
    one = get_method("bleep", epochs=2, top_k=1).fit(train, GENES, EMB, seed=0).predict(test)
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
    model = get_method("bleep", epochs=300, top_k=1, dropout=0.0, batch_size=n).fit([s], genes, EMB, seed=0)
    np.testing.assert_array_equal(model.neighbours(s)[:, 0], np.arange(n))
    np.testing.assert_allclose(model.predict(s), log1p_targets(s, genes), rtol=1e-6)


def test_stflow_loss_decreases(cohort):
    train, _ = cohort
    model = get_method(
        "stflow", epochs=6, crops_per_slide=4, hidden=32, pair_hidden=32, n_layers=2, lr=2e-3
    )
    model.fit(train, GENES, EMB, seed=0)
    assert len(model.history_) == 6
    assert np.mean(model.history_[-2:]) < 0.7 * model.history_[0]


def test_stflow_edges_are_e2_invariant():
    from hist_st.methods.stflow import STFlowDenoiser, knn_graph

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


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("training", [False, True])
def test_stflow_factorised_logits_equal_the_concatenated_message(activation, training):
    """The attention MLP applied to the authors' concatenated ``[q_i, k_j, edge_ij, x_j - x_i]`` message
    (the reference, built here as their code builds it) gives the same logits and gradients as the block's
    factorised first layer, with the same dropout draws in training."""
    from hist_st.methods.stflow import STFlowBlock, knn_graph

    torch.manual_seed(0)
    n, k, g, heads = 30, 8, 50, 4
    blk = STFlowBlock(16, 8, g, heads, activation, drop=0.3, attn_drop=0.0).train(training).double()
    x, q, kk = torch.randn(n, g).double(), torch.randn(n, heads, 4).double(), torch.randn(n, heads, 4).double()
    edge_h = torch.randn(n, k, heads, 2).double()
    nbr = torch.from_numpy(knn_graph(np.random.default_rng(0).uniform(0, 9, (n, 2)), k))
    for t in (x, q, kk, edge_h):
        t.requires_grad_(True)

    def run(fn):
        torch.manual_seed(1)
        out = fn()
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).double().view_as(out)).sum(),
                                    [x, q, kk, edge_h, *blk.mlp_attn.parameters()])
        return out, grads

    def concatenated():
        gdiff = (x[nbr] - x[:, None])[:, :, None, :].expand(n, k, heads, g)
        msg = torch.cat([q[:, None].expand(n, k, heads, 4), kk[nbr], edge_h, gdiff], dim=-1)
        return blk.mlp_attn(msg).squeeze(-1)

    ref, ref_grads = run(concatenated)
    got, got_grads = run(lambda: blk.attention_logits(x, q, kk, edge_h, nbr))
    assert got.shape == (n, k, heads)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_stflow_prior_and_sampling_are_seeded(cohort):
    train, test = cohort
    m = get_method(
        "stflow", epochs=1, crops_per_slide=1, hidden=16, pair_hidden=16, n_layers=1, prior="zinb-per-gene"
    )
    m.fit(train, GENES, EMB, seed=3)
    assert m.prior_params_["total_count"].shape == (len(GENES),)
    np.testing.assert_array_equal(m.predict(test), m.predict(test))


def test_stnet_loss_decreases(cohort):
    train, test = cohort
    model = get_method(
        "stnet-lite0", patches=_fake_patches(), input_size=32, lr=3e-4, batch_size=60, epochs=6, tta=True
    )
    model.fit(train[:1], GENES, EMB, seed=0)  # one full-slide batch per step: the loss curve is not noisy
    h = model.history_
    assert len(h) == 6
    assert np.mean(h[-2:]) < 0.9 * h[0]
    assert model.fit_seconds_ is not None and model.fit_seconds_ > 0
    assert model.predict(test).shape == (test.n_spots, len(GENES))


def test_stnet_densenet_needs_weights(cohort, tmp_path, monkeypatch):
    """ST-Net's default DenseNet-121 loads torchvision's ImageNet weights (cache or download); offline and
    uncached, the error names the cache path, the option to pass a file and the lighter variant."""
    import torchvision

    train, _ = cohort
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.models, "densenet121", offline)  # what torchvision raises offline
    with pytest.raises(InputError, match="torchvision's ImageNet weights") as err:
        get_method("stnet", patches=_fake_patches(), epochs=1).fit(train, GENES, EMB)
    msg = str(err.value)
    assert "densenet121-a639ec97.pth" in msg and "stnet.weights=" in msg and "stnet-lite0" in msg
    with pytest.raises(InputError, match="weights file not found"):
        get_method("stnet", weights=tmp_path / "none.pth", patches=_fake_patches(), epochs=1).fit(
            train, GENES, EMB
        )


def test_stnet_targets_and_epoch_choice(cohort):
    """ST-Net's targets log((1 + y) / (n + Z)) with n and Z over all the slide's genes; log1p(y) is the
    target plus log(n + Z). Inner folds group training patients (else slides); the inner-CV epoch is the
    argmin of the recorded held-out squared error, and the final model trains for that many epochs."""
    from hist_st.methods.stnet import inner_folds, stnet_targets

    train, test = cohort
    t, log_scale = stnet_targets(test, GENES)
    dense = test.counts.toarray().astype(np.float64)
    np.testing.assert_allclose(log_scale, np.log(dense.shape[1] + dense.sum(1)))
    np.testing.assert_allclose(t + log_scale[:, None], log1p_targets(test, GENES), rtol=1e-5, atol=1e-5)
    slides = [_slide(f"s{i}", n=8, seed=i) for i in range(5)]
    for s, p in zip(slides, "ABABC"):
        s.patient = p
    assert inner_folds(slides, 4) == [[0, 2], [1, 3], [4]]  # patients A, B, C: 3 folds
    for s in slides:
        s.patient = "A"
    assert inner_folds(slides, 2) == [[0, 2, 4], [1, 3]]  # one patient: slides take its place
    m = get_method("stnet", backbone="efficientnet_lite0", patches=_fake_patches(), input_size=32, epochs=3,
                     batch_size=30, lr=1e-4, tta=False)
    m.fit(train, GENES, EMB, seed=0)
    assert len(m.inner_sse_) == 3 and m.best_epoch_ == int(np.argmin(m.inner_sse_)) + 1
    assert len(m.history_) == m.best_epoch_ * 4  # final model only: 120 spots, batch 30: 4 steps per epoch
    pred = m.predict(test)
    assert abs(float(pred.mean()) - float(log1p_targets(test, GENES).mean())) < 1.5


def test_learnable_signal_beats_mean():
    train = [_slide("a", n=150, seed=1), _slide("b", n=150, seed=2)]
    test = _slide("t", n=150, seed=3)
    y = log1p_targets(test, GENES)

    def mse(name, **opts):
        return float(
            ((get_method(name, **opts).fit(train, GENES, EMB, seed=0).predict(test) - y) ** 2).mean()
        )

    floor = mse("mean")
    assert mse("ridge", center_targets=True) < 0.7 * floor
    assert mse("mlp", epochs=30) < 0.7 * floor
    # HEST-exact ridge (no intercept, uncentred targets): per-gene Pearson is what HEST reports.
    pred = get_method("ridge", center_targets=False).fit(train, GENES, EMB).predict(test)
    pcc = np.mean([np.corrcoef(pred[:, j], y[:, j])[0, 1] for j in range(len(GENES))])
    assert pcc > 0.5


@pytest.mark.parametrize("name", ["mlp", "bleep", "stflow", "stnet"])
def test_device_auto_is_cuda_when_available(name):
    """The default ``device="auto"`` resolves like HiST's (CUDA when available); an explicit device is kept
    and an unavailable one is refused."""
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert get_method(name).device == expected
    assert get_method(name, device="cpu").device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            get_method(name, device="cuda")


@pytest.mark.parametrize("alpha", [0.3, 2.5])
def test_standard_gamma_matches_scipy(alpha):
    """The seeded on-device Gamma sampler against scipy's Gamma CDF (Kolmogorov-Smirnov)."""
    from scipy import stats

    from hist_st.methods.stflow import standard_gamma

    gen = torch.Generator().manual_seed(0)
    x = standard_gamma(torch.full((20000,), alpha), gen).numpy()
    assert stats.kstest(x, stats.gamma(alpha).cdf).pvalue > 1e-3
    again = standard_gamma(torch.full((20000,), alpha), torch.Generator().manual_seed(0)).numpy()
    np.testing.assert_array_equal(x, again)


def test_sample_zinb_matches_the_zinb_pmf():
    """ZINB draws (torch conventions: mean r * exp(l), zeros inflated with sigmoid(zi)) against scipy's
    negative binomial mixed with a point mass at 0."""
    from scipy import stats

    from hist_st.methods.stflow import sample_zinb

    r, lg, zi, n = 1.5, 0.7, -1.0, 100000
    x = sample_zinb((n,), r, lg, zi, torch.Generator().manual_seed(1)).numpy()
    pi = 1.0 / (1.0 + np.exp(-zi))
    nb = stats.nbinom(r, 1.0 / (1.0 + np.exp(lg)))
    for k in range(6):
        p = pi * (k == 0) + (1 - pi) * nb.pmf(k)
        assert abs((x == k).mean() - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-4
    assert abs(x.mean() - (1 - pi) * nb.mean()) < 0.03


def _with_flat_channel(s: Slide, spread: float) -> Slide:
    """Copy of ``s`` whose embedding channel 0 is 0.5 plus noise of size ``spread``."""
    import dataclasses

    emb = s.embeddings[EMB].copy()
    emb[:, 0] = 0.5 + spread * np.random.default_rng(len(s.slide_id)).normal(size=len(emb))
    return dataclasses.replace(s, embeddings={EMB: emb})


def test_mlp_feeds_raw_embeddings_and_ridge_robust_drops_flat_channels(cohort):
    """Issue 16: a channel nearly constant in training (std 1e-6) but not on the test slide. Standardised
    inputs turn it into z-scores of about 1e4 (the mlp's old default); raw inputs, like HiST's, do not.
    ridge-robust equals HEST's pipeline fitted without that channel."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = cohort
    train = [_with_flat_channel(s, 1e-6) for s in train]
    test = _with_flat_channel(test, 0.01)
    y = log1p_targets(test, GENES)
    raw = get_method("mlp", epochs=20).fit(train, GENES, EMB, seed=0).predict(test)
    std = get_method("mlp", epochs=20, standardise=True).fit(train, GENES, EMB, seed=0).predict(test)
    assert np.abs(raw - y).mean() < 0.5 * np.abs(std - y).mean()

    model = get_method("ridge-robust").fit(train, GENES, EMB, seed=7)
    np.testing.assert_array_equal(model.keep_, np.arange(1, 8))
    x = np.concatenate([s.embeddings[EMB][:, 1:] for s in train])
    yt = np.concatenate([log1p_targets(s, GENES) for s in train])
    pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=7, random_state=7))])
    z = pipe.fit_transform(x)
    reg = Ridge(solver="lsqr", alpha=100 / (z.shape[1] * yt.shape[1]), random_state=7, fit_intercept=False,
                max_iter=1000).fit(z, yt - yt.mean(0))
    expected = reg.predict(pipe.transform(test.embeddings[EMB][:, 1:])) + yt.mean(0)
    np.testing.assert_allclose(model.predict(test), expected, rtol=1e-4, atol=1e-4)
    hest = get_method("ridge").fit(train, GENES, EMB, seed=7).predict(test)
    assert np.abs(hest - y).mean() > 2 * np.abs(model.predict(test) - y).mean()  # why HEST's row is fragile



def test_depth_is_each_genes_line_in_log_depth_at_the_probed_depth(cohort):
    """depth: per gene, the least-squares line of log1p counts on log1p(total counts over all of the slide's
    genes) (numpy's polyfit), evaluated at the depth that HEST's pipeline, fitted on that one target after
    dropping flat channels, predicts from the embedding."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = cohort
    train = [_with_flat_channel(s, 1e-6) for s in train]
    model = get_method("depth").fit(train, GENES, EMB, seed=7)
    depth = np.concatenate([np.log1p(np.asarray(s.counts.toarray(), dtype=np.float64).sum(1)) for s in train])
    y = np.concatenate([log1p_targets(s, GENES) for s in train]).astype(np.float64)
    lines = np.array([np.polyfit(depth, y[:, g], 1) for g in range(len(GENES))])  # [G, (slope, intercept)]
    np.testing.assert_allclose(model.slope_, lines[:, 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.intercept_, lines[:, 1], rtol=1e-4, atol=1e-4)
    x = np.concatenate([s.embeddings[EMB][:, 1:] for s in train])
    pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=7, random_state=7))])
    z = pipe.fit_transform(x)
    reg = Ridge(solver="lsqr", alpha=100 / 7, random_state=7, fit_intercept=False, max_iter=1000)
    reg.fit(z, depth - depth.mean())
    probed = reg.predict(pipe.transform(test.embeddings[EMB][:, 1:])) + depth.mean()  # [N]
    np.testing.assert_allclose(model.predict(test), lines[:, 1] + probed[:, None] * lines[:, 0], rtol=1e-4,
                               atol=1e-4)


def test_depth_scores_genes_whose_variation_is_depth_alone():
    """Counts = a spot's depth x a fixed composition, depth linear in the embedding: every gene's variation
    is depth, so the depth reference recovers it (per-gene Pearson near 1) while the gene-mean floor cannot;
    and its predictions move together (centred, they have rank 1)."""
    from hist_st.metrics import per_gene_metrics

    def slide(slide_id: str, seed: int) -> Slide:
        rng = np.random.default_rng(seed)
        emb = rng.normal(size=(200, 8)).astype(np.float32)
        depth = np.exp(6.0 + 0.6 * emb[:, 0] - 0.4 * emb[:, 3])  # [N] molecules per spot
        share = np.random.default_rng(5).dirichlet(np.ones(12))  # one composition for every spot
        counts = rng.poisson(depth[:, None] * share).astype(np.float32)
        return Slide(slide_id=slide_id, spatial=rng.uniform(0, 1e4, size=(200, 2)),
                     barcodes=np.array([f"{slide_id}-{i}" for i in range(200)], dtype=object),
                     genes=np.array([f"G{i}" for i in range(12)], dtype=object), counts=sp.csr_matrix(counts),
                     embeddings={EMB: emb}, um_per_px=1.0).validate()

    train, test = [slide("a", 1), slide("b", 2)], slide("t", 3)
    pred = get_method("depth").fit(train, GENES, EMB, seed=0).predict(test)
    truth = test.counts.toarray()[:, [int(g[1:]) for g in GENES]]
    assert per_gene_metrics(pred, truth)["pcc"] > 0.9
    assert per_gene_metrics(get_method("mean").fit(train, GENES, EMB).predict(test), truth)["pcc"] == 0.0
    assert np.linalg.matrix_rank(pred - pred.mean(0), tol=1e-3 * np.abs(pred).max()) == 1

def test_stflow_sampler_follows_the_straight_path():
    """The official update x + dt (x1_hat - x) / (1 - t): with a denoiser that always predicts the same
    x1, every state visited is the interpolant (1 - t) x0 + t x1 (without the 1 / (1 - t) it lags)."""
    from hist_st.methods.stflow import euler_sample

    x0, x1 = torch.randn(5, 3), torch.randn(5, 3)
    ts = torch.linspace(0.01, 1.0, 6)
    seen = []

    def denoise(x, t):
        seen.append((x.clone(), float(t)))
        return x1

    euler_sample(denoise, (1 - ts[0]) * x0 + ts[0] * x1, ts)
    assert len(seen) == 5
    for x, t in seen:
        torch.testing.assert_close(x, (1 - t) * x0 + t * x1)
