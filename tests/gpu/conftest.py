"""tests/gpu: the GPU suite that `bash benchmarks/gpu/run_all.sh` runs on a lent GPU machine.

Nothing here skips anything: each GPU test file skips itself when CUDA is absent
(`pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), ...)`), and test_benchmarks_smoke.py runs on
every machine (it keeps the benchmark scripts from rotting on CPU CI). The header names the device.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_report_header(config: pytest.Config) -> str:
    if torch.cuda.is_available():
        return f"tests/gpu: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"tests/gpu: no CUDA (torch {torch.__version__}): GPU tests skip, the benchmark smoke test runs on CPU"
