"""Held-out evaluation while `asyncgrpo up` runs: when the generation server holds version 0, K, 2K, ...
(evaluator.freq_steps), evaluate the policy it serves (rollout/evaluation.py) and record the result in the
run directory (evals.jsonl) and for the control plane (RunControl.record_eval).

It runs in a thread of `up` beside the services, never inside one: an evaluation that fails (a server
restarting, a weight update aborting its requests again and again) is reported and tried again at the next
point, and can neither stop the run nor slow the trainer beyond the generation it shares.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asyncgrpo.rollout.evaluation import HeldOutResult, evaluate_served

log = logging.getLogger(__name__)


def next_point(version: int, freq: int) -> int:
    """The first evaluation point (a multiple of freq) at or after version."""
    return -(-version // freq) * freq


def load_held_out(cfg: Any, data: Path) -> tuple[list[str], list[str]]:
    """(prompts, answers) of the first evaluator.prompts records, prompts built with the training template."""
    from asyncgrpo.rollout.dataset import load_records

    d = cfg.train_dataset
    records = load_records(data, d.prompt_key, d.answer_key)[: cfg.evaluator.prompts]
    return [d.prompt_template.format(**r) for r in records], [str(r[d.answer_key]) for r in records]


class PeriodicEval(threading.Thread):
    """Evaluates server_url's policy at every evaluation point from start_version on, until stop()."""

    def __init__(self, cfg: Any, server_url: str, api_key: str | None, data: Path, out: Path, *,
                 record: Callable[[dict[str, Any]], None] | None = None,
                 on_result: Callable[[HeldOutResult], None] | None = None,
                 on_error: Callable[[str], None] | None = None, start_version: int = 0, poll_s: float = 1.0) -> None:
        super().__init__(name="periodic-eval", daemon=True)
        if cfg.evaluator.freq_steps < 1:
            raise ValueError("evaluator.freq_steps must be >= 1 for evaluations during the run")
        self.cfg, self.server_url, self.api_key, self.data, self.out = cfg, server_url, api_key, data, out
        self.record, self.on_result, self.on_error = record, on_result, on_error
        self.next_at = next_point(start_version, cfg.evaluator.freq_steps)
        self.poll_s = poll_s
        self.results: list[HeldOutResult] = []
        self._stopping = threading.Event()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout_s)

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as e:  # noqa: BLE001 - evaluation is a report: it must never take the run down
            self._error(f"held-out evaluation stopped: {type(e).__name__}: {e}")

    def _error(self, msg: str) -> None:
        if self._stopping.is_set():  # the run is stopping: its servers go away under the evaluation
            return
        log.warning("%s", msg)
        if self.on_error is not None:
            self.on_error(msg)

    async def _main(self) -> None:
        from transformers import AutoTokenizer

        from asyncgrpo.rewards import get_reward_fn
        from asyncgrpo.sglang.client import SGLangClient

        ev, freq = self.cfg.evaluator, self.cfg.evaluator.freq_steps
        prompts, answers = load_held_out(self.cfg, self.data)
        if not prompts:
            return
        tok = AutoTokenizer.from_pretrained(self.cfg.actor.path)
        ids = [list(tok.encode(p, add_special_tokens=False)) for p in prompts]
        reward_fn = get_reward_fn(self.cfg.reward.fns[0])  # the accuracy `up` reports before -> after

        def score(completion_ids: list[int], answer: str) -> float:
            return float(reward_fn(tok.decode(completion_ids, skip_special_tokens=True), answer))

        async with SGLangClient(self.server_url, timeout_s=self.cfg.rollout.request_timeout_s, api_key=self.api_key) as client:
            while not self._stopping.is_set():
                try:
                    version = await client.weight_version()
                except Exception:  # noqa: BLE001 - a server starting or restarting: ask again
                    version = -1
                if version >= self.next_at:
                    try:
                        res = await evaluate_served(
                            client, ids, answers, score, temperature=self.cfg.actor.temperature, samples=ev.samples,
                            max_new_tokens=self.cfg.rollout.max_new_tokens, seed=ev.seed, greedy=ev.greedy)
                    except Exception as e:  # noqa: BLE001
                        self._error(f"held-out evaluation at version {version} failed ({type(e).__name__}: {e}); "
                                    "trying again at the next point")
                        self.next_at = next_point(version + 1, freq)
                        continue
                    self._publish(res)
                    self.next_at = next_point(max(res.version, version) + 1, freq)
                await asyncio.sleep(self.poll_s)

    def _publish(self, res: HeldOutResult) -> None:
        self.results.append(res)
        row = res.row()
        with self.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.record is not None:
            try:
                self.record(row)
            except Exception as e:  # noqa: BLE001 - the file has it; the control plane is a convenience
                log.warning("cannot record the evaluation for the control plane: %s", e)
        if self.on_result is not None:
            self.on_result(res)
