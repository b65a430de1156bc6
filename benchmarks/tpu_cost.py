"""Compiled cost of the train step (forward + backward + optimizer) of FAM, BSWA and full attention on one TPU chip.

    python benchmarks/tpu_cost.py                        # v5p, one chip, per-device batch 1 and 4
    python benchmarks/tpu_cost.py --topology=v5e:1x1 --batches=1 --layers=4 --json=cost.json

No TPU is needed: libtpu compiles for a topology description (famjax.tools.aot, `pip install famjax[tpu]`).
The model is configs/paper_1b.py changed to the 1B shape of benchmarks/step_time.py: d 1536, 18 layers,
12 heads, FFN 6144 (GeGLU, the preset's), vocab 32k, bf16 compute, remat full, B 1024, m 1, F 64, 8192-token
rows (every row a fresh sequence: no carried stream state, no RSP). Attention is famjax's one einsum path (no
fused kernel); `full` keeps dense [T, T] scores.

Peak memory is XLA's buffer assignment of the step the trainer runs (layers in a lax.scan). FLOPs and bytes
accessed are not taken from that program: XLA's cost analysis counts a loop body once, so the scanned layers
and the FAM's scan over blocks would count one layer and one block. They come from the same step with every
loop unrolled (layers unrolled by the model's scan_layers=False, scans unrolled while tracing) at 1, 2 and 3
layers, extrapolated linearly from 2 and 3 layers to the full depth (the printed `lin` is the relative second
difference of the three: 0 when every layer costs the same).
"""
import argparse
import ast
import contextlib
import json
import os
import time

import jax

from famjax.tools import aot
from famjax.train.config import sibling_config

MODES = ("fam", "bswa", "full")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(mode: str, batch: int, layers: int, seq_len: int, *, scan_layers: bool = True, model=None):
    """Returns the benchmark config of one attention mode and per-device batch (one chip: mesh 1 x 1 x 1);
    model: further ModelConfig overrides."""
    cfg = sibling_config(os.path.join(REPO, "configs", "default.py"), "paper_1b").get_config()
    cfg.model.update(vocab_size=32_000, d_model=1536, num_layers=layers, num_heads=12, mlp_dim=6144,
                     dtype="bfloat16", remat="full", attention=mode, attention_impl="xla", block_size=1024,
                     memory_blocks=1, max_len=seq_len, scan_layers=scan_layers)
    cfg.model.update(**(model or {}))
    cfg.fam.update(fam_len=64, rsp_prob=0.0)
    cfg.data.update(seq_len=seq_len, batch_size=batch)
    cfg.train.stream_state = "off"
    cfg.mesh.shape = (1, 1, 1)
    return cfg


def model_overrides(text: str) -> dict:
    """The ModelConfig overrides of a --model flag, "name=value,...": numbers and True/False parsed, else strings."""
    return {k: ast.literal_eval(v) if v[:1].isdigit() or v in ("True", "False") else v
            for k, v in (item.split("=", 1) for item in text.split(",") if item)}


@contextlib.contextmanager
def unrolled_scans():
    """Every jax.lax.scan traced inside is fully unrolled (the same computation, every iteration visible)."""
    scan = jax.lax.scan

    def unrolled(*args, **kwargs):
        return scan(*args, **{**kwargs, "unroll": True})  # whatever unroll the caller asked for
    jax.lax.scan = unrolled
    try:
        yield
    finally:
        jax.lax.scan = scan


def all_loops_cost(mode, batch, layers, seq_len, mesh, hbm, model=None) -> dict:
    """Returns FLOPs and bytes accessed of the step at `layers` layers with every loop iteration counted."""
    points = []
    for n in (1, 2, 3):
        cfg = aot.prepare(config(mode, batch, n, seq_len, scan_layers=False, model=model))
        with unrolled_scans():
            r = aot.program_report(aot.compile_train_step(cfg, mesh), hbm)
        points.append((r["flops"], r["bytes_accessed"]))
    out = {"points": points}
    for i, key in enumerate(("flops", "bytes_accessed")):
        y1, y2, y3 = (p[i] for p in points)
        out[key] = y3 + (layers - 3) * (y3 - y2)  # from 2 and 3 layers: a lone layer is first and last at once
        out[f"{key}_linearity"] = abs(y3 - 2 * y2 + y1) / (y3 - y2)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="v5p:1x1x1", help="one chip (v5p's smallest slice is 2x2x1; one chip "
                   "is compiled with host bounds 1x1x1)")
    p.add_argument("--batches", default="1,4", help="per-device batch sizes")
    p.add_argument("--modes", default=",".join(MODES), help="attention modes (bswa is the ratios' base)")
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--seq_len", type=int, default=8192)
    p.add_argument("--model", default="", help="ModelConfig overrides, e.g. fam_deferred_grads=False")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()
    overrides = model_overrides(args.model)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_compilation_cache", False)  # compile-only TPU programs cannot be reloaded

    devices = aot.topology_devices(args.topology)
    kind = devices[0].device_kind
    hbm = int(aot.HBM_GIB[kind] * aot.GIB)
    print(f"{args.topology}: 1 x {kind}, HBM {hbm / aot.GIB:.0f} GiB; jax {jax.__version__}; "
          f"{args.layers} layers, {args.seq_len} tokens per row")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for mode in args.modes.split(","):
            cfg = aot.prepare(config(mode, batch, args.layers, args.seq_len, model=overrides))
            mesh = aot.meshlib.make_mesh(cfg.mesh, devices[:1])
            t0 = time.perf_counter()
            r = aot.try_compile(lambda: aot.compile_train_step(cfg, mesh), hbm)  # noqa: B023  # called at once
            r = {"mode": mode, "batch": batch, "compile_s": time.perf_counter() - t0, **r}
            r["xla_flops"], r["xla_bytes_accessed"] = r.pop("flops", None), r.pop("bytes_accessed", None)
            r.update(all_loops_cost(mode, batch, args.layers, args.seq_len, mesh, hbm, overrides))
            rows.append(r)
            print(f"  {mode} batch {batch}: step compiled in {r['compile_s']:.0f} s, costs in "
                  f"{time.perf_counter() - t0 - r['compile_s']:.0f} s", flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print("\n| batch | mode | TFLOP | GB accessed | peak GiB | fits | FLOPs / BSWA | bytes / BSWA | peak / BSWA "
          "| XLA TFLOP (loops once) | lin |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next((b for b in rows if b["batch"] == r["batch"] and b["mode"] == "bswa"), {})  # ratios need bswa
        peak = f"{r['peak_bytes'] / aot.GIB:.2f}" if "peak_bytes" in r else \
            f"> {r.get('needs_at_least_bytes', 0) / aot.GIB:.1f}"
        ratios = [f"{r[k] / base[k]:.3f}x" if k in r and k in base else "" for k in
                  ("flops", "bytes_accessed", "peak_bytes")]
        xla = f"{r['xla_flops'] / 1e12:.2f}" if r["xla_flops"] else ""
        lin = max(r["flops_linearity"], r["bytes_accessed_linearity"])
        print(f"| {r['batch']} | {r['mode']} | {r['flops'] / 1e12:.2f} | {r['bytes_accessed'] / 1e9:.1f} | {peak} | "
              f"{'yes' if r['fits'] else 'no'} | " + " | ".join(ratios) + f" | {xla} | {lin:.1e} |")


if __name__ == "__main__":
    main()
