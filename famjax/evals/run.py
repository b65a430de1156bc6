"""End-to-end eval runs (what the CLI calls): evaluate models, write JSON/CSV tables and PNG plots.

Each function takes in-memory models (name -> FamLM), so a notebook or a test runs exactly what the CLI runs.
"""
from __future__ import annotations

import json
import os

import numpy as np

from famjax.evals import fam_inspect, passkey, perplexity, plots

PPL_FIELDS = ("model", "lo", "hi", "tokens", "loss", "perplexity")


def run_passkey(models: dict, data_cfg, out_dir: str, *, multipliers=None, limit: int | None = None,
                chunk_size: int = 1024, batch_size: int = 1, tokenizer=None, log=print) -> list[dict]:
    """Returns the PassKey table of every model on the eval_x{m} splits; writes passkey.{json,csv,png}.

    data_cfg: the `data` section (dataset 'passkey') whose tokenizer the models were trained with;
    multipliers: which eval_xM splits (default data_cfg.passkey.eval_multipliers); limit: examples per split.
    """
    from famjax.data import eval_split_name

    multipliers = tuple(data_cfg.passkey.eval_multipliers if multipliers is None else multipliers)
    splits = {eval_split_name(m): (lambda m=m: passkey.passkey_split_examples(
        data_cfg, eval_split_name(m), limit=limit, tokenizer=tokenizer)) for m in multipliers}

    def progress(name, split, acc):
        for length, r in acc.items():
            log(f"{name:>10} {split:>9} filler {length:>8}: {r['accuracy']:.3f} ({r['correct']}/{r['count']})")
    rows = passkey.compare_passkey(models, splits, chunk_size=chunk_size, batch_size=batch_size,
                                   progress=progress)
    stem = os.path.join(out_dir, "passkey")
    passkey.write_rows(rows, stem)
    plots.save_png(plots.plot_passkey_accuracy(rows), stem + ".png")
    return rows


def run_perplexity(models: dict, documents, out_dir: str, *, chunk_size: int = 1024,
                   max_tokens: int | None = None, first_bucket: int = 64, log=print) -> dict[str, list[dict]]:
    """Returns {model: perplexity rows} on the same documents; writes perplexity.{json,csv,md,png}.

    documents: a list of int [T] token arrays (or a zero-argument callable returning an iterable of them).
    """
    docs = list(documents() if callable(documents) else documents)
    if max_tokens is not None:
        docs = [np.asarray(d)[:max_tokens] for d in docs]
    longest = max(len(d) for d in docs) if docs else 0
    edges = perplexity.doubling_edges(max(longest - 1, 1), first=first_bucket)
    results = {}
    for name, model in models.items():
        results[name] = perplexity.perplexity_by_position(model, docs, edges=edges, chunk_size=chunk_size)
        log(f"{name}: " + ", ".join(f"[{r['lo']},{r['hi']}) {r['perplexity']:.2f}" for r in results[name]))
    rows = [{"model": n, **r} for n, rs in results.items() for r in rs]
    stem = os.path.join(out_dir, "perplexity")
    passkey.write_rows(rows, stem, fields=PPL_FIELDS)
    table = perplexity.format_table(results)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(table + "\n")
    log(table)
    plots.save_png(plots.plot_perplexity_by_position(results), stem + ".png")
    return results


def run_inspect(model, tokens, out_dir: str, *, detail_blocks=(), chunk_blocks: int = 16) -> list[str]:
    """Writes the FAM heatmaps / norms of tokens int [T] and fam_norms.json; returns the written paths."""
    diag = fam_inspect.inspect_fam(model, tokens, chunk_blocks=chunk_blocks)
    paths = fam_inspect.save_fam_plots(diag, out_dir, detail_blocks=tuple(detail_blocks))
    norms = os.path.join(out_dir, "fam_norms.json")
    with open(norms, "w", encoding="utf-8") as f:  # [L][nb] mean row norm, for numbers next to the plot
        json.dump(np.asarray(diag["fam_norm"])[:, 0].mean(-1).round(4).tolist(), f)
    return [*paths, norms]
