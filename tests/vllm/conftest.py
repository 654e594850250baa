import os

# One engine at a time, in this process (no engine-core subprocess: starts in seconds, not a minute).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.pop("TRITON_INTERPRET", None)

import pytest

from tokenreduce.testing.tiny_vllm import save_vllm_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """Directory of a saved tiny model of a family (built once per session)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = save_vllm_model(family, tmp_path_factory.mktemp(family))
        return str(cache[family])

    return get
