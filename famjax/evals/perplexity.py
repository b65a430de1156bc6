"""Long-document perplexity by position: how the loss falls as the model has read more of a document.

A document's token at position p (p >= 1, so p tokens have been read before it) goes to the bucket
[lo, hi) holding p. Buckets double in width by default, so one table covers the first block and a whole book.
Losses are summed per bucket over all documents and reported as mean loss and perplexity exp(mean loss).
Documents stream through famjax.infer.token_nll (chunked, constant memory for bswa/fam).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np

import famjax
from famjax import infer
from famjax.errors import DataError


def doubling_edges(max_position: int, first: int = 64) -> list[int]:
    """Returns bucket edges [1, first, 2 first, 4 first, ...] up to and including one >= max_position + 1."""
    if first < 2:
        raise ValueError(f"first must be >= 2, got {first}")
    edges = [1, first]
    while edges[-1] <= max_position:
        edges.append(edges[-1] * 2)
    return edges


def bucket_sums(nll, edges: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Returns (loss sum float64 [n], token count int64 [n]) per bucket of n = len(edges) - 1.

    nll: float [T - 1], the loss of token p at index p - 1 (as returned by famjax.infer.token_nll).
    """
    nll = np.asarray(nll, np.float64)
    positions = np.arange(1, len(nll) + 1)
    which = np.searchsorted(np.asarray(edges), positions, side="right") - 1
    n = len(edges) - 1
    keep = (which >= 0) & (which < n)
    sums = np.bincount(which[keep], weights=nll[keep], minlength=n)[:n]
    counts = np.bincount(which[keep], minlength=n)[:n]
    return sums, counts


def perplexity_by_position(model: famjax.FamLM, documents: Iterable, *, edges: list[int] | None = None,
                           chunk_size: int = 1024, max_tokens: int | None = None) -> list[dict]:
    """Returns table rows {'lo', 'hi', 'tokens', 'loss', 'perplexity'}, one per non-empty bucket.

    documents: iterable of int [T] token arrays (one document each; shorter than 2 tokens are skipped);
    edges: bucket edges (default doubling_edges of the longest document read, first bucket 64 tokens);
    max_tokens: read at most this many tokens of each document (keeps a run bounded on very long books).
    """
    per_doc = []
    for doc in documents:
        tokens = np.asarray(doc, np.int32).ravel()
        if max_tokens is not None:
            tokens = tokens[:max_tokens]
        if len(tokens) >= 2:
            per_doc.append(infer.token_nll(model, tokens[None], chunk_size=chunk_size)[0])
    if not per_doc:
        raise DataError("perplexity_by_position: no document with at least 2 tokens")
    if edges is None:
        edges = doubling_edges(max(len(n) for n in per_doc))
    sums = np.zeros(len(edges) - 1)
    counts = np.zeros(len(edges) - 1, np.int64)
    for nll in per_doc:
        s, c = bucket_sums(nll, edges)
        sums += s
        counts += c
    rows = []
    for i, (s, c) in enumerate(zip(sums, counts)):
        if c:
            loss = s / c
            rows.append({"lo": int(edges[i]), "hi": int(edges[i + 1]), "tokens": int(c), "loss": float(loss),
                         "perplexity": float(math.exp(min(loss, 700.0)))})
    return rows


def text_documents(data_cfg, split: str, *, limit: int | None = None, tokenizer=None) -> Iterator[np.ndarray]:
    """Yields the token ids (bos + text + eos) of the documents of a text dataset split (local_text, pg19...)."""
    from famjax.data import catalog, make_tokenizer

    tok = tokenizer or make_tokenizer(data_cfg)
    opened = catalog.open_dataset(data_cfg, split, tok)
    n = len(opened.source) if limit is None else min(limit, len(opened.source))
    for i in range(n):
        yield opened.to_example(opened.source[i])["tokens"]


def format_table(results: dict[str, list[dict]]) -> str:
    """Returns a markdown table: one row per bucket, one perplexity column per model."""
    names = list(results)
    buckets = sorted({(r["lo"], r["hi"]) for rows in results.values() for r in rows})
    lines = ["| positions | " + " | ".join(f"{n} ppl" for n in names) + " | tokens |",
             "|---|" + "---|" * (len(names) + 1)]
    for lo, hi in buckets:
        cells, tokens = [], 0
        for n in names:
            row = next((r for r in results[n] if (r["lo"], r["hi"]) == (lo, hi)), None)
            cells.append(f"{row['perplexity']:.3f}" if row else "-")
            tokens = max(tokens, row["tokens"] if row else 0)
        lines.append(f"| [{lo}, {hi}) | " + " | ".join(cells) + f" | {tokens} |")
    return "\n".join(lines)
