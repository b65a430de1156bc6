"""Loading a trained model and its tokenizer for the CLIs (the trainer owns the checkpoint format)."""
from __future__ import annotations


def load_model(path: str):
    """Returns (model, run config) restored from a workdir or checkpoint folder.

    Delegates to famjax.train.checkpoint.restore_model, imported here so that inference without the trainer
    (an in-memory model) needs neither orbax nor the trainer's modules.
    """
    try:
        from famjax.train.checkpoint import restore_model
    except ImportError as e:
        raise RuntimeError(f"cannot load {path!r}: famjax.train.checkpoint.restore_model is not available "
                           f"({e})") from e
    return restore_model(path)


def tokenizer_for(config):
    """Returns the tokenizer of a run config's `data` section (bytes when the config has none)."""
    from famjax.data import ByteTokenizer, make_tokenizer

    data = config.get("data") if hasattr(config, "get") else getattr(config, "data", None)
    return make_tokenizer(data) if data is not None else ByteTokenizer()
