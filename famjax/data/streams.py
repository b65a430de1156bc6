"""Document streams: batch row r follows one document across steps, segment k of it at step k.

This is how the FAM (and memory K/V) state is carried across train steps over a long document: the trainer
keeps each row's state between steps and resets it where `segment_start[r]` is True. A finished document's
last segment is padded (loss 0); at the next step the row takes the next unread document. Rows take new
documents in row order, so the assignment is a pure function of the document order and of the lengths.
"""
from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np

IDLE = -1  # a row with no document (only once a finite split runs out)


def segment(example: dict, offset: int, seq_len: int, pad_id: int) -> dict:
    """Returns one row: tokens, targets int32 [seq_len], loss_mask float32 [seq_len], answer_mask bool.

    targets[t] = tokens[offset + t + 1]: the last target of a segment is the first token of the next one,
    so no prediction is lost between steps.
    """
    x, w, a = example["tokens"], example["weights"], example["answer"]
    tok = np.full(seq_len, pad_id, np.int32)
    tgt = np.full(seq_len, pad_id, np.int32)
    mask = np.zeros(seq_len, np.float32)
    ans = np.zeros(seq_len, bool)
    chunk = x[offset:offset + seq_len]
    tok[:len(chunk)] = chunk
    nt = max(0, min(seq_len, len(x) - 1 - offset))
    tgt[:nt] = x[offset + 1:offset + 1 + nt]
    mask[:nt] = w[offset + 1:offset + 1 + nt]
    ans[:nt] = a[offset + 1:offset + 1 + nt]
    return {"tokens": tok, "targets": tgt, "loss_mask": mask, "answer_mask": ans}


class StreamBatchIterator(grain.DatasetIterator):
    """Yields {'tokens','targets': int32 [rows, T], 'loss_mask': float32 [rows, T], 'answer_mask': bool
    [rows, T], 'segment_start': bool [rows], 'doc_index': int32 [rows] (-1 when idle)}.

    State: {'next_doc': int, 'rows': [[doc index, offset], ...]}; documents are re-read by index on restore.
    """

    def __init__(self, docs: grain.MapDataset, *, rows: int, seq_len: int, pad_id: int, read_ahead: int = 0):
        super().__init__()
        self._docs = docs
        self._rows, self._seq_len, self._pad_id = rows, seq_len, pad_id
        self._read_ahead = read_ahead
        self._n = len(docs)
        self.set_state({"next_doc": 0, "rows": [[IDLE, 0]] * rows})

    def _open_reader(self, index: int) -> None:
        threads = max(self._read_ahead, 0)
        self._reader = iter(self._docs[index:].to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)))

    def _take_doc(self) -> tuple[int, dict | None]:
        """Returns (index, example) of the next document with at least one target, or (IDLE, None)."""
        while self._next_doc < self._n:
            i, ex = self._next_doc, next(self._reader)
            self._next_doc += 1
            if len(ex["tokens"]) >= 2:
                return i, ex
        return IDLE, None

    def __next__(self) -> dict:
        starts = np.zeros(self._rows, bool)
        for r in range(self._rows):
            doc, off = self._row_pos[r]
            if doc == IDLE or off >= len(self._row_doc[r]["tokens"]) - 1:  # nothing left to predict
                doc, ex = self._take_doc()
                self._row_pos[r], self._row_doc[r] = [doc, 0], ex
                starts[r] = doc != IDLE
        if all(p[0] == IDLE for p in self._row_pos):
            raise StopIteration
        rows = []
        for r in range(self._rows):
            doc, off = self._row_pos[r]
            if doc == IDLE:
                rows.append(segment({"tokens": np.zeros(0, np.int32), "weights": np.zeros(0, np.float32),
                                     "answer": np.zeros(0, bool)}, 0, self._seq_len, self._pad_id))
            else:
                rows.append(segment(self._row_doc[r], off, self._seq_len, self._pad_id))
                self._row_pos[r] = [doc, off + self._seq_len]
        batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
        batch["segment_start"] = starts
        batch["doc_index"] = np.asarray([p[0] for p in self._row_pos], np.int32)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_doc": int(self._next_doc), "rows": [[int(d), int(o)] for d, o in self._row_pos]}

    def set_state(self, state: dict[str, Any]) -> None:
        rows = [list(map(int, p)) for p in state["rows"]]
        if len(rows) != self._rows:
            raise ValueError(f"stream iterator state has {len(rows)} rows, this iterator has {self._rows} "
                             f"(batch_size / process_count changed?)")
        self._next_doc = int(state["next_doc"])
        self._row_pos = rows
        # Random access for the documents rows are in the middle of; sequential reads for the rest.
        self._row_doc = [None if d == IDLE else self._docs[d] for d, _ in rows]
        self._open_reader(self._next_doc)


class StreamBatchDataset(grain.IterDataset):
    """An IterDataset of document-stream batches; see StreamBatchIterator."""

    def __init__(self, docs: grain.MapDataset, **kwargs):
        super().__init__()
        self._docs = docs
        self._kwargs = kwargs

    def __iter__(self) -> StreamBatchIterator:
        return StreamBatchIterator(self._docs, **copy.copy(self._kwargs))
