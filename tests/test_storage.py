"""The storage layer (orchestrator.storage) on a local root and on object storage (moto's S3
server on loopback: the s3_bucket fixture of conftest.py), and results read straight from a
bucket with pandas."""
import os
import re
import threading
import time

import pandas as pd
import pytest

from orchestrator import results
from orchestrator.storage import Storage, StorageError, fetch, input_sha256, local_path, stage_input
from tasks.files import sha256_file


@pytest.fixture(params=['local', 's3'])
def storage(request, tmp_path):
    """A root of each kind: a local folder, and a prefix in a new bucket."""
    if request.param == 'local':
        return Storage(str(tmp_path / 'root'))
    return Storage(request.getfixturevalue('s3_bucket') + '/some/prefix')


def test_storage_round_trips_files_folders_and_listings(storage, tmp_path, monkeypatch):
    monkeypatch.setenv('CALIB_EDM_CACHE', str(tmp_path / 'cache'))
    storage.check()
    assert not storage.exists('exp/a.json') and storage.list('exp') == []
    storage.write_json('exp/a.json', dict(x=1, y=[1, 2]))
    assert storage.read_json('exp/a.json') == dict(x=1, y=[1, 2]) and storage.exists('exp/a.json')
    storage.write_bytes('exp/sub/b.bin', b'\x00\x01')
    assert storage.list('exp') == ['a.json', 'sub'] and storage.read_bytes('exp/sub/b.bin') == b'\x00\x01'
    assert sorted(k for k, _ in storage.files('exp')) == ['exp/a.json', 'exp/sub/b.bin']
    uri = storage.write_file('exp/c.npz', lambda path: open(path, 'wb').write(b'npz bytes'))
    assert uri == storage.uri('exp/c.npz') and storage.read_bytes('exp/c.npz') == b'npz bytes'
    folder = tmp_path / 'folder'
    (folder / 'inner').mkdir(parents=True)
    (folder / 'inner' / 'f.txt').write_text('hello')
    storage.upload(str(folder), 'exp/up')
    assert storage.read_bytes('exp/up/inner/f.txt') == b'hello'
    storage.download('exp/up', str(tmp_path / 'down'))
    assert (tmp_path / 'down' / 'inner' / 'f.txt').read_text() == 'hello'
    with storage.local_folder('exp/figs') as local:
        open(os.path.join(local, 'p.png'), 'wb').write(b'png')
    assert storage.read_bytes('exp/figs/p.png') == b'png'
    storage.write_bytes('README.md', b'a file beside the experiments')  # (results/README.md is one)
    assert storage.list('README.md') == [] and results.experiments(storage) == []
    storage.delete('exp/a.json')
    assert not storage.exists('exp/a.json')
    with pytest.raises(FileNotFoundError, match='no such file'):
        storage.read_bytes('exp/a.json')
    # A stored file read by remote code: a local root's path as it is, a URI downloaded once per node.
    local = fetch(storage.uri('exp/c.npz'))
    assert open(local, 'rb').read() == b'npz bytes'
    if not storage.is_local:
        assert local.startswith(str(tmp_path / 'cache'))
        assert sha256_file(local) == os.path.basename(os.path.dirname(local))  # cached under its sha256
        storage.delete('exp/c.npz')  # the cache answers by sha256 alone
        assert fetch(storage.uri('exp/c.npz'), sha256_file(local)) == local
    # Pickled for remote code: the root alone, resolved again there with that node's credentials.
    import pickle
    again = pickle.loads(pickle.dumps(storage))
    assert again.root == storage.root and again._fs is None and again.read_bytes('exp/sub/b.bin') == b'\x00\x01'


def test_a_changed_object_is_downloaded_again_and_checked(s3_bucket, tmp_path, monkeypatch):
    """The cache finds a URI by its listing (size, modification time); a plan's sha256 that no
    longer matches the object's content is one line, not a wrong number."""
    monkeypatch.setenv('CALIB_EDM_CACHE', str(tmp_path / 'cache'))
    storage = Storage(s3_bucket)
    storage.write_bytes('in/w.pth', b'first')
    first = fetch(storage.uri('in/w.pth'))
    assert open(first, 'rb').read() == b'first' and fetch(storage.uri('in/w.pth')) == first
    time.sleep(1.1)  # a new modification time
    storage.write_bytes('in/w.pth', b'second, longer')
    assert open(fetch(storage.uri('in/w.pth')), 'rb').read() == b'second, longer'
    storage.write_bytes('in/x.pth', b'other')
    with pytest.raises(StorageError, match='its content changed since the plan hashed it'):
        fetch(storage.uri('in/x.pth'), sha256='0' * 64)
    with pytest.raises(FileNotFoundError, match='no such file or folder'):
        fetch(storage.uri('in/missing.pth'))


def test_inputs_are_hashed_by_content_and_uploaded_once_to_object_storage(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv('CALIB_EDM_CACHE', str(tmp_path / 'cache'))
    a, b = tmp_path / 'a' / 'net.pt', tmp_path / 'b' / 'net.pt'
    for f in (a, b):
        f.parent.mkdir()
        f.write_bytes(b'the same network')
    assert input_sha256(str(a)) == input_sha256(str(b)) == sha256_file(str(a))  # where it lives is not hashed
    monkeypatch.chdir(tmp_path)
    assert local_path('a/net.pt') == str(a) and local_path('s3://x/y') == 's3://x/y' and local_path(None) is None
    storage = Storage(s3_bucket + '/root')
    sha = input_sha256(str(a))
    ref = stage_input(storage, str(a), sha)
    assert ref == f'{s3_bucket}/root/inputs/{sha}/net.pt' and storage.read_bytes(f'inputs/{sha}/net.pt') == b'the same network'
    assert stage_input(storage, str(b), sha) == ref  # the second is found there, not uploaded again
    assert stage_input(Storage(str(tmp_path / 'r')), str(a), sha) == str(a)  # a local root reads the path itself
    assert input_sha256(ref) == sha  # a URI input is hashed by its content too


def test_bad_roots_are_one_line_each(s3_server, tmp_path, cli_subprocess):
    """An unknown scheme, a bucket that does not exist, an endpoint that does not answer: one line
    each, from `orchestrator run` before any stage, and from `results`."""
    spec = os.path.join(os.path.dirname(__file__), 'specs', 'tiny-train.yaml')
    cases = [('foo://bucket/x', "foo://bucket/x: not a storage URI pyarrow can open"),
             ('s3://no-such-bucket-here/x', "the bucket 'no-such-bucket-here' does not exist"),
             ('s3://bucket/x', 'cannot reach the store')]
    for root, message in cases:
        env = dict(os.environ)
        if root == 's3://bucket/x':
            env['AWS_ENDPOINT_URL'] = 'http://127.0.0.1:1'  # nothing listens there
        for command in (['run', spec, '--results', root], ['results', '--results', root]):
            started = time.time()
            out = cli_subprocess(*command, env=env, timeout=120)
            assert out.returncode == 2 and message in out.stderr, (command, out.stderr[-2000:])
            assert out.stderr.count('\n') == 1 and 'Traceback' not in out.stderr and '== train' not in out.stdout
            assert time.time() - started < 60


def test_results_and_lease_on_object_storage(s3_bucket, monkeypatch):
    """Parquet tables written to a bucket are read back by pandas with nothing but the
    environment (pyarrow takes AWS_ENDPOINT_URL and the credentials); the lease is an object that
    the running driver renews, refused to a second run and taken over once it expires."""
    root = s3_bucket + '/prefix'
    rows = [dict(label='a', fid=1.5), dict(label='b', fid=2.5)]
    uri = results.write_table(root, 'exp', 'sweep', rows, dict(experiment='exp'))
    assert uri == f'{root}/exp/sweep.parquet'
    df = pd.read_parquet(uri)  # straight from the bucket, as a user would
    assert df['fid'].tolist() == [1.5, 2.5] and (df['experiment'] == 'exp').all()
    assert results.read_table(root, 'exp', 'sweep')['label'].tolist() == ['a', 'b']
    assert results.experiments(root) == ['exp']
    monkeypatch.setattr(results, 'RENEW_SECONDS', 0.2)
    storage = Storage(root)
    with results.experiment_lease(root, 'exp'):
        first = storage.read_json(results.lease_key('exp'))
        time.sleep(0.8)
        renewed = storage.read_json(results.lease_key('exp'))
        assert renewed['owner'] == first['owner'] and renewed['expires'] > first['expires']
        with pytest.raises(results.ExperimentBusy, match=rf"being run by pid {os.getpid()} on "):
            with results.experiment_lease(root, 'exp'):
                pass
    assert not storage.exists(results.lease_key('exp'))
    storage.write_json(results.lease_key('exp'), dict(owner='x', pid=1, host='gone-host', started='then',
                                                      expires=time.time() - 1))
    said = []
    with results.experiment_lease(root, 'exp', log=said.append):
        assert storage.read_json(results.lease_key('exp'))['pid'] == os.getpid()
    assert 'taking over the lease' in said[0] and 'gone-host' in said[0]


def test_cli_results_and_figures_read_the_bucket(s3_bucket, capsys, tmp_path):
    """`orchestrator results` and `figures` on a bucket: a quickstart's tables (a copy in
    tests/data: `make quickstart` rewrites results/quickstart), uploaded as a run would have
    written them but without their sample grids, list, print and render from there; the sheet
    says which grids are missing, and every figure is the one a local root gives."""
    from orchestrator import cli
    quickstart = os.path.join(os.path.dirname(__file__), 'data', 'quickstart')
    root, local = s3_bucket + '/p', str(tmp_path / 'local')
    storage = Storage(root)
    sweep = pd.read_parquet(os.path.join(quickstart, 'sweep.parquet'))
    sweep['samples'] = 'samples/' + sweep['trial_hash'] + '.png'  # as today's runs name their grids
    sweep.to_parquet(tmp_path / 'sweep.parquet')
    for table in ('sweep', 'calibration', 'likelihood'):
        source = str(tmp_path / 'sweep.parquet') if table == 'sweep' else os.path.join(quickstart, f'{table}.parquet')
        storage.upload(source, f'quickstart/{table}.parquet')
        Storage(local).upload(source, f'quickstart/{table}.parquet')
    assert cli.main(['results', '--results', root]) == 0
    assert capsys.readouterr().out.strip() == 'quickstart'
    assert cli.main(['results', 'quickstart', '--results', root, '--columns', 'label,fid']) == 0
    fids = pd.read_parquet(os.path.join(quickstart, 'sweep.parquet'))['fid']
    assert f'{fids.iloc[0]:.6f}'[:6] in capsys.readouterr().out
    assert cli.main(['figures', 'nosuch', '--results', root]) == 2  # nothing to draw: said, nothing made
    assert "no results tables for experiment 'nosuch' (has it run?)" in capsys.readouterr().err
    assert storage.list('nosuch') == []
    assert cli.main(['figures', 'quickstart', '--results', root]) == 0
    out = capsys.readouterr().out
    assert f'wrote {root}/quickstart/training_progress.png' in out and f'wrote {root}/quickstart/sweep.md' in out
    assert storage.read_bytes('quickstart/training_progress.png')[:4] == b'\x89PNG'
    assert storage.read_bytes('quickstart/samples.png')[:4] == b'\x89PNG'  # drawn, with its cells saying "missing"
    assert cli.main(['figures', 'quickstart', '--results', local]) == 0
    for name in ('training_progress.md', 'sweep.md'):  # the same tables as from a local root
        with open(os.path.join(local, 'quickstart', name)) as f:
            assert storage.read_bytes(f'quickstart/{name}').decode() == f.read()


# Results and run records on a results root (no Ray).

def test_two_experiments_share_a_results_root(tmp_path):
    """Concurrent writers of two experiments never corrupt each other's files (atomic renames
    into separate folders)."""
    root = str(tmp_path)
    errors = []

    def writer(name):
        try:
            for i in range(20):
                rows = [dict(step=j, value=float(i * j), payload='x' * 1000) for j in range(200)]
                results.write_table(root, name, 'sweep', rows, dict(experiment=name))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in ('a', 'b')]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name in ('a', 'b'):
        df = pd.read_parquet(os.path.join(root, name, 'sweep.parquet'))
        assert len(df) == 200 and (df['experiment'] == name).all() and df['value'].iloc[-1] == 19 * 199
    assert results.experiments(root) == ['a', 'b']
    assert not [f for f in os.listdir(os.path.join(root, 'a')) if '.tmp' in f]


def test_show_tells_a_running_run_from_a_dead_one(tmp_path):
    """`show` reads run.json and the lease alone: a run whose lease is renewed is running (its
    owner, since when, its stage); the same record with the lease expired is a run that died."""
    from orchestrator.plan import Stage
    from orchestrator.storage import Storage
    storage = Storage(str(tmp_path))
    stages = [Stage('train', 'a' * 16, 'x/stages/train-' + 'a' * 16, {}, ''), Stage('sweep', 'b' * 16, 'x/stages/sweep-' + 'b' * 16, {}, '')]
    record = results.RunRecord(storage, 'x', 'c' * 16, stages)
    storage.write_json(f'x/stages/train-{"a" * 16}/DONE.json', {})
    record.stage_done('train', 'a' * 16, 'ran', 12.0)
    record.update(stage=dict(name='sweep', hash='b' * 16, since='2026-11-30T10:00:00+00:00'),
                  sweep=dict(best=dict(label='edm num_steps=18', fid=3.5), rungs={'500': 12, '1500': 4}, trials_done=3))
    now = time.time()
    storage.write_json('x/.lease.json', dict(owner='o', pid=4242, host='node-1', started='then', expires=now + 20))
    shown = '\n'.join(results.show(storage, 'x', now=now))
    assert 'last run: running since' in shown and 'pid 4242 on node-1 (lease renewed 10 s ago); stage sweep since 2026-11-30T10:00:00' in shown
    assert re.search(r'train +a{16} +done \(ran in this run, 12 s\)', shown) and re.search(r'sweep +b{16} +running since', shown)
    assert 'sweep so far: 3 trial(s) done; best fid 3.50 (first seed block): edm num_steps=18; rungs 500:12 1500:4' in shown
    record.update(sweep=dict(record.data['sweep'], images_generated=900, grid_images=2400))  # as the sweep stage ends
    assert 'images generated: 900 of the grid\'s 2400 (37.5%)' in '\n'.join(results.show(storage, 'x', now=now))
    dead = '\n'.join(results.show(storage, 'x', now=now + 60))
    assert 'last run: died' in dead and 'pid' in dead
    with pytest.raises(FileNotFoundError, match="no experiment 'y'"):
        results.show(storage, 'y')
