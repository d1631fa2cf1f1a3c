"""Test setup: fake 8 CPU devices before JAX starts, so sharded and unsharded runs can be compared."""

import os

# The suite compiles hundreds of tiny programs: LLVM's optimisation passes buy nothing at these sizes
# and cost about a quarter of the suite's time. Subprocesses get the same flags (`helpers.xla_flags`).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {FAST_COMPILE_FLAGS} --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache: on CPU with faked devices, executables loaded from it deadlock in
# cross-device all-reduces (XLA rendezvous timeout, SIGABRT) on jax 0.10.2.

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
