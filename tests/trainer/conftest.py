"""Fixtures of the trainer tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def megatron_world1() -> Iterator[None]:
    """megatron's parallel state for world size 1 in this process, for one test module at a time."""
    from asyncgrpo.trainer.model import destroy_parallel, init_parallel

    from trainer.workers import intra_op_threads

    torch.set_num_threads(intra_op_threads())  # 1 unless ASYNCGRPO_TEST_THREADS says otherwise
    init_parallel(1, seed=0)
    yield
    destroy_parallel()


@pytest.fixture(scope="session")
def llama_untied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama checkpoint with a separate lm_head: the other mapping family next to the tied Qwen2."""
    from asyncgrpo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), preset="tiny", arch="llama", seed=3, tie_word_embeddings=False)
