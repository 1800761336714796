"""Fixtures of the genserver tests: a session-scoped server on the tiny model and the model itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from .procs import GenServer


@pytest.fixture(scope="session")
def genserver(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenServer]:
    """One server for the tests that do not change weights (they may pause/abort, and always continue)."""
    srv = GenServer(tiny_model_dir, tmp_path_factory.mktemp("genserver") / "server.log", "--dist-timeout-s", "10")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def teacher_forced_logprobs(model: torch.nn.Module, prompt: list[int], output: list[int], temperature: float) -> torch.Tensor:
    """What the trainer recomputes: log_softmax(logits / T) of the sampled tokens, one forward, no cache."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(output)[:, None])[:, 0]
