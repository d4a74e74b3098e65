"""What object storage costs a run: the same spec from empty, once with a local results root and
once with an S3 root on an S3-compatible server on loopback (moto), each stage's wall time from
the runs' own timings tables, side by side.

    .venv/bin/python bench/storage_overhead.py specs/quickstart.yaml

Loopback moto measures the storage layer's own work (uploads, downloads, listings, the node cache)
and not a network: a real bucket adds its latency and bandwidth on top. Each run starts from an
empty root and an empty node cache (CALIB_EDM_CACHE; the converted Inception weights are copied
in, as a user's cache holds them).
"""
import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(spec, results, env):
    start = time.time()
    proc = subprocess.run([sys.executable, '-m', 'orchestrator', 'run', spec, '--results', results], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f'{results}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return time.time() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('spec')
    args = p.parse_args()
    import logging
    import boto3
    from moto.server import ThreadedMotoServer
    logging.getLogger('werkzeug').setLevel(logging.WARNING)  # a line per request otherwise
    from orchestrator import results, spec as spec_mod
    from tasks import metrics
    experiment = spec_mod.load(args.spec).experiment
    port = free_port()
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=port, verbose=False)
    server.start()
    work = tempfile.mkdtemp(prefix='storage-bench-')
    # The server's address and its (made-up) credentials, as a node's environment would hold them.
    os.environ.update(AWS_ENDPOINT_URL=f'http://127.0.0.1:{port}', AWS_ACCESS_KEY_ID='bench', AWS_SECRET_ACCESS_KEY='bench',
                      AWS_DEFAULT_REGION='us-east-1')
    env = dict(os.environ)
    try:
        boto3.client('s3').create_bucket(Bucket='bench')
        weights = metrics.resolve_inception_weights().path
        walls, tables = {}, {}
        for name, root in (('local', os.path.join(work, 'results')), ('s3 (loopback)', 's3://bench/results')):
            cache = os.path.join(work, f'cache-{len(walls)}')
            os.makedirs(cache)
            shutil.copy(weights, cache)
            walls[name] = run(args.spec, root, dict(env, CALIB_EDM_CACHE=cache))
            tables[name] = results.read_table(root, experiment, 'timings').set_index('stage')['seconds']
        stages = list(tables['local'].index)
        print(f'{args.spec}: wall time per stage (s), from each run\'s timings table')
        print(f'{"stage":<11}' + ''.join(f'{name:>16}' for name in tables) + f'{"difference":>12}')
        for stage in stages:
            a, b = (tables[name][stage] for name in tables)
            print(f'{stage:<11}{a:>16.1f}{b:>16.1f}{b - a:>+12.1f}')
        a, b = walls.values()
        print(f'{"whole run":<11}{a:>16.1f}{b:>16.1f}{b - a:>+12.1f}   (the command, start to exit)')
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
