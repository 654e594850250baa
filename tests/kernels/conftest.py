import warnings

import pytest

from tests.kernels.helpers import kernel_device


@pytest.fixture
def device() -> str:
    """Device the Triton path runs on in this session (CPU under the interpreter)."""
    return kernel_device()


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    # The interpreter evaluates masked-out lanes with numpy too (e.g. exp(-inf - -inf)); its
    # RuntimeWarnings about those discarded values are noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        yield
