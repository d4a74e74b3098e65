import pytest
import torch

from tasks import checkpoints, data, losses, train


def _toy_dataset(n=256, res=16, seed=0):
    """Bright rectangles on black: structure a tiny net learns within a few hundred images."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, res, res, dtype=torch.uint8)
    for i in range(n):
        x0, y0 = torch.randint(0, res // 2, (2,), generator=g).tolist()
        w, h = torch.randint(3, res // 2, (2,), generator=g).tolist()
        images[i, 0, y0:y0 + h, x0:x0 + w] = 255
    return data.ImageDataset(images, torch.randint(0, 10, (n,), generator=g), 'rectangles')


def _fixed_noise_loss(net, images):
    """EDM loss on fixed images, sigmas and noise (a deterministic validation loss)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return float(losses.EDMLoss()(net, images, generator=g).mean())


def test_lr_and_ema_schedules():
    assert train.learning_rate(1e-3, 0, 10) == 0
    assert train.learning_rate(1e-3, 5000, 10) == pytest.approx(5e-4)
    assert train.learning_rate(1e-3, 50000, 10) == 1e-3
    assert train.ema_beta(64, 0, 0.5, 0.05) == 0.0                      # first step: EMA = net
    assert train.ema_beta(64, 1000, 0.5, 0.05) == pytest.approx(0.5 ** (64 / 50))  # ramp-up: 5% of 1000 img
    assert train.ema_beta(64, 10 ** 6, 0.5, 0.05) == pytest.approx(0.5 ** (64 / 500))
    assert train.ema_beta(64, 1000, 0.5, None) == pytest.approx(0.5 ** (64 / 500))


def test_small_preset_trains_and_loss_falls(tmp_path, train_run):
    ds = _toy_dataset()
    config = train.TrainConfig(preset='ddpmpp-tiny', batch_size=32, total_kimg=2.5, lr=2e-3, lr_rampup_kimg=0.2,
                               ema_halflife_kimg=0.2, kimg_per_tick=0.5, seed=1)
    torch.manual_seed(1)
    untrained = train.build_network(config, (1, 16), 0).eval()
    val = data.to_model_range(ds.images[:64])
    log = train_run(config, ds, str(tmp_path), progress=False)
    trained = checkpoints.load_denoiser(str(tmp_path / train.NETWORK))
    before, after = _fixed_noise_loss(untrained, val), _fixed_noise_loss(trained, val)
    assert after < 0.6 * before, (before, after)
    assert log[-1]['loss'] < log[0]['loss']
    assert [r['kimg'] for r in log] == pytest.approx([0.512, 1.024, 1.536, 2.048, 2.528])
    assert trained.train_config == config


def test_resume_continues_exactly(tmp_path, train_run):
    """Stopping after a checkpoint and resuming gives the very same weights, EMA and optimizer
    state as an uninterrupted run (data order, noise and dropout RNG states are restored)."""
    ds = _toy_dataset(64)
    kw = dict(preset='ddpmpp-tiny', batch_size=16, lr=1e-3, kimg_per_tick=0.064, checkpoint_ticks=2, hflip=True,
              network_overrides=dict(dropout=0.1), seed=3)
    train_run(train.TrainConfig(total_kimg=0.256, **kw), ds, str(tmp_path / 'straight'), progress=False)
    train_run(train.TrainConfig(total_kimg=0.128, **kw), ds, str(tmp_path / 'resumed'), progress=False)
    train_run(train.TrainConfig(total_kimg=0.256, **kw), ds, str(tmp_path / 'resumed'), progress=False)
    a = torch.load(tmp_path / 'straight' / train.CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / 'resumed' / train.CHECKPOINT, weights_only=True)
    assert a['cur_nimg'] == b['cur_nimg'] == 256
    for key in ('net', 'ema'):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert [r['loss'] for r in a['log']] == [r['loss'] for r in b['log']]


def test_snapshot_is_the_network_of_a_run_that_stops_there(tmp_path, train_run):
    """train.snapshots_kimg keeps the EMA at the first step reaching each point: bit for bit the
    network a run with total_kimg at that point ends with (the lr ramp, EMA and data order depend
    on images seen, never on total_kimg), off tick boundaries too."""
    ds = _toy_dataset(64)
    kw = dict(preset='ddpmpp-tiny', batch_size=16, lr=1e-3, lr_rampup_kimg=0.1, ema_halflife_kimg=0.05,
              kimg_per_tick=0.064, seed=5)
    train_run(train.TrainConfig(total_kimg=0.192, snapshots_kimg=[0.1, 0.192, 0.04], **kw), ds, str(tmp_path / 'long'),
                progress=False)
    assert sorted(p.name for p in (tmp_path / 'long').glob('network*.pt')) == ['network-0.04kimg.pt', 'network-0.1kimg.pt',
                                                                              train.NETWORK]
    for kimg, nimg in ((0.04, 48), (0.1, 112)):  # the first multiples of 16 at or past 40 and 100
        train_run(train.TrainConfig(total_kimg=kimg, **kw), ds, str(tmp_path / f'short-{kimg}'), progress=False)
        a = torch.load(tmp_path / 'long' / train.snapshot_name(kimg), weights_only=True)
        b = torch.load(tmp_path / f'short-{kimg}' / train.NETWORK, weights_only=True)
        assert a['cur_nimg'] == b['cur_nimg'] == nimg
        for name in a['ema']:
            assert torch.equal(a['ema'][name], b['ema'][name]), (kimg, name)
        assert checkpoints.snapshot_kimg(str(tmp_path / 'long' / train.snapshot_name(kimg))) == nimg / 1000
    with pytest.raises(ValueError, match=r'snapshots_kimg must lie in \(0, total_kimg = 0.192\]'):
        train.TrainConfig(total_kimg=0.192, snapshots_kimg=[0.5])


def test_resume_refuses_other_config(tmp_path):
    ds = _toy_dataset(32)
    kw = dict(preset='ddpmpp-tiny', batch_size=16, total_kimg=0.032, kimg_per_tick=0.016)
    train.train(train.TrainConfig(**kw), ds, str(tmp_path), progress=False)
    with pytest.raises(ValueError, match='differs in: lr'):
        train.train(train.TrainConfig(lr=5e-4, **kw), ds, str(tmp_path), progress=False)


def test_bf16_autocast_and_conditional_step(tmp_path):
    ds = _toy_dataset(32)
    config = train.TrainConfig(preset='ddpmpp-tiny', batch_size=16, total_kimg=0.032, kimg_per_tick=0.016, bf16=True, cond=True)
    log = train.train(config, ds, str(tmp_path), progress=False)
    assert all(torch.isfinite(torch.tensor(r['loss'])) for r in log)
    net = checkpoints.load_denoiser(str(tmp_path / train.NETWORK))
    assert net.label_dim == 10


@pytest.mark.parametrize('name', ['vp', 've', 'edm'])
def test_losses_use_table1_weights(name):
    """Each loss draws sigma from its Table 1 distribution and weights by lambda(sigma)."""
    loss = losses.build_loss(name)
    images = torch.zeros(20000, 1, 1, 1)
    sigma = loss.sample_sigma(images, torch.Generator().manual_seed(0)).flatten()
    if name == 'edm':
        assert float(sigma.log().mean()) == pytest.approx(-1.2, abs=0.03) and float(sigma.log().std()) == pytest.approx(1.2, abs=0.03)
        assert torch.allclose(loss.weight(sigma), (sigma ** 2 + 0.25) / (0.5 * sigma) ** 2)
    else:
        from tasks.schedules import VPSchedule
        lo, hi = (0.02, 100) if name == 've' else (float(VPSchedule().sigma(1e-5)), float(VPSchedule().sigma(1.0)))
        assert float(sigma.min()) >= lo * 0.99 and float(sigma.max()) <= hi * 1.01
        assert torch.allclose(loss.weight(sigma), 1 / sigma ** 2)
    # The identity denoiser of zero images gives loss = weight * sigma^2 * n^2.
    out = loss(lambda x, s, labels: torch.zeros_like(x), torch.zeros(4, 1, 2, 2), generator=torch.Generator().manual_seed(1))
    assert out.shape == (4, 1, 2, 2)
    with pytest.raises(ValueError, match='vp, ve, edm'):
        losses.build_loss('l1')


def test_a_network_with_non_finite_weights_is_never_saved(tmp_path):
    """The EMA network (and h_phi) are checked as they are about to be kept: NonFiniteLoss, no file."""
    import types
    config = train.TrainConfig(preset='ddpmpp-tiny', network_overrides=dict(model_channels=8))
    ema = train.build_network(config, (1, 8), 0)
    with torch.no_grad():
        next(ema.parameters()).fill_(float('inf'))
    dataset = types.SimpleNamespace(channels=1, resolution=8)
    with pytest.raises(train.NonFiniteLoss, match=r'training: the EMA network holds non-finite weights \(.*\) at 0.016 kimg'):
        train._save_network(str(tmp_path), ema, config, 16, dataset, 0, {}, None, [])
    assert not (tmp_path / train.NETWORK).exists()
