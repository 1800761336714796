"""Process rewards through a real reward server: a token-classification model served on /score_steps scores each
step at its last token as the HF model does; the built-in `prm` reward gives the rollout one reward per step; the
tiny PRM learns which steps are right; and GRPO with process supervision trains with every service a real process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch

from asyncgrpo.config import load_config
from asyncgrpo.rollout.rewards import RewardRunner
from asyncgrpo.tiny.reward_model import TINY_STEP_SEPARATOR, build_prm_model, step_examples, train_prm_model
from reward_server.conftest import KEY, start_reward_server

PROMPT = "Q: 2+3=?\nA:"
STEPS = [" 2+3=5 ####", " 5"]


@pytest.fixture(scope="module")
def prm_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_prm_model(tiny_model_dir, tmp_path_factory.mktemp("tiny_prm"), seed=4)


@pytest.fixture(scope="module")
def prm_server(prm_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    url, proc = start_reward_server(prm_dir, tmp_path_factory.mktemp("prm_logs") / "prm_server.log")
    yield url
    proc.stop()


def _hf_step_probs(model_dir: Path, prompt: str, steps: list[str]) -> list[float]:
    """sigmoid of the model's logit at each step's last token, one sequence alone (the tiny tokenizer is
    byte-level, so the prefix lengths are the token positions)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model = AutoModelForTokenClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids, pos = tok.encode(prompt), []
    for s in steps:
        ids = ids + tok.encode(s)
        pos.append(len(ids) - 1)
    with torch.no_grad():
        return torch.sigmoid(model(torch.tensor([ids])).logits[0, pos, 0]).tolist()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_score_steps_matches_the_hf_model(prm_server: str, prm_dir: Path) -> None:
    want = _hf_step_probs(prm_dir, PROMPT, STEPS)
    r = httpx.post(f"{prm_server}/score_steps", json={"prompt": PROMPT, "steps": STEPS}, headers=_auth(), timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    n_prompt = len(PROMPT)
    assert body["meta_info"]["token_positions"] == [n_prompt + len(STEPS[0]) - 1, n_prompt + len(STEPS[0]) + len(STEPS[1]) - 1]
    # fp32 logits of one sequence, alone vs in the server's batch of one: the same kernels; 1e-5 on a probability
    # bounds any reduction-order difference (observed 0)
    got = body["step_scores"]
    assert len(got) == 2 and max(abs(a - b) for a, b in zip(got, want)) < 1e-5, (got, want)
    assert abs(got[0] - got[1]) > 1e-4  # the steps score differently: the check is not vacuous
    info = httpx.get(f"{prm_server}/model_info", headers=_auth(), timeout=10).json()
    assert info["kind"] == "process" and info["num_labels"] == 1


@pytest.mark.parametrize("body,fragment", [({"prompt": PROMPT, "steps": []}, "steps"), ({"steps": ["x"]}, "prompt"),
                                           ({"prompt": "x", "steps": ["y"], "extra": 1}, "extra")])
def test_bad_step_requests_get_400_naming_the_field(prm_server: str, body: dict, fragment: str) -> None:
    r = httpx.post(f"{prm_server}/score_steps", json=body, headers=_auth(), timeout=30)
    assert r.status_code == 400 and fragment in r.text, (r.status_code, r.text)


def test_each_kind_of_server_points_to_its_endpoint(prm_server: str, server) -> None:  # type: ignore[no-untyped-def]
    r = httpx.post(f"{prm_server}/classify", json={"text": "x"}, headers=_auth(), timeout=30)
    assert r.status_code == 400 and "/score_steps" in r.text, r.text
    orm_url, _ = server
    r = httpx.post(f"{orm_url}/score_steps", json={"prompt": "x", "steps": ["y"]}, headers=_auth(), timeout=30)
    assert r.status_code == 400 and "/classify" in r.text, r.text
    assert httpx.post(f"{prm_server}/score_steps", json={"prompt": "x", "steps": ["y"]}, timeout=30).status_code == 401


def test_the_prm_reward_gives_one_reward_per_step(prm_server: str, prm_dir: Path) -> None:
    cfg = load_config(overrides={"reward": {"fns": ["prm", "gsm8k"], "weights": [1.0, 0.5], "step_separator": TINY_STEP_SEPARATOR,
                                            "prm": {"url": prm_server, "api_key": KEY}}})
    runner = RewardRunner.from_config(cfg)
    try:
        (s,) = asyncio.run(runner.score(PROMPT, ["".join(STEPS)], "5"))
    finally:
        runner.close()
    want = _hf_step_probs(prm_dir, PROMPT, STEPS)
    assert s.error is None and s.step_rewards is not None, s
    assert abs(s.step_rewards[0] - want[0]) < 1e-4 and abs(s.step_rewards[1] - (want[1] + 0.5)) < 1e-4, (s, want)
    assert s.step_char_ends == [len(STEPS[0]), len(STEPS[0]) + len(STEPS[1])]
    assert s.reward == pytest.approx(min(want) + 0.5)


def test_the_tiny_prm_learns_which_steps_are_right(tiny_model_dir: Path, tmp_path: Path) -> None:
    # 80 one-digit additions, each step labelled right or wrong (step_examples: half of each step's labels are 1).
    # From random weights, 600 steps (~15 s on 2 cores); observed 0.78 of the steps of fresh corruptions classified
    # right (0.75 for the computation, 0.85 for the final answer); chance is 0.5
    from asyncgrpo.tasks.arithmetic import ArithmeticSpec, make_split

    train, _ = make_split(80, 20, seed=0, spec=ArithmeticSpec(ops=("+",), min_digits=1, max_digits=1))
    prm = build_prm_model(tiny_model_dir, tmp_path / "prm", seed=1)
    examples = step_examples(train, seed=5)
    assert sum(y for _, _, lab in examples for y in lab) / (2 * len(examples)) == pytest.approx(0.5, abs=0.1)

    def accuracy() -> float:
        hits = n = 0
        for prompt, steps, labels in examples:
            for p, y in zip(_hf_step_probs(prm, prompt, steps), labels):
                hits += (p > 0.5) == (y > 0.5)
                n += 1
        return hits / n

    before = accuracy()
    result = train_prm_model(prm, train, steps=600, seed=0)
    after = accuracy()
    print(f"\n[tiny prm] step accuracy {before:.2f} -> {after:.2f} (train loop: {result})")
    assert after >= 0.7 and after > before + 0.1, f"step accuracy {before:.2f} -> {after:.2f}"


@pytest.mark.slow
def test_grpo_process_supervision_trains_with_real_processes(tiny_model_dir: Path, prm_dir: Path, tmp_path: Path) -> None:
    """redis, genserver, weight-sync, rollout and trainer as `up` plans them, and a PRM server: 4 steps of
    adv_estimator=grpo_process on reward.fns=[prm]. Every queued completion with text carries its step rewards
    (schema 3), their ends tiling its tokens; one that decodes to no text keeps an outcome reward of 0; the trainer
    trains on them and nothing is lost."""
    from faults.system import System, fault_config, write_dataset

    url, rm = start_reward_server(prm_dir, tmp_path / "prm_server.log")
    cfg = fault_config(tiny_model_dir, write_dataset(tmp_path / "train.jsonl", 200), "prm", 4, 2)
    cfg.reward.prm.url, cfg.reward.prm.api_key = url, KEY
    cfg.reward.fns = ["prm"]
    cfg.reward.step_separator = " "
    cfg.actor.adv_estimator = "grpo_process"
    run = System(tmp_path, cfg)
    try:
        run.start()
        run.finish(300)
        acc = run.accounting()
        assert len(acc.trained) == 4 * cfg.train_dataset.batch_size and not acc.lost, acc.summary()
        from asyncgrpo.queue.schema import decode_group

        queued = [decode_group(f[b"g"]) for _, f in run.redis.xrange(run.state.keys.stream) if f and b"g" in f]
        assert queued, "no group left in the queue to inspect"
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        completions = [c for g in queued for c in g.completions if c.output_ids]
        stepped = 0
        for c in completions:
            assert c.reward_error is None, c
            if not tok.decode(c.output_ids, skip_special_tokens=True):
                # e.g. EOS alone: no text, no steps; scored as an outcome (the PRM's scalar for no steps is 0),
                # which the trainer takes as one step over its tokens
                assert c.step_rewards is None and c.step_ends is None and c.reward == 0.0, c
                continue
            assert c.step_rewards is not None and c.step_ends is not None, c
            assert c.step_ends[-1] == len(c.output_ids) and all(0 <= r <= 1 for r in c.step_rewards), c
            assert c.reward == pytest.approx(min(c.step_rewards), abs=1e-6)
            stepped += 1
        assert stepped >= len(completions) // 2, f"only {stepped} of {len(completions)} completions had text"
        # (an untrained policy's 8 random tokens seldom hold the separator, so most are one step: several steps per
        # completion are covered by test_the_prm_reward_gives_one_reward_per_step and the trainer's per-token test)
    finally:
        run.stop()
        rm.stop()
    problems = run.log_problems()
    assert not problems, f"ERROR lines or tracebacks: {problems}"
