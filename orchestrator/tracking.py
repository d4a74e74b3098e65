"""Experiment tracking in MLflow (report.mlflow: {tracking_uri, experiment}), through Ray's own
integrations where Ray runs the work: `setup_mlflow` in the Ray Train workers (rank 0 logs each
training tick: loss, kimg, img/s) and `MLflowLoggerCallback` for the Tune trials (one run per
trial, named by its label, its settings as params, every report as metrics with `images` as the
step: Tune's callback takes the step from `timesteps_total`, which trials report as their image
count). The driver adds a run per other stage (the calibration summary: ||E[eps]||^2 per sigma,
Calib Eq. 27, and the likelihood-bound gain per table) and the artifacts: each trial's sample grid
and the Parquet tables, read through the storage layer (Ray's callback would upload the driver's
trial folder, which is empty for trials that ran on other nodes).

The optional extra `.[mlflow]` installs mlflow-skinny (full mlflow 3 needs pyarrow < 26). On a
cluster of several nodes every node must reach the tracking store: an http(s) server.
"""
import os
import tempfile

from ray.air.integrations.mlflow import MLflowLoggerCallback


def check_tracking_uri(uri, embedded):
    """None, or why `uri` cannot serve this run: a store on this machine's disk (sqlite, file, a
    path) is reached by the embedded cluster only."""
    if embedded or uri.startswith(('http://', 'https://', 'databricks')):
        return None
    return (f'{uri} is a store on this machine\'s disk, which the other nodes of a cluster cannot reach: give a tracking '
            'server every node reaches (http[s]://HOST:PORT), or run on the embedded cluster')


def artifact_location(uri):
    """Where a new experiment keeps its artifacts: beside a sqlite database (MLflow's default,
    ./mlruns, would be whatever folder the command ran in); the server's choice otherwise."""
    if uri.startswith('sqlite:///'):
        return 'file://' + os.path.join(os.path.dirname(os.path.abspath(uri[len('sqlite:///'):])), 'mlruns')
    return None


class Tracker:
    """One MLflow experiment (report.mlflow.experiment, default the spec's): the driver's runs
    and the artifacts it logs."""

    def __init__(self, config, experiment):
        import mlflow
        self.uri, self.experiment = config['tracking_uri'], config.get('experiment') or experiment
        self.client = mlflow.MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(self.experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            self.experiment, artifact_location=artifact_location(self.uri))

    def start(self, name, params=None, tags=None):
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags or {})
        for key, value in (params or {}).items():
            self.client.log_param(run.info.run_id, key, value)
        return run.info.run_id

    def log_series(self, run_id, name, values):
        """Metric `name` at steps 0, 1, ... (e.g. one value per sigma of a calibration grid)."""
        for step, value in enumerate(values):
            self.client.log_metric(run_id, name, float(value), step=step)

    def log_artifact(self, run_id, storage, key, folder=None):
        """A file under the results root (local or object store), read through the storage layer."""
        with tempfile.TemporaryDirectory(prefix='calib-edm-') as tmp:
            path = os.path.join(tmp, os.path.basename(key))
            with open(path, 'wb') as f:
                f.write(storage.read_bytes(key))
            self.client.log_artifact(run_id, path, folder)

    def end(self, run_id, failed=False):
        self.client.set_terminated(run_id, 'FAILED' if failed else 'FINISHED')

    def train_setup(self):
        """setup_mlflow's keyword arguments in the Ray Train workers (rank 0 logs)."""
        return dict(tracking_uri=self.uri, experiment_name=self.experiment, run_name='train',
                    create_experiment_if_not_exists=True, rank_zero_only=True)

    def trial_callback(self, hash_of):
        return TrialRuns(self, hash_of)


class TrialRuns(MLflowLoggerCallback):
    """Ray Tune's MLflow callback with the run named by the trial's label and its settings as
    params; `runs` maps each trial's content hash (hash_of(trial config)) to its run id."""

    def __init__(self, tracker, hash_of):
        super().__init__(tracking_uri=tracker.uri, experiment_name=tracker.experiment, save_artifact=False)
        self.hash_of, self.runs = hash_of, {}

    def log_trial_start(self, trial):
        from orchestrator.spec import describe_trial
        if trial not in self._trial_runs:
            settings, h = trial.config['trial'], self.hash_of(trial.config['trial'])
            run = self.mlflow_util.start_run(tags=dict(self.tags, trial_hash=h), run_name=describe_trial(settings))
            self._trial_runs[trial] = self.runs[h] = run.info.run_id
            self.mlflow_util.log_params(run_id=run.info.run_id, params_to_log=settings)
