"""Loading a trained model and its tokenizer for the CLIs (famjax.restore reads the checkpoint)."""
from __future__ import annotations


def load_model(path: str):
    """Returns (model, run config) restored from a workdir or checkpoint folder (famjax.restore; no trainer)."""
    from famjax.restore import restore_model  # orbax is imported only when a model is loaded

    return restore_model(path)


def tokenizer_for(config):
    """Returns the tokenizer of a run config's `data` section (bytes when the config has none)."""
    from famjax.data import ByteTokenizer, make_tokenizer

    data = config.get("data") if hasattr(config, "get") else getattr(config, "data", None)
    return make_tokenizer(data) if data is not None else ByteTokenizer()
