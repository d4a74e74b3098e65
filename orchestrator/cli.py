"""orchestrator CLI: validate, schema, run, submit, logs, status, results, show, figures.

    orchestrator validate specs/quickstart.yaml [--results DIR or s3://...] [--address ...]
    orchestrator schema --out spec.schema.json
    orchestrator run specs/quickstart.yaml [--dry-run] [--verbose] [--address ray://HEAD:10001] [--results DIR or s3://...]
    orchestrator submit specs/quickstart.yaml --address http://HEAD:8265 [--wait]; orchestrator stop JOB --address ...
    orchestrator results quickstart --where calibrated=True
    orchestrator figures quickstart
"""
import argparse
import sys

from orchestrator import spec as spec_mod

USER_ERRORS = (spec_mod.SpecError, spec_mod.StageFailed, FileNotFoundError)


def _user_errors():
    from tasks.calibration import CalibrationError
    from tasks.checkpoints import CheckpointError
    from tasks.data import DataError
    from tasks.metrics import MetricsError
    from orchestrator.results import ExperimentBusy
    from orchestrator.storage import StorageError
    return USER_ERRORS + (DataError, MetricsError, CalibrationError, CheckpointError, ExperimentBusy, StorageError)


def cmd_validate(args):
    from orchestrator import checks, plan
    from orchestrator.storage import Storage
    storage = Storage(args.results)
    s, _ = checks.check(args.spec, storage, args.address)  # what run and run --dry-run check first
    stages = {stage.name: stage for stage in plan.make_plan(s, storage)}  # the trial list as a run resolves it
    trials = stages['sweep'].inputs['trials'] if 'sweep' in stages else []
    if trials is None:  # a search algorithm proposes them
        print(f'{args.spec}: valid; experiment {s.experiment!r}, spec hash {s.hash()}, sweep: {stages["sweep"].resources}')
        return
    snapshots = len({t['snapshot_kimg'] for t in trials})
    print(f'{args.spec}: valid; experiment {s.experiment!r}, spec hash {s.hash()}, {len(trials)} sweep trial(s)'
          + (f' ({len(trials) // snapshots} settings x {snapshots} model snapshots)' if snapshots > 1 else ''))


def cmd_schema(args):
    import json
    text = json.dumps(spec_mod.json_schema(), indent=1)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text + '\n')
        print(f'wrote {args.out}')
    else:
        print(text)


def cmd_run(args):
    from orchestrator import runner
    runner.run(args.spec, results_root=args.results, address=args.address, dry_run=args.dry_run, verbose=args.verbose,
               stall_timeout=args.stall_timeout)


def cmd_submit(args):
    from orchestrator.submit import submit
    spec_mod.load(args.spec)  # refuse a bad spec before shipping anything; its files are checked by the job's run
    code = submit(args.spec, args.address, args.results, args.python, wait=args.wait, stall_timeout=args.stall_timeout)
    return code if args.wait else 0


def cmd_stop(args):
    from ray.job_submission import JobSubmissionClient
    stopped = JobSubmissionClient(args.address).stop_job(args.job)
    print(f'job {args.job}: {"stop requested" if stopped else "was not running"}')


def cmd_logs(args):
    from ray.job_submission import JobSubmissionClient
    print(JobSubmissionClient(args.address).get_job_logs(args.job))


def cmd_status(args):
    from ray.job_submission import JobSubmissionClient
    print(JobSubmissionClient(args.address).get_job_status(args.job))


def cmd_results(args):
    import pandas as pd
    from orchestrator import results
    from orchestrator.storage import Storage
    storage = Storage(args.results)
    storage.check()
    if not args.experiment:
        names = results.experiments(storage)
        print('\n'.join(names) if names else f'no experiments under {storage.root}')
        return
    df = results.read_table(storage, args.experiment, args.table)
    for cond in args.where or []:
        key, _, value = cond.partition('=')
        if key not in df.columns:
            raise spec_mod.SpecError(f'--where {cond}: no column {key!r}; columns: {", ".join(df.columns)}')
        df = df[df[key].astype(str) == value]
    columns = args.columns.split(',') if args.columns else [c for c in df.columns if c not in ('config', 'evaluate', 'params')]
    with pd.option_context('display.max_rows', 200, 'display.width', 200):
        print(df[columns].to_string(index=False))


def cmd_show(args):
    from orchestrator import results
    from orchestrator.storage import Storage
    storage = Storage(args.results)
    storage.check()
    print('\n'.join(results.show(storage, args.experiment)))


def cmd_figures(args):
    from orchestrator import figures
    from orchestrator.storage import Storage
    storage = Storage(args.results)
    storage.check()
    for path in figures.render(storage, args.experiment):
        print(f'wrote {path}')


def build_parser():
    p = argparse.ArgumentParser(prog='orchestrator', description='Calibrated EDM experiments on Ray.')
    sub = p.add_subparsers(dest='command', required=True)
    v = sub.add_parser('validate', help='check a spec file without running anything (the checks run and run --dry-run '
                                         'make first; nothing starts Ray)')
    v.add_argument('spec')
    v.add_argument('--results', default='results', help='results root the run would use (see run)')
    v.add_argument('--address', default=None, help='the cluster the run would use (see run): decides what a tracking '
                                                   'store on this disk may serve')
    v.set_defaults(fn=cmd_validate)
    sc = sub.add_parser('schema', help='print the JSON Schema of spec files (for editors: YAML completion and checks)')
    sc.add_argument('--out', default=None, help='write it to this file instead')
    sc.set_defaults(fn=cmd_schema)
    r = sub.add_parser('run', help='run a spec on the embedded Ray (default) or a cluster')
    r.add_argument('spec')
    r.add_argument('--address', default=None, help='an existing Ray cluster (ray://HEAD:10001 or auto)')
    r.add_argument('--results', default='results', help='results root: a path, or object storage such as s3://bucket/prefix '
                   '(credentials and AWS_ENDPOINT_URL from the environment; default: results)')
    r.add_argument('--dry-run', action='store_true', help='print the stages, their resources and reuse; run nothing')
    r.add_argument('--verbose', action='store_true', help="also show Ray's own logs and workers' output in the terminal")
    r.add_argument('--stall-timeout', type=float, default=600.0, metavar='SECONDS',
                   help='give up on a stage that makes no progress this long, e.g. work waiting for the resources of a '
                        'lost node (default: 600)')
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser('submit', help="submit a spec as a Ray job (ships the project's tracked files and the spec)")
    s.add_argument('spec')
    s.add_argument('--address', required=True, help='the cluster dashboard, e.g. http://HEAD:8265')
    s.add_argument('--results', default='results', help='results root as the job sees it: on a cluster, object storage '
                   '(s3://bucket/prefix) or a path every node mounts')
    s.add_argument('--python', default='python',
                   help="the interpreter on the cluster that has this project's dependencies (default: python)")
    s.add_argument('--wait', action='store_true', help="follow the job's logs and exit with its status (0: succeeded)")
    s.add_argument('--stall-timeout', type=float, default=None, metavar='SECONDS', help='passed to the job\'s run (see run)')
    s.set_defaults(fn=cmd_submit)
    for name, fn, text in (('logs', cmd_logs, "a submitted job's logs"), ('status', cmd_status, "a submitted job's status"),
                           ('stop', cmd_stop, 'stop a submitted job')):
        q = sub.add_parser(name, help=text)
        q.add_argument('job')
        q.add_argument('--address', required=True)
        q.set_defaults(fn=fn)
    t = sub.add_parser('results', help='list experiments, or print a results table')
    t.add_argument('experiment', nargs='?')
    # results.TABLES, spelled out: importing results (pandas) would slow every command down
    t.add_argument('--table', default='sweep', choices=('train_log', 'calibration', 'likelihood', 'sweep', 'rungs', 'timings'))
    t.add_argument('--where', action='append', metavar='COLUMN=VALUE', help='keep rows whose column equals the value')
    t.add_argument('--columns', default=None, help='comma-separated columns to show')
    t.add_argument('--results', default='results')
    t.set_defaults(fn=cmd_results)
    w = sub.add_parser('show', help='what is stored of an experiment: its last run, stages done / running / failed, best rows')
    w.add_argument('experiment')
    w.add_argument('--results', default='results')
    w.set_defaults(fn=cmd_show)
    f = sub.add_parser('figures', help='render figures and Markdown tables from the Parquet results')
    f.add_argument('experiment')
    f.add_argument('--results', default='results')
    f.set_defaults(fn=cmd_figures)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
    except _user_errors() as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, at any point: Ray's processes stop with this one (ray.shutdown at exit)
        kept = (' What had finished is kept (stages, training checkpoints, calibration chunk groups, sweep trials); '
                'the same command goes on from there.') if args.command == 'run' else ''
        print(f'\ninterrupted: {args.command} stopped.{kept}', file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == '__main__':
    sys.exit(main())
