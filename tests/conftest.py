"""Every test sees 8 fake CPU devices, so mesh code runs exactly as on a pod slice."""
import os

# Must happen before jax is imported anywhere in the test process.
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Tests compare against numpy / single-device references; keep matmuls exact.
jax.config.update("jax_default_matmul_precision", "highest")
