"""Generation benchmark: prefill peak RSS and tokens/s vs prompt length, decode tokens/s at a fixed context.

Compares, at the same size (d_model, layers, heads, MLP): a FAM model (constant-size state), the same model
with full attention and a KV cache of the whole stream (`init_state(max_len=...)`), and transformers'
PyTorch Llama with its KV cache (skipped with a message if torch/transformers are missing).

    python benchmarks/generate.py --quick            # smoke run (~1 minute), prints the table
    python benchmarks/generate.py --write            # full run, appends "## Generation" to RESULTS.md

famjax decodes with `infer.generate(..., steps_per_call=N)` (N decode steps fused into one jitted
`lax.while_loop` call, --steps_per_call); torch runs its usual one-forward-per-token Python loop.
Every configuration runs in its own subprocess, so its peak RSS (ru_maxrss of that process: Python, the
framework, compiled programs and the data) is its own. Tokens/s exclude compilation (a warm-up run first).
Full attention and torch run only up to --full_max / --torch_max tokens: their prefill time grows as n^2 (every chunk
attends to the whole cache) and their cache as n; beyond that the table gives the KV cache it would need.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

SIZE = dict(vocab_size=256, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256)
FAM = dict(attention="fam", block_size=128, memory_blocks=1, fam_len=16)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _kv_cache_mib(tokens: int) -> float:
    head_dim = SIZE["d_model"] // SIZE["num_heads"]
    return 2 * SIZE["num_layers"] * tokens * SIZE["num_kv_heads"] * head_dim * 4 / 2**20


# ------------------------------------------------------------------ workers (one per subprocess)
def _jax_model(attention: str, max_len: int):
    from flax import nnx

    import famjax
    extra = FAM if attention == "fam" else dict(attention="full", max_len=max_len)
    return famjax.FamLM(famjax.ModelConfig(**SIZE, **extra), rngs=nnx.Rngs(0))


def work_jax_prefill(attention: str, tokens: int, chunk: int) -> dict:
    import jax
    import numpy as np

    from famjax import infer
    model = _jax_model(attention, tokens)
    rng = np.random.default_rng(0)
    warm = rng.integers(0, SIZE["vocab_size"], min(tokens, 2 * chunk)).astype(np.int32)
    jax.block_until_ready(infer.prefill(model, [warm], chunk_size=chunk, max_len=tokens))
    prompt = rng.integers(0, SIZE["vocab_size"], tokens).astype(np.int32)
    t0 = time.perf_counter()
    logits, state = infer.prefill(model, [prompt], chunk_size=chunk, max_len=tokens)
    jax.block_until_ready(logits)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens_per_s": tokens / dt, "state_mib": state.nbytes() / 2**20}


def work_jax_decode(attention: str, context: int, new: int, steps_per_call: int) -> dict:
    import numpy as np

    from famjax import infer
    model = _jax_model(attention, context + new)
    prompt = np.random.default_rng(0).integers(0, SIZE["vocab_size"], context).astype(np.int32)
    kw = {"chunk_size": 1024, "steps_per_call": steps_per_call}
    infer.generate(model, [prompt], max_new_tokens=3, **kw)  # compiles prefill and decode (same programs)
    gen = infer.generate(model, [prompt], max_new_tokens=new, **kw)
    return {"seconds": gen.decode_seconds, "tokens_per_s": gen.decode_steps / gen.decode_seconds,
            "state_mib": gen.state.nbytes() / 2**20}


def _torch_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=SIZE["vocab_size"], hidden_size=SIZE["d_model"],
                      intermediate_size=SIZE["mlp_dim"], num_hidden_layers=SIZE["num_layers"],
                      num_attention_heads=SIZE["num_heads"], num_key_value_heads=SIZE["num_kv_heads"],
                      max_position_embeddings=1 << 21, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _torch_prefill(model, ids, chunk):
    import torch
    from transformers import DynamicCache
    cache, out = DynamicCache(), None
    with torch.inference_mode():
        for s in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True)
    return out.logits[:, -1], cache


def work_torch_prefill(tokens: int, chunk: int) -> dict:
    import torch
    model = _torch_model()
    g = torch.Generator().manual_seed(0)
    _torch_prefill(model, torch.randint(0, SIZE["vocab_size"], (1, min(tokens, 2 * chunk)), generator=g), chunk)
    ids = torch.randint(0, SIZE["vocab_size"], (1, tokens), generator=g)
    t0 = time.perf_counter()
    _torch_prefill(model, ids, chunk)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens_per_s": tokens / dt, "state_mib": _kv_cache_mib(tokens)}


def work_torch_decode(context: int, new: int) -> dict:
    import torch
    model = _torch_model()
    ids = torch.randint(0, SIZE["vocab_size"], (1, context), generator=torch.Generator().manual_seed(0))

    def run(n):
        logits, cache = _torch_prefill(model, ids, 1024)
        token = logits.argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(n - 1):  # same count as famjax: the first token comes from the prefill logits
                token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(
                    -1, keepdim=True)
        return time.perf_counter() - t0
    run(3)
    dt = run(new)
    return {"seconds": dt, "tokens_per_s": (new - 1) / dt, "state_mib": _kv_cache_mib(context + new)}


WORKERS = {"jax_prefill": work_jax_prefill, "jax_decode": work_jax_decode,
           "torch_prefill": work_torch_prefill, "torch_decode": work_torch_decode}


def worker_main(spec: str) -> None:
    job = json.loads(spec)
    if job["fn"].startswith("torch"):
        import torch
        # Intra-op threads spin while waiting: on a shared machine 2 threads made decode ~100x slower
        # than 1 (measured), so torch gets the count it runs best with here (--torch_threads).
        torch.set_num_threads(job.pop("threads"))
    out = WORKERS[job["fn"]](**job["args"])
    out["peak_rss_mib"] = _peak_rss_mib()
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------ driver
def run_job(fn: str, timeout: float, threads: int = 1, **args) -> dict:
    """Runs one worker in a fresh process; returns its result dict or {'error': ...}."""
    job = {"fn": fn, "args": args, "threads": threads}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}


def torch_available() -> str:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return f"skipped: {e} (pip install torch transformers)"
    return ""


def _fmt(r: dict, key: str, fmt: str) -> str:
    return "-" if "error" in r or key not in r else format(r[key], fmt)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--lengths", default="", help="prefill lengths, e.g. 8192,32768")
    p.add_argument("--chunk", type=int, default=4096, help="prefill tokens per call (FAM)")
    p.add_argument("--full_max", type=int, default=8192, help="longest prompt for famjax full attention")
    p.add_argument("--torch_max", type=int, default=32768, help="longest prompt for torch Llama")
    p.add_argument("--torch_threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--steps_per_call", type=int, default=64, help="famjax decode steps per jitted call")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per configuration")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    else:
        lengths = [2048, 8192] if args.quick else [8192, 32768, 131072, 524288, 1048576]
    context, new = (512, 32) if args.quick else (4096, 256)
    # Full attention's chunk scores are [heads, chunk, cache]: a smaller chunk keeps them in memory.
    quad_chunk = min(args.chunk, 1024)
    skip_torch = torch_available()
    rows = []

    def add(name, phase, n, r):
        rows.append((name, phase, n, r))
        shown = r.get("error") or (f"{r['tokens_per_s']:.0f} tok/s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                                   f"state {r['state_mib']:.2f} MiB")
        print(f"{name:>16} {phase:>7} {n:>8}: {shown}", flush=True)

    for n in lengths:
        add("famjax FAM", "prefill", n, run_job("jax_prefill", args.timeout, attention="fam", tokens=n,
                                                 chunk=args.chunk))
        note = {"error": f"not run (n^2 time); KV cache alone {_kv_cache_mib(n):.0f} MiB"}
        add("famjax full+KV", "prefill", n, note if n > args.full_max else run_job(
            "jax_prefill", args.timeout, attention="full", tokens=n, chunk=quad_chunk))
        if not skip_torch:
            add("torch Llama", "prefill", n, note if n > args.torch_max else run_job(
                "torch_prefill", args.timeout, args.torch_threads, tokens=n, chunk=quad_chunk))
    add("famjax FAM", "decode", context, run_job("jax_decode", args.timeout, attention="fam", context=context,
                                                  new=new, steps_per_call=args.steps_per_call))
    add("famjax full+KV", "decode", context, run_job("jax_decode", args.timeout, attention="full",
                                                      context=context, new=new,
                                                      steps_per_call=args.steps_per_call))
    if skip_torch:
        print(f"torch Llama: {skip_torch}")
    else:
        add("torch Llama", "decode", context, run_job("torch_decode", args.timeout, args.torch_threads,
                                                       context=context, new=new))

    table = ["| model | phase | tokens (prompt / context) | tokens/s | peak RSS MiB | state / KV MiB | note |",
             "|---|---|---|---|---|---|---|"]
    for name, phase, n, r in rows:
        table.append(f"| {name} | {phase} | {n} | {_fmt(r, 'tokens_per_s', '.0f')} | "
                     f"{_fmt(r, 'peak_rss_mib', '.0f')} | {_fmt(r, 'state_mib', '.2f')} | {r.get('error', '')} |")
    fam = [r for name, phase, _, r in rows if name == "famjax FAM" and phase == "prefill" and "error" not in r]
    summary = []
    if len(fam) >= 2:
        lo, hi = fam[0]["peak_rss_mib"], fam[-1]["peak_rss_mib"]
        summary.append(f"FAM prefill peak RSS {lo:.0f} -> {hi:.0f} MiB from {lengths[0]} to {lengths[-1]} tokens "
                       f"({100 * (hi - lo) / lo:+.1f}%; target within 10%).")
    dec = {name: r for name, phase, _, r in rows if phase == "decode" and "error" not in r}
    if "famjax FAM" in dec and "torch Llama" in dec:
        ratio = dec["famjax FAM"]["tokens_per_s"] / dec["torch Llama"]["tokens_per_s"]
        summary.append(f"FAM decode at {context} context: {ratio:.2f}x transformers (target >= 2x).")
    import jax
    header = (f"Model: {SIZE} (FAM: {FAM}); prefill chunk {args.chunk} (full/torch {quad_chunk}); torch "
              f"threads {args.torch_threads}; decode "
              f"{new} tokens after a {context}-token prompt, batch 1, greedy (famjax: {args.steps_per_call} "
              f"steps per jitted call). Machine: {platform.machine()}, "
              f"{os.cpu_count()} CPU cores, jax {jax.__version__}, {datetime.date.today()}; other jobs shared the "
              f"cores, so tokens/s are indicative. Command: `python benchmarks/generate.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}`.")
    text = "\n".join([header, "", *table, "", *summary]) + "\n"
    print("\n" + text)
    if args.write:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n## Generation\n\n" + text)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
