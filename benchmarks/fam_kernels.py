"""Kernels per step of the FAM's loop over blocks, counted in the compiled train step (forward and backward).

    python benchmarks/fam_kernels.py                           # TPU v5p (compiled on this CPU, libtpu), 1B shape
    python benchmarks/fam_kernels.py --topology=cpu            # this machine's backend

Only the F rows of a block are sequential, so each iteration of the loop over blocks should be a few large
kernels. The script compiles the trainer's step (famjax.tools.aot) for configs/paper_1b.py at the 1B shape of
benchmarks/tpu_cost.py with a few layers, once per setting of `--settings` (ModelConfig overrides), finds the
loops whose trip count is the number of blocks (or one less: in training the last block's update runs after
the loop), and prints the kernels launched per iteration of each ("kernels x iterations"), and their launches
per step divided by the number of blocks: XLA fusions, unfused dots and custom calls, counted in the loop body
and the computations it calls.
"""
import argparse
import collections
import os
import re
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_cost  # noqa: E402

from famjax.tools import aot  # noqa: E402

SETTINGS = {
    "as configured": {},
    "plain scan": dict(fam_deferred_grads=False),
    "deferred grads": dict(fam_deferred_grads=True),
    "deferred unroll 2": dict(fam_deferred_grads=True, fam_unroll=2),
    "pallas attention": dict(fam_deferred_grads=True, attention_impl="pallas"),  # TPU's default kernel
    "keep loop residuals": dict(fam_deferred_grads=True, fam_remat="keep"),  # no rerun of the loop under remat
    "offload loop residuals": dict(fam_deferred_grads=True, fam_remat="offload"),  # keep's, in host memory
}
# Instructions that do no work of their own (they alias, index or bookkeep); everything else is a kernel.
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier", "while", "conditional", "call", "copy-start", "copy-done", "add-dependency"}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")  # a header: at column 0, ends with {
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = .*?\s([\w\-]+)\(")
_WHILE = re.compile(r"\swhile\(.*body=%?([\w.\-]+)")
_WHILE_COND = re.compile(r"condition=%?([\w.\-]+)")
_BOUND = re.compile(r"s32\[\]\S* constant\((\d+)\)")
_CALLS = re.compile(r"(?:to_apply|calls|body|condition|branch_computations)=\{?%?([\w.\-]+)")


def parse(hlo: str):
    """Returns ({computation: [(opcode, line)]}, [(body, trip count)] of every while loop; the trip count is the
    integer constant of the loop's condition, None if there is not exactly one)."""
    comps, current, whiles = {}, None, []
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = comps.setdefault(m.group(1), [])
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            current.append((m.group(1), line))
            w = _WHILE.search(line)
            if w:
                whiles.append((w.group(1), _WHILE_COND.search(line).group(1)))
    loops = []
    for body, cond in whiles:
        bounds = {int(b) for _, ln in comps.get(cond, []) for b in _BOUND.findall(ln)}
        loops.append((body, bounds.pop() if len(bounds) == 1 else None))
    return comps, loops


def kernels(comps: dict, name: str) -> collections.Counter:
    """Kernels one execution of computation `name` launches, by kind, including calls it makes (not loops)."""
    out = collections.Counter()
    for opcode, line in comps.get(name, []):
        if opcode == "fusion" or opcode not in _FREE:
            kind = "fusion" if opcode == "fusion" else opcode
            if opcode == "fusion" and "kind=kCustom" in line:
                kind = "custom fusion"
            out[kind] += 1
        if opcode in ("call", "conditional"):
            for callee in _CALLS.findall(line):
                out.update(kernels(comps, callee))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="v5p:1x1x1", help="a TPU topology, or 'cpu' for this machine")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--settings", default=",".join(list(SETTINGS)[1:]), help="names from SETTINGS")
    args = p.parse_args()
    if args.topology == "cpu":
        devices = jax.devices()[:1]
    else:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_enable_compilation_cache", False)
        devices = aot.topology_devices(args.topology)
    blocks = args.seq_len // 1024
    print(f"{devices[0].device_kind}: {args.layers} layers, {args.seq_len} tokens = {blocks} blocks, batch "
          f"{args.batch}; kernels per iteration of each loop over the blocks (fusions + other kernels)")
    for name in args.settings.split(","):
        cfg = tpu_cost.config("fam", args.batch, args.layers, args.seq_len)
        cfg.model.update(**SETTINGS[name])
        cfg = aot.prepare(cfg)
        mesh = aot.meshlib.make_mesh(cfg.mesh, devices)
        comps, loops = parse(aot.compile_train_step(cfg, mesh).as_text())
        # Loops over all blocks, or over all but the last (whose update runs after the loop in training), in
        # iterations of one or more blocks (fam_unroll).
        per_loop = [(body, trip, kernels(comps, body)) for body, trip in loops
                    if trip is not None and trip > 1 and trip != args.layers
                    and (blocks % trip == 0 or (blocks - 1) % trip == 0)]
        counts = "; ".join(f"{sum(c.values())} x {t} ({', '.join(f'{n} {k}' for k, n in c.most_common())})"
                           for _, t, c in per_loop)
        total = sum(sum(c.values()) * t for _, t, c in per_loop) / blocks  # kernels launched per step / blocks
        print(f"  {name:20s} {total:5.1f} kernels per block in {len(per_loop)} loops: {counts}", flush=True)


if __name__ == "__main__":
    main()
