"""The results root, and every file that remote code reads: one storage layer for all stages.

A root is a local or NFS path (the default, `results`) or a URI of any filesystem pyarrow
resolves (`s3://bucket/prefix`, `gs://...`, `abfs://...`, and fsspec's through pyarrow's handler).
As in Ray Train's own storage context, the root is resolved once per process into a pyarrow
filesystem and a path, and files move with pyarrow (`copy_files`). Credentials come only from the
environment's standard chains on each node (AWS_* and AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS,
instance profiles): a Storage pickles as its root string alone, never with a resolved filesystem.

Inputs a spec names (data, checkpoints, reference statistics, Inception weights) are local paths
or URIs. `fetch(ref, sha256)` gives a local file for either: a path as it is, a URI downloaded once
per node into the cache (`$CALIB_EDM_CACHE`, default ~/.cache/calib-edm) under its sha256. With an
object-store root, `stage_input` uploads a local input once to `<root>/inputs/<sha256>` so that
code on other nodes reads it from there, never from the driver's disk.
"""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid

import pyarrow.fs as pafs

from tasks.files import atomic_write, sha256_file


class StorageError(ValueError):
    """A results root or input URI that cannot be used; the message says which and why."""


def is_uri(ref):
    return isinstance(ref, str) and '://' in ref and not ref.startswith('file://')


def cache_dir():
    """This node's cache (shared with the Inception weights: tasks.metrics.default_cache_dir)."""
    from tasks.metrics import default_cache_dir
    return default_cache_dir()


def _resolve(uri):
    """(pyarrow filesystem, path) of a URI, or one StorageError line."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # ArrowInvalid (unknown scheme), OSError (no credentials, bad region)
        raise StorageError(f'{uri}: not a storage URI pyarrow can open ({type(e).__name__}: {_first_line(e)}); use a '
                           'local or NFS path, or s3://, gs://, abfs://, hdfs:// (and fsspec\'s schemes with fsspec '
                           'installed)') from None


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else ''


class Storage:
    """Files under one root, by '/'-separated keys relative to it."""

    def __init__(self, root):
        self.root = root.rstrip('/') if is_uri(root) else os.path.abspath(os.path.expanduser(root))
        self._fs = None

    @classmethod
    def of(cls, root):
        """A Storage from a root string (path or URI), or the Storage itself."""
        return root if isinstance(root, Storage) else cls(root)

    def __reduce__(self):  # each process resolves the root itself, with its own node's credentials
        return Storage, (self.root,)

    def __repr__(self):
        return f'Storage({self.root!r})'

    @property
    def is_local(self):
        return not is_uri(self.root)

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._base = (pafs.LocalFileSystem(), self.root) if self.is_local else _resolve(self.root)
        return self._fs

    def path(self, *keys):
        """The filesystem path of a key (for self.fs)."""
        self.fs  # noqa: B018 (resolves _base)
        return '/'.join([self._base.rstrip('/'), *(k.strip('/') for k in keys if k)])

    def uri(self, *keys):
        """What a person, Ray Train/Tune's storage_path and pandas take: the root URI (or the
        absolute local path) joined with the keys."""
        return '/'.join([self.root, *(k.strip('/') for k in keys if k)])

    # -- bytes and JSON ----------------------------------------------------------------------

    def exists(self, key):
        return self.fs.get_file_info(self.path(key)).type != pafs.FileType.NotFound

    def read_bytes(self, key):
        try:
            with self.fs.open_input_stream(self.path(key)) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f'{self.uri(key)}: no such file') from None

    def write_bytes(self, key, data):
        """Whole or not at all: on a local root through a temporary name and a rename (an
        object store's single upload is atomic by itself)."""
        path = self.path(key)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f'{path}.tmp-{uuid.uuid4().hex[:8]}'
            with open(tmp, 'wb') as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
        return self.uri(key)

    def read_json(self, key):
        return json.loads(self.read_bytes(key))

    def write_json(self, key, obj):
        """Indented JSON (other values as strings), written whole."""
        return self.write_bytes(key, json.dumps(obj, indent=1, default=str).encode())

    def delete(self, key):
        try:
            self.fs.delete_file(self.path(key))
        except FileNotFoundError:
            pass

    def list(self, key=''):
        """Names directly under a key (files and folders), sorted; [] when there is none."""
        try:
            info = self.fs.get_file_info(pafs.FileSelector(self.path(key), allow_not_found=True))
        except NotADirectoryError:  # a file: nothing under it
            return []
        return sorted(i.base_name for i in info)

    def files(self, key=''):
        """Every file under a key, recursively: [(key, modification time)]."""
        info = self.fs.get_file_info(pafs.FileSelector(self.path(key), recursive=True, allow_not_found=True))
        base = len(self.path()) + 1
        return [(i.path[base:], i.mtime) for i in info if i.type == pafs.FileType.File]

    # -- files and folders -------------------------------------------------------------------

    def write_file(self, key, write):
        """write(path) makes a local file (torch.save, np.savez, savefig...) that becomes `key`,
        whole or not at all. Returns the key's URI."""
        if self.is_local:
            os.makedirs(os.path.dirname(self.path(key)), exist_ok=True)
            atomic_write(self.path(key), write, suffix=os.path.splitext(key)[1])
            return self.uri(key)
        with tempfile.TemporaryDirectory(prefix='calib-edm-') as tmp:
            local = os.path.join(tmp, os.path.basename(key))
            write(local)
            return self.upload(local, key)

    def upload(self, local, key):
        """Copy a local file or folder to a key (a folder's files keep their relative paths)."""
        dest = self.path(key)
        if self.is_local:
            if os.path.abspath(local) != dest:
                (shutil.copytree(local, dest, dirs_exist_ok=True) if os.path.isdir(local) else
                 (os.makedirs(os.path.dirname(dest), exist_ok=True), shutil.copyfile(local, dest)))
            return self.uri(key)
        if not os.path.isdir(local):
            self.fs.create_dir(os.path.dirname(dest), recursive=True)
        pafs.copy_files(local, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        return self.uri(key)

    def download(self, key, local):
        """Copy a key (file or folder) to a local path; returns it."""
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        pafs.copy_files(self.path(key), local, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        return local

    @contextlib.contextmanager
    def local_folder(self, key):
        """A local folder for files that belong under `key`: on a local root that folder itself;
        else a temporary one whose files are uploaded when the block ends, also when it fails (a
        failed stage's ray.log is what a person reads first)."""
        if self.is_local:
            os.makedirs(self.path(key), exist_ok=True)
            yield self.path(key)
            return
        with tempfile.TemporaryDirectory(prefix='calib-edm-') as tmp:
            try:
                yield tmp
            finally:
                if os.listdir(tmp):
                    self.upload(tmp, key)

    def check(self):
        """One StorageError line if the root cannot be used: an unknown scheme, a bucket that
        does not exist, an endpoint that does not answer, credentials refused; on a local root,
        a file where the folder should be or a folder this user cannot write. Creates nothing."""
        if self.is_local:
            existing = self.root
            while not os.path.exists(existing):
                existing = os.path.dirname(existing)
            if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
                raise StorageError(f'{self.root}: cannot be the results root ({existing} is not a folder this user can '
                                   'write to)')
            return
        bucket = self.path().split('/')[0]
        try:
            found = self.fs.get_file_info(bucket).type
        except OSError as e:
            raise StorageError(f'{self.root}: cannot reach the store ({_first_line(e)}); check the endpoint '
                               '(AWS_ENDPOINT_URL for an S3-compatible server) and the credentials of this '
                               'environment') from None
        if found == pafs.FileType.NotFound:
            raise StorageError(f'{self.root}: the bucket {bucket!r} does not exist (or these credentials cannot see it); '
                               'create it first: the orchestrator never creates buckets')


# -- inputs named in a spec -------------------------------------------------------------------

def local_path(ref):
    """A spec's file reference resolved once, where the command was started: a relative path
    becomes absolute (workers run in other folders); a URI stays as it is."""
    if ref is None or is_uri(ref):
        return ref
    return os.path.abspath(os.path.expanduser(ref[len('file://'):] if ref.startswith('file://') else ref))


def fetch(ref, sha256=None):
    """A local file or folder holding `ref`: a local path as it is; a URI from this node's cache,
    downloaded once (into <cache>/files/<sha256>/). With `sha256` the cached copy is found by it
    (what remote code passes: the plan hashed the input); without, the URI's listing (names, sizes,
    modification times) finds it, and a changed object is downloaded again."""
    if not is_uri(ref):
        if not os.path.exists(ref):
            raise FileNotFoundError(f'{ref}: no such file or directory')
        return ref
    files = os.path.join(cache_dir(), 'files')
    name = ref.rstrip('/').rsplit('/', 1)[-1]
    if sha256 and os.path.exists(os.path.join(files, sha256, name)):
        return os.path.join(files, sha256, name)
    fs, path = _resolve(ref)
    try:
        info = fs.get_file_info(path)
        listing = [info] if info.type == pafs.FileType.File else \
            fs.get_file_info(pafs.FileSelector(path, recursive=True)) if info.type == pafs.FileType.Directory else []
    except OSError as e:
        raise StorageError(f'{ref}: cannot read ({_first_line(e)})') from None
    if not listing:
        raise FileNotFoundError(f'{ref}: no such file or folder')
    version = hashlib.sha256(json.dumps(sorted((i.path, i.size, str(i.mtime)) for i in listing)).encode()).hexdigest()
    index = os.path.join(cache_dir(), 'uris', f'{version}.json')
    if os.path.isfile(index):
        with open(index) as f:
            known = json.load(f)['sha256']
        if os.path.exists(os.path.join(files, known, name)):
            return os.path.join(files, known, name)
    os.makedirs(files, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=files, prefix='.download-')
    try:
        pafs.copy_files(path, os.path.join(tmp, name), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        digest = sha256_file(os.path.join(tmp, name))
        if sha256 and digest != sha256:
            raise StorageError(f'{ref}: its content changed since the plan hashed it (sha256 {digest[:16]}..., '
                               f'expected {sha256[:16]}...); run the spec again')
        final = os.path.join(files, digest)
        if not os.path.exists(os.path.join(final, name)):
            os.makedirs(final, exist_ok=True)
            os.replace(os.path.join(tmp, name), os.path.join(final, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(index), exist_ok=True)
    with open(f'{index}.tmp-{os.getpid()}', 'w') as f:
        json.dump(dict(uri=ref, sha256=digest), f)
    os.replace(f'{index}.tmp-{os.getpid()}', index)
    return os.path.join(final, name)


def input_sha256(ref):
    """The content hash of an input (file or folder), local or URI: what plans hash, never where
    the input lives."""
    return sha256_file(fetch(ref))


def stage_input(storage, ref, sha256):
    """Where remote code reads an input from: a URI as it is; a local path as it is on a local
    root (one machine, or NFS that every node mounts at the same path), else uploaded once to
    <root>/inputs/<sha256>/<name> of the object store."""
    if is_uri(ref) or storage.is_local:
        return ref
    key = f'inputs/{sha256}/{os.path.basename(ref.rstrip("/"))}'
    if not storage.exists(key):
        storage.upload(ref, key)
    return storage.uri(key)
