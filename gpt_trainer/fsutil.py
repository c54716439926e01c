"""
Filesystem helpers every writer shares: durable renames (fsync_dir), atomic small files
(write_json), a failed write in words (write_failure) and a download that never leaves half a
file. Torch-free, so the prepare scripts use them without importing torch.
"""
import errno
import json
import os
import sys
import urllib.request

from gpt_trainer.errors import DataError


def fsync_dir(path):
    """Make the entries of directory `path` (a rename into it, say) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj):
    """Write path atomically: readers see the old file or the new one, never half of one."""
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except BaseException:  # a full disk leaves no empty temp file behind
        try:
            os.remove(path + ".tmp")
        except OSError:
            pass
        raise


def write_failure(e):
    """Why a write failed, in words. torch.save reports a short write as a RuntimeError whose
    context holds the OSError with the reason, so the chain is searched for an errno."""
    reasons = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EFBIG: "file too large (the file size limit, ulimit -f, or the filesystem's)",
               errno.EROFS: "read-only file system"}
    cause = e
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return reasons.get(cause.errno, os.strerror(cause.errno).lower())
        cause = cause.__cause__ or cause.__context__
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def download(url, path):
    """url to path, through a temporary file of this process so that no rank reads half a file."""
    print(f"downloading {url} to {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except OSError as e:
        raise DataError(f"could not download {url} ({getattr(e, 'reason', e)}); put the file at {path} "
                        f"and re-run")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
