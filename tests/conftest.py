import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nothing reaches the network in tests: no hub lookups, no telemetry thread (one of those, started by a
# trainer, crashed a test worker inside getaddrinfo on a machine without network).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Tests of the research code import `research` from the checkout (it is not part of the wheel).
sys.path.append(str(Path(__file__).resolve().parents[1]))

import pytest
import torch

# tests/vllm run in their own environment (`make test-vllm`, .venv-vllm); elsewhere vLLM is absent.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm"]

# The tiny test models are fastest on one thread; `make test` runs one pytest worker per core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
