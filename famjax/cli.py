"""What famjax's command lines share: user errors as one line, --verbose for the traceback.

    def main(argv=None):
        args = parse_args(argv)
        with famjax.cli.user_errors("famjax.generate", verbose=args.verbose):
            ...

A `famjax.errors.FamjaxError` raised inside prints `prog: message` (one line) on stderr and exits with its
exit code (2); with verbose (or FAMJAX_VERBOSE=1 in the environment) it propagates with its traceback. A first
KeyboardInterrupt outside the trainer (which handles Ctrl-C itself) exits 130 quietly.
"""
from __future__ import annotations

import contextlib
import os
import sys

from famjax.errors import FamjaxError, one_line

VERBOSE_ENV = "FAMJAX_VERBOSE"
VERBOSE_HELP = f"show the traceback of a user error (also: {VERBOSE_ENV}=1)"


def verbose_default() -> bool:
    """Whether the environment asks for tracebacks ($FAMJAX_VERBOSE set and not 0)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def fail(prog: str, message: str, code: int = 2):
    """Prints `prog: message` on stderr (one line) and exits with `code`."""
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


@contextlib.contextmanager
def user_errors(prog: str, *, verbose: bool = False, also: tuple[type[BaseException], ...] = ()):
    """Turns a FamjaxError (and the exception types in `also`) raised inside into one stderr line + exit code."""
    verbose = verbose or verbose_default()
    try:
        yield
    except FamjaxError as e:
        if verbose:
            raise
        fail(prog, one_line(e), e.exit_code)
    except also as e:
        if verbose:
            raise
        fail(prog, one_line(e), 2)
    except KeyboardInterrupt:
        if verbose:
            raise
        fail(prog, "interrupted", 130)
