"""
The errors a user can fix, and how every entry point reports them: one `error: ...` line and
exit status 1. Any other exception is a bug and keeps its traceback. Torch-free and
dependency-free, so every module (and every prepare script) can raise these cheaply.
"""
import sys


class UserError(Exception):
    """Something the user can fix (a setting, a file, a checkpoint, a dataset): every entry
    point reports it as one `error: ...` line and exits 1. Every other exception is a bug and
    keeps its traceback."""


class ConfigError(UserError):
    """A bad config file or override."""


class DataError(UserError):
    """Bad or missing data: reported to the user as one line."""


class CheckpointError(UserError):
    """A checkpoint that cannot be written or used: reported to the user as one line."""


class HFError(UserError):
    """A model that cannot move between Hugging Face and our GPT: reported to the user as one line."""


def install_error_hook():
    """The one error hook of every entry point: a UserError prints as one line and exits 1;
    anything else keeps its traceback because it is a bug."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, UserError):
            print(f"error: {exc}", file=sys.stderr)
            sys.stderr.flush()
        else:
            previous(exc_type, exc, tb)
    sys.excepthook = hook
