"""Forward+backward step time, compiled memory and MFU of famjax (full / BSWA / FAM) next to a PyTorch peer.

    python benchmarks/step_time.py                      # tiny and small configs, 1k..16k tokens
    python benchmarks/step_time.py --sizes=tiny --lengths=1024,4096 --peer=false

Every number in the printed table is measured in this one process: the matmul peak (a 2048^3 float32 matmul
in JAX), each configuration's best-of-N step time, and the PyTorch peer (transformers' Llama with SDPA, if
torch is installed: `pip install -e .[bench]`). Ratios are only meaningful within one run.
"""
import argparse
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tpu_cost import model_overrides  # benchmarks/ is the script's folder

import famjax

SIZES = {  # vocab 256, SwiGLU
    "tiny": dict(d_model=256, num_layers=4, num_heads=4, mlp_dim=1024),
    "small": dict(d_model=512, num_layers=8, num_heads=8, mlp_dim=2048),
    "base": dict(d_model=1024, num_layers=12, num_heads=8, mlp_dim=4096),  # accelerators
    "1b": dict(d_model=1536, num_layers=18, num_heads=12, mlp_dim=6144),  # the paper's 1B shape, FFN 4x SwiGLU
}
MEMORY = 1


def best_time(fn, repeats):
    """Returns the best wall time of fn() over repeats runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(n=2048, dtype="float32"):
    """Returns matmul FLOP/s of an n^3 product in `dtype`, measured with JAX on this machine."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda a: a @ a)
    return 2 * n ** 3 / best_time(lambda: f(a).block_until_ready(), 5)


def model_flops(cfg: famjax.ModelConfig, t: int) -> float:
    """Returns the FLOPs of one training step (forward + backward = 3x forward) on t tokens."""
    d, h, kv, hd, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    per_row = 2 * (d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f)  # matmuls of one token (or FAM row)
    if cfg.attention == "full":
        keys = (t + 1) / 2 * t
    else:
        pos = np.arange(t)
        keys = np.minimum(pos, cfg.memory_blocks * cfg.block_size + pos % cfg.block_size).sum() + t
        keys += cfg.num_fam * t
    attention = 4 * h * hd * keys
    fam_rows = cfg.num_fam * (t // cfg.block_size)
    fam = fam_rows * per_row + 4 * h * hd * fam_rows * (cfg.num_fam + cfg.block_size)
    head = 2 * d * cfg.vocab_size * t
    return 3 * (cfg.num_layers * (per_row * t + attention + fam) + head)


def famjax_step(size, mode, t, repeats, block, fam, batch=1, dtype="float32", model_overrides=None):
    cfg = famjax.ModelConfig(vocab_size=256, **SIZES[size], attention=mode, block_size=block,
                             memory_blocks=MEMORY, fam_len=fam, max_len=t, dtype=dtype, **(model_overrides or {}))
    graphdef, params = nnx.split(famjax.FamLM(cfg, rngs=nnx.Rngs(0)))

    def loss(params, tokens):
        logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1], state_grad=False)  # as the trainer calls it
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, t + 1)), jnp.int32)
    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    step = best_time(lambda: jax.block_until_ready(compiled(params, tokens)), repeats)
    return dict(step=step, compile=compile_s, mem=peak, flops=batch * model_flops(cfg, t))


def torch_step(size, t, repeats, batch=1, dtype="float32"):
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    torch.manual_seed(0)
    s = SIZES[size]
    cfg = LlamaConfig(vocab_size=256, hidden_size=s["d_model"], intermediate_size=s["mlp_dim"],
                      num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
                      num_key_value_heads=s["num_heads"], max_position_embeddings=t + 1,
                      attn_implementation="sdpa")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM(cfg).to(dev)  # float32 parameters; bf16 compute through autocast
    tokens = torch.randint(0, 256, (batch, t + 1), device=dev)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev, torch.bfloat16, enabled=dtype == "bfloat16"):
            out = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1])
        out.loss.backward()
        if dev == "cuda":
            torch.cuda.synchronize()
    return best_time(step, repeats)


def out_of_memory_is_none(fn, *args):
    """fn(*args), or None when the device runs out of memory (XLA's RESOURCE_EXHAUSTED, torch's OutOfMemoryError):
    one configuration too large for the device does not end a one-shot device run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 -- anything else is re-raised below
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            return None
        raise


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--modes", default="full,bswa,fam")
    parser.add_argument("--peer", default="true", help="also time the PyTorch Llama peer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=256, help="block size B")
    parser.add_argument("--fam", type=int, default=16, help="FAM rows F (F / B = 1 / 16 by default)")
    parser.add_argument("--full_max", type=int, default=8192, help="longest length for famjax full attention")
    parser.add_argument("--batch", type=int, default=1, help="rows per step")
    parser.add_argument("--model", default="", help="ModelConfig overrides, e.g. attention_impl=xla,fam_unroll=2")
    parser.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16 (params f32)")
    parser.add_argument("--peak_n", type=int, default=2048, help="side of the matmul that measures the peak")
    args = parser.parse_args()
    peak = matmul_peak(args.peak_n, args.dtype)
    print(f"device: {jax.devices()[0].device_kind}, matmul peak (JAX {args.dtype} {args.peak_n}^3): "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"B={args.block} m={MEMORY} F={args.fam}; batch {args.batch}; {args.dtype}; {args.model or 'defaults'}; "
          f"best of {args.repeats}; "
          "memory = XLA buffers of the step\n")
    overrides = model_overrides(args.model)
    header = ("| size | tokens | mode | step s | compile s | mem MB | MFU | FAM/BSWA | torch s | torch/famjax |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    print(header)
    for size in args.sizes.split(","):
        for t in map(int, args.lengths.split(",")):
            torch_s = (out_of_memory_is_none(torch_step, size, t, args.repeats, args.batch, args.dtype)
                       if args.peer == "true" else None)
            results = {}
            for mode in args.modes.split(","):
                if mode == "full" and t > args.full_max:
                    continue  # dense [T, T] scores per layer: memory grows as T^2
                r = out_of_memory_is_none(famjax_step, size, mode, t, args.repeats, args.block, args.fam,
                                          args.batch, args.dtype, overrides)
                if r is None:  # a row that says so; the rows after it still run
                    print(f"| {size} | {t} | {mode} | out of memory | | | | | | |", flush=True)
                    continue
                results[mode] = r
                ratio = (f"{r['step'] / results['bswa']['step']:.2f}x"
                         if mode == "fam" and "bswa" in results else "")
                vs = f"{torch_s / r['step']:.2f}x" if torch_s else ""
                print(f"| {size} | {t} | {mode} | {r['step']:.3f} | {r['compile']:.1f} | {r['mem'] / 2**20:.0f} | "
                      f"{r['flops'] / r['step'] / peak:.0%} | {ratio} | {f'{torch_s:.3f}' if torch_s else '-'} | "
                      f"{vs} |", flush=True)
                gc.collect()


if __name__ == "__main__":
    main()
