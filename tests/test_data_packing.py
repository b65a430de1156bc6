"""Packed rows and document streams on synthetic examples: boundaries, targets, masks, continuity, resume."""
import grain
import numpy as np
import pytest

from famjax.data.packing import PackedBatchDataset, padded_len
from famjax.data.streams import StreamBatchDataset

PAD = 0


def make_examples(lengths, seed=0):
    """Examples whose tokens encode (example id, position) so any misplacement is visible."""
    out = []
    for i, n in enumerate(lengths):
        tokens = (1000 * (i + 1) + np.arange(n)).astype(np.int32)
        weights = np.full(n, 0.5, np.float32)
        weights[-2:] = 1.0  # pretend the last two tokens are the answer
        answer = np.zeros(n, bool)
        answer[-2:] = True
        out.append({"tokens": tokens, "weights": weights, "answer": answer})
    return grain.MapDataset.source(out)


def pack(lengths, rows=3, seq_len=32, block=8, **kw):
    return iter(PackedBatchDataset(make_examples(lengths), rows=rows, seq_len=seq_len, block_size=block,
                                   pad_id=PAD, **kw))


LENGTHS = [5, 9, 16, 3, 30, 8, 1, 12, 7, 20, 2, 11, 31, 6, 4, 17]


def test_packed_rows_boundaries_targets_masks():
    batches = list(pack(LENGTHS))
    seen = []
    for b in batches:
        assert set(b) == {"tokens", "targets", "loss_mask", "segment_start", "answer_mask"}
        for k in ("tokens", "targets", "loss_mask", "segment_start"):
            assert b[k].shape == (3, 32)
        assert b["tokens"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
        for r in range(3):
            starts = np.nonzero(b["segment_start"][r])[0]
            assert np.all(starts % 8 == 0)  # block aligned
            tok = b["tokens"][r]
            for j, s in enumerate(starts):
                ex_id = tok[s] // 1000
                n = LENGTHS[ex_id - 1]
                seen.append(ex_id)
                # the whole example is in this row, contiguous, from its first token
                np.testing.assert_array_equal(tok[s:s + n], 1000 * ex_id + np.arange(n))
                np.testing.assert_array_equal(b["targets"][r, s:s + n - 1], tok[s + 1:s + n])
                want = np.full(n - 1, 0.5, np.float32)
                want[-2:] = 1.0
                np.testing.assert_array_equal(b["loss_mask"][r, s:s + n - 1], want)
                answer_at = np.nonzero(b["answer_mask"][r, s:s + n - 1])[0]
                np.testing.assert_array_equal(answer_at, [i for i in (n - 3, n - 2) if i >= 0])
                # no loss across the boundary, padding up to the next block is masked
                end = s + padded_len(n, 8)
                assert b["loss_mask"][r, s + n - 1:end].sum() == 0 and np.all(tok[s + n:end] == PAD)
                nxt = starts[j + 1] if j + 1 < len(starts) else 32
                assert nxt == end or (j + 1 == len(starts) and np.all(tok[end:] == PAD))
            # everything that is not inside an example is padding
            covered = np.zeros(32, bool)
            for s in starts:
                covered[s:s + LENGTHS[tok[s] // 1000 - 1]] = True
            assert np.all(tok[~covered] == PAD) and b["loss_mask"][r][~covered].sum() == 0
    # every example with a target appears once, in order (the 1-token example has none and is skipped)
    assert seen == [i + 1 for i, n in enumerate(LENGTHS) if n >= 2]


def test_long_examples_are_split_into_rows():
    batches = list(pack([70], rows=2, seq_len=32, block=8))
    rows = np.concatenate([b["tokens"] for b in batches])
    np.testing.assert_array_equal(rows[0], 1000 + np.arange(32))
    np.testing.assert_array_equal(rows[1], 1000 + np.arange(32, 64))
    np.testing.assert_array_equal(rows[2][:6], 1000 + np.arange(64, 70))
    starts = np.concatenate([b["segment_start"] for b in batches])
    assert starts[:3, 0].tolist() == [True] * 3 and starts.sum() == 3


@pytest.mark.parametrize("read_ahead", [0, 2])
@pytest.mark.parametrize("lengths", [LENGTHS, [70, 5, 40, 9] * 3])
def test_packed_resume_is_exact(lengths, read_ahead):
    for n_first in range(4):
        it = pack(lengths, rows=2, read_ahead=read_ahead)
        for _ in range(n_first):
            next(it)
        state = it.get_state()
        rest = list(it)
        it2 = pack(lengths, rows=2, read_ahead=read_ahead)
        it2.set_state(state)
        again = list(it2)
        assert len(rest) == len(again) > 0 or n_first > 0
        for a, b in zip(rest, again):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def stream(lengths, rows=2, seq_len=16, **kw):
    return iter(StreamBatchDataset(make_examples(lengths), rows=rows, seq_len=seq_len, pad_id=PAD, **kw))


DOCS = [40, 10, 70, 16, 17, 5, 33]


def test_stream_rows_continue_documents_exactly():
    batches = list(stream(DOCS))
    assert batches[0]["segment_start"].shape == (2,) and batches[0]["tokens"].shape == (2, 16)
    for r in range(2):
        prev = None
        for b in batches:
            tok, doc = b["tokens"][r], b["doc_index"][r]
            if doc < 0:
                assert np.all(tok == PAD) and b["loss_mask"][r].sum() == 0 and not b["segment_start"][r]
                continue
            n = DOCS[doc]
            off = tok[0] - 1000 * (doc + 1)
            if b["segment_start"][r]:
                assert off == 0
            else:  # continues the same document exactly where the last step stopped
                assert prev is not None and prev[0] == doc and off == prev[1] + 16
                assert prev[2] == tok[0]  # last target of the previous step = first token now
            k = min(16, n - off)
            np.testing.assert_array_equal(tok[:k], 1000 * (doc + 1) + off + np.arange(k))
            nt = min(16, n - 1 - off)
            np.testing.assert_array_equal(b["targets"][r, :nt], tok[1:nt + 1] if nt < 16 else
                                          1000 * (doc + 1) + off + 1 + np.arange(16))
            assert b["loss_mask"][r, nt:].sum() == 0 and np.all(b["loss_mask"][r, :nt] > 0)
            prev = (doc, off, b["targets"][r, 15])
    # every document is read once, from its start, in row order of need
    firsts = [int(b["doc_index"][r]) for b in batches for r in range(2) if b["segment_start"][r]]
    assert sorted(firsts) == list(range(len(DOCS))) and firsts[:2] == [0, 1]


def test_stream_resume_is_exact():
    full = list(stream(DOCS, rows=3, read_ahead=2))
    for n_first in range(1, 5):
        it = stream(DOCS, rows=3, read_ahead=2)
        for _ in range(n_first):
            next(it)
        state = it.get_state()
        it2 = stream(DOCS, rows=3)
        it2.set_state(state)
        again = list(it2)
        assert len(again) == len(full) - n_first
        for a, b in zip(full[n_first:], again):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ValueError, match="state has 3 rows, this iterator has 2"):
        stream(DOCS, rows=2).set_state(state)
