"""PassKey retrieval accuracy per filler length: stream each prompt, greedy-decode the answer, exact match.

Examples are `(prompt, answer)` or `(prompt, answer, length)` token arrays from any iterable (PassKeyPair
included); `passkey_split_examples` reads them from the data layer's tfds splits with the true filler length.
The prompt goes through famjax.infer (chunked prefill, constant memory), so prompts far longer than one model
call fits are fine. Scoring is exact match of the whole greedy answer: one wrong token scores 0.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator

import numpy as np

import famjax
from famjax import infer


@dataclasses.dataclass
class PassKeyScore:
    """One scored example: length (filler tokens if known, else prompt tokens), correct (1 or 0), the
    greedy prediction int32 [A] and the right answer int32 [A]."""
    length: int
    correct: int
    predicted: np.ndarray
    answer: np.ndarray


def exact_match(predicted, answer) -> int:
    """Returns 1 if predicted [n] equals answer [A] token for token (same length), else 0."""
    predicted, answer = np.asarray(predicted).ravel(), np.asarray(answer).ravel()
    return int(predicted.shape == answer.shape and bool(np.all(predicted == answer)))


def _unpack(example, index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Returns (prompt int32 [P], answer int32 [A], length) of one example (see the module doc)."""
    if not isinstance(example, (tuple, list)) or len(example) not in (2, 3):
        raise ValueError(f"example {index} must be (prompt, answer) or (prompt, answer, length), "
                         f"got {type(example).__name__}")
    prompt, answer = np.asarray(example[0]), np.asarray(example[1])
    if answer.ndim != 1 or answer.size == 0:
        raise ValueError(f"example {index}: answer must be a non-empty 1-D token array, got shape {answer.shape}")
    length = int(example[2]) if len(example) == 3 else int(np.size(prompt))
    return prompt, answer.astype(np.int32), length


def _batches(examples: Iterable, batch_size: int) -> Iterator[list]:
    batch = []
    for i, ex in enumerate(examples):
        batch.append(_unpack(ex, i))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def evaluate_passkey(model: famjax.FamLM, examples: Iterable, *, chunk_size: int = 1024,
                     batch_size: int = 1) -> list[PassKeyScore]:
    """Returns one PassKeyScore per example, in order.

    examples: any iterable of (prompt, answer[, length]) token arrays (read lazily, batch_size at a time);
    chunk_size: prefill tokens per model call; batch_size: prompts decoded together (equal-length prompts
    also prefill together, see famjax.infer.prefill).
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    scores = []
    for batch in _batches(examples, batch_size):
        answer_len = max(len(a) for _, a, _ in batch)
        gen = infer.generate(model, [p for p, _, _ in batch], max_new_tokens=answer_len,
                             chunk_size=chunk_size)
        for (_, answer, length), predicted in zip(batch, gen.tokens):
            predicted = predicted[:len(answer)]
            scores.append(PassKeyScore(length, exact_match(predicted, answer), predicted, answer))
    return scores


def accuracy_by_length(scores: Iterable[PassKeyScore]) -> dict[int, dict]:
    """Returns {length: {'accuracy', 'correct', 'count'}} sorted by length."""
    out: dict[int, dict] = {}
    for s in scores:
        row = out.setdefault(s.length, {"correct": 0, "count": 0})
        row["correct"] += s.correct
        row["count"] += 1
    for row in out.values():
        row["accuracy"] = row["correct"] / row["count"]
    return dict(sorted(out.items()))


def passkey_split_examples(data_cfg, split: str, *, limit: int | None = None,
                           tokenizer=None) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yields (prompt int32 [P], answer int32 [A], filler tokens) of a PassKey split, e.g. 'eval_x16'."""
    from famjax import data  # the tfds data layer is only needed for splits, not for iterables

    for i, ex in enumerate(data.passkey_examples(data_cfg, split, tokenizer=tokenizer)):
        if limit is not None and i >= limit:
            return
        s, a = int(ex["answer_start"]), int(ex["answer_len"])
        tokens = np.asarray(ex["tokens"], np.int32)
        yield tokens[:s], tokens[s:s + a], int(ex["filler_tokens"])


def compare_passkey(models: dict[str, famjax.FamLM], examples_by_split: dict[str, Iterable] | Iterable,
                    *, chunk_size: int = 1024, batch_size: int = 1,
                    progress=None) -> list[dict]:
    """Returns table rows {'model', 'length', 'accuracy', 'correct', 'count'}: every model on the same data.

    models: name -> model (e.g. {'fam': ..., 'bswa': ...}); examples_by_split: name -> a re-iterable of
    examples (a list, or a zero-argument callable returning a fresh iterator), or one such re-iterable;
    progress(model_name, split_name, accuracy_rows): optional callback after each split.
    """
    splits = examples_by_split if isinstance(examples_by_split, dict) else {"examples": examples_by_split}
    rows = []
    for name, model in models.items():
        for split, examples in splits.items():
            if callable(examples):
                examples = examples()
            acc = accuracy_by_length(evaluate_passkey(model, examples, chunk_size=chunk_size,
                                                      batch_size=batch_size))
            if progress is not None:
                progress(name, split, acc)
            rows.extend({"model": name, "length": length, **r} for length, r in acc.items())
    return rows


TABLE_FIELDS = ("model", "length", "accuracy", "correct", "count")


def write_rows(rows: list[dict], path_stem: str, fields=TABLE_FIELDS) -> tuple[str, str]:
    """Writes rows as `path_stem.json` and `path_stem.csv`; returns both paths."""
    os.makedirs(os.path.dirname(os.path.abspath(path_stem)), exist_ok=True)
    with open(path_stem + ".json", "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    with open(path_stem + ".csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path_stem + ".json", path_stem + ".csv"
