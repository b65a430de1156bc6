"""famjax trainer: config-driven, sharded (data, fsdp, tensor), checkpointed, observable.

    from famjax.train import train, evaluate, train_and_eval, restore_model
    model, cfg = restore_model("runs/passkey_tiny")      # a workdir, its checkpoints/ dir, or a step dir
"""
from famjax.train.checkpoint import load_config, restore_model

__all__ = ["load_config", "restore_model"]
