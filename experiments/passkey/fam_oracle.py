"""Where does a PassKey answer fail at k x N? Per-digit accuracy, and two oracle edits of the FAM.

    .venv/bin/python -m experiments.passkey.fam_oracle --workdir=runs/passkey_ks_drift/<model>/stage1 \
        --multipliers=8,16,32 --offsets=0,16 --out=experiments/passkey/results

For each target length k x N + offset (filler tokens, key where the run's data puts it) it also makes a young
reference: the same prompts' layout with the filler cut by whole blocks to between N and N + B tokens, so that
its last R tokens (R = the reference's length) sit at the same offsets in their blocks as the target's last R.
The target is run over all but its last R tokens in one call, then block by block, and before each of those
blocks (but the first) its FAM is edited (the model itself is unchanged):

- plain: no edit (the model's own accuracy, computed block by block: chunked == one call, spec 7);
- recentred: each layer's and row's RMS-normalised FAM moved by (mean over the reference prompts at this
  block - mean over the target prompts here), its own norm kept: the shared drift the probe found is undone;
- recentred + young norm: the same, and every row rescaled to the reference's mean RMS at this block.

With --scales, each young reference is also run with its FAM multiplied by each factor once, before tail block
--scale_at (default 2: with the key at the start, after the key is written). A pre-norm reader sees the FAM only
as a direction, so this changes only how much the later writes weigh in it, as the size of an old FAM does.

Also reported: the in-block index of the last prompt token (the answer's first digit is predicted there) and
the accuracy of each answer digit without edits, which says whether digits are lost before or after the block
boundary that the answer may cross. Writes fam_oracle.md under --out.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from experiments.passkey.fam_probe import prompts, rms


class Streamer:
    """Runs token arrays [n, T] through a model, the last `tail` tokens block by block with optional FAM edits."""

    def __init__(self, model):
        import jax.numpy as jnp
        from flax import nnx

        @nnx.jit
        def step(m, state, tokens):
            logits, state = m(tokens, state)
            return jnp.argmax(logits, -1), state

        self.model, self.step, self.block = model, step, model.cfg.block_size

    def head(self, seq, tail: int):
        """Returns the state after all but the last `tail` tokens of seq [n, T], read in one call."""
        import jax.numpy as jnp

        state = self.model.init_state(seq.shape[0])
        if seq.shape[1] > tail:
            _, state = self.step(self.model, state, jnp.asarray(seq[:, :seq.shape[1] - tail]))
        return state

    def __call__(self, seq, tail: int, ref=None, edit: str = "plain", scale=None, start=None):
        """Returns (argmax over the last `tail` positions [n, tail], [(mean normalised FAM [L, 1, F, d], mean RMS
        [L, 1, F, 1]) before each of the tail's blocks]). ref: that list from a reference run, used by the edits;
        scale: None or (tail block j, factor): the FAM is multiplied by factor once, before block j;
        start: self.head(seq, tail), when several runs share it (default: computed here)."""
        import jax.numpy as jnp

        state = self.head(seq, tail) if start is None else start
        head = seq.shape[1] - tail
        preds, stats = [], []
        for j, i in enumerate(range(head, seq.shape[1], self.block)):
            fam = np.asarray(state.layers.fam)  # [L, n, F, d]
            hat = fam / rms(fam)
            mean = hat.mean(1, keepdims=True)
            stats.append((mean, rms(fam).mean(1, keepdims=True)))
            if scale is not None and j == scale[0]:
                state = state.replace(layers=state.layers.replace(fam=state.layers.fam * scale[1]), fresh=True)
            if edit != "plain" and j > 0:  # block 0 of the reference starts from the initial FAM: nothing to match
                ref_mean, ref_rms = ref[j]
                norm = ref_rms if edit == "young_norm" else rms(fam)
                state = state.replace(layers=state.layers.replace(
                    fam=jnp.asarray((hat + ref_mean - mean) * norm, jnp.float32)), fresh=True)
            pred, state = self.step(self.model, state, jnp.asarray(seq[:, i:i + self.block]))
            preds.append(np.asarray(pred))
        return np.concatenate(preds, 1), stats


def with_answers(cfg, filler: int, n: int, seed: int):
    """Returns (prompts [n, P], answers [n, A], prompt + answer[:-1] [n, P + A - 1]) of one filler length."""
    prompt, answer = prompts(cfg, filler, n, seed)
    return prompt, answer, np.concatenate([prompt, answer[:, :-1]], 1)


def digit_hits(pred, answer):
    """bool [n, A]: is each answer digit the argmax? pred: argmax over the last positions of prompt +
    answer[:-1], which predict the A answer digits."""
    return pred[:, -answer.shape[1]:] == answer


def exact(pred, answer) -> float:
    """Share of prompts whose whole answer is the argmax (famjax.evals.exact_match; teacher-forced, which for a
    whole answer is the same as greedy decoding). pred, answer: as for digit_hits."""
    from famjax import evals

    return float(np.mean([evals.exact_match(p, a) for p, a in zip(pred[:, -answer.shape[1]:], answer)]))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.passkey.fam_oracle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a trained FAM run (its newest checkpoint is used)")
    p.add_argument("--multipliers", default="8,16,32", help="target lengths as multiples of N")
    p.add_argument("--offsets", default="0", help="filler tokens added to every k x N (e.g. 0,16: the exact "
                   "length and one half a block on)")
    p.add_argument("--scales", default="", help="factors for the scaled young reference, e.g. 3,10,30")
    p.add_argument("--scale_at", type=int, default=2, help="the young reference's block before which it scales")
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--seed", type=int, default=99)
    p.add_argument("--out", default="experiments/passkey/results")
    args = p.parse_args()

    from famjax.infer.load import load_model

    model, cfg = load_model(args.workdir)
    if model.cfg.attention != "fam" or model.cfg.memory_blocks:
        raise ValueError(f"fam_oracle needs a FAM model with memory_blocks 0, got {args.workdir}")
    n, b = int(cfg.data.passkey.train_filler_max), model.cfg.block_size
    run = Streamer(model)
    rows = []
    for offset in (int(o) for o in args.offsets.split(",")):
        for mult in (int(m) for m in args.multipliers.split(",")):
            filler = n * mult + offset
            ref_filler = filler - ((filler - n) // b) * b
            _, ra, rs = with_answers(cfg, ref_filler, args.examples, args.seed)
            tp, ta, ts = with_answers(cfg, filler, args.examples, args.seed)
            tail = rs.shape[1]
            ref_pred, ref_stats = run(rs, tail)
            result = {"filler": filler, "ref": ref_filler, "index": (tp.shape[1] - 1) % b,
                      "ref_exact": exact(ref_pred, ra)}
            result["scaled"] = [(float(c), exact(run(rs, tail, scale=(args.scale_at, float(c)))[0], ra))
                                for c in args.scales.split(",") if c]
            start = run.head(ts, tail)  # the long part of the target, shared by the three runs
            for edit in ("plain", "recentred", "young_norm"):
                pred = run(ts, tail, ref_stats, edit, start=start)[0]
                result[edit] = exact(pred, ta)
                if edit == "plain":
                    result["digits"] = digit_hits(pred, ta).mean(0)
            rows.append(result)
            print(f"{filler} (ref {ref_filler}, last prompt token at in-block index {result['index']}): "
                  f"ref {100 * result['ref_exact']:.0f}%, plain {100 * result['plain']:.0f}%, recentred "
                  f"{100 * result['recentred']:.0f}%, + young norm {100 * result['young_norm']:.0f}%; digits "
                  + " / ".join(f"{100 * d:.0f}" for d in result["digits"])
                  + "".join(f"; ref scaled {c:g}x: {100 * a:.0f}%" for c, a in result["scaled"]), flush=True)
    lines = ["| filler (young ref) | last prompt token's in-block index | young ref | plain | per digit, plain | "
             "recentred every block | recentred + young norm | young ref, FAM scaled |", "|---" * 8 + "|"]
    lines += [f"| {r['filler']} ({r['ref']}) | {r['index']} | {100 * r['ref_exact']:.0f}% | {100 * r['plain']:.0f}% "
              f"| {' / '.join(f'{100 * d:.0f}' for d in r['digits'])} | {100 * r['recentred']:.0f}% | "
              f"{100 * r['young_norm']:.0f}% | {', '.join(f'{c:g}x {100 * a:.0f}%' for c, a in r['scaled']) or '-'} |"
              for r in rows]
    table = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fam_oracle.md"), "w") as f:
        f.write(f"Exact match of model {args.workdir} (N = {n}, B = {b}), {args.examples} prompts per length, with "
                "FAM edits before each of the last blocks (experiments/passkey/fam_oracle.py)\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
