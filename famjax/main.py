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
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from famjax.cli import VERBOSE_HELP, config_arg, fail, flag_error, user_errors, verbose_default
from famjax.errors import EXIT_PREEMPTED

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


def _fail_on_flags(e: BaseException, argv: list[str]):
    """A flag or config error: re-raised with --verbose / FAMJAX_VERBOSE, else one line and exit 2."""
    if "--verbose" in argv or verbose_default():
        raise e
    fail(PROG, flag_error(e, argv))


def _parse(argv: list[str]) -> list[str]:
    """absl's flags parser: a bad flag, config file, field or value exits 2 with one line."""
    try:
        rest = FLAGS(argv)
        FLAGS.config  # noqa: B018  loads the --config file and applies the overrides
        return rest
    except Exception as e:  # noqa: BLE001  anything raised while parsing is about the command line
        _fail_on_flags(e, argv)


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
    path = config_arg(argv)
    try:
        if path is not None and not os.path.isfile(path):
            fail(PROG, f"--config={path}: {'a folder, not a config file' if os.path.isdir(path) else 'no such file'}")
        _define_flags()
    except Exception as e:  # noqa: BLE001  a default config whose overrides do not apply
        _fail_on_flags(e, argv)
    app.run(main, flags_parser=_parse)


if __name__ == "__main__":
    cli()
