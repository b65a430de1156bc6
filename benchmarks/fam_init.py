"""The initial FAM table of a retrofitted pretrained model, untrained: next-token loss by block of a real text.

A pretrained checkpoint switched to FAM gets one new parameter, the initial-FAM table [F, d]
(docs/design.md, "Pretrained checkpoints"). Before any fine-tuning, the table decides what every token of
block 0 sees besides its block (S_{-1}) and, through the first update, every later FAM. This script loads
SmolLM2-135M-Instruct (Q4_1 GGUF, `famjax.convert.smollm2_gguf()`) once and reports the mean next-token loss
(nats) of --tokens tokens of a text (default: Debian's GPL-3) per block, for full attention, BSWA (same B, m)
and FAM with each candidate table:

- mean, bos, random, zeros: `famjax.convert.common.initial_fam_table(init=...)` (mean: the mean token
  embedding + 0.1 x std noise; bos: every row the bos token's embedding; random: F random tokens' embeddings);
- text: the embeddings of the first F tokens of a fixed neutral English paragraph (NEUTRAL below);
- token:<id>: every row the embedding of that token id (e.g. token:0, SmolLM2's <|endoftext|>).

    python benchmarks/fam_init.py                      # B 64/128, m 0/1, F 16/64, 1024 tokens (~5 min, 2 cores)
    python benchmarks/fam_init.py --blocks 64 --memory 1 --fams 16 --inits mean,bos --tokens 512   # quick

Each FAM model runs as specified ("paper": no residual on the first update) and with --variants' others
(default also "resid": fam_zero_residual=False). No fine-tuning: every model shares the checkpoint's weights;
only attention, B, m, F, the variant and the table change. Prints per-B tables by block, then a summary
(loss over all tokens / over block 0, one column per B, m, F), as in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

NEUTRAL = ("The following text is a document. It was written in plain English and it is shown here as it was "
           "written, from the beginning to the end, without changes. A document has a title, a few sections and "
           "some paragraphs of ordinary sentences. Each section begins with a short heading and then explains "
           "one idea in more detail, with examples where they help the reader to follow. ") * 4

VARIANTS = {"paper": {}, "resid": dict(fam_zero_residual=False),
            "resid_keepnorm": dict(fam_zero_residual=False, fam_keep_norm=True)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", default="", help="a GGUF file (default: famjax.convert.smollm2_gguf())")
    p.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the text read (one row)")
    p.add_argument("--bos", action="store_true", help="prepend the checkpoint's bos token to the text "
                   "(SmolLM2's GGUF says add_bos_token=false: off by default)")
    p.add_argument("--blocks", default="64,128", help="block sizes B")
    p.add_argument("--memory", default="0,1", help="memory blocks m")
    p.add_argument("--fams", default="16,64", help="FAM lengths F")
    p.add_argument("--inits", default="mean,bos,random,text,zeros,token:0", help="candidate tables (see the docstring)")
    p.add_argument("--variants", default="paper,resid",
                   help="FAM model variants, each a row group: paper (famjax's defaults: zero residual on the first "
                   "update), resid (fam_zero_residual=False: the first update keeps S_-1), resid_keepnorm (and "
                   "fam_keep_norm=True)")
    p.add_argument("--seed", type=int, default=0, help="fam_seed of mean/random")
    return p.parse_args(argv)


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def groups(n_blocks):
    """Column groups of block indices: 0, 1, 2-3, 4-7, 8-15, ..."""
    out, lo = [], 0
    while lo < n_blocks:
        hi = max(lo + 1, 2 * lo)
        out.append((lo, min(hi, n_blocks)))
        lo = hi
    return out


def main(argv=None):
    args = parse_args(argv)
    import jax
    from flax import nnx

    import famjax
    from famjax.convert import common, load_pretrained, smollm2_gguf

    t0 = time.time()
    path = args.gguf or smollm2_gguf()
    base, tok = load_pretrained(path, attention="full", max_len=args.tokens)
    cfg0 = base.cfg
    params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    embed = np.asarray(params["embed"])
    with open(args.text, encoding="utf-8") as f:
        ids = list(tok.encode(f.read()))
    if args.bos:
        ids = [tok.bos_id] + ids
    ids = np.asarray(ids[:args.tokens], np.int32)
    if len(ids) < args.tokens:
        raise SystemExit(f"{args.text} has only {len(ids)} tokens")
    neutral = np.asarray(tok.encode(NEUTRAL), np.int32)
    print(f"loaded {path} in {time.time() - t0:.0f} s; {len(ids)} tokens of {args.text}", flush=True)

    def losses(cfg, table=None):
        """Next-token loss [T - 1] of the text under cfg (same weights), FAM table `table`."""
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: famjax.FamLM(cfg, rngs=nnx.Rngs(0))))
        p = dict(params)
        if table is not None:
            p["fam_init"] = np.asarray(table, np.float32)
        state = jax.tree.map(lambda a, v: np.asarray(v, a.dtype), nnx.to_pure_dict(abstract), p)
        fn = _compiled.setdefault(repr(cfg), jax.jit(lambda s, x: _loss(nnx.merge(graphdef, s), x)))
        return np.asarray(fn(state, ids[None]))[0]

    _compiled = {}

    def _loss(model, x):
        logits = model(x)[0][:, :-1]
        logp = jax.nn.log_softmax(logits, -1)
        return -jax.numpy.take_along_axis(logp, x[:, 1:, None], -1)[..., 0]

    def table_of(init, F):
        if init in common.FAM_INITS:
            return common.initial_fam_table(embed, F, embed_scale=cfg0.embed_scale, seed=args.seed, init=init,
                                            bos_id=tok.bos_id)
        if init == "text":
            rows = embed[np.resize(neutral, F)]
        elif init.startswith("token:"):
            rows = np.repeat(embed[int(init.split(":")[1])][None], F, 0)
        else:
            raise SystemExit(f"unknown init {init!r}")
        return rows * (cfg0.d_model ** 0.5 if cfg0.embed_scale else 1.0)

    t = time.time()
    full = losses(cfg0)
    print(f"full attention: {time.time() - t:.0f} s", flush=True)
    inits = [s for s in args.inits.split(",") if s]
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    variants = [v for v in args.variants.split(",") if v]
    summary = {}  # (model, init) -> {setting: (loss over all tokens, loss over block 0)}
    for B in _ints(args.blocks):
        nb = -(-(len(ids)) // B)
        cols = groups(nb)
        # Token i is predicted from i - 1: the loss of token i (i >= 1) belongs to block i // B.
        owner = np.arange(1, len(ids)) // B
        head = ["model", "init"] + [f"blk {lo}" if hi == lo + 1 else f"blk {lo}-{hi - 1}" for lo, hi in cols] + ["all"]
        print(f"\nB = {B} ({len(ids)} tokens, {nb} blocks; mean loss in nats of the tokens of each block)\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for m in _ints(args.memory):
            rows = [("full", "", None, full)] if m == _ints(args.memory)[0] else []
            rows.append(("bswa", "", None, losses(dataclasses.replace(cfg0, attention="bswa", block_size=B,
                                                                       memory_blocks=m))))
            for F in _ints(args.fams):
                for variant in variants:
                    cfg = dataclasses.replace(cfg0, attention="fam", block_size=B, memory_blocks=m, fam_len=F,
                                              **VARIANTS[variant])
                    rows += [(f"fam {variant}", init, F, losses(cfg, table_of(init, F))) for init in inits]
            for name, init, F, loss in rows:
                vals = [loss[(owner >= lo) & (owner < hi)].mean() for lo, hi in cols] + [loss.mean()]
                label = name if name == "full" else f"{name} m{m}" + (f" F{F}" if F else "")
                print("| " + " | ".join([label, init] + [f"{v:.2f}" for v in vals]) + " |", flush=True)
                for f in [F] if F else _ints(args.fams):
                    for mm in [m] if name != "full" else _ints(args.memory):
                        summary.setdefault((name, init), {})[f"B{B} m{mm} F{f}"] = (vals[-1], vals[0])

    settings = [f"B{B} m{m} F{F}" for B in _ints(args.blocks) for m in _ints(args.memory) for F in _ints(args.fams)]
    print(f"\nSummary: mean loss (nats) over all {len(ids)} tokens / over block 0\n")
    print("| model | init | " + " | ".join(settings) + " |")
    print("|---|---|" + "---|" * len(settings))
    for (name, init), cells in summary.items():
        print(f"| {name} | {init} | " + " | ".join("{:.2f} / {:.2f}".format(*cells[st]) for st in settings) + " |")
    print(f"\n{time.time() - t0:.0f} s in all ({jax.devices()[0].platform})")

if __name__ == "__main__":
    main()
