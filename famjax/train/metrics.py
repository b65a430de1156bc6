"""Observability: one console line per N steps, TensorBoard scalars (process 0 only), model FLOPs and MFU."""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from famjax import paths
from famjax.model import ModelConfig

TB_DIR = "tensorboard"
METRICS_FILE = "metrics.jsonl"

_LOG = logging.getLogger(__name__)


class Writer:
    """TensorBoard scalars under <workdir>/tensorboard via tensorboardX, and <workdir>/metrics.jsonl; a no-op on
    processes other than 0.

    A remote workdir (gs://...) gets both through a famjax.paths.Mirror: written to a local folder and copied to
    the workdir at most every SYNC_EVERY_S seconds and at close (object stores cannot append).
    """

    SYNC_EVERY_S = 30.0

    def __init__(self, workdir: str):
        run = paths.resolve(workdir)
        self.logdir = str(run / TB_DIR)
        self._tb = self._mirror = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            local = str(run)
            if paths.is_remote(run):
                self._mirror = paths.Mirror(run, every_s=self.SYNC_EVERY_S, fetch=(METRICS_FILE,))
                local = self._mirror.local
            self._jsonl = os.path.join(local, METRICS_FILE)
            self._tb = SummaryWriter(os.path.join(local, TB_DIR))

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        if self._tb is None:
            return
        for k, v in values.items():
            self._tb.add_scalar(f"{prefix}{k}", float(v), step)
        self._tb.flush()
        self._sync()

    def jsonl(self, step: int, values: dict) -> None:
        """Appends {"step", **values} to <workdir>/metrics.jsonl (a plain record tests and scripts can read)."""
        if self._tb is None:
            return
        with open(self._jsonl, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
        self._sync()

    def _sync(self) -> None:
        if self._mirror is not None:
            self._mirror.sync()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._mirror is not None:
            self._mirror.close()


def flops_per_token(mcfg: ModelConfig, seq_len: int) -> float:
    """Returns training FLOPs per token (forward + backward = 3x forward) of the model's matmuls.

    Per layer: projections and FFN (2 FLOPs per weight), attention scores and values over the average
    context (half the own block, m memory blocks, F FAM rows), and the FAM update (F rows per B tokens run
    through the layer again). Plus the LM head. Embedding lookups are free.
    """
    d, h, kv, hd, f = mcfg.d_model, mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim, mcfg.mlp_dim
    gates = 3 if mcfg.mlp_activation in ("swiglu", "geglu") else 2
    layer_weights = d * hd * (2 * h + 2 * kv) + gates * d * f
    if mcfg.attention == "full":
        context = seq_len / 2
    else:
        context = mcfg.block_size / 2 + mcfg.memory_blocks * mcfg.block_size + mcfg.num_fam
    per_layer = 2 * layer_weights + 4 * h * hd * context
    fam_factor = 1 + (mcfg.num_fam / mcfg.block_size if mcfg.attention == "fam" else 0)
    forward = mcfg.num_layers * per_layer * fam_factor + 2 * d * mcfg.vocab_size
    return 3.0 * forward


def measure_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """Returns FLOP/s of a float32 n x n matmul on the first device (a stand-in peak for MFU on CPU)."""
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        y = f(x)
    y.block_until_ready()
    return 2 * n ** 3 * repeats / max(time.perf_counter() - t, 1e-9)


def job_peak_flops(train_cfg) -> float:
    """Returns the job's peak FLOP/s: train.peak_flops, or one measured matmul x devices (x hosts on CPU,
    where host devices share the same cores)."""
    if float(train_cfg.peak_flops) > 0:
        return float(train_cfg.peak_flops)
    per = measure_peak_flops()
    units = jax.process_count() if jax.default_backend() == "cpu" else jax.device_count()
    return per * units


class Throughput:
    """Tokens/s and MFU between two console lines."""

    def __init__(self, flops_per_tok: float, peak: float):
        self.flops_per_tok, self.peak = flops_per_tok, peak
        self.reset()

    def reset(self) -> None:
        self._t, self._tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def rates(self) -> dict:
        dt = max(time.perf_counter() - self._t, 1e-9)
        tps = self._tokens / dt
        return {"tokens_per_s": tps, "mfu": tps * self.flops_per_tok / max(self.peak, 1e-9)}


def console_line(step: int, steps: int, m: dict) -> str:
    """Returns the one-line progress summary of a step."""
    return (f"step {step}/{steps}  loss {m['loss']:.4f}  acc {m['accuracy']:.3f}  "
            f"tok/s {m.get('tokens_per_s', 0):,.0f}  MFU {100 * m.get('mfu', 0):.1f}%  lr {m['lr']:.2e}  "
            f"gnorm {m['grad_norm']:.3f}  fam_norm {m['fam_norm']:.3f}")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


_BAR = None  # the active progress bar: log() writes above it


class Progress:
    """A run's progress on process 0: on a terminal a tqdm bar (steps, ETA, loss, tokens/s, MFU) below the log
    lines; elsewhere (log files, CI, notebooks' captured output) the plain console lines, each with the ETA
    (counted from the first step after compiling)."""

    def __init__(self, start: int, steps: int, *, stream=None):
        global _BAR
        self.start, self.steps = start, steps
        self._t0 = self._s0 = None
        self.bar = None
        stream = stream if stream is not None else sys.stdout
        if jax.process_index() == 0 and getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm
            self.bar = _BAR = tqdm(total=steps, initial=start, file=stream, unit="step", dynamic_ncols=True,
                                   smoothing=0.1)

    def step(self, step: int) -> None:
        """Called after each step."""
        if self._t0 is None:  # the first step includes the compile
            self._t0, self._s0 = time.perf_counter(), step
        if self.bar is not None:
            self.bar.update(1)

    def eta(self, step: int) -> float | None:
        if self._t0 is None or step <= self._s0:
            return None
        rate = (step - self._s0) / max(time.perf_counter() - self._t0, 1e-9)
        return (self.steps - step) / rate

    def report(self, step: int, m: dict) -> None:
        """The metrics of a logged step: the bar's postfix on a terminal, else a console line with the ETA."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {m['loss']:.4f} tok/s {m.get('tokens_per_s', 0):,.0f} "
                                     f"MFU {100 * m.get('mfu', 0):.1f}%", refresh=False)
            log(console_line(step, self.steps, m))  # above the bar, which shows the ETA
            return
        eta = self.eta(step)
        log(console_line(step, self.steps, m) + (f"  eta {_duration(eta)}" if eta is not None and step < self.steps
                                                  else ""))

    def close(self) -> None:
        global _BAR
        if self.bar is not None:
            self.bar.close()
            _BAR = self.bar = None


def log(msg: str) -> None:
    """Prints on process 0 (above the progress bar if one is shown) and logs on every process."""
    _LOG.info(msg)
    if jax.process_index() == 0:
        if _BAR is not None:
            _BAR.write(msg, file=_BAR.fp)
        else:
            print(msg, flush=True)


def finite(values: dict) -> bool:
    return all(np.isfinite(float(v)) for v in values.values())
