"""Does the FAM drift over many updates? Norms and self-reads of a trained model's FAM along a long PassKey input.

    .venv/bin/python -m experiments.passkey.fam_drift --workdir=runs/passkey_tiny --filler=11520 \
        --out=experiments/passkey/results

Streams `--examples` fresh PassKey prompts of `--filler` filler tokens through famjax.evals.inspect_fam and
prints, at blocks 1, 2, 4, ...: the mean L2 norm of the FAM rows per layer, and the share of the FAM queries'
attention that goes to the previous FAM (the rest goes to the block's tokens). Writes fam_drift.md and
fam_drift_norms.png (norms of every row of the first example) under --out.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from experiments.passkey.run import eval_examples


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.passkey.fam_drift", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a trained FAM run (its newest checkpoint is used)")
    p.add_argument("--filler", type=int, default=11520, help="filler tokens of the inspected prompts")
    p.add_argument("--examples", type=int, default=4)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default="experiments/passkey/results")
    args = p.parse_args()

    from famjax import evals
    from famjax.infer.load import load_model

    model, cfg = load_model(args.workdir)
    exs = eval_examples(cfg.data, [args.filler], args.examples, args.seed)[args.filler]
    n = min(len(prompt) for prompt, _, _ in exs)
    tokens = np.stack([prompt[:n] for prompt, _, _ in exs])
    got = evals.inspect_fam(model, tokens)
    norm = got["fam_norm"].mean(-1)  # [L, b, nb]: mean over the F rows
    F = model.cfg.num_fam
    self_share = got["fam_probs"][..., :F].sum(-1).mean((-1, -2))  # [L, b, nb]: mean over heads and rows
    nb = norm.shape[-1]
    blocks = sorted({1, *[2 ** i for i in range(1, 20) if 2 ** i <= nb], nb})
    layers = range(norm.shape[0])
    head = ("| block (tokens) | " + " | ".join(f"FAM norm L{li}" for li in layers) + " | "
            + " | ".join(f"self-read L{li}" for li in layers) + " |")
    lines = [head, "|" + "---|" * (1 + 2 * len(layers))]
    for blk in blocks:
        i = blk - 1
        cells = [f"{norm[li, :, i].mean():.1f}" for li in layers]
        cells += [f"{100 * self_share[li, :, i].mean():.0f}%" for li in layers]
        lines.append(f"| {blk} ({blk * model.cfg.block_size}) | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fam_drift.md"), "w") as f:
        f.write(f"FAM after each block of {args.examples} PassKey prompts with {args.filler} filler tokens, "
                f"model {args.workdir} (B {model.cfg.block_size}, F {F}); mean over rows and prompts\n\n" + table)
    evals.save_png(evals.plot_fam_norms(got["fam_norm"]), os.path.join(args.out, "fam_drift_norms.png"))


if __name__ == "__main__":
    main()
