"""The built-in `orm` reward: the rollout's RewardRunner scores prompt + completion through a real reward server,
combined with rule rewards by weight; and GRPO trains on it with every service a real process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from asyncgrpo.config import load_config
from asyncgrpo.rollout.rewards import RewardRunner
from reward_server.conftest import KEY, start_reward_server
from service_procs import free_port


def _hf_score(model_dir: Path, text: str) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return float(model(torch.tensor([AutoTokenizer.from_pretrained(model_dir).encode(text)])).logits[0, 0])


def test_the_orm_reward_scores_prompt_and_completion_through_the_server(server, reward_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    cfg = load_config(overrides={"reward": {"fns": ["orm", "gsm8k"], "weights": [1.0, 0.5],
                                            "orm": {"url": url, "api_key": KEY}}})
    runner = RewardRunner.from_config(cfg)
    prompt, completions = "Q: 2+3=?\nA:", [" 2+3=5 #### 5", " 2+3=6 #### 6"]
    scores = asyncio.run(runner.score(prompt, completions, "5"))
    want = [_hf_score(reward_model_dir, prompt + c) for c in completions]
    for s, w, right in zip(scores, want, (1.0, 0.0)):
        assert s.error is None and abs(s.details["orm"] - w) < 1e-4, (s, w)  # fp32, batched vs alone (see server test)
        assert s.details["gsm8k"] == right and s.reward == pytest.approx(s.details["orm"] + 0.5 * right)
    runner.close()

    # a wrong key: the server answers 401, the completion scores 0 and the error names the server
    bad = RewardRunner.from_config(load_config(overrides={"reward": {"fns": ["orm"], "orm": {"url": url, "api_key": "nope"}}}))
    (s,) = asyncio.run(bad.score(prompt, completions[:1], "5"))
    assert s.reward == 0.0 and "orm: OrmError" in (s.error or "") and "answered 401" in (s.error or ""), s.error
    # a server that is not there: the same, quickly, naming the URL
    gone = f"http://127.0.0.1:{free_port()}"
    down = RewardRunner.from_config(load_config(overrides={"reward": {"fns": ["orm"], "orm": {"url": gone}}}))
    (s,) = asyncio.run(down.score(prompt, completions[:1], "5"))
    assert s.reward == 0.0 and gone in (s.error or ""), s.error
    bad.close()
    down.close()


@pytest.mark.slow
def test_grpo_trains_on_the_orm_reward_with_real_processes(tiny_model_dir: Path, reward_model_dir: Path,
                                                          tmp_path: Path) -> None:
    """redis, genserver, weight-sync, rollout and trainer as `up` plans them, and a reward server: 4 steps with
    reward.fns = [orm]. Every queued completion carries the ORM's score as its reward."""
    from faults.system import System, fault_config, write_dataset

    url, rm = start_reward_server(reward_model_dir, tmp_path / "reward_server.log")
    cfg = fault_config(tiny_model_dir, write_dataset(tmp_path / "train.jsonl", 200), "orm", 4, 2)
    cfg.reward.orm.url, cfg.reward.orm.api_key = url, KEY
    cfg.reward.fns = ["orm"]
    run = System(tmp_path, cfg)
    try:
        run.start()
        run.finish(300)
        acc = run.accounting()
        assert len(acc.trained) == 4 * cfg.train_dataset.batch_size and not acc.lost, acc.summary()
        k = run.state.keys
        from asyncgrpo.queue.schema import decode_group

        queued = [decode_group(f[b"g"]) for _, f in run.redis.xrange(k.stream) if f and b"g" in f]
        assert queued, "no group left in the queue to inspect"
        rewards = [c.reward for g in queued for c in g.completions]
        for g in queued:
            for c in g.completions:
                assert c.reward_error is None and c.reward == c.reward_details["orm"], c
        assert len(set(rewards)) > 1, rewards  # real model scores, not a constant
    finally:
        run.stop()
        rm.stop()
    problems = run.log_problems()
    assert not problems, f"ERROR lines or tracebacks: {problems}"
