"""Test configuration: 8 fake CPU devices (set before jax is imported), fp32 matmuls, offline."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval's datasets: local files only
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libtpu (installed for `hilora aot`) must not initialise a TPU backend or query a cloud metadata
# server in tests; tests/test_aot.py compiles for TPU topologies through it explicitly.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _check_devices():
    assert len(jax.devices()) == 8, "tests expect 8 fake CPU devices (XLA_FLAGS set too late?)"
