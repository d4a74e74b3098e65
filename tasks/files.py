"""Files written whole or not at all."""
import os


def atomic_write(path, write, suffix=''):
    """Call write(tmp) on a temporary name beside `path`, then rename it to `path`: a reader
    never sees a half-written file, and a crash leaves the old file (or none). `suffix` keeps an
    extension that the writer would otherwise append (np.savez adds '.npz')."""
    tmp = f'{path}.tmp-{os.getpid()}{suffix}'
    write(tmp)
    os.replace(tmp, path)
    return path
