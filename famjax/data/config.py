"""The `data` section of the famjax config, and its validation."""
from __future__ import annotations

import ml_collections

from famjax.data.catalog import CATALOG, DATASETS
from famjax.data.local_text import ENCODING_ERRORS
from famjax.data.passkey import KEY_POSITIONS
from famjax.data.tokenizers import TOKENIZER_KINDS
from famjax.errors import ConfigError

BATCHINGS = ("auto", "packed", "stream")


def default_config() -> ml_collections.ConfigDict:
    """Returns the default `data` section: PassKey with the byte tokenizer."""
    c = ml_collections.ConfigDict()
    c.dataset = "passkey"  # one of: passkey, local_text, pg19, lm1b, c4
    c.data_dir = "~/famjax_data"  # where famjax prepares passkey/local_text and finds prepared catalog sets
    c.train_split = "train"  # split read for training
    c.eval_split = "validation"  # split read for evaluation (PassKey also has eval_x1, eval_x2, ...)
    c.batching = "auto"  # packed rows, document stream, or auto (stream for long documents)
    c.seq_len = 1024  # tokens per row per step (T); a multiple of the model's block size
    c.batch_size = 8  # global rows per step, split evenly over processes
    c.seed = 0  # shuffle seed (same seed -> same order on every run)
    c.shuffle = True  # shuffle the training split (evaluation splits are read in order)
    c.read_threads = 2  # threads reading and tokenizing examples ahead of the batcher
    c.prefetch_batches = 2  # batches assembled ahead in a background thread (0: none)

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.kind = "byte"  # byte (no file), word, sentencepiece, hf (tokenizer.json), gguf (a .gguf's vocabulary)
    c.tokenizer.path = ""  # model / vocabulary file; word without a path uses the PassKey vocabulary
    c.tokenizer.bos_token = ""  # hf only: name of the bos token if it is not a common one
    c.tokenizer.eos_token = ""  # hf only: name of the eos token if it is not a common one
    c.tokenizer.pad_token = ""  # hf only: name of the pad token (default: eos, else id 0)

    c.passkey = ml_collections.ConfigDict()
    c.passkey.key_digits = 5  # digits in the pass key
    c.passkey.key_position = "uniform"  # start (right after the intro), uniform (any filler sentence), end
    c.passkey.train_filler_min = 64  # shortest training filler, in tokens of the tokenizer
    c.passkey.train_filler_max = 512  # longest training filler; eval_xM splits use M x this
    c.passkey.train_examples = 20000  # examples in the train split
    c.passkey.validation_examples = 500  # examples in the validation split (training lengths)
    c.passkey.eval_multipliers = (1, 2, 4, 8, 16, 32, 64)  # eval_xM splits to generate
    c.passkey.eval_examples = 100  # examples per eval_xM split
    c.passkey.seed = 0  # generation seed (independent of the shuffle seed)
    c.passkey.loss_weight_other = 0.0  # loss weight on non-answer tokens (the answer has weight 1)
    # Training split only: K > 1 joins K consecutive (shuffled) examples into one document, read as a
    # document stream, so the model state runs on across examples and train steps (each new key has to
    # replace the old one in the FAM). Needs batching auto or stream; 1 = examples on their own.
    c.passkey.chain = 1

    c.local_text = ml_collections.ConfigDict()
    c.local_text.path = ""  # folder of text files, one document per file
    c.local_text.glob = "**/*.txt"  # which files under the folder (recursive glob)
    c.local_text.validation_fraction = 0.05  # share of files (by path hash) in the validation split
    c.local_text.encoding_errors = "strict"  # strict (non-UTF-8 file is an error), replace, or ignore

    c.catalog = ml_collections.ConfigDict()
    c.catalog.version = ""  # tfds version folder of a catalog dataset; empty: the newest prepared
    return c


def _choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"data.{field} must be one of {tuple(allowed)}, got {value!r}")


def validate(cfg: ml_collections.ConfigDict, *, process_count: int | None = None,
             block_size: int | None = None) -> None:
    """Raises ConfigError (a ValueError) naming the first bad field of a `data` section and what it allows."""
    _choice("dataset", cfg.dataset, DATASETS)
    _choice("batching", cfg.batching, BATCHINGS)
    _choice("tokenizer.kind", cfg.tokenizer.kind, TOKENIZER_KINDS)
    if not cfg.data_dir:
        raise ConfigError("data.data_dir is required (where datasets are prepared or cached)")
    if cfg.tokenizer.kind in ("sentencepiece", "hf", "gguf") and not cfg.tokenizer.path:
        raise ConfigError(f"data.tokenizer.path is required for tokenizer.kind={cfg.tokenizer.kind!r}")
    for field in ("seq_len", "batch_size"):
        if int(cfg[field]) <= 0:
            raise ConfigError(f"data.{field} must be > 0, got {cfg[field]}")
    for field in ("read_threads", "prefetch_batches"):
        if int(cfg[field]) < 0:
            raise ConfigError(f"data.{field} must be >= 0, got {cfg[field]}")
    if block_size is not None and cfg.seq_len % block_size:
        raise ConfigError(f"data.seq_len must be a multiple of block_size {block_size}, got {cfg.seq_len}")
    if process_count is not None and cfg.batch_size % process_count:
        raise ConfigError(f"data.batch_size must be divisible by the process count {process_count}, "
                          f"got {cfg.batch_size}")
    if cfg.dataset == "passkey":
        pk = cfg.passkey
        _choice("passkey.key_position", pk.key_position, KEY_POSITIONS)
        if pk.key_digits < 1:
            raise ConfigError(f"data.passkey.key_digits must be >= 1, got {pk.key_digits}")
        if not 0 <= pk.train_filler_min <= pk.train_filler_max:
            raise ConfigError("data.passkey.train_filler_min must be in [0, train_filler_max], got "
                              f"{pk.train_filler_min} (train_filler_max {pk.train_filler_max})")
        if any(int(m) < 1 for m in pk.eval_multipliers):
            raise ConfigError("data.passkey.eval_multipliers must all be >= 1, "
                              f"got {tuple(pk.eval_multipliers)}")
        if pk.loss_weight_other < 0:
            raise ConfigError(f"data.passkey.loss_weight_other must be >= 0, got {pk.loss_weight_other}")
        chain = pk.get("chain", 1)
        if not isinstance(chain, int) or chain < 1:
            raise ConfigError(f"data.passkey.chain must be an integer >= 1, got {chain!r}")
        if chain > 1 and cfg.batching == "packed":
            raise ConfigError("data.passkey.chain > 1 joins examples into document streams: it needs "
                              "data.batching 'auto' or 'stream', got 'packed'")
    if cfg.dataset == "local_text":
        if not cfg.local_text.path:
            raise ConfigError("data.local_text.path is required for dataset 'local_text'")
        _choice("local_text.encoding_errors", cfg.local_text.encoding_errors, ENCODING_ERRORS)
        if not 0.0 <= cfg.local_text.validation_fraction < 1.0:
            raise ConfigError("data.local_text.validation_fraction must be in [0, 1), got "
                             f"{cfg.local_text.validation_fraction}")


def resolve_batching(cfg: ml_collections.ConfigDict, dataset_default: str) -> str:
    """Returns 'packed' or 'stream': the config's choice, or the dataset's own default for 'auto'."""
    return dataset_default if cfg.batching == "auto" else cfg.batching


__all__ = ["BATCHINGS", "CATALOG", "default_config", "resolve_batching", "validate"]
