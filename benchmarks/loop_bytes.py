"""Bytes the looped train step moves, estimated kernel by kernel: FAM vs BSWA on one TPU chip.

    python benchmarks/loop_bytes.py                                   # v5p, 1B shape, 18 layers, batch 1 and 4
    python benchmarks/loop_bytes.py --layers=2 --batches=4 --top=15 --calibrate
    python benchmarks/loop_bytes.py --batches=1 --diff=40             # FAM minus BSWA, kernel by kernel

tpu_cost.py takes bytes from XLA's cost analysis of the step with every loop unrolled, because the analysis
counts a loop body once; but XLA fuses an unrolled program differently from the looped one the trainer runs.
This script reads the looped program itself (benchmarks/tpu_cost.py's config, layers in a lax.scan): every
kernel of the compiled step (a fusion, an unfused op, a custom call) moves its operands and its result, times
the trip counts of the loops around it. A fusion operand that is only sliced, directly or inside a nested
fusion, counts its slices; an operand updated in place by a dynamic-update-slice counts nothing and the result
(each result of a multi-output fusion) counts the update, read and written; an asynchronous slice to or from
host memory (model.fam_remat="offload") counts its device side, the update or the slice, once; a buffer the
compiler allocates without writing it (custom call AllocateBuffer) counts nothing. Anything XLA's
cost model sees differently (e.g. a fusion that reads an operand twice) makes it an estimate; `--calibrate`
compares it with XLA's count on the unrolled program.

It also sums the TPU compiler's own time estimate of every kernel (the `estimated_cycles` its cost model writes
into each kernel's backend config, times the loops' trip counts): the closest thing to a step time a program
compiled without a chip offers. Kernels the compiler gives no estimate (scalar bookkeeping, some reshapes and
gathers, transfers to and from host memory, Pallas kernels, which carry their own FLOPs and bytes instead) are
counted apart, so a ratio of two programs is only as good as that coverage.
"""
import argparse
import os
import re
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fam_kernels  # noqa: E402
import tpu_cost  # noqa: E402

from famjax.tools import aot  # noqa: E402

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(pred|bf16|[suf]\d+)\[([\d,]*)\]")
_LAID_OUT = re.compile(r"\b(pred|bf16|[suf]\d+)\[([\d,]+)\](\{[^}]*\})?")  # an array with dims and its layout
_HOST = "S(5)"  # the layout's memory space of host memory (TPU)
_ASYNC_TRANSFERS = ("dynamic-update-slice-start", "dynamic-slice-start")  # the -done halves only wait
_DEF = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")  # name = type opcode(operands...
_NAME = re.compile(r"%[\w.\-]+")
_CALLEE = re.compile(r"calls=%?([\w.\-]+)")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_ALLOCATION = 'custom_call_target="AllocateBuffer"'  # a buffer left uninitialised (a loop's stacked outputs): no work


def _without_layouts(type_text: str) -> str:
    """An HLO type with its layouts ({...}) left out: how kernels of two programs are named alike."""
    return re.sub(r"{[^}]*}", "", type_text)


def device_part_bytes(type_text: str) -> int:
    """Bytes of the arrays of an HLO type that live in device memory (not host memory), scalars left out: what an
    asynchronous slice to or from host memory reads or writes on the device (the update, or the slice)."""
    return sum(nbytes(f"{dtype}[{dims}]") for dtype, dims, layout in _LAID_OUT.findall(type_text)
               if _HOST not in layout)


def nbytes(type_text: str) -> int:
    """Bytes of every array in an HLO type (a tuple counts all its parts)."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dtype, 4)
    return total


class Program:
    """One compiled HLO module: its computations' instructions as (name, type, opcode, operands, line)."""

    def __init__(self, hlo: str):
        self.comps, loops = fam_kernels.parse(hlo)
        self.trips = dict(loops)
        self.entry = re.search(r"^ENTRY %?([\w.\-]+)", hlo, re.M).group(1)
        self.defs = {}
        for comp, instrs in self.comps.items():
            rows = self.defs[comp] = []
            for _, line in instrs:
                m = _DEF.match(line)
                if m:
                    rows.append((m.group(1), m.group(2), m.group(3), _NAME.findall(m.group(4).split("), ")[0]),
                                 line))

    def operand_read(self, fused: str, index: int, full: int) -> int:
        """Bytes a fusion reads of its operand `index`, the computation `fused` seeing it as parameter(index)."""
        rows = self.defs.get(fused, [])
        param = next((n for n, _, op, _, line in rows if op == "parameter" and f"parameter({index})" in line),
                     None)
        users = [r for r in rows if param in r[3]] if param else []
        if not users:
            return full
        total = 0
        for _, type_text, op, operands, line in users:
            if op in ("slice", "dynamic-slice"):
                total += nbytes(type_text)
            elif op == "dynamic-update-slice" and operands[0] == param:
                pass  # the buffer updated in place: the result's count covers the update
            elif op == "fusion":
                callee = _CALLEE.search(line).group(1)
                total += sum(self.operand_read(callee, i, full) for i, o in enumerate(operands) if o == param)
            else:
                return full
        return min(total, full)

    def result_bytes(self, type_text: str, op: str, line: str) -> int:
        """Bytes a kernel writes (a dynamic-update-slice in place: its update, read and written)."""
        callee = _CALLEE.search(line) if op == "fusion" else None
        rows = self.defs.get(callee.group(1), []) if callee else []
        root = next((r for r in rows if r[4].lstrip().startswith("ROOT")), None)
        if not root:
            return nbytes(type_text)
        by_name = {r[0]: r for r in rows}
        outputs = [by_name.get(n) for n in root[3]] if root[2] == "tuple" else [root]  # a multi-output fusion
        total = 0
        for out in outputs:
            if out is None:
                return nbytes(type_text)
            update = by_name.get(out[3][1]) if out[2] == "dynamic-update-slice" else None
            total += 2 * nbytes(update[1]) if update else nbytes(out[1])
        return total

    def kernels(self, comp: str | None = None, times: int = 1):
        """Yields (bytes, type, opcode, op_name, launches, cycles) of every kernel run by `comp` (default: the
        entry), counted `times` x the trip counts of the loops it sits in (launches: that factor; cycles: the
        compiler's estimate, None where it gives none)."""
        comp = comp or self.entry
        types = {r[0]: r[1] for r in self.defs.get(comp, [])}
        for _, type_text, op, operands, line in self.defs.get(comp, []):
            if op == "while":
                body = fam_kernels._WHILE.search(line).group(1)
                yield from self.kernels(body, times * (self.trips.get(body) or 1))
            elif op in ("call", "conditional"):
                for callee in fam_kernels._CALLS.findall(line):
                    yield from self.kernels(callee, times)
            elif op in ("dynamic-update-slice-done", "dynamic-slice-done"):  # waits for its -start
                continue
            elif op not in fam_kernels._FREE and _ALLOCATION not in line:
                if op in _ASYNC_TRANSFERS:  # host offload: the update or slice crosses to or from host memory
                    moved = device_part_bytes(type_text)
                else:
                    callee = _CALLEE.search(line) if op == "fusion" else None
                    moved = self.result_bytes(type_text, op, line) + sum(
                        self.operand_read(callee.group(1), i, nbytes(types.get(o, ""))) if callee
                        else nbytes(types.get(o, "")) for i, o in enumerate(operands))
                meta = re.search(r'op_name="([^"]*)"', line)
                cycles = _CYCLES.search(line)
                yield (moved * times, type_text, op, meta.group(1) if meta else "", times,
                       int(cycles.group(1)) * times if cycles else None)


def differences(rows, base):
    """[((op_name, type without layouts, opcode), (bytes, cycles))] of `rows` minus `base` (Program.kernels rows),
    summed over the kernels that share op name, type and opcode, largest difference in bytes first."""
    def grouped(rows):
        out = {}
        for moved, type_text, op, name, _, cost in rows:
            key = (re.sub(r"^jit\(\w+\)/", "", name), _without_layouts(type_text), op)
            b, c = out.get(key, (0, 0))
            out[key] = (b + moved, c + (cost or 0))
        return out
    a, b = grouped(rows), grouped(base)
    diff = {k: (a.get(k, (0, 0))[0] - b.get(k, (0, 0))[0], a.get(k, (0, 0))[1] - b.get(k, (0, 0))[1])
            for k in a.keys() | b.keys()}
    return sorted(diff.items(), key=lambda kv: -abs(kv[1][0]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="v5p:1x1x1")
    p.add_argument("--batches", default="1,4", help="per-device batch sizes")
    p.add_argument("--modes", default="fam,bswa", help="attention modes (bswa is the ratios' base)")
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--seq_len", type=int, default=8192)
    p.add_argument("--model", default="", help="ModelConfig overrides, e.g. fam_deferred_grads=False")
    p.add_argument("--top", type=int, default=0, help="also list the largest kernels of each program")
    p.add_argument("--diff", type=int, default=0,
                   help="also list the largest differences from BSWA's program, kernels matched by op and shape")
    p.add_argument("--calibrate", action="store_true",
                   help="also estimate the unrolled program and compare with XLA's count (slow)")
    args = p.parse_args()
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_compilation_cache", False)
    devices = aot.topology_devices(args.topology)
    overrides = tpu_cost.model_overrides(args.model)
    print(f"{devices[0].device_kind}: {args.layers} layers, {args.seq_len} tokens per row; estimated bytes and "
          "cycles of the looped train step")
    for batch in (int(b) for b in args.batches.split(",")):
        totals, cycles, programs = {}, {}, {}
        for mode in args.modes.split(","):
            cfg = aot.prepare(tpu_cost.config(mode, batch, args.layers, args.seq_len, model=overrides))
            mesh = aot.meshlib.make_mesh(cfg.mesh, devices[:1])
            rows = sorted(Program(aot.compile_train_step(cfg, mesh).as_text()).kernels(), key=lambda r: -r[0])
            totals[mode], programs[mode] = sum(r[0] for r in rows), rows
            cycles[mode] = sum(r[5] for r in rows if r[5] is not None)
            host = sum(r[0] for r in rows if r[2] in _ASYNC_TRANSFERS)
            unestimated = [r for r in rows if r[5] is None and r[0] >= 1 << 20]  # scalar bookkeeping left out
            line = (f"  batch {batch} {mode:5s} {totals[mode] / 1e9:8.1f} GB in {len(rows)} kernels, "
                    f"{sum(r[4] for r in rows)} launches" + (f" ({host / 1e9:.1f} GB of them to and from host "
                                                              "memory)" if host else "")
                    + f"; compiler's estimate {cycles[mode] / 1e6:.1f} M cycles ({len(unestimated)} kernels moving "
                    f"{sum(r[0] for r in unestimated) / 1e9:.1f} GB without one)")
            if args.calibrate:
                cfg = aot.prepare(tpu_cost.config(mode, batch, args.layers, args.seq_len, scan_layers=False,
                                                  model=overrides))
                with tpu_cost.unrolled_scans():
                    compiled = aot.compile_train_step(cfg, mesh)
                estimate = sum(r[0] for r in Program(compiled.as_text()).kernels())
                xla = aot.program_report(compiled, 1 << 50)["bytes_accessed"]
                line += f"; unrolled: estimate {estimate / 1e9:.1f} GB, XLA {xla / 1e9:.1f} GB"
            print(line, flush=True)
            for r in rows[:args.top]:
                cost = "-" if r[5] is None else f"{r[5] / 1e3:.0f}"
                print(f"      {r[0] / 1e6:9.1f} MB {cost:>9s} k cycles  {r[2]:10s} "
                      f"{_without_layouts(r[1])[:70]:70s} {r[3][-60:]}")
        for mode in totals:
            if mode != "bswa" and "bswa" in totals:
                print(f"  batch {batch} {mode} / bswa: bytes {totals[mode] / totals['bswa']:.3f}x, estimated "
                      f"cycles {cycles[mode] / cycles['bswa']:.3f}x")
                for (name, kind, op), (moved, cost) in differences(programs[mode], programs["bswa"])[:args.diff]:
                    print(f"      {moved / 1e9:+8.2f} GB {cost / 1e6:+8.2f} M cycles  {op:10s} {kind[:60]:60s} "
                          f"{name[-60:]}")


if __name__ == "__main__":
    main()
