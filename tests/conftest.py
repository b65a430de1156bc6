"""Test set-up: 8 fake CPU devices and float32 matmuls, fixed before jax is imported."""
import os

# 8 fake CPU devices share 2 cores in CI: give collectives time to rendezvous instead of aborting after 40 s.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                      "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
