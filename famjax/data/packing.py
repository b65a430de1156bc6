"""Packed rows: short examples, each padded to a multiple of the block size, laid end to end in fixed rows.

Block alignment means every example starts a fresh FAM block, so the model can reset its FAM exactly at
`segment_start` without a block straddling two examples. Greedy in-order packing (an example that does not
fit closes the row) keeps the row sequence a pure function of the example order, which is what makes the
iterator state a single integer: the index of the first example not yet in an emitted batch.
"""
from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np


def padded_len(n: int, block_size: int) -> int:
    """Returns n rounded up to a multiple of block_size."""
    return -(-n // block_size) * block_size


def split_long(example: dict, seq_len: int) -> list[dict]:
    """Returns the example cut into pieces of at most seq_len tokens (each piece becomes its own example).

    Only documents longer than a row are cut; the prediction across a cut is lost, which is the price of
    packed rows (use stream batching for long documents).
    """
    n = len(example["tokens"])
    if n <= seq_len:
        return [example]
    return [{k: v[i:i + seq_len] for k, v in example.items()} for i in range(0, n, seq_len)]


def empty_rows(rows: int, seq_len: int, pad_id: int) -> dict:
    """Returns an all-padding batch: every array [rows, seq_len], loss_mask 0, segment_start False."""
    return {"tokens": np.full((rows, seq_len), pad_id, np.int32),
            "targets": np.full((rows, seq_len), pad_id, np.int32),
            "loss_mask": np.zeros((rows, seq_len), np.float32),
            "segment_start": np.zeros((rows, seq_len), bool),
            "answer_mask": np.zeros((rows, seq_len), bool)}


def place(batch: dict, row: int, offset: int, example: dict) -> None:
    """Writes one example (tokens, weights, answer: [L]) into batch[...][row, offset:offset + L].

    targets[t] = tokens[t + 1] inside the example; the example's last position has no target (mask 0), so
    no loss crosses into the next example.
    """
    x = example["tokens"]
    n = len(x)
    batch["tokens"][row, offset:offset + n] = x
    batch["targets"][row, offset:offset + n - 1] = x[1:]
    batch["loss_mask"][row, offset:offset + n - 1] = example["weights"][1:]
    batch["answer_mask"][row, offset:offset + n - 1] = example["answer"][1:]
    batch["segment_start"][row, offset] = True


class PackedBatchIterator(grain.DatasetIterator):
    """Yields packed batches (see `empty_rows` for keys and shapes) from a random-access example dataset.

    State: {'next_example': first example not wholly in an emitted batch, 'skip_pieces': how many of its
    row-sized pieces were emitted}. Restoring re-reads from there; packing is deterministic, so the batches
    that follow are identical.
    """

    def __init__(self, examples: grain.MapDataset, *, rows: int, seq_len: int, block_size: int, pad_id: int,
                 read_ahead: int = 0):
        super().__init__()
        self._examples = examples
        self._rows, self._seq_len, self._block = rows, seq_len, block_size
        self._pad_id = pad_id
        self._read_ahead = read_ahead
        self._n = len(examples)
        self._set_position(0)

    def _set_position(self, index: int, skip_pieces: int = 0) -> None:
        self._cursor = index  # next example index to read
        # Reading through grain's iterator lets ReadOptions threads tokenize ahead in the background.
        threads = max(self._read_ahead, 0)
        self._reader = iter(self._examples[index:].to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)))
        self._pending: list[dict] = []  # pieces of the current example not yet placed
        self._pending_start = index  # index of the example that `_pending` comes from
        self._pending_done = 0  # how many of its pieces are already placed
        if skip_pieces:
            self._read_example()
            del self._pending[:skip_pieces]
            self._pending_done = skip_pieces

    def _read_example(self) -> bool:
        """Loads the next example's pieces into `_pending`; returns False at the end of the data."""
        while self._cursor < self._n:
            ex = next(self._reader)
            self._pending_start, self._pending_done = self._cursor, 0
            self._cursor += 1
            # A piece of < 2 tokens has no target; it would only waste a block.
            self._pending = [p for p in split_long(ex, self._seq_len) if len(p["tokens"]) >= 2]
            if self._pending:
                return True
        return False

    def __next__(self) -> dict:
        batch = empty_rows(self._rows, self._seq_len, self._pad_id)
        used = False
        for row in range(self._rows):
            offset = 0
            while self._pending or self._read_example():
                need = padded_len(len(self._pending[0]["tokens"]), self._block)
                if offset + need > self._seq_len:
                    break  # the example opens the next row
                place(batch, row, offset, self._pending.pop(0))
                self._pending_done += 1
                offset += need
                used = True
            if not self._pending and self._cursor >= self._n:
                break
        if not used:
            raise StopIteration
        return batch

    def get_state(self) -> dict[str, Any]:
        if self._pending:
            return {"next_example": int(self._pending_start), "skip_pieces": int(self._pending_done)}
        return {"next_example": int(self._cursor), "skip_pieces": 0}

    def set_state(self, state: dict[str, Any]) -> None:
        self._set_position(int(state["next_example"]), int(state.get("skip_pieces", 0)))


class PackedBatchDataset(grain.IterDataset):
    """An IterDataset of packed batches; see PackedBatchIterator."""

    def __init__(self, examples: grain.MapDataset, **kwargs):
        super().__init__()
        self._examples = examples
        self._kwargs = kwargs

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self._examples, **copy.copy(self._kwargs))
