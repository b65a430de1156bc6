"""famjax trainer: config-driven, sharded (data, fsdp, tensor), checkpointed, observable.

    from famjax.train import train, evaluate, train_and_eval, restore_model
    result = train_and_eval(config, "runs/passkey_tiny")   # resumes if the workdir holds checkpoints
    model, cfg = restore_model("runs/passkey_tiny")       # a workdir, its checkpoints/ dir, or a step dir

Research code passes its own FAM perturbation with train(config, workdir, perturb=fn) (famjax.train.perturb).
"""
from famjax.restore import load_config, restore_model
from famjax.train.loop import Result, evaluate, train, train_and_eval

__all__ = ["Result", "evaluate", "load_config", "restore_model", "train", "train_and_eval"]
