"""With libtpu installed (the tests and aot extras), a plain CPU run prints no libtpu noise.

libtpu loads with every JAX process; on a host with no TPU chip it complains about its unset
accelerator type and worker hostnames unless `hilora_jax` gives it quiet defaults at import.
The check runs in a fresh subprocess without the suite's `JAX_PLATFORMS=cpu` and TPU variables.
"""

import importlib.util
import os
import subprocess
import sys


def _clean_env():
    return {k: v for k, v in os.environ.items()
            if k != "JAX_PLATFORMS" and not k.startswith(("TPU_", "ALLOW_MULTIPLE_LIBTPU"))}


def test_libtpu_is_installed_for_the_aot_tests():
    assert importlib.util.find_spec("libtpu") is not None, "the tests extra installs jax[tpu]"


def test_importing_hilora_jax_keeps_libtpu_quiet_on_a_cpu_host():
    code = "import hilora_jax, jax; print(jax.numpy.ones(3).sum())"
    p = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "3.0"
    assert "TPU" not in p.stderr and "libtpu" not in p.stderr, p.stderr
    # the control: without hilora_jax's defaults, libtpu does print (so the check can fail)
    q = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.ones(3).sum())"],
                       env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert q.returncode == 0 and "TPU" in q.stderr, q.stderr
