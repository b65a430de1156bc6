"""Test set-up for tests/ and experiments/: 8 fake CPU devices, float32 matmuls and one XLA compilation cache,
fixed before jax is imported.

It lives at the repository root so that every collected test directory gets it, whichever pytest collects
first (tests/conftest.py holds nothing more).
"""
import atexit
import os
import shutil
import tempfile

# 8 fake CPU devices share 2 cores in CI. XLA's concurrency-optimised CPU scheduler let two devices enter
# different collectives first and deadlock (seen in the (2, 2, 2) mesh test); the default scheduler keeps
# every device on one order. Collectives may wait for starved threads a while, but never hang CI for long.
#
# The suite is compile-bound (small shapes, many programs): LLVM's optimisation of the generated CPU code is most of
# a compile and buys little at test sizes, so it is turned off (measured on two test files: a third less time).
# XLA's older CPU fusion emitter compiles faster than its MLIR fusion emitters (the default): the whole suite took
# 748 s instead of 1223 s, 22 instead of 37 CPU minutes (docs/design.md).
# These flags change how fast the code runs, not what it computes (no fast-math either way). Subprocesses that
# tests start inherit them; those that need one device append --xla_force_host_platform_device_count=1 (the last
# occurrence of a flag wins).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_enable_concurrency_optimized_scheduler=false "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=300 "
                      "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _temporary_dir_unless_set(variable: str, prefix: str) -> None:
    """Points environment variable `variable`, unless already set, at a new temporary directory removed at exit
    (by the process that made it: the xdist controller, whose workers and subprocesses inherit the variable)."""
    if variable not in os.environ:
        path = tempfile.mkdtemp(prefix=prefix)
        os.environ[variable] = path
        atexit.register(shutil.rmtree, path, ignore_errors=True)


# Compiling is most of the suite's time on CPU, and the suite compiles the same small programs many times: in
# several tests, in both pytest workers (they inherit this environment from the xdist controller, which loads
# this file first) and in the `python -m famjax.main` / notebook subprocesses that tests start. One persistent
# compilation cache per run lets each program compile once. It starts empty, so a run reuses nothing from an
# earlier one; set JAX_COMPILATION_CACHE_DIR to keep a cache between runs.
_temporary_dir_unless_set("JAX_COMPILATION_CACHE_DIR", "famjax_tests_xla_cache_")
# libtpu (the TPU compile checks) writes a few log files per process that compiles for a TPU topology, by default
# into /tmp/tpu_logs; the suite's go to a temporary directory removed at exit.
_temporary_dir_unless_set("TPU_LOG_DIR", "famjax_tests_tpu_logs_")
# Programs that compile in under half a second (most of the suite's, mostly single ops that tests run eagerly) are
# not written: JAX's cache lists and reads its whole directory under the lock on every write, so each entry makes
# every later write slower (60 ms a write at 1000 entries on the 2-core machine under load); such programs cost less
# to compile again (docs/design.md).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A size limit turns on the cache's file lock: workers and subprocesses read and write entries concurrently.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(items):
    """Test files with a slow case run first (each file's tests stay together and in order): the two workers
    then end on short tests instead of one idling while the other runs a minute-long case."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


# A test that kills its pytest-xdist worker is run again on a fresh worker, up to twice. XLA has crashed (SIGABRT
# about one suite run in 15 until 2026-11-30; a segmentation fault in each of six runs on 2026-12-01, five times in
# the same test) in executable.serialize() while JAX wrote a compilation-cache entry of a test that passed on its
# rerun: a flake, not a failing test. A test that crashes three times still fails the run; a rerun is named in the
# summary.
CRASH_RERUNS = 2
_crashes: dict = {}


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: absent when xdist is not loaded
def pytest_handlecrashitem(crashitem, report, sched):
    _crashes[crashitem] = _crashes.get(crashitem, 0) + 1
    if _crashes[crashitem] <= CRASH_RERUNS:
        sched.mark_test_pending(crashitem)
        report.outcome = "rerun"


def pytest_report_teststatus(report):
    if report.outcome == "rerun":
        return "rerun", "R", ("RERUN", {"yellow": True})


def pytest_terminal_summary(terminalreporter):
    for rep in terminalreporter.stats.get("rerun", []):
        terminalreporter.write_line(f"RERUN {rep.nodeid}: its worker crashed; the test ran again on a new worker",
                                    yellow=True)
