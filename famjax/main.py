"""famjax command line: train / eval / train_and_eval a config into a workdir.

    python -m famjax.main --config=configs/passkey_tiny.py --workdir=runs/x [--config.train.steps=100]
        [--mode=train|eval|train_and_eval] [--distributed]

--config defaults to configs/passkey_tiny.py. With --distributed (or FAMJAX_DISTRIBUTED=1) the process calls
jax.distributed.initialize() first: on clusters it finds its peers itself; on one machine pass
--coordinator_address=localhost:PORT --num_processes=N --process_id=I.
"""
import os

from absl import app, flags
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_CONFIG = os.path.join(_REPO, "configs", "passkey_tiny.py")

config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "training config file (get_config())",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "where config.json, checkpoints/ and tensorboard/ go", required=True)
flags.DEFINE_enum("mode", "train", ["train", "eval", "train_and_eval"], "what to run")
flags.DEFINE_bool("distributed", os.environ.get("FAMJAX_DISTRIBUTED", "") not in ("", "0"),
                  "call jax.distributed.initialize() (multi-host); default from $FAMJAX_DISTRIBUTED")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (distributed, when not auto)")
flags.DEFINE_integer("num_processes", None, "processes in the job (distributed, when not auto)")
flags.DEFINE_integer("process_id", None, "this process's index (distributed, when not auto)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; progress lines are printed

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


if __name__ == "__main__":
    app.run(main)
