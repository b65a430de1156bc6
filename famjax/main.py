"""famjax command line: train / eval / train_and_eval a config into a workdir.

    python -m famjax.main --config=configs/passkey_tiny.py --workdir=runs/x [--config.train.steps=100]
        [--mode=train|eval|train_and_eval] [--distributed] [--verbose]

--config defaults to configs/passkey_tiny.py. With --distributed (or FAMJAX_DISTRIBUTED=1) the process calls
jax.distributed.initialize() first: on clusters it finds its peers itself; on one machine pass
--coordinator_address=localhost:PORT --num_processes=N --process_id=I.

Exit codes (famjax.errors): 0 done, 2 a user error (one line on stderr naming the flag, field or file; --verbose
or FAMJAX_VERBOSE=1 shows the traceback), 75 preempted (SIGTERM or a first Ctrl-C: the step was finished and
saved; the same command resumes), 1 anything else.
"""
import ast
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from famjax.cli import VERBOSE_HELP, fail, user_errors, verbose_default
from famjax.errors import EXIT_PREEMPTED, one_line

PROG = "famjax.main"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_CONFIG = os.path.join(_REPO, "configs", "passkey_tiny.py")
FLAGS = flags.FLAGS


def _define_flags() -> None:
    # The config flag loads its default file (and applies --config.x=y overrides) as soon as it is defined.
    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "training config file (get_config())",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "where config.json, checkpoints/ and tensorboard/ go (a folder or "
                        "gs://bucket/path)", required=True)
    flags.DEFINE_enum("mode", "train", ["train", "eval", "train_and_eval"], "what to run")
    flags.DEFINE_bool("distributed", os.environ.get("FAMJAX_DISTRIBUTED", "") not in ("", "0"),
                      "call jax.distributed.initialize() (multi-host); default from $FAMJAX_DISTRIBUTED")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (distributed, when not auto)")
    flags.DEFINE_integer("num_processes", None, "processes in the job (distributed, when not auto)")
    flags.DEFINE_integer("process_id", None, "this process's index (distributed, when not auto)")
    flags.DEFINE_bool("verbose", False, VERBOSE_HELP)


def _config_arg(argv: list[str]) -> str | None:
    """The --config file named on the command line (without a preset's ':arg'), or None."""
    for i, a in enumerate(argv):
        if a in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
        if re.match(r"^--?config=", a):
            return a.split("=", 1)[1].split(":")[0]
    return None


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
        return f"--config={_config_arg(argv)}: {one_line(e).split(';')[-1].strip()}"
    return one_line(e).removeprefix("flag ")


def _parse(argv: list[str]) -> list[str]:
    """absl's flags parser: a bad flag, config file, field or value exits 2 with one line."""
    try:
        rest = FLAGS(argv)
        FLAGS.config  # noqa: B018  loads the --config file and applies the overrides
        return rest
    except Exception as e:  # noqa: BLE001  anything raised while parsing is about the command line
        if "--verbose" in argv or verbose_default():
            raise
        fail(PROG, flag_error(e, argv))


def main(argv):
    del argv
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; progress lines are printed
    with user_errors(PROG, verbose=FLAGS.verbose):
        if FLAGS.distributed:
            jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                       num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
        from famjax.train import loop

        run = {"train": loop.train, "eval": loop.evaluate, "train_and_eval": loop.train_and_eval}[FLAGS.mode]
        result = run(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        pk = result.eval.get("passkey_accuracy")
        if pk is not None:
            print(f"PassKey accuracy at the training length: {pk:.3f} "
                  f"({int(result.eval['passkey_examples'])} examples, step {result.step})")
        if result.eval:
            print(f"eval loss {result.eval['loss']:.4f}  token accuracy {result.eval['accuracy']:.4f}")
        print(f"TensorBoard logs: {result.logdir}")
    if result.preempted:
        sys.exit(EXIT_PREEMPTED)


def cli() -> None:
    argv = sys.argv
    path = _config_arg(argv)
    try:
        if path is not None and not os.path.isfile(path):
            fail(PROG, f"--config={path}: {'a folder, not a config file' if os.path.isdir(path) else 'no such file'}")
        _define_flags()
    except Exception as e:  # noqa: BLE001  a default config whose overrides do not apply
        if "--verbose" in argv or verbose_default():
            raise
        fail(PROG, flag_error(e, argv))
    app.run(main, flags_parser=_parse)


if __name__ == "__main__":
    cli()
