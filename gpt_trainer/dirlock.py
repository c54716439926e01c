"""
One writer per directory: an out_dir (checkpoint.lock_out_dir) or a data dir (dataprep's
prepare scripts) is held with flock on DIR/.lock, which the kernel releases when the process
ends in any way (kill -9 included), so no lock outlives its holder. The holder's pid, host
and start time are written into the file for the next writer's error message. Torch-free, so
the prepare scripts use it without torch.
"""
import contextlib
import fcntl
import os
import socket
import time

from gpt_trainer.fsutil import write_failure

_locks = {}  # realpath(dir) -> its open lock file, held until this process exits


def is_locked(path):
    """Whether this process holds path's lock."""
    return os.path.realpath(path) in _locks


def lock_dir(path, error, setting="out_dir", kind="run"):
    """Make directory `path` this process's alone (created if missing). error: the UserError
    class to raise; setting names the option to change in the messages."""
    if is_locked(path):
        return _locks[os.path.realpath(path)]
    if os.path.exists(path) and not os.path.isdir(path):
        raise error(f"{setting}={path} is a file, not a directory; pick another --{setting}")
    try:
        os.makedirs(path, exist_ok=True)
        f = open(os.path.join(path, ".lock"), "a+")
    except OSError as e:
        raise error(f"cannot use {setting}={path}: {write_failure(e)}")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that is just starting"
        f.close()
        raise error(f"{path} is in use by another {kind} ({holder}); wait for it to end, "
                    f"stop it, or pick another --{setting}")
    try:
        f.truncate(0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
        f.flush()
    except OSError:
        pass  # the lock holds without the note (a full disk); the next writer's message is vaguer
    _locks[os.path.realpath(path)] = f
    return f


def unlock_dir(path):
    """Release path's lock if this process holds it (a writer called in-process, e.g. a
    prepare run from a test, that is done with the directory)."""
    f = _locks.pop(os.path.realpath(path), None)
    if f is not None:
        f.close()


@contextlib.contextmanager
def holding(path, error, setting="out_dir", kind="run"):
    """lock_dir for the duration of a with block; a lock this process already held stays held."""
    took = not is_locked(path)
    lock_dir(path, error, setting, kind)
    try:
        yield
    finally:
        if took:
            unlock_dir(path)


def unlock_all():
    """Release every lock this process holds (tests)."""
    for path in list(_locks):
        _locks.pop(path).close()
