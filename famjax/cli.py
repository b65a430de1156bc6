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

import ast
import contextlib
import os
import re
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


# ---------------------------------------------------------------- ml_collections config flags
def config_arg(argv: list[str]) -> str | None:
    """The --config file named on the command line (the last one, as absl takes it; without a preset's ':arg'),
    or None."""
    found = None
    for i, a in enumerate(argv):
        if a in ("--config", "-config") and i + 1 < len(argv):
            found = argv[i + 1].split(":")[0]
        elif re.match(r"^--?config=", a):
            found = a.split("=", 1)[1].split(":")[0]
    return found


def flag_error(e: BaseException, argv: list[str]) -> str:
    """One line for an error raised while the flags (and the --config file with its overrides) load."""
    text = str(e)
    if text[:1] in "'\"":
        try:
            text = ast.literal_eval(text)  # ml_collections wraps a KeyError's message in quotes
        except (ValueError, SyntaxError):
            pass
    field = re.match(r"""^'([^']+)'\s*(?:Did you mean (.*?)\?)?\s*$""", text, re.S)
    if isinstance(e, (AttributeError, KeyError)) and field:
        name, hint = field.groups()
        flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                     and name in a.split("=")[0].split(".")), f"--config...{name}")
        return f"{flag}: the config has no field {name!r}" + (f" (did you mean {hint.split()[0]}?)" if hint else "")
    if isinstance(e, OSError) and "Failed loading config file" in text:
        return f"--config={config_arg(argv)}: {one_line(e).split(';')[-1].strip()}"
    return one_line(e).removeprefix("flag ")
