"""famjax's own error types and the command lines' exit codes.

A `FamjaxError` is a problem with what the user gave (a config field, a data or tokenizer file, a checkpoint, a
workdir), not a bug: its message is one line that names the field or file and says what to do. The command lines
(famjax.main, famjax.generate, famjax.evals; `famjax.cli.run`) print it as `prog: message` on stderr and exit
with `exit_code` (2), without a traceback unless --verbose or FAMJAX_VERBOSE=1 asks for one. Each type also
derives from the built-in exception a caller would have caught before (ValueError, FileNotFoundError).

Exit codes of famjax.main: 0 finished (or the training data ran out), 1 an unexpected failure (traceback),
2 a user error (one line), 75 preempted (SIGTERM or a first Ctrl-C: the step was finished and saved; rerunning
the same command resumes). 75 is EX_TEMPFAIL of sysexits.h, "try again later".
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75


class FamjaxError(Exception):
    """A user-facing error with a one-line message."""

    exit_code = EXIT_USER_ERROR


class ConfigError(FamjaxError, ValueError):
    """A config field is unknown, of the wrong type or value, or differs from the run's saved config."""


class DataError(FamjaxError, ValueError):
    """A dataset, text file or data folder cannot be read as the config says (empty, not UTF-8, missing)."""


class TokenizerError(DataError):
    """A tokenizer file is missing or not what its kind expects."""


class CheckpointError(FamjaxError, ValueError):
    """A checkpoint cannot be restored, or belongs to another model or base."""


class CheckpointNotFoundError(FamjaxError, FileNotFoundError):
    """A workdir or checkpoint folder holds no checkpoint."""


class WorkdirError(FamjaxError, OSError):
    """A workdir cannot be used: it is a file, not writable, or (gs://...) not reachable."""


class NonFiniteLossError(FamjaxError, FloatingPointError):
    """The loss became NaN/inf; the last good checkpoint is left as it was."""

    exit_code = 1


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (a multi-line message's lines joined with '; ')."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, (FileNotFoundError, OSError)) and err.args and len(err.args) == 2 and err.filename:
        text = f"{err.strerror}: {err.filename}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return lines[0] + " " + "; ".join(lines[1:])
    return "; ".join(lines)
