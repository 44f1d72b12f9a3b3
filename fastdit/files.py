"""Files: crash-safe writes, content hashes and the cache location, shared by data, checkpoints and the zoo."""
import hashlib
import os
import tempfile
from pathlib import Path


def cache_root():
    """$FASTDIT_CACHE, else $XDG_CACHE_HOME/fastdit, else ~/.cache/fastdit."""
    root = os.environ.get("FASTDIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastdit")
    return Path(root)


def sha256_file(path):
    """Streamed: sample archives and data sets can be gigabytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path, write):
    """Call write(f) on a temporary file beside `path`, fsync it, then rename it over `path`.

    A reader never sees a half-written file, and a killed writer leaves the old file untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file private (0600); give it the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
