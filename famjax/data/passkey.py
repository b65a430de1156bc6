"""PassKey retrieval (paper section 4.3; docs/fam.md, "The paper's settings and its PassKey task"), generated
locally as a TF-free tfds dataset.

An example is `[bos] intro, key sentence, filler, question, answer [eos]` in token ids of one tokenizer.
The filler length is counted in tokens of that tokenizer, so token ids (not text) are stored, and the cache
folder is keyed on the tokenizer's fingerprint. The key is written with exactly the token ids of the answer,
so `tokens[key_position : key_position + answer_len] == answer` and exact match is well defined.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from famjax.data import tfds_util
from famjax.data.passkey_text import (  # noqa: F401 (re-exported: passkey.INTRO, ...)
    FILLER,
    INTRO,
    KEY_AFTER,
    KEY_BEFORE,
    KEY_MIDDLE,
    QUESTION,
    template_texts,
)
from famjax.data.tokenizers import Tokenizer
from famjax.errors import ConfigError, DataError, TokenizerError

KEY_POSITIONS = ("start", "uniform", "end")
BUILDER_NAME = "famjax_passkey"


def eval_split_name(multiplier: int) -> str:
    """Returns the split holding examples with `multiplier` x the longest training filler, e.g. 'eval_x4'."""
    return f"eval_x{int(multiplier)}"


class _Pieces:
    """Token ids of the fixed texts, encoded once per tokenizer."""

    def __init__(self, tok: Tokenizer):
        enc = tok.encode
        self.tok = tok
        self.intro = enc(INTRO)
        self.key_middle = enc(KEY_MIDDLE)
        self.key_after = enc(KEY_AFTER)
        self.question = enc(QUESTION)
        self.key_before = enc(KEY_BEFORE)
        self.filler = [enc(s) for s in FILLER]
        if min(len(f) for f in self.filler) == 0:
            raise TokenizerError("tokenizer: encodes a PassKey filler sentence to no tokens; PassKey needs a "
                                 "tokenizer that covers English text")

    def key(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Returns (ids of the key as written everywhere, ids of the whitespace that precedes it).

        Encoding " 12345" gives byte tokenizers a leading space token; it belongs to the text before the
        key, not to the answer, so that the answer is exactly the key.
        """
        ids = self.tok.encode(" " + key)
        lead = 0
        while lead < len(ids) - 1 and self.tok.decode(ids[lead:lead + 1]).strip() == "":
            lead += 1
        return ids[lead:], ids[:lead]

    def filler_tokens(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (int32 [n] filler: the sentences cycled then cut at n, sentence boundaries <= n)."""
        reps = n // sum(len(f) for f in self.filler) + 1
        sents = self.filler * reps
        ids = np.concatenate(sents)[:n].astype(np.int32)
        bounds = np.concatenate([[0], np.cumsum([len(s) for s in sents])])
        return ids, bounds[bounds <= n]


def filler_ids(tok: Tokenizer, n: int) -> np.ndarray:
    """Returns int32 [n]: the task's filler in ids of tok (the sentences cycled, cut at n tokens)."""
    return _Pieces(tok).filler_tokens(n)[0]


def make_example(pieces: _Pieces, rng: np.random.Generator, *, filler_len: int, key_digits: int,
                 key_position: str) -> dict:
    """Returns one example: tokens int32 [L], loss_mask float32 [L] (1 on the answer), and metadata."""
    key = str(rng.integers(1, 10)) + "".join(str(d) for d in rng.integers(0, 10, key_digits - 1))
    key_ids, space_ids = pieces.key(key)
    filler, bounds = pieces.filler_tokens(filler_len)
    if key_position == "start":
        cut = 0
    elif key_position == "end":
        cut = filler_len
    else:  # uniform over sentence boundaries, so the key sentence never splits a word
        cut = int(bounds[rng.integers(0, len(bounds))])
    tok = pieces.tok
    head = [np.asarray([tok.bos_id] if tok.bos_id is not None else [], np.int32), pieces.intro,
            filler[:cut], pieces.key_before, space_ids]
    key_position_ = sum(len(h) for h in head)
    body = [key_ids, pieces.key_middle, space_ids, key_ids, pieces.key_after, filler[cut:], pieces.question,
            space_ids]
    prompt = np.concatenate(head + body).astype(np.int32)
    tail = np.asarray([tok.eos_id] if tok.eos_id is not None else [], np.int32)
    tokens = np.concatenate([prompt, key_ids, tail]).astype(np.int32)
    loss_mask = np.zeros(len(tokens), np.float32)
    loss_mask[len(prompt):len(prompt) + len(key_ids)] = 1.0
    return {"tokens": tokens, "loss_mask": loss_mask, "key": key, "key_position": key_position_,
            "answer_start": len(prompt), "answer_len": len(key_ids), "filler_tokens": filler_len}


@dataclasses.dataclass(eq=False)
class PassKeyConfig(tfds.core.BuilderConfig):
    """What a PassKey dataset is generated from; the name (cache folder) is a digest of all of it."""

    tokenizer_fingerprint: str = "byte"
    key_digits: int = 5
    key_position: str = "start"
    train_filler_min: int = 64
    train_filler_max: int = 512
    train_examples: int = 20000
    validation_examples: int = 500
    eval_multipliers: tuple = (1, 2, 4, 8, 16, 32, 64)
    eval_examples: int = 100
    seed: int = 0


def passkey_config(pk_cfg, tok: Tokenizer) -> PassKeyConfig:
    """Returns the builder config for the `data.passkey` config section and a tokenizer."""
    fields = {"tokenizer_fingerprint": tok.fingerprint, "key_digits": int(pk_cfg.key_digits),
                  "key_position": str(pk_cfg.key_position), "train_filler_min": int(pk_cfg.train_filler_min),
                  "train_filler_max": int(pk_cfg.train_filler_max), "train_examples": int(pk_cfg.train_examples),
                  "validation_examples": int(pk_cfg.validation_examples),
                  "eval_multipliers": tuple(int(m) for m in pk_cfg.eval_multipliers),
                  "eval_examples": int(pk_cfg.eval_examples), "seed": int(pk_cfg.seed)}
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    name = (f"{tok.fingerprint.split('-')[0]}_k{fields['key_digits']}_{fields['key_position']}"
            f"_f{fields['train_filler_min']}-{fields['train_filler_max']}_s{fields['seed']}_{digest}")
    return PassKeyConfig(name=name, version="1.0.0", description="famjax PassKey", **fields)


class FamjaxPasskey(tfds.core.GeneratorBasedBuilder):
    """PassKey with splits train, validation (train lengths), eval_x{m} (m x the longest train filler)."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds looks for a checksums file next to the builder's module through `importlib_resources`, a
    # package it only requires on Python < 3.9; this builder downloads nothing, so there is no such file.
    code_path = None
    BUILDER_CONFIGS = [PassKeyConfig(name="default")]  # noqa: RUF012  (tfds reads this class attribute)

    def __init__(self, *, tokenizer: Tokenizer | None = None, **kwargs):
        # The tokenizer is only needed to generate; reading back needs nothing but the files.
        self._tokenizer = tokenizer
        super().__init__(**kwargs)

    def _info(self):
        return tfds_util.LocalDatasetInfo(
            builder=self,
            description="PassKey retrieval (TransformerFAM, arXiv 2404.09173), token ids of one tokenizer.",
            features=tfds.features.FeaturesDict({
                "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "loss_mask": tfds.features.Tensor(shape=(None,), dtype=np.float32),
                "key": tfds.features.Text(),
                "key_position": np.int32,
                "answer_start": np.int32,
                "answer_len": np.int32,
                "filler_tokens": np.int32,
            }),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        splits = {"train": {"n": c.train_examples, "lo": c.train_filler_min, "hi": c.train_filler_max, "stream": 0},
                  "validation": {"n": c.validation_examples, "lo": c.train_filler_min, "hi": c.train_filler_max,
                                     "stream": 1}}
        for m in c.eval_multipliers:
            length = m * c.train_filler_max
            splits[eval_split_name(m)] = {"n": c.eval_examples, "lo": length, "hi": length, "stream": 1000 + m}
        return {name: self._generate_examples(**kw) for name, kw in splits.items()}

    def _generate_examples(self, n, lo, hi, stream):
        if self._tokenizer is None:
            raise ValueError("famjax_passkey: generating needs the tokenizer (pass tokenizer=...)")
        c = self.builder_config
        pieces = _Pieces(self._tokenizer)
        # One generator per (seed, split): splits are independent and adding eval lengths changes no
        # other split.
        rng = np.random.default_rng([c.seed, stream])
        for i in range(n):
            filler_len = int(rng.integers(lo, hi + 1))
            ex = make_example(pieces, rng, filler_len=filler_len, key_digits=c.key_digits,
                              key_position=c.key_position)
            # Zero-padded keys keep the stored order (tfds sorts by a hash of the key) reproducible.
            yield f"{i:09d}", ex


def prepare(pk_cfg, tok: Tokenizer, data_dir: str) -> FamjaxPasskey:
    """Returns the PassKey builder for this config, generating its files under data_dir the first time."""
    return tfds_util.prepare(lambda: FamjaxPasskey(config=passkey_config(pk_cfg, tok), data_dir=data_dir,
                                                   tokenizer=tok, file_format="array_record"))


def data_source(pk_cfg, tok: Tokenizer, data_dir: str, split: str):
    """Returns the random-access source (len, [i] -> example dict) of a split, preparing it if needed."""
    builder = prepare(pk_cfg, tok, data_dir)
    if split not in builder.info.splits:
        raise DataError(f"split {split!r} is not in dataset 'passkey'; "
                        f"available: {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


class PassKeyPair(NamedTuple):
    """One evaluation item: feed `prompt` (int32 [P], starts with bos); the right answer is `answer`
    (int32 [A])."""

    prompt: np.ndarray
    answer: np.ndarray


def make_pairs(tok: Tokenizer, rng: np.random.Generator, *, filler_len: int, count: int, key_digits: int = 5,
               key_position: str = "uniform") -> list[PassKeyPair]:
    """Returns `count` fresh (prompt, answer) pairs with exactly `filler_len` filler tokens, drawn from `rng`
    (for evaluations at lengths no prepared split has)."""
    if key_position not in KEY_POSITIONS:
        raise ConfigError(f"key_position must be one of {KEY_POSITIONS}, got {key_position!r}")
    pieces = _Pieces(tok)
    out = []
    for _ in range(count):
        ex = make_example(pieces, rng, filler_len=filler_len, key_digits=key_digits, key_position=key_position)
        s, a = ex["answer_start"], ex["answer_len"]
        out.append(PassKeyPair(ex["tokens"][:s], ex["tokens"][s:s + a]))
    return out


def pairs_from_source(source, *, process_index: int = 0, process_count: int = 1,
                      limit: int | None = None) -> Iterator[PassKeyPair]:
    """Yields (prompt, answer) of every process_count-th example of `source` starting at process_index."""
    n = len(source) if limit is None else min(limit, len(source))
    for i in range(process_index, n, process_count):
        ex = source[i]
        s, a = int(ex["answer_start"]), int(ex["answer_len"])
        tokens = np.asarray(ex["tokens"], np.int32)
        yield PassKeyPair(tokens[:s], tokens[s:s + a])


def max_tokens(pk_cfg, tok: Tokenizer, split: str) -> int:
    """Returns the length in tokens of the longest example a split can hold (before any block padding)."""
    if split.startswith("eval_x"):
        filler = int(split[len("eval_x"):]) * int(pk_cfg.train_filler_max)
    else:
        filler = int(pk_cfg.train_filler_max)
    ex = make_example(_Pieces(tok), np.random.default_rng(0), filler_len=filler,
                      key_digits=int(pk_cfg.key_digits), key_position="start")
    # The key is written 3 times; with a subword tokenizer its token count varies with the digits, but
    # no tokenizer spends more than one token per ASCII digit.
    a = int(ex["answer_len"])
    return len(ex["tokens"]) + 3 * (max(a, int(pk_cfg.key_digits)) - a)
