"""Ahead-of-time TPU compile of a config's train step and decode step on any machine: memory and cost per chip.

    python -m famjax.tools.aot --config=configs/paper_1b.py --topology=v5p:2x4x4 [--config.x=y ...]
        [--decode_batch=N] [--hbm_gib=G] [--json=report.json]

libtpu (`pip install famjax[tpu]`) compiles for a topology description without TPUs
(jax.experimental.topologies). The config is resolved and validated as the trainer does, its mesh is built
over the topology's devices, and the programs are the trainer's own: famjax.train.step.make_train_step jitted
with the train state's shardings, the batch sharded on rows and the state donated, inside the activation
rules; and one decoded token (model call with a state, greedy pick) for a small batch. XLA's buffer
assignment of those programs is what the job would get on the chips, not a model of it.
Exit status: 0 every program fits in HBM; 1 one does not (one line on stderr); 2 bad input (one line).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

import famjax.data as fd
from famjax.cli import flag_error
from famjax.data.config import resolve_batching
from famjax.errors import FamjaxError
from famjax.model.decoder import target_platform
from famjax.train import mesh as meshlib
from famjax.train.config import resolve, validate
from famjax.train.optim import make_optimizer
from famjax.train.state import abstract_model, abstract_train_state, stream_logical_spec
from famjax.train.step import make_train_step

GIB = 1 << 30
# HBM of one device, by the device_kind libtpu reports (v4 is compiled as megacore: one device per chip).
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32, "TPU v6e": 32}
_TOPOLOGY = re.compile(r"^([A-Za-z0-9_]+):(\d+(?:x\d+)*)$")
_PROG = "famjax.tools.aot"


class UserError(FamjaxError, ValueError):
    """Bad input (topology, config, libtpu missing): reported in one line, exit status 2."""


def _one_line(e: BaseException) -> str:
    text = str(e).split("=== Source Location Trace")[0]
    return " ".join(text.replace("INVALID_ARGUMENT: ", "").replace("invalid config:\n", "invalid config: ")
                    .replace("\n", "; ").split())


def topology_devices(name: str) -> list:
    """Returns the compile-only devices of a TPU topology ("v5e:2x2", "v5p:2x4x4", "v6e:4x4", "v4:2x2x1").

    A slice smaller than one host (e.g. "v5p:1x1x1", one chip) gets host bounds of its own size.
    """
    m = _TOPOLOGY.match(name or "")
    if not m:
        raise UserError(f"--topology must be <chip>:<dims> like v5p:2x2x2 or v5e:2x2, got {name!r}")
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise UserError("libtpu is not installed: pip install famjax[tpu] (or pip install libtpu)")
    # libtpu looks for the TPU VM it runs on; on another machine these keep it from warning and querying, and
    # compiling touches no chip, so several processes may load it (it holds a lock file otherwise).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    dims = [int(d) for d in m.group(2).split("x")]
    kwargs = {"chip_config_name": "megacore"} if m.group(1) == "v4" else {}
    try:
        try:
            return list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)
        except Exception as e:  # noqa: BLE001  # libtpu raises JaxRuntimeError; retried for sub-host slices
            if "chips_per_host_bounds" not in str(e) or math.prod(dims) >= 4:
                raise
            bounds = (dims + [1, 1, 1])[:3]
            return list(topologies.get_topology_desc(name, "tpu", chips_per_host_bounds=bounds, **kwargs).devices)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--topology {name!r}: {_one_line(e)}") from None


def prepare(cfg):
    """Returns the config resolved and validated as the trainer does (UserError on a bad field)."""
    try:
        cfg = resolve(cfg)
        validate(cfg)
    except (ValueError, TypeError) as e:
        raise UserError(_one_line(e)) from None
    return cfg


def batching(cfg) -> str:
    """Returns how the trainer's data iterator batches this config, 'packed' or 'stream' (no data read)."""
    d = cfg.data
    if d.dataset == "passkey":
        default = "stream" if int(d.passkey.get("chain", 1)) > 1 else "packed"
    else:
        default = fd.CATALOG[d.dataset].batching if d.dataset in fd.CATALOG else "stream"
    return resolve_batching(d, default)


def _sharded(shape, dtype, mesh, spec: PartitionSpec) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def abstract_batch(cfg, mesh, how: str) -> dict:
    """Returns the global train batch as sharded ShapeDtypeStructs (rows on "batch", as meshlib.global_batch):
    tokens, targets int32 [b, T]; loss_mask float32 [b, T]; segment_start bool [b, T] (packed) or [b] (stream)."""
    b, t = int(cfg.data.batch_size), int(cfg.data.seq_len)
    shapes = {"tokens": ((b, t), jnp.int32), "targets": ((b, t), jnp.int32), "loss_mask": ((b, t), jnp.float32),
              "segment_start": ((b,) if how == "stream" else (b, t), jnp.bool_)}
    return {k: _sharded(s, dt, mesh, meshlib.batch_spec(len(s), cfg.mesh.rules, mesh, 0, s))
            for k, (s, dt) in shapes.items()}


def compile_train_step(cfg, mesh):
    """Returns the compiled train step of a prepared config on `mesh`, jitted as famjax.train.loop does."""
    how = batching(cfg)
    mode = cfg.train.stream_state
    streaming = mode == "on" or (mode == "auto" and how == "stream")
    tx = make_optimizer(cfg.train)
    state, shardings = abstract_train_state(cfg, tx, mesh, stream=streaming)
    graphdef, _, _ = abstract_model(cfg)
    batch = abstract_batch(cfg, mesh, how)
    step = jax.jit(make_train_step(cfg, graphdef, tx, streaming=streaming),
                   in_shardings=(shardings, {k: v.sharding for k, v in batch.items()}),
                   out_shardings=(shardings, meshlib.replicated(mesh)), donate_argnums=0)
    with meshlib.activation_rules(mesh, cfg.mesh.rules), target_platform(_platform_of(mesh)):
        return step.lower(state, batch).compile()


def batch_devices(cfg, mesh) -> int:
    """Returns how many ways the mesh splits the batch (rows) axis."""
    axes = meshlib.batch_spec(1, cfg.mesh.rules, mesh)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def compile_decode_step(cfg, mesh, rows: int):
    """Returns the compiled decode step: one token per row [rows, 1] through the model with its state (donated),
    the greedy next token out; parameters placed by the mesh rules, state rows on "batch"."""
    rules = cfg.mesh.rules
    graphdef, params, specs = abstract_model(cfg)
    param_sh = meshlib.tree_shardings(specs, params, rules, mesh)
    state = jax.eval_shape(
        lambda p: nnx.merge(graphdef, p).init_state(rows).replace(aligned=False, fresh=False), params)
    state_sh = meshlib.tree_shardings(stream_logical_spec(state), state, rules, mesh)
    token_sh = NamedSharding(mesh, meshlib.batch_spec(2, rules, mesh, 0, (rows, 1)))
    out_sh = NamedSharding(mesh, meshlib.batch_spec(1, rules, mesh, 0, (rows,)))

    def decode(params, state, token):
        logits, state = nnx.merge(graphdef, params)(token, state)
        # full attention reports an aligned state; keep the structure the next step reads (famjax.infer)
        return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), state.replace(aligned=False, fresh=False)

    step = jax.jit(decode, in_shardings=(param_sh, state_sh, token_sh), out_shardings=(out_sh, state_sh),
                   donate_argnums=1)
    with meshlib.activation_rules(mesh, rules), target_platform(_platform_of(mesh)):
        return step.lower(params, state, jax.ShapeDtypeStruct((rows, 1), jnp.int32)).compile()


def _platform_of(mesh) -> str:
    """The platform of the mesh's devices ("tpu" for a topology's devices): the kernels the model picks."""
    return mesh.devices.flat[0].platform


def program_report(compiled, hbm: int) -> dict:
    """Returns per-device memory (bytes) and cost of a compiled program, and whether it fits in `hbm` bytes.

    peak = arguments + outputs - aliased (donated) + temporaries + generated code, or XLA's own peak if larger.
    flops, bytes_accessed: XLA's cost analysis, which counts the body of a loop (lax.scan) once.
    """
    m = compiled.memory_analysis()
    out = {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
           "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
           "code_bytes": m.generated_code_size_in_bytes}
    total = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"] + out["code_bytes"]
    out["peak_bytes"] = max(total, int(getattr(m, "peak_memory_in_bytes", 0) or 0))
    out["host_temp_bytes"] = int(getattr(m, "host_temp_size_in_bytes", 0) or 0)  # e.g. offloaded residuals
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    out["flops"] = float(cost.get("flops", float("nan")))
    out["bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
    out["margin_bytes"] = hbm - out["peak_bytes"]
    out["fits"] = out["margin_bytes"] >= 0
    return out


def try_compile(build, hbm: int) -> dict:
    """Returns program_report(build(), hbm), or, when the TPU compiler refuses the program for want of HBM,
    {"fits": False, "error": its message} with the bytes it says it needs at least and can use, if it says."""
    try:
        return program_report(build(), hbm)
    except Exception as e:  # noqa: BLE001  # XlaRuntimeError RESOURCE_EXHAUSTED; anything else is re-raised
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        out = {"fits": False, "error": _one_line(e)}
    sizes = re.findall(r"\(([\d.]+)([KMGT])\)", out["error"])  # "temporaries (26.19G) exceeds ... HBM (15.75G)"
    if len(sizes) >= 2:
        scale = {"K": 1 << 10, "M": 1 << 20, "G": GIB, "T": 1 << 40}
        out["needs_at_least_bytes"], out["available_bytes"] = (int(float(v) * scale[u]) for v, u in sizes[:2])
    return out


def compile_for_topology(cfg, topology: str, *, decode_batch: int = 0, hbm_gib: float = 0.0) -> dict:
    """Returns the report of a config's train step and decode step compiled for a TPU topology.

    decode_batch: rows of the decode step (0: one per device of the batch axis); hbm_gib: HBM per device
    (0: from HBM_GIB by the device kind). Raises UserError on bad input.
    """
    devices = topology_devices(topology)
    kind = devices[0].device_kind
    if not hbm_gib and kind not in HBM_GIB:
        raise UserError(f"unknown HBM size of {kind!r}: pass --hbm_gib")
    hbm = int((hbm_gib or HBM_GIB[kind]) * GIB)
    cfg = prepare(cfg)
    try:
        mesh = meshlib.make_mesh(cfg.mesh, devices)
    except ValueError as e:
        raise UserError(f"{_one_line(e)} of topology {topology}") from None
    rows = int(decode_batch) or batch_devices(cfg, mesh)
    report = {"topology": topology, "device_kind": kind, "devices": len(devices), "hbm_bytes": hbm,
              "mesh": {k: int(v) for k, v in mesh.shape.items()}, "programs": {}}
    for name, shape, build in (
            ("train_step", [int(cfg.data.batch_size), int(cfg.data.seq_len)], lambda: compile_train_step(cfg, mesh)),
            ("decode_step", [rows, 1], lambda: compile_decode_step(cfg, mesh, rows))):
        report["programs"][name] = {"batch": shape, **try_compile(build, hbm)}
    report["fits"] = all(p["fits"] for p in report["programs"].values())
    return report


def format_report(report: dict) -> str:
    """Returns the report as a small table (GiB per device)."""
    mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
    lines = [f"{report['devices']} x {report['device_kind']} ({report['topology']}), mesh {mesh}, "
             f"HBM {report['hbm_bytes'] / GIB:.1f} GiB per device",
             f"{'per device (GiB)':<24}" + "".join(f"{h:>9}" for h in ("args", "outputs", "temps", "code",
                                                                       "peak", "margin"))
             + f"{'fits':>6}{'TFLOP':>10}{'GB accessed':>13}"]
    for name, p in report["programs"].items():
        label = f"{name} [{p['batch'][0]}x{p['batch'][1]}]"
        if "error" in p:
            lines.append(f"{label:<24}does not fit: {p['error']}")
            continue
        gib = [p[k] / GIB for k in ("argument_bytes", "output_bytes", "temp_bytes", "code_bytes", "peak_bytes",
                                     "margin_bytes")]
        lines.append(f"{label:<24}" + "".join(f"{v:>9.3f}" for v in gib)
                     + f"{'yes' if p['fits'] else 'NO':>6}{p['flops'] / 1e12:>10.3f}{p['bytes_accessed'] / 1e9:>13.2f}")
        if p.get("host_temp_bytes"):
            lines.append(f"{'':<24}and {p['host_temp_bytes'] / GIB:.3f} GiB of host memory per device (offloaded)")
    lines.append("peak = arguments + outputs - donated + temps + code (or XLA's peak if larger); margin = HBM - peak;\n"
                 "FLOPs, bytes accessed: XLA's count per device, a loop body once (one scanned layer, one FAM block, "
                 "one accumulation step)")
    return "\n".join(lines)


def not_fitting(report: dict) -> str | None:
    """Returns one line naming the first program that does not fit and by how much (None if all fit)."""
    for name, p in report["programs"].items():
        if not p["fits"]:
            if "needs_at_least_bytes" in p:
                need, have = p["needs_at_least_bytes"] / GIB, p["available_bytes"] / GIB
                return (f"{name} does not fit on {report['device_kind']} ({report['topology']}): the TPU compiler "
                        f"needs at least {need:.2f} GiB per device, {have:.2f} GiB available, "
                        f"{need - have:.2f} GiB over")
            if "error" in p:
                return f"{name} does not fit on {report['device_kind']} ({report['topology']}): {p['error']}"
            return (f"{name} does not fit on {report['device_kind']} ({report['topology']}): needs "
                    f"{p['peak_bytes'] / GIB:.2f} GiB per device of {report['hbm_bytes'] / GIB:.1f} GiB HBM, "
                    f"{-p['margin_bytes'] / GIB:.2f} GiB over")
    return None


def main(argv=None) -> int:
    """Runs the command line; returns the exit status (0 fits, 1 does not fit, 2 bad input)."""
    argv = list(sys.argv if argv is None else argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "training config file (get_config()), as famjax.main",
                                    flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2, v5p:2x2x2, v5p:2x4x4, v6e:4x4",
                        flag_values=fv)
    flags.DEFINE_integer("decode_batch", 0, "rows of the decode step (0: one per device of the batch axis)",
                         flag_values=fv)
    flags.DEFINE_float("hbm_gib", 0.0, "HBM per device in GiB (0: the chip's, from HBM_GIB)", flag_values=fv)
    flags.DEFINE_string("json", None, "also write the report (bytes, FLOPs) to this JSON file", flag_values=fv)
    try:
        try:
            fv(argv)
            if fv.config is None or not fv.topology:
                raise UserError("--config and --topology are required")
            fv.config.keys()  # a config file that failed to load raises here
        except (AttributeError, KeyError, OSError, TypeError) as e:  # an unknown field, a file that does not load
            raise UserError(flag_error(e, argv)) from None
        report = compile_for_topology(fv.config, fv.topology, decode_batch=fv.decode_batch, hbm_gib=fv.hbm_gib)
    except (UserError, flags.Error) as e:
        print(f"{_PROG}: {_one_line(e)}", file=sys.stderr)
        return 2
    print(format_report(report))
    if fv.json:
        try:
            with open(fv.json, "w") as f:
                json.dump(report, f, indent=2)
        except OSError as e:
            print(f"{_PROG}: --json {fv.json}: {e.strerror}", file=sys.stderr)
            return 2
    line = not_fitting(report)
    if line:
        print(f"{_PROG}: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Nothing runs on this machine's own devices (on a TPU VM they may be training); the persistent cache
    # would store compile-only TPU programs that it cannot load back.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_compilation_cache", False)
    sys.exit(main())
