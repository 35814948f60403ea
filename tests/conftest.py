"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""
import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")
# The suite trains the same tiny configs many times (resume, restart, eval CLI, ...): a
# persistent compilation cache shared by the xdist workers compiles each step once.
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "VLMJAX_TEST_JIT_CACHE", os.path.join(tempfile.gettempdir(), "vlmjax_test_jit_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
assert jax.device_count() == 8, f"expected 8 simulated CPU devices, got {jax.devices()}"
