"""famjax data: TF-free tfds datasets (PassKey, local text, catalog), tokenizers, resumable per-host loading.

    tok = make_tokenizer(cfg.data)
    it = make_iterator(cfg.data, block_size=B, split="train")   # process index/count from jax by default
    batch = next(it); state = it.get_state(); it.set_state(state)
    for prompt, answer in passkey_pairs(cfg.data, "eval_x16"): ...
"""
from famjax.data.catalog import CATALOG, DATASETS
from famjax.data.config import default_config, validate
from famjax.data.loader import DataIterator, make_iterator, passkey_examples, passkey_pairs
from famjax.data.passkey import PassKeyPair, eval_split_name
from famjax.data.tokenizers import (
                                    ByteTokenizer,
                                    HFTokenizer,
                                    SentencePieceTokenizer,
                                    Tokenizer,
                                    WordTokenizer,
                                    build_word_vocab,
                                    make_tokenizer,
)

__all__ = [
                                    "CATALOG",
                                    "DATASETS",
                                    "ByteTokenizer",
                                    "DataIterator",
                                    "HFTokenizer",
                                    "PassKeyPair",
                                    "SentencePieceTokenizer",
                                    "Tokenizer",
                                    "WordTokenizer",
                                    "build_word_vocab",
                                    "default_config",
                                    "eval_split_name",
                                    "make_iterator",
                                    "make_tokenizer",
                                    "passkey_examples",
                                    "passkey_pairs",
                                    "validate",
]
