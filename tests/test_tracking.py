"""MLflow tracking (report.mlflow): a real sqlite tracking store in a temporary folder, read back
with MLflow's own client."""
import os

import pytest
import yaml

from orchestrator import checks, runner, spec, tracking
from tasks import data

mlflow = pytest.importorskip('mlflow', reason="MLflow is the optional extra '.[mlflow]' (make setup installs it)")

fashion_present = os.path.isfile(os.path.join(data.FASHION_MNIST_DIR, 'train-images-idx3-ubyte.gz'))
needs_fashion = pytest.mark.skipif(not fashion_present, reason=f'Fashion-MNIST not installed in {data.FASHION_MNIST_DIR}')


def _spec(tmp_path, **report):
    raw = dict(experiment='tracked', seed=0, data=dict(name='fashion-mnist', pad_to_32=True, resolution=16, limit=256),
               model=dict(preset='ddpmpp-tiny'),
               train=dict(total_kimg=0.064, batch_size=16, kimg_per_tick=0.032, checkpoint_ticks=2, lr_rampup_kimg=0.01),
               calibrate=dict(images=16, chunk_size=8, actors=1, batch_size=16),
               sweep=dict(samplers=[dict(sampler='dpm_solver', order=2, method='multistep', steps=[4, 6])], calibrated=[False, True],
                          search=dict(scheduler='fifo', min_images=3, reduction_factor=2)),
               evaluate=dict(num_images=6, reference_images=8, batch_size=8),
               report=dict(mlflow=report))
    path = tmp_path / 'tracked.yaml'
    path.write_text(yaml.safe_dump(raw))
    return spec.load(str(path))


@pytest.mark.parametrize('uri', ['sqlite:///mlruns.db', 'file:///tmp/mlruns', '/tmp/mlruns', 'mlruns'])
def test_a_store_on_this_disk_is_refused_on_a_cluster(tmp_path, uri):
    """Other nodes cannot reach a sqlite or file store on the driver's disk: refused before any
    stage on a cluster, accepted on the embedded one; an http(s) server is accepted on both."""
    assert 'a store on this machine\'s disk' in tracking.check_tracking_uri(uri, embedded=False)
    assert tracking.check_tracking_uri(uri, embedded=True) is None
    assert tracking.check_tracking_uri('https://mlflow.lab:5000', embedded=False) is None
    s = _spec(tmp_path, tracking_uri=uri)
    with pytest.raises(spec.SpecError, match=r'tracked.yaml: report.mlflow.tracking_uri: .* \(http\[s\]://HOST:PORT\)'):
        checks.check_tracking(s, embedded=False)


def test_validate_dry_run_and_run_refuse_a_local_store_for_a_cluster_alike(tmp_path, capsys):
    """The tracking store is checked against --address by all three commands, before Ray starts."""
    from test_spec import _refused_alike  # tests/ helper
    s = _spec(tmp_path, tracking_uri='sqlite:///mlruns.db')
    _refused_alike(s.path, "report.mlflow.tracking_uri: sqlite:///mlruns.db is a store on this machine's disk", capsys,
                   '--address', 'ray://127.0.0.1:1', results=str(tmp_path / 'results'))


def test_a_store_mlflow_cannot_open_is_one_line(tmp_path):
    with pytest.raises(spec.SpecError, match=r"tracked.yaml: report.mlflow.tracking_uri: cannot open bogus://x: .*unsupported URI 'bogus://x'"):
        runner.make_tracker(_spec(tmp_path, tracking_uri="bogus://x"))


@pytest.mark.parametrize('report, message', [
    (dict(experiment='x'), r'report.mlflow.tracking_uri: missing'),
    (dict(tracking_uri='sqlite:///m.db', experimnet='x'), r"report.mlflow.experimnet: 'experimnet' is not one of: tracking_uri, experiment"),
    (dict(tracking_uri='sqlite:///m.db', experiment=3), r'report.mlflow.experiment: expected a name, got 3'),
])
def test_bad_mlflow_sections_name_the_field(tmp_path, report, message):
    with pytest.raises(spec.SpecError, match=message):
        _spec(tmp_path, **report)


@needs_fashion
def test_runs_of_stages_and_trials_round_trip_through_a_sqlite_store(ray_cluster, tmp_path):
    """One MLflow run per stage and per sweep trial: trial runs named by their labels, their
    settings as params, fid per rung with the images as the step, the sample grid as an
    artifact; the training run has each tick's loss (logged by Ray Train's rank 0 through
    setup_mlflow); the calibration run ||E[eps]||^2 per sigma and the likelihood gain; the
    stages' Parquet tables as artifacts."""
    uri = f'sqlite:///{tmp_path}/mlflow.db'
    s = _spec(tmp_path, tracking_uri=uri, experiment='calib-edm-test')
    root = str(tmp_path / 'results')
    runner.run(s, results_root=root)
    import pandas as pd
    sweep = pd.read_parquet(os.path.join(root, 'tracked', 'sweep.parquet'))
    rungs = pd.read_parquet(os.path.join(root, 'tracked', 'rungs.parquet'))
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name('calib-edm-test')
    # Artifacts beside the database, not in ./mlruns of whatever folder the run started in.
    assert experiment.artifact_location == f'file://{tmp_path}/mlruns' and not os.path.exists('mlruns')
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(sweep['label']) <= set(runs)
    for _, row in sweep.iterrows():
        run = runs[row['label']]
        assert run.data.params['sampler'] == 'dpm_solver' and run.data.params['steps'] in ('4', '6')
        assert run.data.params['calibrated'] == str(row['calibrated'])
        history = sorted(client.get_metric_history(run.info.run_id, 'fid'), key=lambda m: m.step)
        mine = rungs[rungs['trial_hash'] == row['trial_hash']].sort_values('images')
        assert [m.step for m in history] == mine['images'].tolist() == [3, 6]  # the step is the rung's image count
        assert [m.value for m in history] == pytest.approx(mine['fid'].tolist(), rel=1e-12)
        assert [a.path for a in client.list_artifacts(run.info.run_id, 'samples')] == [f'samples/{row["trial_hash"]}.png']
    train = runs['train']
    losses = client.get_metric_history(train.info.run_id, 'loss')
    log = pd.read_parquet(os.path.join(root, 'tracked', 'train_log.parquet'))
    assert [m.value for m in sorted(losses, key=lambda m: m.step)] == pytest.approx(log['loss'].tolist(), rel=1e-6)
    assert {a.path for a in client.list_artifacts(train.info.run_id, 'tables')} == {'tables/train_log.parquet'}
    cal = runs['calibrate']
    cal_table = pd.read_parquet(os.path.join(root, 'tracked', 'calibration.parquet'))
    series = [k for k in cal.data.metrics if k.startswith('mean_eps_norm2_')]
    assert len(series) == 1
    history = sorted(client.get_metric_history(cal.info.run_id, series[0]), key=lambda m: m.step)
    assert [m.value for m in history] == pytest.approx(cal_table.sort_values('sigma')['mean_eps_norm2'].tolist(), rel=1e-12)
    assert any(k.startswith('likelihood_gain_nats_') for k in cal.data.metrics)
    assert {a.path for a in client.list_artifacts(runs['sweep'].info.run_id, 'tables')} == {'tables/sweep.parquet',
                                                                                         'tables/rungs.parquet'}
    # The images the trials generated, and their share of the grid's (4 trials x 6 images x 1 block; fifo: all of it).
    metrics = client.get_run(runs['sweep'].info.run_id).data.metrics
    assert metrics['images_generated'] == sweep['images_generated'].sum() == 24 and metrics['share_of_grid_images'] == 1.0
