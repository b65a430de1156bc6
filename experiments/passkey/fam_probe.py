"""Is the key still in the FAM far past the training length? A linear probe of the FAM after the prompt.

    .venv/bin/python -m experiments.passkey.fam_probe --workdir=runs/passkey_tiny --multipliers=1,4,16 \
        --out=experiments/passkey/results

For each length (multiples of N, the run's longest training filler) it makes `--examples` fresh prompts, runs
the model over them and keeps the FAM after the prompt's last complete block (every layer, each row
RMS-normalised as the layer's pre-norm sees it). A ridge regression from that FAM to the one-hot key digits is
fitted on 80% of the prompts and scored on the rest:

- probe here: digit accuracy of a probe fitted at this length (is the key linearly decodable at all?);
- probe from 1x: the probe fitted at the first length, applied here (is the key written the same way?);
- recentred: the probe from 1x after shifting this length's FAMs by (mean FAM at 1x - mean FAM here), the
  means over the prompts (does only the example-independent part of the FAM move with age?);
- cos(mean): cosine between this length's mean FAM and the first length's;
- model: the model's own digit accuracy (teacher-forced argmax on the answer).

Chance is ~10% per digit. If the probe still reads the key where the model no longer does, the memory kept
it and the reading fails; if the probe fails too, the key was overwritten. Writes fam_probe.md under --out.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from experiments.passkey.run import eval_examples

LAMBDAS = (1e-2, 1e-1, 1.0, 10.0, 100.0)


def rms(x):
    """[..., 1]: the root mean square over the last axis (what an RMS pre-norm divides by)."""
    return np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6)


def prompts(cfg, filler: int, n: int, seed: int):
    """Returns (prompts [n, P], answers [n, A]): `n` fresh PassKey examples of one filler length."""
    exs = eval_examples(cfg.data, [filler], n, seed)[filler]
    if len({len(p) for p, _, _ in exs}) != 1:
        raise ValueError("prompts of one length differ in tokens; they are batched as one array")
    return np.stack([p for p, _, _ in exs]), np.stack([a for _, a, _ in exs])


def fam_and_digits(model, prompts_, answers, batch: int):
    """Returns (features [n, L*F*d]: the normalised FAM after each prompt, model digit hits [n, A])."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @nnx.jit
    def run(m, prompt, answer):
        # One pass: the prompt, then the answer from the prompt's state (chunked == one call, spec 7).
        logits_p, state = m(prompt, m.init_state(prompt.shape[0]))
        logits_a, _ = m(answer[:, :-1], state)
        pred = jnp.argmax(jnp.concatenate([logits_p[:, -1:], logits_a], 1), -1)  # [b, A]: digit predictions
        return state.layers.fam, pred

    feats, hits = [], []
    for i in range(0, len(prompts_), batch):
        prompt, answer = prompts_[i:i + batch], answers[i:i + batch]
        fam, pred = jax.device_get(run(model, jnp.asarray(prompt), jnp.asarray(answer)))
        fam = fam / rms(fam)  # [L, b, F, d]
        feats.append(np.moveaxis(fam, 1, 0).reshape(len(prompt), -1))
        hits.append(pred == answer)
    return np.concatenate(feats), np.concatenate(hits)


def fit_ridge(x, y, lam):
    """Returns (x mean, weights, y mean) of a ridge regression y ~ (x - x mean) w + y mean, solved in its dual
    form (n << dims)."""
    mu = x.mean(0)
    xc = x - mu
    alpha = np.linalg.solve(xc @ xc.T + lam * np.eye(len(x)), y - y.mean(0))
    return mu, xc.T @ alpha, y.mean(0)


def predict(fit, x):
    mu, w, y0 = fit
    return (x - mu) @ w + y0


def digit_accuracy(scores, labels, classes: int) -> float:
    """scores [n, A*classes]; labels [n, A] class indices -> share of digits whose argmax is right."""
    n, a = labels.shape
    return float(np.mean(scores.reshape(n, a, classes).argmax(-1) == labels))


def best_probe(x, y1h, labels, classes: int):
    """Fits the ridge with the lambda that does best on a held-out fifth of (x, y)."""
    cut = int(0.8 * len(x))
    acc = {lam: digit_accuracy(predict(fit_ridge(x[:cut], y1h[:cut], lam), x[cut:]), labels[cut:], classes)
           for lam in LAMBDAS}
    lam = max(acc, key=acc.get)
    return fit_ridge(x, y1h, lam)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.passkey.fam_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a trained FAM run (its newest checkpoint is used)")
    p.add_argument("--multipliers", default="1,4,16", help="lengths as multiples of N; the first one is the "
                   "reference for the transferred probe")
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=99)
    p.add_argument("--out", default="experiments/passkey/results")
    args = p.parse_args()

    from famjax.infer.load import load_model

    model, cfg = load_model(args.workdir)
    n = int(cfg.data.passkey.train_filler_max)
    mults = [int(m) for m in args.multipliers.split(",")]
    rows, ref, ref_mean = [], None, None
    for mult in mults:
        prompt, answers = prompts(cfg, n * mult, args.examples, args.seed)
        x, hits = fam_and_digits(model, prompt, answers, args.batch)
        ids = np.unique(answers)
        labels = np.searchsorted(ids, answers)  # [n, A] class index of each digit
        y1h = np.eye(len(ids))[labels].reshape(len(answers), -1)
        cut = int(0.8 * len(answers))
        probe = best_probe(x[:cut], y1h[:cut], labels[:cut], len(ids))
        here = digit_accuracy(predict(probe, x[cut:]), labels[cut:], len(ids))
        mean = x[:cut].mean(0)
        ref, ref_mean = ref or probe, mean if ref_mean is None else ref_mean
        transfer = digit_accuracy(predict(ref, x[cut:]), labels[cut:], len(ids))
        recentred = digit_accuracy(predict(ref, x[cut:] - mean + ref_mean), labels[cut:], len(ids))
        cos = float(mean @ ref_mean / (np.linalg.norm(mean) * np.linalg.norm(ref_mean)))
        rows.append((mult, n * mult, here, transfer, recentred, cos, float(hits[cut:].mean())))
        print(f"{mult}x ({n * mult}): probe here {100 * here:.0f}%, probe from {mults[0]}x "
              f"{100 * transfer:.0f}% ({100 * recentred:.0f}% recentred), cos(mean) {cos:.2f}, "
              f"model {100 * hits[cut:].mean():.0f}%", flush=True)
    lines = ["| length | probe here | probe from %dx | recentred | cos(mean) | model |" % mults[0],
             "|---|---|---|---|---|---|"]
    lines += [f"| {m}x ({ln}) | {100 * h:.0f}% | {100 * t:.0f}% | {100 * r:.0f}% | {c:.2f} | {100 * md:.0f}% |"
              for m, ln, h, t, r, c, md in rows]
    table = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fam_probe.md"), "w") as f:
        f.write(f"Digit accuracy of a linear probe of the FAM after the prompt, model {args.workdir} (N = {n}), "
                f"{args.examples} prompts per length (probe fitted on 80%, scored on 20%)\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
