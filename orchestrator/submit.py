"""`orchestrator submit`: a spec as a Ray job. What is shipped is the project's tracked files
(`git ls-files`: never a stray `.env`, results or caches that only lie in the folder) and the
spec itself (as job-spec.yaml, so a spec from anywhere runs), with its size printed and Ray's
package limit checked before anything is uploaded."""
import os
import shutil
import subprocess
import tempfile
import time

from orchestrator.spec import SpecError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_SPEC = 'job-spec.yaml'
TERMINAL = ('SUCCEEDED', 'FAILED', 'STOPPED')


def package_limit():
    """The largest working_dir package Ray accepts (its gRPC message limit, 512 MiB by default)."""
    try:
        from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE
        return GCS_STORAGE_MAX_SIZE
    except ImportError:  # a Ray that moved it: its documented default
        return 512 * 1024 ** 2


def tracked_files(root=ROOT):
    """The project's files under version control, relative to root."""
    try:
        out = subprocess.run(['git', 'ls-files', '-z'], cwd=root, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        raise SpecError(f'{root}: not a git checkout; submit ships the tracked files of a clone of this project') from None
    return [f for f in out.stdout.decode().split('\0') if f and os.path.isfile(os.path.join(root, f))]


def make_package(spec_path, dest, root=ROOT):
    """Copy the tracked files and the spec (as JOB_SPEC) into dest; returns (files, bytes)."""
    files = tracked_files(root)
    for f in files:
        os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(root, f), os.path.join(dest, f))
    shutil.copy2(spec_path, os.path.join(dest, JOB_SPEC))
    files.append(JOB_SPEC)
    return files, sum(os.path.getsize(os.path.join(dest, f)) for f in files)


def submit(spec_path, address, results='results', python='python', wait=False, log=print, stall_timeout=None):
    """Submit the job; with wait, print its logs as they come and return 0 if it succeeded,
    else 1. Returns the job id without wait."""
    from ray.job_submission import JobSubmissionClient
    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory() as package:
        files, size = make_package(spec_path, package)
        if size >= package_limit():
            raise SpecError(f'{spec_path}: the job package is {size / 2 ** 20:.1f} MiB, over Ray\'s limit of '
                            f'{package_limit() / 2 ** 20:.0f} MiB; large tracked files belong elsewhere')
        stall = '' if stall_timeout is None else f' --stall-timeout {stall_timeout:g}'
        job = client.submit_job(entrypoint=f'{python} -m orchestrator run {JOB_SPEC} --results {results}{stall}',
                                runtime_env=dict(working_dir=package))
    log(f'submitted job {job}: {len(files)} files, {size / 2 ** 20:.1f} MiB (the tracked sources and the spec); '
        f'follow it with: orchestrator logs {job} --address {address}')
    if not wait:
        return job
    shown = 0
    while True:
        status = str(client.get_job_status(job)).split('.')[-1]
        logs = client.get_job_logs(job)
        if len(logs) > shown:
            log(logs[shown:].rstrip('\n'))
            shown = len(logs)
        if status in TERMINAL:
            log(f'job {job}: {status}')
            return 0 if status == 'SUCCEEDED' else 1
        time.sleep(2)
