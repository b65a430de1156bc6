"""PassKey extrapolation experiment (issue 6): FAM vs BSWA, length curriculum, streaming eval to 64x.

    .venv/bin/python -m experiments.passkey.run --preset=tiny --out=runs/passkey_exp

Run from the repository root. For every model of the preset (experiments/passkey/presets.py): trains stage 1
with the trainer (`python -m famjax.main`; stage 1 starts from scratch or, with an init workdir / --fam_init,
from that run's newest checkpoint), then fine-tunes each later stage from the previous stage's checkpoint
(copied into the new stage's workdir without its data-iterator state, with train.steps = previous step + stage
steps, so the trainer simply resumes with the new data/LR config). Then streams fresh PassKey prompts
(generated here with the data layer's make_pairs, seed `eval.seed`, not from the training splits) of N x 1, 2,
4, ... filler tokens through famjax.evals.evaluate_passkey, where N is the longest filler of the last stage,
and writes <out>/passkey.{json,csv,md,png} (famjax.evals.write_rows, plot_passkey_accuracy). Re-running skips
stages whose workdir already holds the final step (use --retrain to redo them). Each model is evaluated right
after its training and the table is rewritten, so an interrupted run keeps the models done so far.
--eval_only --examples=K re-evaluates trained stages into passkey_Kex.*; --stages=K stops after (or
evaluates) stage K, into passkey_stageK*; an eval with the key always at the start (the *_start presets)
writes passkey*_key_start.*.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from experiments.passkey.presets import PRESETS, stage_options

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _ckpt_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(s) for s in os.listdir(d) if s.isdigit())


def _copy_checkpoint(src: str, dst: str) -> int:
    """Copies src's newest checkpoint into dst/checkpoints without its data-iterator state; returns its step."""
    step = _ckpt_steps(src)[-1]
    out = os.path.join(dst, "checkpoints", str(step))
    shutil.copytree(os.path.join(src, "checkpoints", str(step)), out)
    shutil.rmtree(os.path.join(out, "data"), ignore_errors=True)  # new stage = new data: start it fresh
    return step


def train_model(name: str, config: str, overrides: dict, stages: list[dict], out: str, retrain: bool,
                python: str, init_from: str | None = None, extra: dict | None = None) -> tuple[str, int, float]:
    """Runs every stage; returns (last workdir, longest training filler, seconds spent training).

    init_from: a workdir whose newest checkpoint stage 1 fine-tunes from (None: stage 1 starts from scratch).
    extra: config overrides applied last, to every stage (the command line's --set).
    """
    prev, total, seconds, longest = init_from, 0, 0.0, 0
    if init_from is not None:
        total = _ckpt_steps(init_from)[-1]
    for k, stage in enumerate(stages, 1):
        stage = dict(stage)
        steps = int(stage.pop("steps"))
        wd = os.path.join(out, name, f"stage{k}")
        if retrain and os.path.isdir(wd):
            shutil.rmtree(wd)
        total += steps
        opts = {**stage_options(overrides, stages, k), **(extra or {}), "train.steps": total}
        done = _ckpt_steps(wd)
        if done and done[-1] >= total:
            _log(f"{name} stage {k}: already at step {done[-1]}, skipped")
        else:
            if prev is not None and not done:
                s = _copy_checkpoint(prev, wd)
                _log(f"{name} stage {k}: fine-tunes from {prev} step {s}")
            cmd = [python, "-m", "famjax.main", f"--config={config}", f"--workdir={wd}", "--mode=train"]
            cmd += [f"--config.{key}={v}" for key, v in opts.items()]
            _log(f"{name} stage {k}: " + " ".join(cmd[2:]))
            t0 = time.time()
            with open(os.path.join(out, name, f"stage{k}.log"), "a") as logf:
                subprocess.run(cmd, cwd=ROOT, check=True, stdout=logf, stderr=subprocess.STDOUT)
            seconds += time.time() - t0
            _log(f"{name} stage {k}: {time.time() - t0:.0f} s")
        longest = max(longest, int(opts["data.passkey.train_filler_max"]))
        prev = wd
    return prev, longest, seconds


def eval_examples(data_cfg, lengths, count: int, seed: int, key_position: str | None = None, spread: int = 0):
    """{length: [(prompt, answer, length)]}: fresh PassKey examples made here (not the training splits), with the
    key placed as `key_position` says (default: as the model's training data placed it).

    spread = 0: every example has exactly `length` filler tokens. spread = S > 0 (the block size): example i has
    length + (i mod S) - S // 2, so the question and answer sit at every offset in their block in turn (the
    examples are still reported under `length`); with m = 0 an answer that crosses a block boundary must be read
    through the FAM alone, so one exact length measures one offset only.
    """
    from famjax.data import make_tokenizer
    from famjax.data import passkey as pk

    tok = make_tokenizer(data_cfg)
    kw = dict(key_digits=int(data_cfg.passkey.key_digits), key_position=key_position or data_cfg.passkey.key_position)
    out = {}
    for n in lengths:
        if not spread:
            pairs = pk.make_pairs(tok, np.random.default_rng([seed, n]), filler_len=n, count=count, **kw)
        else:
            fillers = [max(1, n + i % spread - spread // 2) for i in range(count)]
            pairs = [pk.make_pairs(tok, np.random.default_rng([seed, n, i]), filler_len=f, count=1, **kw)[0]
                     for i, f in enumerate(fillers)]
        out[n] = [(prompt, answer, n) for prompt, answer in pairs]
    return out


def digit_accuracy(scores) -> float:
    """Mean share of answer digits the greedy answer got right (chance ~0.1), a finer signal than exact match.
    scores: famjax.evals.PassKeyScore list."""
    return float(np.mean([np.sum(s.predicted[:len(s.answer)] == s.answer[:len(s.predicted)]) / len(s.answer)
                          for s in scores]))


def output_stem(out: str, stages: int, examples: int, key_position: str | None, phases: bool = False) -> str:
    """Returns <out>/passkey[_stageK][_Kex][_key_start|_key_end][_phases]: a `*_start` preset evaluated into the
    same --out as its base preset writes next to the base's table, not over it."""
    tags = [f"_stage{stages}" if stages else "", f"_{examples}ex" if examples else "",
            f"_key_{key_position}" if key_position in ("start", "end") else "", "_phases" if phases else ""]
    return os.path.join(out, "passkey" + "".join(tags))


def markdown(rows: list[dict], lengths: list[int], n: int) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    acc = {(r["model"], r["length"]): r for r in rows}
    head = "| model | " + " | ".join(f"{ln // n}x ({ln})" for ln in lengths) + " |"
    lines = [head, "|" + "---|" * (len(lengths) + 1)]
    for m in models:
        cells = []
        for ln in lengths:
            r = acc.get((m, ln))
            cells.append("-" if r is None else f"{100 * r['accuracy']:.0f}% ({r['correct']}/{r['count']})"
                         + (f", d {100 * r['digit_accuracy']:.0f}%" if "digit_accuracy" in r else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.passkey.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), metavar="NAME",
                   help="a preset of experiments/passkey/presets.py: " + ", ".join(sorted(PRESETS)))
    p.add_argument("--out", default="runs/passkey_exp")
    p.add_argument("--models", default="", help="comma-separated subset of the preset's models, in order")
    p.add_argument("--fam_init", default=None,
                   help="workdir of a trained FAM run (e.g. `make train`'s runs/passkey_tiny) that the fam* "
                        "models fine-tune from; default: the preset's choice")
    p.add_argument("--examples", type=int, default=0, help="examples per length (default: the preset's)")
    p.add_argument("--stages", type=int, default=0,
                   help="use only the preset's first K stages (train and evaluate after stage K; N from them)")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--eval_only", action="store_true", help="evaluate the stages already trained")
    p.add_argument("--phases", action="store_true",
                   help="spread each length's examples over k x N - B/2 .. k x N + B/2 - 1 filler tokens (every "
                        "offset of the question in its block); tables get the suffix _phases")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override for every model and stage, e.g. --set data.data_dir=/tmp/pk")
    args = p.parse_args()
    bad = [kv for kv in args.set if "=" not in kv]
    if bad:
        p.error(f"--set needs FIELD=VALUE, got {bad[0]!r}")
    extra = dict(kv.split("=", 1) for kv in args.set)
    t_start = time.time()
    preset = PRESETS[args.preset]
    if args.stages:
        if not 1 <= args.stages <= len(preset["stages"]):
            p.error(f"--stages must be in 1..{len(preset['stages'])} for preset {args.preset}, got {args.stages}")
        preset = {**preset, "stages": preset["stages"][:args.stages]}
    out = os.path.abspath(args.out)
    models = preset["models"]
    if args.models:
        models = {k: models[k] for k in args.models.split(",")}
    os.makedirs(out, exist_ok=True)

    from famjax import evals
    from famjax.infer.load import load_model

    ev = dict(preset["eval"])
    if args.examples:
        ev["examples"] = args.examples
    n = max(int(stage_options({}, preset["stages"], k)["data.passkey.train_filler_max"])
            for k in range(1, len(preset["stages"]) + 1))
    lengths = [n * m for m in ev["multipliers"]]
    rows, train_s, eval_s, examples = [], {}, {}, None
    stem = output_stem(out, args.stages, args.examples, ev.get("key_position"), args.phases)
    for name, spec in models.items():  # train, evaluate and write the table after every model
        config, overrides = spec[0], spec[1]
        init_from = spec[2] if len(spec) > 2 else None
        if name.startswith("fam") and args.fam_init:
            init_from = args.fam_init
        os.makedirs(os.path.join(out, name), exist_ok=True)
        if args.eval_only:
            wd, secs = os.path.join(out, name, f"stage{len(preset['stages'])}"), 0.0
        else:
            wd, _, secs = train_model(name, config, overrides, preset["stages"], out, args.retrain,
                                      sys.executable, init_from, extra)
        train_s[name] = secs
        model, cfg = load_model(wd)
        if examples is None:
            examples = eval_examples(cfg.data, lengths, int(ev["examples"]), int(ev["seed"]), ev.get("key_position"),
                                     spread=int(cfg.model.block_size) if args.phases else 0)
        t0 = time.time()
        for ln in lengths:
            t1 = time.time()
            scores = evals.evaluate_passkey(model, examples[ln], chunk_size=int(ev["chunk_size"]),
                                            batch_size=int(ev["batch_size"]))
            acc = evals.accuracy_by_length(scores)[ln]
            acc["digit_accuracy"] = digit_accuracy(scores)
            rows.append({"model": name, "length": ln, **acc})
            _log(f"eval {name} filler {ln} ({ln // n}x): {100 * acc['accuracy']:.0f}% "
                 f"({acc['correct']}/{acc['count']}), digits {100 * acc['digit_accuracy']:.0f}% "
                 f"in {time.time() - t1:.0f} s")
        eval_s[name] = time.time() - t0
        evals.write_rows(rows, stem, fields=evals.passkey.TABLE_FIELDS + ("digit_accuracy",))
        table = markdown(rows, lengths, n)
        total = time.time() - t_start
        with open(stem + ".md", "w") as f:
            spread = (f", each length spread over +-{cfg.model.block_size // 2} filler tokens (every block offset)"
                      if args.phases else "")
            f.write(f"PassKey exact match, N = {n} filler tokens (longest trained), {ev['examples']} examples "
                    f"per length{spread}, preset {args.preset}\n\n" + table)
            f.write("\ntrain seconds: " + json.dumps({k: round(v) for k, v in train_s.items()}) + "\n")
            f.write("eval seconds: " + json.dumps({k: round(v) for k, v in eval_s.items()}) + "\n")
            f.write(f"total seconds so far: {total:.0f}\n")
        fig = evals.plot_passkey_accuracy(rows, title=f"PassKey, trained up to N={n} filler tokens")
        evals.save_png(fig, stem + ".png")
    print(table)
    _log(f"wrote {stem}.{{json,csv,md,png}}; train s {json.dumps({k: round(v) for k, v in train_s.items()})}; "
         f"eval s {json.dumps({k: round(v) for k, v in eval_s.items()})}; total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
