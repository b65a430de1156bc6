"""Loading a trained model, its tokenizer and a prompt for the CLIs (famjax.restore reads the checkpoint)."""
from __future__ import annotations

import os

from famjax import paths
from famjax.errors import DataError


def load_model(path: str):
    """Returns (model, run config) restored from a workdir or checkpoint folder (famjax.restore; no trainer)."""
    from famjax.restore import restore_model  # orbax is imported only when a model is loaded

    return restore_model(path)


def check_run(path: str):
    """Returns the run config of a workdir or checkpoint folder after checking that it holds a checkpoint; a
    user error (no such folder, no checkpoint, an unknown model field) is one line, before any model is built."""
    from famjax.restore import checkpoint_dir_and_steps, load_config

    config = load_config(path)
    checkpoint_dir_and_steps(path)
    return config


def tokenizer_for(config):
    """Returns the tokenizer of a run config's `data` section (bytes when the config has none)."""
    from famjax.data import ByteTokenizer, make_tokenizer

    data = config.get("data") if hasattr(config, "get") else getattr(config, "data", None)
    return make_tokenizer(data) if data is not None else ByteTokenizer()


def read_prompt(prompt: str | None, prompt_file: str | None = None) -> str:
    """Returns the prompt text: `prompt_file`'s contents (UTF-8) if given, else `prompt`.

    Raises DataError (one line naming the flag or file) if the text is empty or the file is missing, a folder,
    unreadable or not UTF-8, so a CLI fails before it loads a model.
    """
    if prompt_file is None:
        if not prompt:
            raise DataError("--prompt is empty: give the text to continue (or --prompt_file=FILE)")
        return prompt
    paths.check_reachable(prompt_file, write=False)  # gs://...: one line if it does not answer
    path = paths.resolve(os.path.expanduser(prompt_file))
    if not path.exists():
        raise DataError(f"--prompt_file {prompt_file}: no such file")
    if path.is_dir():
        raise DataError(f"--prompt_file {prompt_file} is a folder: give a text file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"--prompt_file {prompt_file}: cannot read it ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"--prompt_file {prompt_file} is not valid UTF-8 ({e.reason} at byte {e.start}): "
                        "re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    if not text:
        raise DataError(f"--prompt_file {prompt_file} is empty: put the prompt text in it")
    return text
