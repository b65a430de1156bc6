"""A checkpoint's own tokenizer through famjax's Tokenizer interface (famjax.data.tokenizers), and back.

Import reuses `famjax.data.tokenizers.HFTokenizer` (tokenizer.json through the `tokenizers` library; encode
adds no special tokens; pad/bos/eos from tokenizer_config.json, else from config.json's token ids, else
common names) or `SentencePieceTokenizer` for a folder with only tokenizer.model. Export writes
tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer reads.
"""
from __future__ import annotations

import json
import logging
import os

from famjax.convert.common import ConvertError
from famjax.data.tokenizers import HFTokenizer, SentencePieceTokenizer

_LOG = logging.getLogger(__name__)


def _first_id(value):
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def load_tokenizer(folder: str, hf_config: dict | None = None):
    """Returns the tokenizer of a Hugging Face folder, or None (with a warning) when it has none."""
    path = os.path.join(folder, "tokenizer.json")
    try:
        if os.path.isfile(path):
            tok = HFTokenizer(path)
            has_names = os.path.isfile(os.path.join(folder, "tokenizer_config.json"))
            if not has_names and hf_config:  # the model's config.json names the special ids
                for key in ("bos", "eos", "pad"):
                    value = _first_id(hf_config.get(f"{key}_token_id"))
                    if value is not None and value < tok.vocab_size:
                        setattr(tok, f"{key}_id", value)
            return tok
        sp = os.path.join(folder, "tokenizer.model")
        if os.path.isfile(sp):
            return SentencePieceTokenizer(sp)
    except ValueError as e:  # the tokenizer classes raise one-line ValueErrors
        raise ConvertError(str(e)) from None
    _LOG.warning("%s has no tokenizer.json or tokenizer.model: the tokenizer is None", folder)
    return None


def _backend(tokenizer):
    """The `tokenizers.Tokenizer` inside a famjax tokenizer, or None."""
    from tokenizers import Tokenizer

    tok = getattr(tokenizer, "tok", None)
    return tok if isinstance(tok, Tokenizer) else None


def check_exportable(tokenizer) -> None:
    if _backend(tokenizer) is None:
        raise ConvertError(f"cannot export a {type(tokenizer).__name__}: only tokenizers backed by a Hugging Face "
                           "tokenizer.json (famjax.data.tokenizers.HFTokenizer) can be exported")


def save_tokenizer(tokenizer, out_dir: str) -> None:
    """Writes tokenizer.json and tokenizer_config.json (special tokens by name) into out_dir."""
    check_exportable(tokenizer)
    tok = _backend(tokenizer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for key in ("bos", "eos", "pad"):
        value = getattr(tokenizer, f"{key}_id", None)
        name = tok.id_to_token(int(value)) if value is not None else None
        if name is not None:
            config[f"{key}_token"] = name
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
