"""The trainer's entry: a deterministic, per-host, resumable grain pipeline of block-aligned batches.

Pipeline (per process): source -> this host's shard [process_index::process_count] -> shuffle (seeded; a
new order every epoch) -> repeat -> tokenize (grain read threads, ahead of need) -> packed rows or document
streams -> batches assembled in a background thread. Every stage is random-access up to the batcher, so the
whole position is a few integers: the state is a small JSON-able dict the trainer checkpoints with orbax.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import weakref
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from famjax.data import catalog, passkey
from famjax.data.config import resolve_batching, validate
from famjax.data.packing import PackedBatchDataset
from famjax.data.streams import StreamBatchDataset
from famjax.data.tokenizers import Tokenizer, make_tokenizer
from famjax.errors import CheckpointError, ConfigError, DataError

STATE_VERSION = 1


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when not injected: tests and tools simulate hosts without jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    return int(process_index), int(process_count)


def _check_length(example: dict, *, seq_len: int, split: str) -> dict:
    if len(example["tokens"]) > seq_len:
        raise ConfigError(f"a PassKey example of split {split!r} has {len(example['tokens'])} tokens, "
                          f"more than "
                          f"data.seq_len {seq_len}; raise seq_len or lower passkey.train_filler_max")
    return example


class DataIterator(grain.DatasetIterator):
    """Batches for the trainer: dicts of numpy arrays, with exact get_state/set_state.

    Packed batches: tokens, targets int32 [b, T]; loss_mask float32 [b, T]; segment_start, answer_mask bool
    [b, T]. Stream batches: the same but segment_start bool [b], plus doc_index int32 [b]. b is the
    per-process batch (batch_size / process_count). answer_mask marks targets that are PassKey answer tokens:
    a sequence's answer is exactly right iff argmax(logits) == targets wherever answer_mask is set (teacher
    forcing and greedy decoding agree on that).
    """

    def __init__(self, inner: grain.DatasetIterator, *, fingerprint: str, batching: str,
                 tokenizer: Tokenizer):
        super().__init__(inner)
        self._inner = inner
        _LIVE.add(self)
        self._fingerprint = fingerprint
        self.batching = batching
        self.tokenizer = tokenizer

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._inner)

    def get_state(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict (json.dumps works) that set_state restores exactly."""
        return {"version": STATE_VERSION, "fingerprint": self._fingerprint,
                "loader": json.loads(json.dumps(self._inner.get_state()))}

    def set_state(self, state: dict[str, Any]) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"data iterator state has version {state.get('version')}, "
                                  f"expected {STATE_VERSION}")
        if state.get("fingerprint") != self._fingerprint:
            raise ConfigError("data iterator state was saved with a different data config, split or process "
                              "layout (dataset, seq_len, batch_size, seed, process_index/count must match)")
        self._inner.set_state(state["loader"])

    def close(self) -> None:
        self._inner.close()


# Iterators still open at exit are closed while modules are intact: grain's own finaliser otherwise runs
# during interpreter teardown and prints a spurious traceback.
_LIVE: weakref.WeakSet[DataIterator] = weakref.WeakSet()


def _noop() -> None:
    return None


@atexit.register
def _close_live_iterators() -> None:
    for it in list(_LIVE):
        try:
            it.close()
        except Exception:  # noqa: BLE001, S110  # best effort at exit
            pass
        # grain's __del__ calls close() again during teardown, when its module globals are gone.
        for obj in (it, it._inner):  # pylint: disable=protected-access
            obj.close = _noop


def make_iterator(data_cfg, *, block_size: int, process_index: int | None = None,
                  process_count: int | None = None, split: str | None = None,
                  num_epochs: int | None = -1, tokenizer: Tokenizer | None = None) -> DataIterator:
    """Returns this process's batch iterator over `split` (default: data_cfg.train_split).

    num_epochs: -1 (default) repeats the training split forever and reads any other split once; None
    repeats forever; n reads n epochs. Shuffling applies to the training split only (data_cfg.shuffle).
    """
    process_index, process_count = _process(process_index, process_count)
    validate(data_cfg, process_count=process_count, block_size=block_size)
    split = split or data_cfg.train_split
    is_train = split == data_cfg.train_split
    if num_epochs == -1:
        num_epochs = None if is_train else 1
    tok = tokenizer or make_tokenizer(data_cfg)
    opened = catalog.open_dataset(data_cfg, split, tok)
    n = len(opened.source)
    if n < process_count:
        raise DataError(f"split {split!r} of dataset {data_cfg.dataset!r} has {n} examples, fewer than the "
                        f"{process_count} processes reading it")
    seq_len = int(data_cfg.seq_len)
    to_example = opened.to_example
    chain = int(data_cfg.passkey.get("chain", 1)) if data_cfg.dataset == "passkey" and is_train else 1
    batching = resolve_batching(data_cfg, "stream" if chain > 1 else opened.batching)
    if data_cfg.dataset == "passkey":
        longest = passkey.max_tokens(data_cfg.passkey, tok, split)
        if longest > seq_len and batching == "packed":
            raise ConfigError(f"PassKey split {split!r} holds examples of up to {longest} tokens, more than "
                              f"data.seq_len {seq_len}; raise seq_len or lower passkey.train_filler_max")
        if batching == "packed":
            check = functools.partial(_check_length, seq_len=seq_len, split=split)
            to_example = _compose(opened.to_example, check)

    ds = grain.MapDataset.source(opened.source)[process_index::process_count]
    if is_train and data_cfg.shuffle:
        ds = ds.shuffle(seed=int(data_cfg.seed))
    ds = ds.repeat(num_epochs).map(to_example)
    if chain > 1:  # K examples -> one document (a partial group at the end of a finite split is dropped)
        ds = ds.batch(chain, drop_remainder=True, batch_fn=_join_examples)

    rows = int(data_cfg.batch_size) // process_count
    if batching == "packed":
        it_ds = PackedBatchDataset(ds, rows=rows, seq_len=seq_len, block_size=block_size, pad_id=tok.pad_id,
                                   read_ahead=int(data_cfg.read_threads))
    else:
        it_ds = StreamBatchDataset(ds, rows=rows, seq_len=seq_len, pad_id=tok.pad_id,
                                   read_ahead=int(data_cfg.read_threads))
    if data_cfg.prefetch_batches:
        it_ds = grain.experimental.ThreadPrefetchIterDataset(
            it_ds, prefetch_buffer_size=int(data_cfg.prefetch_batches))
    # What decides the batch sequence; read_threads, prefetch_batches and data_dir may change on resume.
    cfg_dict = {k: v for k, v in data_cfg.to_dict().items()
                if k not in ("read_threads", "prefetch_batches", "data_dir")}
    fingerprint = hashlib.sha1(json.dumps(
        [cfg_dict, split, block_size, process_index, process_count, num_epochs, tok.fingerprint],
        sort_keys=True, default=str).encode()).hexdigest()[:16]
    return DataIterator(iter(it_ds), fingerprint=fingerprint, batching=batching, tokenizer=tok)


def _join_examples(examples) -> dict:
    """Returns one document: the examples' tokens, weights and answer masks end to end."""
    return {k: np.concatenate([ex[k] for ex in examples]) for k in ("tokens", "weights", "answer")}


def _compose(f, g):
    return functools.partial(_apply_both, f, g)


def _apply_both(f, g, x):
    return g(f(x))


def passkey_pairs(data_cfg, split: str, *, process_index: int = 0, process_count: int = 1,
                  limit: int | None = None,
                  tokenizer: Tokenizer | None = None) -> Iterator[passkey.PassKeyPair]:
    """Yields PassKeyPair(prompt int32 [P], answer int32 [A]) of a PassKey split (e.g. 'eval_x16'), in order.

    With process_count > 1 each process gets every process_count-th example. limit caps the examples read.
    """
    if data_cfg.dataset != "passkey":
        raise ConfigError(f"passkey_pairs needs data.dataset='passkey', got {data_cfg.dataset!r}")
    tok = tokenizer or make_tokenizer(data_cfg)
    src = passkey.data_source(data_cfg.passkey, tok, os.path.expanduser(data_cfg.data_dir), split)
    return passkey.pairs_from_source(src, process_index=process_index, process_count=process_count,
                                     limit=limit)


def passkey_examples(data_cfg, split: str, *, tokenizer: Tokenizer | None = None) -> Iterator[dict]:
    """Yields full PassKey records in order: tokens, loss_mask, key (str), key_position, answer_start,
    answer_len, filler_tokens."""
    tok = tokenizer or make_tokenizer(data_cfg)
    src = passkey.data_source(data_cfg.passkey, tok, os.path.expanduser(data_cfg.data_dir), split)
    for i in range(len(src)):
        ex = dict(src[i])
        ex["key"] = ex["key"].decode() if isinstance(ex["key"], bytes) else ex["key"]
        yield ex
