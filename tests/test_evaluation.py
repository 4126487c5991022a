"""Evaluation metrics against closed forms and brute-force float64 references, with a random-weight Inception."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from erw_fast.evaluation import (
    GaussianStats,
    build_fid_inception,
    cknna,
    evaluate_batches,
    frechet_distance,
    inception_score,
    inception_score_from_probs,
    manifold_precision_recall,
    manifold_radii,
    pool_features,
    tf_legacy_resize_bilinear,
)
from erw_fast.evaluation.layerwise import layerwise_cknna, sit_layer_features
from erw_fast.models import SiT


@pytest.fixture(scope="module")
def inception():
    return build_fid_inception(pretrained=False, seed=0)


def _random_spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


# ------------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, 50), rng.uniform(0.1, 3.0, 50)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_shared_eigenbasis_closed_form():
    # Σ1 = Q diag(a) Qᵀ, Σ2 = Q diag(b) Qᵀ commute: tr sqrt(Σ1Σ2) = Σ sqrt(a_i b_i).
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    a, b = rng.uniform(0.0, 2.0, 40), rng.uniform(0.0, 2.0, 40)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(np.zeros(40), s1, np.zeros(40), s2) == pytest.approx(expected, rel=1e-9, abs=1e-10)


def test_frechet_distance_general_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    s1, s2 = _random_spd(rng, 30), _random_spd(rng, 30)
    mu1, mu2 = rng.standard_normal(30), rng.standard_normal(30)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rank_deficient_covariances():
    # N < D (every tiny test batch): singular covariances must still give the exact value, not NaN/complex.
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((8, 20)), rng.standard_normal((6, 20)) + 0.5
    s1, s2 = GaussianStats.from_features(x), GaussianStats.from_features(y)
    assert s1.factor is not None and s2.factor is not None
    # Independent reference: the general (non-symmetric) eigenvalues of Σ1Σ2, which are real and ≥ 0.
    eig = np.linalg.eigvals(s1.sigma @ s2.sigma).real
    expected = (np.sum((s1.mu - s2.mu) ** 2) + np.trace(s1.sigma) + np.trace(s2.sigma)
                - 2 * np.sqrt(np.clip(eig, 0, None)).sum())
    assert s1.frechet_distance(s2) == pytest.approx(expected, rel=1e-6)  # small N×N eigenproblem
    dense = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)  # D×D path, no factors
    assert dense == pytest.approx(expected, rel=1e-6)
    assert s1.frechet_distance(s1) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
def test_fid_of_a_set_with_itself_is_zero(inception):
    images = torch.randint(0, 256, (12, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = inception(images)
    stats = GaussianStats.from_features(out.pool.numpy())
    assert abs(stats.frechet_distance(stats)) < 1e-6 * np.trace(stats.sigma)
    other = GaussianStats.from_features(inception(255 - images).pool.numpy())
    assert stats.frechet_distance(other) > 1e3 * abs(stats.frechet_distance(stats))


# ------------------------------------------------------------------------------------------------- Inception Score


def test_inception_score_uniform_is_one_and_one_hot_is_the_class_count():
    assert inception_score_from_probs(np.full((20, 1008), 1 / 1008)) == pytest.approx(1.0, abs=1e-12)
    one_hot = np.eye(10)[np.arange(40) % 10]  # 40 confident predictions spread over 10 classes
    assert inception_score_from_probs(one_hot) == pytest.approx(10.0, rel=1e-12)
    assert inception_score(50.0 * one_hot) == pytest.approx(10.0, rel=1e-9)  # from logits: softmax ≈ one-hot


def test_inception_score_averages_fixed_size_splits():
    # Split 1: 4 distinct classes (IS 4); split 2: one class four times (IS 1) → ADM reports their mean.
    probs = np.eye(4)[[0, 1, 2, 3, 0, 0, 0, 0]]
    assert inception_score_from_probs(probs, split_size=4) == pytest.approx(2.5, rel=1e-12)


# ------------------------------------------------------------------------------------------------- precision / recall


def _brute_pr(ref, gen, k):
    def radii(x):
        return [sorted(float(np.sum((p - q) ** 2)) for q in x)[k] for p in x]

    def inside(points, centres, r):
        return [any(float(np.sum((p - c) ** 2)) <= rc for c, rc in zip(centres, r, strict=True)) for p in points]

    return float(np.mean(inside(gen, ref, radii(ref)))), float(np.mean(inside(ref, gen, radii(gen))))


def test_precision_recall_identical_and_disjoint_sets():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((30, 8))
    assert manifold_precision_recall(x, x.copy()) == (1.0, 1.0)
    assert manifold_precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((40, 6))
    gen = np.concatenate([rng.standard_normal((25, 6)) * 0.7, rng.standard_normal((15, 6)) * 2.0 + 1.5])
    for k in (1, 3, 5):
        got = manifold_precision_recall(ref, gen, k=k)
        assert got == pytest.approx(_brute_pr(ref, gen, k), abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1


def test_manifold_radius_is_the_kth_neighbour_on_a_line():
    points = np.arange(10, dtype=np.float64)[:, None]  # 0, 1, …, 9
    r = manifold_radii(points, k=3).numpy()  # squared distance to the 3rd other point
    assert r[0] == 9.0 and r[5] == 4.0 and r[9] == 9.0


# ------------------------------------------------------------------------------------------------- Inception network


def test_tf_legacy_resize_samples_at_scaled_indices():
    ramp = torch.arange(5, dtype=torch.float32).view(1, 1, 1, 5).expand(1, 1, 5, 5)
    out = tf_legacy_resize_bilinear(ramp, 8)
    expected = torch.clamp(torch.arange(8) * 5 / 8, max=4.0)  # src = i·in/out, upper neighbour clamped
    torch.testing.assert_close(out[0, 0, 3], expected)
    torch.testing.assert_close(out[0, 0, :, 6], expected[6].expand(8))
    x = torch.rand(2, 3, 299, 299)
    assert torch.equal(tf_legacy_resize_bilinear(x, 299), x)


@pytest.mark.slow
def test_inception_outputs_follow_the_adm_tensors(inception):
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    net = inception.net
    hooked = []
    handle = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: hooked.append(o.clone()))
    try:
        out = inception(images)
        # torchvision's own forward on the same preprocessed input: its logits = pool·Wᵀ + b.
        x = (tf_legacy_resize_bilinear(images.float(), 299) - 128.0) / 128.0
        with torch.no_grad():
            reference_logits = net.eval()(x)
    finally:
        handle.remove()
    assert out.pool.shape == (3, 2048) and out.spatial.shape == (3, 17 * 17 * 7) and out.logits.shape == (3, 1008)
    torch.testing.assert_close(out.logits + net.fc.bias, reference_logits, rtol=1e-4, atol=1e-5)
    # mixed_6/conv: the tensor Mixed_6d's 1×1 branch feeds its concat (the last hook call), first 7 channels, NHWC.
    torch.testing.assert_close(out.spatial.view(3, 17, 17, 7), hooked[-1][:, :7].permute(0, 2, 3, 1))


def test_missing_inception_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="FID Inception weights"):
        build_fid_inception(weights_path=tmp_path / "missing.pth")


@pytest.mark.slow
def test_evaluate_batches_uses_stored_reference_statistics(inception, tmp_path):
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (10, 48, 48, 3), dtype=np.uint8)
    feats = inception(torch.from_numpy(images).permute(0, 3, 1, 2))
    pool, spatial = feats.pool.double().numpy(), feats.spatial.double().numpy()
    np.savez(tmp_path / "samples.npz", arr_0=images)
    shift = np.zeros(2048)
    shift[:3] = [1.0, -2.0, 0.5]  # stored mu = true mu + shift → FID = ‖shift‖² exactly
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=pool.mean(0) + shift, sigma=np.cov(pool, rowvar=False),
             mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False))
    res = evaluate_batches(tmp_path / "samples.npz", tmp_path / "ref.npz", inception, batch_size=4)
    assert res["fid"] == pytest.approx(5.25, rel=1e-4)
    assert res["sfid"] == pytest.approx(0.0, abs=1e-4 * np.trace(np.cov(spatial, rowvar=False)))
    assert (res["precision"], res["recall"]) == (1.0, 1.0)
    assert res["num_samples"] == 10 and res["inception_score"] >= 1.0


# ------------------------------------------------------------------------------------------------- CKNNA


def _brute_cknna(a, b, k):
    n = len(a)
    a = [[float(v) for v in row] for row in a]
    b = [[float(v) for v in row] for row in b]

    def gram(x):
        return [[sum(p * q for p, q in zip(x[i], x[j], strict=True)) for j in range(n)] for i in range(n)]

    def knn(m, i):
        others = sorted((j for j in range(n) if j != i), key=lambda j: -m[i][j])
        return set(others[:k])

    def hsic(kk, ll):  # Song et al. (2012) eq. 5, with zeroed diagonals
        kt = [[0.0 if i == j else kk[i][j] for j in range(n)] for i in range(n)]
        lt = [[0.0 if i == j else ll[i][j] for j in range(n)] for i in range(n)]
        trace = sum(kt[i][j] * lt[j][i] for i in range(n) for j in range(n))
        sk, sl = sum(map(sum, kt)), sum(map(sum, lt))
        ones_kl_ones = sum(sum(kt[i][m] for i in range(n)) * sum(lt[m][j] for j in range(n)) for m in range(n))
        return (trace + sk * sl / ((n - 1) * (n - 2)) - 2 * ones_kl_ones / (n - 2)) / (n * (n - 3))

    def aligned(kk, ll, nbrs_k, nbrs_l):
        mask = [[1.0 if (j in nbrs_k[i] and j in nbrs_l[i]) else 0.0 for j in range(n)] for i in range(n)]
        return hsic([[mask[i][j] * kk[i][j] for j in range(n)] for i in range(n)],
                    [[mask[i][j] * ll[i][j] for j in range(n)] for i in range(n)])

    kk, ll = gram(a), gram(b)
    nk, nl = [knn(kk, i) for i in range(n)], [knn(ll, i) for i in range(n)]
    return aligned(kk, ll, nk, nl) / math.sqrt(aligned(kk, kk, nk, nk) * aligned(ll, ll, nl, nl))


def test_cknna_matches_brute_force_definition():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(24, 5, generator=g, dtype=torch.float64)
    b = a @ torch.randn(5, 7, generator=g, dtype=torch.float64) + 0.8 * torch.randn(24, 7, generator=g,
                                                                                     dtype=torch.float64)
    a, b = pool_features(a), pool_features(b)
    for k in (3, 10):
        assert cknna(a, b, topk=k) == pytest.approx(_brute_cknna(a.tolist(), b.tolist(), k), rel=1e-10)


def test_cknna_of_a_set_with_itself_is_one_and_unrelated_sets_score_low():
    g = torch.Generator().manual_seed(8)
    x = pool_features(torch.randn(64, 6, 16, generator=g))  # (N, T, D) tokens → mean-pooled, normalised
    assert x.shape == (64, 16) and torch.allclose(x.norm(dim=1), torch.ones(64, dtype=torch.float64))
    assert cknna(x, x, topk=10) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert cknna(x, x @ q, topk=10) == pytest.approx(1.0, abs=1e-12)  # linear kernel: rotation invariant
    noise = pool_features(torch.randn(64, 16, generator=g))
    assert abs(cknna(x, noise, topk=10)) < 0.5


def test_layer_features_equal_hidden_after_at_every_depth():
    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=5,
                z_dims=[8], projector_dim=16, encoder_depth=2).eval()
    for block in model.blocks:  # make every block non-trivial (adaLN-Zero starts as the identity)
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    y = torch.arange(6) % 5
    feats = sit_layer_features(model, x0, y, 0.3, noise, batch_size=4)
    t = torch.full((6,), 0.3)
    with torch.no_grad():
        for depth in range(1, 4):
            expected = model.hidden_after(0.7 * x0 + 0.3 * noise, t, y, depth).mean(dim=1).double()
            torch.testing.assert_close(feats[depth - 1], expected, rtol=1e-5, atol=1e-6)
    scores = layerwise_cknna(feats, feats[1], topk=3)
    assert len(scores) == 3 and scores[1] == pytest.approx(1.0, abs=1e-12)
