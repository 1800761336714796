"""TP=1, TP=2 and DP=2 (gloo, spawned processes) give HF's logits and the same training step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from service_procs import free_port
from trainer.workers import step_worker

pytestmark = pytest.mark.slow

# (world size, TP, micro-batch size): DP = world / TP. Micro-batch sizes differ on purpose: the step must
# not depend on them.
CONFIGS = {"tp1": (1, 1, 3), "tp2": (2, 2, 8), "dp2": (2, 1, 2)}


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("parallel_runs")
    results = {}
    for name, (world, tp, mbs) in CONFIGS.items():
        path = out / f"{name}.pt"
        mp.spawn(step_worker, args=(world, tp, mbs, free_port(), str(tiny_model_dir), str(path)), nprocs=world, join=True)
        results[name] = torch.load(path, weights_only=False)
    return results


@pytest.mark.parametrize("name", ["tp1", "tp2", "dp2"])
def test_logits_match_hf(runs: dict, name: str) -> None:
    assert runs[name]["logit_diff"] < 1e-5


@pytest.mark.parametrize("name", ["tp1", "tp2"])
def test_export_round_trip_bit_exact(runs: dict, name: str, tiny_model_dir: Path) -> None:
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    exported = runs[name]["exported"]
    assert set(exported) == set(original)
    for k, v in original.items():
        assert torch.equal(exported[k], v), k


@pytest.mark.parametrize("name", ["tp2", "dp2"])
def test_step_matches_tp1(runs: dict, name: str) -> None:
    ref, got = runs["tp1"], runs[name]
    for key in ("loss", "grad_norm", "clip_frac", "entropy", "n_tokens"):
        assert got["stats"][key] == pytest.approx(ref["stats"][key], rel=1e-5, abs=1e-6), key
    # The step really moved the weights, and by the same amount everywhere.
    moved = max(float((ref["updated"][k] - ref["exported"][k]).abs().max()) for k in ref["updated"])
    assert moved > 1e-4
    for k, v in ref["updated"].items():
        torch.testing.assert_close(got["updated"][k], v, rtol=0, atol=2e-5, msg=k)
