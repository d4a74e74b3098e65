import os
import re

import pytest
import yaml

from orchestrator import checks, cli, plan, runner, spec

BASE = dict(experiment='t', data=dict(name='fashion-mnist', pad_to_32=True, resolution=16), model=dict(preset='ddpmpp-tiny'),
            train=dict(total_kimg=1, batch_size=16), calibrate=dict(images=32, chunk_size=16, actors=2),
            sweep=dict(samplers=[dict(sampler='dpm_solver', order=[2, 3], steps=10)], calibrated=[False, True]),
            evaluate=dict(num_images=8, reference_images=8))


def _write(tmp_path, obj, name='s.yaml'):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj))
    return str(path)


def _with(**changes):
    d = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        keys = dotted.split('__')
        node = d
        for k in keys[:-1]:
            node = node[k]
        if value is DELETE:
            node.pop(keys[-1])
        else:
            node[keys[-1]] = value
    return d


DELETE = object()


def test_valid_spec_and_grid(tmp_path):
    s = spec.load(_write(tmp_path, BASE))
    assert s.experiment == 't' and s.train.total_kimg == 1.0 and s.train.workers == 1
    trials = s.trials()
    assert len(trials) == 4 and {t['order'] for t in trials} == {2, 3} and {t['calibrated'] for t in trials} == {False, True}
    assert s.hash() == spec.load(_write(tmp_path, BASE, 'copy.yaml')).hash()  # the path is not part of the hash


def test_calibration_tables_are_a_sweep_axis(tmp_path):
    """Calib Table 4: image counts x sources give one table each; calibrated trials cross them,
    uncalibrated ones do not; the calibration stage's hash sees the sampler settings only."""
    s = spec.load(_write(tmp_path, _with(calibrate__images=[32, 16, 64], calibrate__source=['data', 'generated'])))
    assert s.calibrate.counts() == [16, 32, 64] and s.calibrate.tables()[:2] == [('data', 16), ('data', 32)]
    trials = s.trials()
    assert len(trials) == 2 * (1 + 6)
    calibrated = [t for t in trials if t['calibrated']]
    assert {(t['calibration_source'], t['calibration_images']) for t in calibrated} == set(s.calibrate.tables())
    assert all('calibration_source' not in t for t in trials if not t['calibrated'])
    assert spec.sampler_kwargs(calibrated[0]) == dict(order=2, steps=10)
    one = {st.name: st for st in plan.make_plan(spec.load(_write(tmp_path, _with(calibrate__images=[32, 16, 64]), 'b.yaml')), 'r')}
    assert '16/32/64 images of data' in one['calibrate'].resources
    # The plan resolves the grid once: exactly the sigmas the calibrated trials' samplers ask an
    # EDM-preconditioned network for when they actually sample (recorded here on a real one).
    import torch
    from tasks import precond, samplers
    net = precond.EDMPrecond(16, 1, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    asked = set()

    def recording(x, sigma, class_labels=None):
        asked.update(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).tolist())
        return net(x, sigma, class_labels)
    recording.sigma_min, recording.sigma_max, recording.round_sigma = net.sigma_min, net.sigma_max, net.round_sigma
    for order in (2, 3):
        samplers.dpm_solver_sampler(recording, torch.randn(1, 1, 16, 16), order=order, steps=10)
    (grid,) = one['calibrate'].inputs['sigmas'].values()  # no snapshots: the final network's grid only
    grid = torch.tensor(grid, dtype=torch.float64)
    nearest = lambda s: float(((grid - s).abs() / s).min())
    # (union_sigmas keeps one of two sigmas equal to 1e-9 relative, the table lookup's tolerance)
    assert all(nearest(s) <= 1e-9 for s in asked) and set(grid.tolist()) <= asked


@pytest.mark.parametrize('changes,message', [
    (dict(trian=dict(kimg=1)), "trian: unknown section (did you mean 'train'?)"),
    (dict(train__total_kimgs=3), "train.total_kimgs: unknown key (did you mean 'total_kimg'?)"),
    (dict(train__total_kimg='lots'), 'train.total_kimg: expected a number'),
    (dict(train__batch_size=1.5), 'train.batch_size: expected an integer'),
    (dict(train__total_kimg=-1), 'train.total_kimg: must be positive'),
    (dict(train__workers=3), 'train.batch_size: 16 is not divisible by train.workers = 3'),
    (dict(train__use_gpu='maybe'), "train.use_gpu: expected auto, true or false, got 'maybe'"),
    (dict(data__name='fashion_mnist'), "data.name: 'fashion_mnist' is not one of: fashion-mnist"),
    (dict(model__preset='ddpmpp-huge'), "model.preset: 'ddpmpp-huge' is not one of"),
    (dict(model__checkpoint='/nope/network.pt'), 'model.checkpoint: /nope/network.pt: no such file or directory'),
    (dict(experiment=DELETE), 'experiment: missing'),
    (dict(experiment='has space'), 'experiment: expected a name'),
    (dict(calibrate=DELETE), 'sweep.calibrated: calibrated trials need a `calibrate:` section'),
    (dict(calibrate__source='web'), "calibrate.source: 'web' is not one of: data, generated"),
    (dict(calibrate__source=['data', 'web']), "calibrate.source[1]: 'web' is not one of: data, generated"),
    (dict(calibrate__images=[16, 40]), 'calibrate.images[1]: 40 is not a multiple of calibrate.chunk_size = 16'),
    (dict(calibrate__images=[16, 0]), 'calibrate.images[1]: expected a positive integer, got 0'),
    (dict(calibrate__images='many'), "calibrate.images: expected a positive integer, got 'many'"),
    (dict(calibrate__images=[]), 'calibrate.images: empty list'),
    (dict(sweep__samplers=[]), 'sweep.samplers: empty'),
    (dict(sweep__samplers=[dict(sampler='ddim')]), "sweep.samplers[0].sampler: 'ddim' is not one of"),
    (dict(sweep__samplers=[dict(sampler='edm', step=[4])]), "sweep.samplers[0].step: not a parameter of edm (did you mean 'num_steps'?"),
    (dict(sweep__samplers=[dict(sampler='dpm_solver', order=5, steps=10)]), 'sweep.samplers[0].order: expected 1, 2 or 3, got 5'),
    # Sampler settings that cannot work (field reports): every setting's domain, and settings against each other.
    (dict(sweep__samplers=[dict(sampler='edm', num_steps=5, sigma_min=0)]),
     'sweep.samplers[0].sigma_min: expected a positive finite number, got 0'),
    (dict(sweep__samplers=[dict(sampler='edm', num_steps=5, sigma_min=80, sigma_max=0.002)]),
     'sweep.samplers: trial 0 (edm num_steps=5 sigma_max=0.002 sigma_min=80): sigma_min: 80 is not below sigma_max = 0.002'),
    (dict(sweep__samplers=[dict(sampler='edm', num_steps=[8, 0])]), 'sweep.samplers[0].num_steps[1]: expected an integer >= 2 (EDM Eq. 5 needs two grid points), got 0'),
    (dict(sweep__samplers=[dict(sampler='edm', rho=-7)]), 'sweep.samplers[0].rho: expected a positive finite number, got -7'),
    (dict(sweep__samplers=[dict(sampler='edm', S_churn=-1)]), 'sweep.samplers[0].S_churn: expected a finite number >= 0, got -1'),
    (dict(sweep__samplers=[dict(sampler='edm', S_churn=40, S_min=1, S_max=0.05)]),
     'sweep.samplers: trial 0 (edm S_churn=40 S_max=0.05 S_min=1): S_min: 1 is above S_max = 0.05'),
    (dict(sweep__samplers=[dict(sampler='edm', S_noise=0)]), 'sweep.samplers[0].S_noise: expected a positive finite number, got 0'),
    (dict(sweep__samplers=[dict(sampler='edm', sigma_max=float('inf'))]), 'sweep.samplers[0].sigma_max: expected a positive finite'),
    (dict(sweep__samplers=[dict(sampler='edm', num_steps=2.5)]), 'sweep.samplers[0].num_steps: expected an integer >= 2 (EDM Eq. 5 needs two grid points), got 2.5'),
    (dict(sweep__samplers=[dict(sampler='edm', num_steps=True)]), 'sweep.samplers[0].num_steps: expected an integer >= 2 (EDM Eq. 5 needs two grid points), got True'),
    (dict(sweep__samplers=[dict(sampler='edm', rho='7')]), "sweep.samplers[0].rho: expected a positive finite number, got '7'"),
    (dict(sweep__samplers=[dict(sampler='edm', num_steps=[])]), 'sweep.samplers[0].num_steps: empty list'),
    (dict(sweep__samplers=[dict(sampler='ablation', solver='rk4')]), "sweep.samplers[0].solver: expected one of euler, heun, got 'rk4'"),
    (dict(sweep__samplers=[dict(sampler='ablation', alpha=0)]), 'sweep.samplers[0].alpha: expected a number in (0, 1]'),
    (dict(sweep__samplers=[dict(sampler='ablation', epsilon_s=1)]), 'sweep.samplers[0].epsilon_s: expected a number in (0, 1)'),
    (dict(sweep__samplers=[dict(sampler='ablation', M=0)]), 'sweep.samplers[0].M: expected an integer >= 1, got 0'),
    (dict(sweep__samplers=[dict(sampler='ablation', C_2=-0.008)]), 'sweep.samplers[0].C_2: expected a positive finite number'),
    (dict(sweep__samplers=[dict(sampler='ablation', discretization='vp', sigma_min=10, sigma_max=1)]),
     'sigma_min: 10 is not below sigma_max = 1'),
    (dict(sweep__samplers=[dict(sampler='dpm_solver', steps=2, order=3)]), 'steps: 2 is fewer than order = 3'),
    (dict(sweep__samplers=[dict(sampler='ablation', num_steps=4, sigma_min=100)]),
     'sigma_min: 100 is not below sigma_max = 80 (the default)'),
    (dict(sweep__samplers=[dict(sampler='edm', sigma_max=0.001)]), 'sigma_min: 0.002 is not below sigma_max = 0.001 (the default)'),
    (dict(sweep__samplers=[dict(sampler='dpm_solver', steps=10, t_end=0)]), 'sweep.samplers[0].t_end: expected a number in (0, 1), got 0'),
    (dict(sweep__samplers=[dict(sampler='dpm_solver', steps=10, t_start=1.5)]), 'sweep.samplers[0].t_start: expected a number in (0, 1]'),
    (dict(sweep__samplers=[dict(sampler='dpm_solver', steps=10, t_start=0.1, t_end=0.5)]), 't_end: 0.5 is not below t_start = 0.1'),
    (dict(sweep__samplers=[dict(sampler='dpm_solver', steps=10, method='adaptive')]), "sweep.samplers[0].method: expected one of singlestep"),
    (dict(sweep__samplers=[dict(sampler='dpm_solver', steps=10, skip_type='karras')]), "sweep.samplers[0].skip_type: expected one of logSNR"),
    (dict(sweep__samplers=[dict(sampler='dpm_solver', steps=10, algorithm_type='dpmsolver+')]), 'sweep.samplers[0].algorithm_type: expected one of'),
    (dict(sweep__samplers=[dict(sampler='dpm_solver', steps=10, denoise_to_zero='yes')]), 'sweep.samplers[0].denoise_to_zero: expected true or false'),
    (dict(sweep__calibrated=['yes']), 'sweep.calibrated[0]: expected true or false'),
    (dict(sweep__resources=dict(tpu=1)), "sweep.resources.tpu: 'tpu' is not one of: cpu, gpu"),
    (dict(evaluate__num_images=1), 'evaluate.num_images: FID needs at least 2 images'),
    (dict(seed=-1), 'seed: must be non-negative, got -1'),
    (dict(experiment='..'), 'experiment: expected a name of letters, digits'),
    (dict(experiment='.'), 'experiment: expected a name of letters, digits'),
    (dict(experiment='.trials'), 'does not start with "."'),
    (dict(calibrate__seed=-3), 'calibrate.seed: must be non-negative, got -3'),
    (dict(data=DELETE), 'data: missing: say which data the experiment uses'),
    (dict(model=DELETE), 'model: missing: say which model the experiment uses'),
    (dict(calibrate__per_class='yes'), "calibrate.per_class: expected true or false, got 'yes'"),
    (dict(model__format='onnx'), "model.format: 'onnx' is not one of: network.pt, edm-pkl, diffusers"),
])
def test_bad_specs_name_the_field(tmp_path, changes, message):
    path = _write(tmp_path, _with(**changes))
    with pytest.raises(spec.SpecError) as error:
        spec.load(path)
    text = str(error.value)
    assert text.startswith(f'{path}: ')  # the file, then the field
    assert re.search(message, text) if '.*' in message else message in text, text


def test_file_level_errors(tmp_path):
    with pytest.raises(spec.SpecError, match='no such spec file'):
        spec.load(str(tmp_path / 'missing.yaml'))
    with pytest.raises(spec.SpecError, match=r'line 3, column 1: invalid YAML'):
        spec.load(_write(tmp_path, 'experiment: t\ntrain: {kimg: [1,\n'))
    with pytest.raises(spec.SpecError, match='top level: expected a mapping'):
        spec.load(_write(tmp_path, '- just\n- a list\n'))
    with pytest.raises(spec.SpecError, match='unsafe.yaml: line'):  # the safe loader refuses Python objects
        spec.load(_write(tmp_path, 'experiment: !!python/object/apply:os.system ["true"]\n', 'unsafe.yaml'))
    unreadable = tmp_path / 'dir.yaml'
    os.makedirs(unreadable)
    with pytest.raises(spec.SpecError, match='cannot read'):
        spec.load(str(unreadable))


def test_cli_prints_one_line_error_without_traceback(tmp_path, capsys):
    path = _write(tmp_path, _with(train__total_kimgs=3))
    assert cli.main(['validate', path]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'Traceback' not in err and len(err.splitlines()) == 1
    assert cli.main(['validate', _write(tmp_path, BASE, 'ok.yaml')]) == 0
    assert '4 sweep trial(s)' in capsys.readouterr().out


def test_dry_run_plan_and_hash_dependencies(tmp_path, capsys):
    s = spec.load(_write(tmp_path, BASE))
    stages = plan.make_plan(s, str(tmp_path / 'results'))
    assert [st.name for st in stages] == ['train', 'calibrate', 'reference', 'sweep']
    assert all(not st.done for st in stages)
    # Tune runs each trial in a folder of its own: the results root trials write to must not be relative.
    assert os.path.isabs(plan.make_plan(s, 'results')[-1].storage.root)
    # Changing the sweep's evaluation keeps train and calibration; changing training changes all.
    s2 = spec.load(_write(tmp_path, _with(evaluate__num_images=16), 's2.yaml'))
    s3 = spec.load(_write(tmp_path, _with(train__total_kimg=2), 's3.yaml'))
    h = lambda sp: {st.name: st.hash for st in plan.make_plan(sp, str(tmp_path / 'results'))}
    assert h(s2)['train'] == h(s)['train'] and h(s2)['calibrate'] == h(s)['calibrate'] and h(s2)['sweep'] != h(s)['sweep']
    assert all(h(s3)[k] != h(s)[k] for k in ('train', 'calibrate', 'sweep'))
    # Resources never change results: more actors or CPUs reuse every stage.
    s4 = spec.load(_write(tmp_path, _with(calibrate__actors=5, train__cpus_per_worker=2, evaluate__batch_size=4), 's4.yaml'))
    assert h(s4) == h(s)
    assert cli.main(['run', _write(tmp_path, BASE, 'd.yaml'), '--dry-run', '--results', str(tmp_path / 'results')]) == 0
    out = capsys.readouterr().out
    assert 'train' in out and '1 Ray Train worker(s)' in out and '4 Tune trial(s)' in out and 'run' in out


def standin_files(tmp_path):
    """Small stand-ins for the published files the paper specs name: an EDM snapshot (written in
    EDM's format from our own classes), a diffusers DDPM directory, and FID statistics."""
    import numpy as np
    import torch
    from edm_format import write_edm_snapshot  # tests/ helper
    from tasks import precond
    torch.manual_seed(0)
    kwargs = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
    net = precond.VPPrecond(img_resolution=32, img_channels=3, **kwargs)
    edm = tmp_path / 'edm-cifar10-32x32-uncond-vp.pkl'
    write_edm_snapshot(edm, net, dict(img_resolution=32, img_channels=3, label_dim=0, model_type='SongUNet', **kwargs),
                       dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=0, **kwargs))
    files = {'edm-pkl': str(edm)}
    try:
        import diffusers
        unet = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
                                     down_block_types=('DownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'UpBlock2D'),
                                     norm_num_groups=8)
        unet.save_pretrained(tmp_path / 'ddpm-cifar10-32')
        diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / 'ddpm-cifar10-32')
        files['diffusers'] = str(tmp_path / 'ddpm-cifar10-32')
    except ImportError:
        pass
    stats = tmp_path / 'cifar10-32x32.npz'
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
    files['stats'] = str(stats)
    return files


@pytest.fixture(scope='module')
def standin_cifar10(tmp_path_factory):
    """A stand-in for the cifar-10-batches-py folder a user downloads: the real layout (python
    pickles data_batch_1..5 and test_batch, 10,000 images each) with blank images, so that the
    spec's image counts fit the data as they would the real one."""
    import pickle
    import numpy as np
    root = tmp_path_factory.mktemp('downloads') / 'cifar-10-batches-py'
    root.mkdir()
    batch = {b'data': np.zeros((10000, 3072), np.uint8), b'labels': [i % 10 for i in range(10000)]}
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        with open(root / name, 'wb') as f:
            pickle.dump(batch, f, protocol=4)
    return str(root)


@pytest.mark.parametrize('name', sorted(f for f in os.listdir('specs') if f.endswith('.yaml')))
def test_shipped_specs_validate_and_plan(name, tmp_path, capsys, standin_cifar10):
    """Every example in specs/ is a valid spec that passes every check of `run --dry-run` and whose
    plan can be printed; the published files that the paper specs name (CIFAR-10's batches, EDM
    snapshots, a diffusers DDPM, FID statistics) are replaced by small stand-ins."""
    with open(os.path.join('specs', name)) as f:
        raw = yaml.safe_load(f)
    model, evaluate = raw.get('model', {}), raw.get('evaluate', {})
    if model.get('checkpoint') or evaluate.get('reference_stats'):
        files = standin_files(tmp_path)
        if model.get('checkpoint'):
            fmt = model.get('format') or 'edm-pkl'
            if fmt not in files:
                pytest.skip("diffusers is an optional extra: pip install '.[diffusers]'")
            model['checkpoint'] = files[fmt]
        if evaluate.get('reference_stats'):
            evaluate['reference_stats'] = files['stats']
    if raw['data'].get('root'):  # the dataset a user downloads
        assert raw['data']['name'] == 'cifar10'
        raw['data']['root'] = standin_cifar10
    s = spec.parse(raw, os.path.join('specs', name))
    assert s.experiment == name[:-len('.yaml')]
    stages = plan.make_plan(s, str(tmp_path))
    assert stages[0].name in ('train', 'checkpoint') and (s.sweep is None or stages[-1].name == 'sweep')
    assert len(s.trials()) == len({spec.stable_hash(t) for t in s.trials()})  # no duplicate trials
    runner.run(s, results_root=str(tmp_path / 'results'), dry_run=True, log=print)
    assert 'stage' in capsys.readouterr().out


def test_paper_specs_say_what_the_papers_did():
    """Calib Table 1: fixed-order singlestep DPM-Solver (NFE = order x floor(NFE / order)), end
    time 1e-3 below 15 steps and 1e-4 from 15 on; EDM's CIFAR-10 protocol: 18 steps (NFE 35),
    50k images x 3 seed blocks against published statistics."""
    for name in ('calib-table1.yaml', 'calib-table1-ddpm.yaml'):
        with open(os.path.join('specs', name)) as f:
            entries = [e for e in yaml.safe_load(f)['sweep']['samplers'] if e['algorithm_type'] == 'dpmsolver']
        for entry in entries:
            assert entry['method'] == 'singlestep_fixed'
            steps = entry['steps'] if isinstance(entry['steps'], list) else [entry['steps']]
            assert all((n < 15) == (entry['t_end'] == 1e-3) and (n >= 15) == (entry['t_end'] == 1e-4) for n in steps)
        assert sorted({n for e in entries for n in e['steps']}) == [10, 15, 20, 25, 30, 35, 40]
    with open('specs/edm-cifar10-pretrained.yaml') as f:
        raw = yaml.safe_load(f)
    assert raw['sweep']['samplers'] == [{'sampler': 'edm', 'num_steps': 18}]
    assert (raw['evaluate']['num_images'], raw['evaluate']['seed_blocks']) == (50000, 3)


def test_model_and_reference_files_are_checked(tmp_path):
    import numpy as np
    files = standin_files(tmp_path)
    path = _write(tmp_path, _with(model__checkpoint=files['edm-pkl'], model__format='diffusers'))
    with pytest.raises(spec.SpecError, match='model.format: .diffusers., but .* is a edm-pkl file'):
        spec.load(path)
    bad = tmp_path / 'bad.npz'
    np.savez(bad, mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(spec.SpecError, match=r'evaluate.reference_stats: .*bad.npz: mu has shape \[64\]'):
        spec.load(_write(tmp_path, _with(evaluate__reference_stats=str(bad)), 'b.yaml'))
    nan = tmp_path / 'nan.npz'
    np.savez(nan, mu=np.full(2048, np.nan), sigma=np.eye(2048))
    with pytest.raises(spec.SpecError, match='NaN or infinite'):
        spec.load(_write(tmp_path, _with(evaluate__reference_stats=str(nan)), 'n.yaml'))
    with pytest.raises(spec.SpecError, match='KID and precision/recall compare features'):
        spec.load(_write(tmp_path, _with(evaluate__reference_stats=files['stats'], evaluate__kid=True), 'k.yaml'))
    s = spec.load(_write(tmp_path, _with(evaluate__reference_stats=files['stats'], **{'evaluate__class': 3}), 'c.yaml'))
    assert s.evaluate.class_idx == 3


def test_training_snapshots_are_a_model_axis(tmp_path):
    """train.snapshots_kimg: every snapshot (and the final network) gets its own calibration grid
    and table key, and the sweep grid is crossed with the snapshots, each row naming its kimg."""
    s = spec.load(_write(tmp_path, _with(train__total_kimg=4, train__snapshots_kimg=[2, 1])))
    stages = {st.name: st for st in plan.make_plan(s, str(tmp_path))}
    assert 'snapshots at 1, 2, 4 kimg' in stages['train'].resources
    grids = stages['calibrate'].inputs['sigmas']
    assert list(grids) == ['1kimg', '2kimg', '4kimg'] and grids['1kimg'] == grids['4kimg']  # one preconditioner
    trials = stages['sweep'].inputs['trials']
    assert len(trials) == 3 * len(s.trials()) == 12
    assert sorted({t['snapshot_kimg'] for t in trials}) == [1.0, 2.0, 4.0]
    assert spec.sampler_kwargs(trials[0]) == dict(order=2, steps=10)  # the snapshot is not a sampler argument
    sweep = stages['sweep']
    assert len({plan.trial_hash(sweep.depends, sweep.inputs['evaluate'], t) for t in trials}) == 12
    assert spec.table_key(2.0, 'data', 32) == '2kimg/data/32' and spec.table_key(None, 'data', 32) == 'model/data/32'
    # The plain spec: one snapshot, the final network.
    plain = {st.name: st for st in plan.make_plan(spec.load(_write(tmp_path, BASE, 'p.yaml')), str(tmp_path))}
    assert list(plain['calibrate'].inputs['sigmas']) == ['1kimg']
    assert {t['snapshot_kimg'] for t in plain['sweep'].inputs['trials']} == {1.0}
    for value, message in (([5], r'train.snapshots_kimg: expected numbers in \(0, total_kimg = 4\]'),
                           ([0], 'train.snapshots_kimg'), (['x'], 'train.snapshots_kimg')):
        with pytest.raises(spec.SpecError, match=message):
            spec.load(_write(tmp_path, _with(train__total_kimg=4, train__snapshots_kimg=value), 'bad.yaml'))


def test_checkpoint_list_is_a_model_axis(tmp_path):
    """model.checkpoint may list snapshots of one run: each is calibrated and swept, keyed by the
    kimg the file records (network.pt) or its EDM name; a file that does not say is refused."""
    import types
    from tasks import checkpoints
    from tasks import train as tasks_train
    config = tasks_train.TrainConfig(preset='ddpmpp-tiny')
    net = tasks_train.build_network(config, (1, 16), 0)
    paths = []
    for nimg in (1024, 5120):
        folder = tmp_path / str(nimg)
        folder.mkdir()
        tasks_train._save_network(str(folder), net, config, nimg, types.SimpleNamespace(channels=1, resolution=16), 0, None, None, [])
        paths.append(str(folder / tasks_train.NETWORK))
    raw = _with(model__checkpoint=paths, model__preset=DELETE)
    s = spec.load(_write(tmp_path, raw))
    stages = {st.name: st for st in plan.make_plan(s, str(tmp_path))}
    assert [f['kimg'] for f in stages['checkpoint'].inputs['files']] == [1.024, 5.12]
    assert list(stages['calibrate'].inputs['sigmas']) == ['1.024kimg', '5.12kimg']
    assert sorted({t['snapshot_kimg'] for t in stages['sweep'].inputs['trials']}) == [1.024, 5.12]
    files = standin_files(tmp_path)  # an EDM snapshot not named network-snapshot-KIMG.pkl
    with pytest.raises(spec.SpecError, match=r'model.checkpoint\[1\]: .*cannot tell at which kimg'):
        spec.load(_write(tmp_path, _with(model__checkpoint=[paths[0], files['edm-pkl']]), 'u.yaml'))
    named = tmp_path / 'network-snapshot-000200.pkl'
    named.write_bytes(open(files['edm-pkl'], 'rb').read())
    assert checkpoints.snapshot_kimg(str(named)) == 200.0
    with pytest.raises(spec.SpecError, match='model.checkpoint: two snapshots of the same kimg'):
        spec.load(_write(tmp_path, _with(model__checkpoint=[paths[0], paths[0]]), 'd.yaml'))
    with pytest.raises(spec.SpecError, match='model.checkpoint: expected a path or a non-empty list of paths'):
        spec.load(_write(tmp_path, _with(model__checkpoint=[]), 'e.yaml'))


def test_validate_opens_a_network_pt_without_running_it(tmp_path, capsys):
    """A truncated or foreign network.pt fails `validate` in one line (it used to pass and fail in
    `run` with a traceback); the file is opened with weights_only, its tensors left on disk."""
    import types
    import torch
    from test_checkpoints import _Reduce  # tests/: a pickle that runs os.system when loaded
    from tasks import train as tasks_train
    config = tasks_train.TrainConfig(preset='ddpmpp-tiny')
    net = tasks_train.build_network(config, (1, 16), 0)
    tasks_train._save_network(str(tmp_path), net, config, 0, types.SimpleNamespace(channels=1, resolution=16), 0, None, None, [])
    good = tmp_path / tasks_train.NETWORK
    marker = tmp_path / 'pwned'
    files = dict(truncated=good.read_bytes()[:good.stat().st_size // 2], state_dict=net.state_dict(),
                 module=torch.nn.Linear(2, 2), code=dict(ema=_Reduce(marker)))
    expected = dict(truncated='a damaged or truncated zip', state_dict='a torch file, but not a network saved by tasks.train',
                    module='refused: it would import torch.nn.modules.linear.Linear',
                    code=r'refused: it would import (posix|os|nt)\.system')
    raw = dict(experiment='x', data=dict(name='fashion-mnist', pad_to_32=True, resolution=16), model=dict(checkpoint=str(good)))
    assert cli.main(['validate', _write(tmp_path, raw, 'good.yaml')]) == 0
    for name, content in files.items():
        path = tmp_path / f'{name}.pt'
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        raw['model']['checkpoint'] = str(path)
        capsys.readouterr()
        assert cli.main(['validate', _write(tmp_path, raw, f'{name}.yaml')]) == 2
        err = capsys.readouterr().err
        assert re.search(rf'model.checkpoint: .*{name}\.pt: {expected[name]}', err), err
        assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err
    assert not marker.exists()


def test_every_format_round_trips_through_model_checkpoint(tmp_path):
    """A spec's model.checkpoint in each format: the checkpoint stage detects the format, and the
    stages downstream load the same D as tasks.checkpoints does directly."""
    import torch
    from tasks import checkpoints, data, train
    files = standin_files(tmp_path)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    toy = data.ImageDataset(images, torch.zeros(32, dtype=torch.long), 'toy', 1)
    train.train(train.TrainConfig(batch_size=16, total_kimg=0.016, kimg_per_tick=0.016,
                                  network_overrides=dict(model_channels=16, channel_mult=[1], attn_resolutions=[])),
                toy, str(tmp_path / 'run'), progress=False)
    files['network.pt'] = str(tmp_path / 'run' / train.NETWORK)
    x = torch.randn(2, 3, 32, 32)
    sigma = torch.tensor([0.5, 5.0], dtype=torch.float64)
    from orchestrator.train import run_checkpoint_stage
    for fmt in ('network.pt', 'edm-pkl', 'diffusers'):
        if fmt not in files:
            continue  # diffusers not installed (the optional extra)
        s = spec.load(_write(tmp_path, _with(model__checkpoint=files[fmt]), f'{fmt}.yaml'))
        stage = plan.make_plan(s, str(tmp_path / 'results'))[0]
        outputs = run_checkpoint_stage(stage, {}, None, runner.RunOptions(log=lambda *a: None))
        assert outputs['format'] == fmt and outputs['sha256'] == checkpoints.sha256_file(files[fmt])
        with torch.no_grad():
            loaded = checkpoints.load_denoiser(outputs['network'], outputs['format'])  # as the stages downstream load it
            assert torch.equal(loaded(x, sigma), checkpoints.load_denoiser(files[fmt])(x, sigma))
    with pytest.raises(spec.SpecError, match='model.format: says the format of model.checkpoint'):
        spec.load(_write(tmp_path, _with(model__format='edm-pkl'), 'f.yaml'))


def test_train_section_is_train_config():
    """One set of training defaults: the spec's train section has TrainConfig's names and
    defaults, and the tasks.train command line starts from them too."""
    import dataclasses
    from tasks import train
    s = spec.parse(dict(experiment='d', data=dict(name='fashion-mnist'), model=dict(preset='ddpmpp-tiny')))
    assert spec.train_config(s) == train.TrainConfig(preset='ddpmpp-tiny', seed=0)
    config_names = {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert {f.name for f in dataclasses.fields(spec.TrainSpec)} - config_names == {'workers', 'cpus_per_worker', 'use_gpu', 'max_failures'}
    parser_defaults = {a.dest: a.default for a in _tasks_train_parser()._actions}
    assert (parser_defaults['kimg'], parser_defaults['lr'], parser_defaults['ema_kimg'], parser_defaults['batch']) == (
        train.TrainConfig.total_kimg, train.TrainConfig.lr, train.TrainConfig.ema_halflife_kimg, train.TrainConfig.batch_size)
    s = spec.parse(dict(experiment='d', data=dict(name='fashion-mnist'), model=dict(preset='ddpmpp-tiny'),
                        train=dict(dynamic_recording=True, cond=True, total_kimg=3)))
    assert spec.train_config(s).dynamic_recording and spec.train_config(s).cond and spec.train_config(s).total_kimg == 3


def _tasks_train_parser():
    """The argparse parser of `python -m tasks.train`, captured without running it."""
    import argparse
    from unittest import mock
    from tasks import train
    captured = {}
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured['parser'] = self
        raise SystemExit(0)
    with mock.patch.object(argparse.ArgumentParser, 'parse_args', capture), pytest.raises(SystemExit):
        train.main([])
    assert real is argparse.ArgumentParser.parse_args
    return captured['parser']


def test_json_schema_checks_the_shipped_specs(tmp_path, capsys):
    """`orchestrator schema` gives editors a JSON Schema that accepts every example spec and
    refuses unknown keys, bad choices and missing sections."""
    import json
    import jsonschema
    assert cli.main(['schema', '--out', str(tmp_path / 'schema.json')]) == 0
    schema = json.loads((tmp_path / 'schema.json').read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for name in sorted(f for f in os.listdir('specs') if f.endswith('.yaml')):
        with open(os.path.join('specs', name)) as f:
            errors = list(validator.iter_errors(yaml.safe_load(f)))
        assert not errors, (name, [e.message for e in errors])
    for bad in (_with(train__kimgs=3), _with(model__precond='ddim'), _with(data=DELETE), _with(seed=-1),
                _with(sweep__samplers=[dict(sampler='heun')]), _with(train__use_gpu='maybe')):
        assert list(validator.iter_errors(bad)), bad
    assert not list(validator.iter_errors(_with(**{'evaluate__class': 2, 'calibrate__interpolate': True})))


def test_requests_the_cluster_cannot_meet_are_refused_naming_the_field():
    """On a cluster that cannot grow, a request larger than the cluster is refused before any
    stage runs; on one that may autoscale, the run says what it waits for."""
    s = spec.parse(_with(sweep__resources=dict(cpu=1, gpu=1), calibrate__gpus_per_actor=0.5), 's.yaml')
    cpu_only = {'CPU': 2.0}
    with pytest.raises(spec.SpecError, match=r's.yaml: calibrate.gpus_per_actor: asks 0.5 GPU per calibration actor, '
                                             r'the cluster has 0 GPU in all'):
        checks.check_resources(s, cpu_only, fixed_size=True)
    messages = []
    checks.check_resources(s, cpu_only, fixed_size=False, log=messages.append)
    assert [m.split(':')[1].strip() for m in messages] == ['calibrate.gpus_per_actor', 'sweep.resources.gpu']
    assert all(m.startswith('waiting for resources') for m in messages)
    checks.check_resources(s, {'CPU': 2.0, 'GPU': 1.0}, fixed_size=True)  # fits
    big = spec.parse(_with(train__cpus_per_worker=4, train__use_gpu=True), 'b.yaml')
    with pytest.raises(spec.SpecError, match='train.cpus_per_worker: asks 4 CPU per training worker'):
        checks.check_resources(big, cpu_only, fixed_size=True)


def test_one_run_per_experiment_at_a_time(tmp_path):
    """A second run of the same experiment is refused naming the first (pid, host, start); the
    lease of a process gone from this host, or of any host's run not renewed past its expiry, is
    taken over, saying so; a live lease is renewed; the lease goes with the run."""
    import json
    import socket
    import subprocess
    import sys
    import time
    from orchestrator import results
    said = []
    with results.experiment_lease(str(tmp_path), 'exp') as path:
        with pytest.raises(results.ExperimentBusy, match=rf"experiment 'exp' is being run by pid {os.getpid()} on .* since "):
            with results.experiment_lease(str(tmp_path), 'exp'):
                pass
    assert not os.path.exists(path)
    gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    live = dict(pid=int(gone.stdout), host=socket.gethostname(), started='earlier', expires=time.time() + 600)
    with open(path, 'w') as f:  # left by a run that died on this host, its lease not yet expired
        json.dump(live, f)
    with results.experiment_lease(str(tmp_path), 'exp', log=said.append):
        with open(path) as f:
            assert json.load(f)['pid'] == os.getpid()
    assert said and 'its process is gone' in said[-1]
    other = dict(pid=1, host='another-host', started='earlier', expires=time.time() + 600)
    with open(path, 'w') as f:  # a live run on another host
        json.dump(other, f)
    with pytest.raises(results.ExperimentBusy, match='being run by pid 1 on another-host'):
        with results.experiment_lease(str(tmp_path), 'exp'):
            pass
    with open(path, 'w') as f:  # the same run, dead: its lease expired
        json.dump(dict(other, expires=time.time() - 1), f)
    with results.experiment_lease(str(tmp_path), 'exp', log=said.append):
        pass
    assert 'from pid 1 on another-host (not renewed since' in said[-1]


def test_cli_results_tables_are_the_stored_tables():
    from orchestrator import results
    sub = next(a for a in cli.build_parser()._actions if a.dest == 'command').choices['results']
    assert next(a for a in sub._actions if a.dest == 'table').choices == results.TABLES


def _tiny_network(tmp_path, name, channels=3, resolution=16, cond=False):
    """A network.pt of a tiny net trained for a few steps on random images (a model to check
    other inputs against)."""
    import torch
    from tasks import data, train
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, channels, resolution, resolution), dtype=torch.uint8)
    toy = data.ImageDataset(images, torch.arange(32) % 10, 'toy', 10)
    run = tmp_path / name
    train.train(train.TrainConfig(batch_size=16, total_kimg=0.016, kimg_per_tick=0.016, cond=cond,
                                  network_overrides=dict(model_channels=16, channel_mult=[1], attn_resolutions=[])),
                toy, str(run), progress=False)
    return str(run / train.NETWORK)


@pytest.mark.skipif(not os.path.isfile('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'),
                    reason='Fashion-MNIST not installed in /usr/share/datasets/fashion-mnist')
def _refused_alike(path, message, capsys, *options, results):
    """`validate`, `run --dry-run` and `run` refuse the spec with the same one line (containing
    `message`), exit 2, and none of them starts Ray (orchestrator.checks runs first in all three;
    conftest fails a test without the `ray` marker that initialises Ray or starts a raylet)."""
    lines = []
    for command in (['validate'], ['run', '--dry-run'], ['run']):
        assert cli.main([*command, path, '--results', results, *options]) == 2, command
        err = capsys.readouterr().err
        assert message in err and err.count('\n') == 1, (command, message, err)
        lines.append(err)
    assert lines[0] == lines[1] == lines[2]


def test_inputs_that_do_not_fit_each_other_are_refused_by_validate(tmp_path, capsys):
    """Every check that spans fields or files runs in `validate` (and in `run` before any stage):
    a sweep-only spec whose 3-channel model would be measured against 1-channel Fashion-MNIST,
    KID subsets larger than the reference set, a class the model does not have, snapshots of two
    different models. One line each, exit 2."""
    import numpy as np
    import PIL.Image
    odd = tmp_path / 'odd'
    odd.mkdir()
    PIL.Image.fromarray(np.zeros((8, 12), np.uint8)).save(odd / 'wide.png')
    rgb = _tiny_network(tmp_path, 'rgb')
    grey = _tiny_network(tmp_path, 'grey', channels=1)
    sweep_only = dict(experiment='fit', data=dict(name='fashion-mnist', pad_to_32=True, resolution=16),
                      model=dict(checkpoint=rgb), sweep=dict(samplers=[dict(sampler='edm', num_steps=4)], calibrated=[False]),
                      evaluate=dict(num_images=8, reference_images=8))
    cases = [
        (sweep_only, 'data: the model takes 3x16x16 images, the data it is measured against are 1x16x16'),
        (dict(sweep_only, model=dict(checkpoint=grey), evaluate=dict(num_images=50, reference_images=20, kid=True)),
         'evaluate.kid: KID compares subsets of min(1000, num_images) = 50 images from each side, but reference_images is 20'),
        (dict(sweep_only, model=dict(checkpoint=grey), evaluate=dict(num_images=8, reference_images=8, **{'class': 3})),
         'evaluate.class: 3, but the model has 0 classes (it is unconditional)'),
        (dict(sweep_only, model=dict(checkpoint=grey), evaluate=dict(num_images=3, reference_images=8, precision_recall=True)),
         'evaluate.precision_recall: k-nearest neighbours with k = 3 need more than 3 images on each side'),
        (dict(BASE, evaluate=dict(num_images=8, reference_images=8, **{'class': 0})),
         'evaluate.class: 0, but the model has 0 classes'),
        (dict(BASE, data=dict(BASE['data'], limit=16)), 'calibrate.images: 32 images asked for, but fashion-mnist train '
                                                        'holds 16 (after data.limit)'),
        (dict(BASE, evaluate=dict(num_images=8, reference_images=100000)),
         'evaluate.reference_images: 100000 images asked for, but fashion-mnist train holds 60000'),
        (dict(BASE, data=dict(name='image-folder', root=str(odd))),
         f'{{path}}: data: image-folder: {odd / "wide.png"} is 12x8, not square'),
        # Fashion-MNIST's first 8 training images are of classes 9, 0, 0, 3, 0, 2, 7, 2.
        (dict(BASE, train=dict(BASE['train'], cond=True), calibrate=dict(images=8, chunk_size=8, per_class=True)),
         'calibrate.per_class: the first 8 images of fashion-mnist hold no image of class(es) 1, 4, 5, 6, 8, whose '
         'per-class term would be 0/0'),
    ]
    for i, (raw, message) in enumerate(cases):
        path = _write(tmp_path, raw, f'case{i}.yaml')
        message = message.replace('{path}', path)
        _refused_alike(path, message, capsys, results=str(tmp_path / 'results'))
    assert not (tmp_path / 'results').exists()
    import torch
    blob = torch.load(rgb, weights_only=True)
    other = dict(blob, cur_nimg=32)  # a "later snapshot" of another shape: a list must be one model's
    torch.save(other, tmp_path / 'later.pt')
    mixed = dict(sweep_only, model=dict(checkpoint=[grey, str(tmp_path / 'later.pt')]))
    assert cli.main(['validate', _write(tmp_path, mixed, 'mixed.yaml')]) == 2
    assert 'model.checkpoint[1]: ' in capsys.readouterr().err
    # Conditional model trained here: its classes are the data's (Fashion-MNIST: 10).
    ok = _write(tmp_path, dict(BASE, train=dict(BASE['train'], cond=True), evaluate=dict(num_images=8, reference_images=8,
                                                                                         **{'class': 9})), 'ok.yaml')
    assert cli.main(['validate', ok]) == 0


def test_a_sigma_range_outside_the_models_is_clamped_and_said(tmp_path, capsys):
    """A requested sigma range reaching outside the model's own (a VP model: [sigma(1e-5),
    sigma(1)] = [0.000977, 152.17]) is clamped as EDM's generate.py does, the run says so once
    per range, and the sampler really samples on the clamped range."""
    import torch
    from tasks import calibration, precond
    raw = _with(model__precond='vp', calibrate=DELETE,
                sweep__samplers=[dict(sampler='edm', num_steps=5, sigma_max=[200, 100]),
                                 dict(sampler='edm', num_steps=5, sigma_min=0.0005, sigma_max=50)],
                sweep__calibrated=[False])
    assert cli.main(['validate', _write(tmp_path, raw)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [
        "sweep: edm sigma range [0.002, 200] reaches outside the model's [0.000976562, 152.167]: sampled on [0.002, 152.167] "
        "(clamped, as EDM's generate.py does)",
        "sweep: edm sigma range [0.0005, 50] reaches outside the model's [0.000976562, 152.167]: sampled on [0.000976562, 50] "
        "(clamped, as EDM's generate.py does)"] and 'valid' in out[2]
    beyond = _with(model__precond='vp', calibrate=DELETE, sweep__calibrated=[False],
                   sweep__samplers=[dict(sampler='edm', num_steps=4, sigma_min=200, sigma_max=300)])
    assert cli.main(['validate', _write(tmp_path, beyond, 'beyond.yaml')]) == 2
    assert ("trial 0 (edm num_steps=4 sigma_max=300 sigma_min=200): sigma range [200, 300] lies outside the model's "
            "[0.000976562, 152.167]: nothing is left to sample after clamping") in capsys.readouterr().err
    net = precond.VPPrecond(img_resolution=1, img_channels=1, model_type=None)
    queried = calibration.queried_sigmas('edm', net, num_steps=5, sigma_max=200)
    assert float(queried.max()) == pytest.approx(float(net.round_sigma(torch.tensor(net.sigma_max))), rel=1e-6)


@pytest.mark.parametrize('sampler,settings', [
    ('edm', dict(rho=0)), ('edm', dict(num_steps=1)), ('edm', dict(sigma_min=100)), ('edm', dict(sigma_min=50, sigma_max=10)),
    ('ablation', dict(sigma_min=5.0, sigma_max=1.0)), ('edm', dict(S_min=10, S_max=1)),
    ('dpm_solver', dict(t_start=0.1, t_end=0.5)), ('dpm_solver', dict(steps=2, order=3)),
    ('edm', dict(sigma_min=200, sigma_max=300)), ('dpm_solver', dict(t_start=1e-6, t_end=1e-7))])
def test_validate_and_the_python_api_refuse_with_the_same_text(tmp_path, capsys, sampler, settings):
    """The entry check of samplers.generate and `orchestrator validate` say the same thing: the
    API's ValueError is validate's line after its field path (a VP model: sigma in
    [0.000977, 152.17])."""
    from tasks import precond, samplers
    net = precond.VPPrecond(img_resolution=1, img_channels=1, model_type=None)
    with pytest.raises(ValueError) as error:
        samplers.generate(net, [0], sampler, **settings)
    raw = _with(model__precond='vp', calibrate=DELETE, sweep__calibrated=[False],
                sweep__samplers=[dict(sampler=sampler, **settings)])
    assert cli.main(['validate', _write(tmp_path, raw)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith(str(error.value)) and line[-len(str(error.value)) - 1] in '.: ', (line, str(error.value))
