"""Test set-up for tests/ and experiments/: 8 fake CPU devices and float32 matmuls, fixed before jax is imported.

It lives at the repository root so that every collected test directory gets it, whichever pytest collects
first (tests/conftest.py holds nothing more).
"""
import os

# 8 fake CPU devices share 2 cores in CI. XLA's concurrency-optimised CPU scheduler let two devices enter
# different collectives first and deadlock (seen in the (2, 2, 2) mesh test); the default scheduler keeps
# every device on one order. Collectives may wait for starved threads a while, but never hang CI for long.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_enable_concurrency_optimized_scheduler=false "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=300 "
                      "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
