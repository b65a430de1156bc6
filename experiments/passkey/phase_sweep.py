"""PassKey exact match against where the question falls in its block, at a few lengths.

    .venv/bin/python -m experiments.passkey.phase_sweep --workdir=runs/passkey_ks_drift/MODEL/stage1 \
        --multipliers=1,8,16 --name=drift01 --out=experiments/passkey/results

With m = 0 a token sees its own block and the FAM only, so an answer that starts near the end of a block is
finished in the next one, which reads the question through the FAM alone. One exact filler length fixes that
offset for every example (N = 90, B = 32: 16x, 32x and 64x N all put the first answer digit on a block's last
token). For each multiple k of N this evaluates filler lengths k x N + o for o = -B/2 .. B/2 - 1
(`--per_offset` fresh examples each, key placed as the run trained) and reports exact match per offset, where
the offset is read off as (prompt length mod B): the in-block index of the first answer digit. Writes
phase_sweep_NAME.{md,png} under --out.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from experiments.passkey.run import eval_examples


def sweep(model, data_cfg, lengths, block_size: int, per_offset: int, seed: int, batch: int):
    """{length: float [B]}: exact match per in-block index of the first answer digit (prompt length mod B)."""
    from famjax import evals

    out = {}
    for n in lengths:
        exs = eval_examples(data_cfg, (n,), block_size * per_offset, seed, spread=block_size)[n]
        scores = evals.evaluate_passkey(model, exs, chunk_size=1024, batch_size=batch)
        hits = np.zeros(block_size)
        for (prompt, _, _), s in zip(exs, scores):
            hits[len(prompt) % block_size] += s.correct
        out[n] = hits / per_offset
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.passkey.phase_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a trained FAM run (its newest checkpoint is used)")
    p.add_argument("--multipliers", default="1,8,16")
    p.add_argument("--per_offset", type=int, default=8, help="examples per block offset and length")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--name", required=True, help="file name part: phase_sweep_NAME.{md,png}")
    p.add_argument("--out", default="experiments/passkey/results")
    args = p.parse_args()

    from famjax import evals
    from famjax.infer.load import load_model

    model, cfg = load_model(args.workdir)
    n, bs = int(cfg.data.passkey.train_filler_max), int(cfg.model.block_size)
    mults = [int(m) for m in args.multipliers.split(",")]
    acc = sweep(model, cfg.data, [m * n for m in mults], bs, args.per_offset, args.seed, args.batch)

    head = "| length | mean | worst offset | " + " | ".join(str(o) for o in range(bs)) + " |"
    lines = [f"PassKey exact match by in-block index of the first answer digit (prompt length mod {bs}), "
             f"{args.per_offset} examples per index, filler k x N - {bs // 2} .. k x N + {bs // 2 - 1}, N = {n}; "
             f"run {args.workdir}", "", head, "|" + "---|" * (bs + 3)]
    for m, (ln, a) in zip(mults, acc.items()):
        cells = " | ".join(f"{100 * v:.0f}" for v in a)
        lines.append(f"| {m}x ({ln}) | {100 * a.mean():.0f}% | {int(np.argmin(a))} ({100 * a.min():.0f}%) | {cells} |")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"phase_sweep_{args.name}")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    fig = evals.plots.new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for m, a in zip(mults, acc.values()):
        ax.plot(np.arange(bs), a, marker="o", label=f"{m}x N")
    ax.set(xlabel=f"in-block index of the first answer digit (prompt length mod {bs})",
           ylabel="exact match", ylim=(-0.05, 1.05), title=f"PassKey by block offset: {args.name}")
    ax.legend()
    evals.save_png(fig, stem + ".png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
