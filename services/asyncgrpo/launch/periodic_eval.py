"""Held-out evaluation while `asyncgrpo up` runs: when the generation server holds version 0, K, 2K, ...
(evaluator.freq_steps), evaluate the policy it serves (rollout/evaluation.py) and record the result in the
run directory (evals.jsonl) and for the control plane (RunControl.record_eval).

It runs in a thread of `up` beside the services, never inside one: an evaluation that fails (a server
restarting, a weight update aborting its requests again and again) is reported and tried again at the next
point, and can neither stop the run nor slow the trainer beyond the generation it shares.
"""

from __future__ import annotations

import asyncio
import contextlib
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


def load_held_out_prompts(cfg: Any, data: Path, encode: Any) -> tuple[list[list[int]], list[str], list[Any]]:
    """(prompt token ids, answers, Prompts) of the first evaluator.prompts records, rendered exactly as the rollout
    renders training prompts (train_dataset's template and keys)."""
    from asyncgrpo.rollout.dataset import PromptDataset, load_records

    d = cfg.train_dataset
    records = load_records(data, d.prompt_key, d.answer_key)[: cfg.evaluator.prompts]
    ds = PromptDataset(records, encode, template=d.prompt_template, prompt_key=d.prompt_key, answer_key=d.answer_key,
                       shuffle=False)
    prompts = [ds.get(0, i) for i in range(len(ds))]
    return [p.input_ids for p in prompts], [p.answer for p in prompts], prompts


class PeriodicEval(threading.Thread):
    """Evaluates server_url's policy at every evaluation point from start_version on, until stop()."""

    def __init__(self, cfg: Any, server_url: str, api_key: str | None, data: Path, out: Path, *,
                 record: Callable[[dict[str, Any]], None] | None = None,
                 on_error: Callable[[str], None] | None = None, start_version: int = 0, poll_s: float = 1.0) -> None:
        super().__init__(name="periodic-eval", daemon=True)
        if cfg.evaluator.freq_steps < 1:
            raise ValueError("evaluator.freq_steps must be >= 1 for evaluations during the run")
        self.cfg, self.server_url, self.api_key, self.data, self.out = cfg, server_url, api_key, data, out
        self.record, self.on_error = record, on_error
        self.next_at = next_point(start_version, cfg.evaluator.freq_steps)
        self.poll_s = poll_s
        self.results: list[HeldOutResult] = []
        self.errors: list[str] = []  # what went wrong, for `up` to show (appended by this thread)
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop now: an evaluation in flight is cancelled (its requests stop generating), nothing more is
        written."""
        self._stopping.set()
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop has just closed: nothing left to cancel
                loop.call_soon_threadsafe(task.cancel)
        if self.is_alive():
            self.join(timeout_s)

    def run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._task = loop.create_task(self._main())
            if not self._stopping.is_set():
                loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except Exception as e:  # noqa: BLE001 - evaluation is a report: it must never take the run down
            self._error(f"held-out evaluation stopped: {type(e).__name__}: {e}")
        finally:
            self._task = None
            loop.close()

    def _error(self, msg: str) -> None:
        if self._stopping.is_set():  # the run is stopping: its servers go away under the evaluation
            return
        log.debug("%s", msg)
        self.errors.append(msg)
        if self.on_error is not None:
            self.on_error(msg)

    async def _main(self) -> None:
        from transformers import AutoTokenizer

        from asyncgrpo.rollout.rewards import RewardRunner
        from asyncgrpo.sglang.client import SGLangClient

        cfg, ev, freq = self.cfg, self.cfg.evaluator, self.cfg.evaluator.freq_steps
        tok = AutoTokenizer.from_pretrained(cfg.actor.path)
        prompts, answers, records = load_held_out_prompts(cfg, self.data, lambda t: list(tok.encode(t, add_special_tokens=False)))
        by_ids = {tuple(p.input_ids): p for p in records}  # the reward sees the prompt text and metadata as in training
        if not prompts:
            return
        # the accuracy `up` reports before -> after: the first reward function, in the rollout's pool with its timeout
        runner = RewardRunner.from_config(cfg, fns=[cfg.reward.fns[0]])

        async def score(prompt_ids: list[int], outputs: list[list[int]], answer: str) -> list[float]:
            texts = [tok.decode(ids, skip_special_tokens=True) for ids in outputs]
            p = by_ids.get(tuple(prompt_ids))
            prompt, meta = (p.text, p.metadata) if p is not None else (tok.decode(prompt_ids), {})
            return [s.reward for s in await runner.score(prompt, texts, answer, meta)]

        try:
            async with SGLangClient(self.server_url, timeout_s=cfg.rollout.request_timeout_s, api_key=self.api_key) as client:
                while not self._stopping.is_set():
                    try:
                        version = await client.weight_version()
                    except Exception:  # noqa: BLE001 - a server starting or restarting: ask again
                        version = -1
                    if version >= self.next_at:
                        try:
                            res = await evaluate_served(
                                client, prompts, answers, score, temperature=cfg.actor.temperature, samples=ev.samples,
                                max_new_tokens=cfg.rollout.max_new_tokens, seed=ev.seed, greedy=ev.greedy)
                        except Exception as e:  # noqa: BLE001
                            self._error(f"held-out evaluation at version {version} failed ({type(e).__name__}: {e}); "
                                        "trying again at the next point")
                            self.next_at = next_point(version + 1, freq)
                            continue
                        self._publish(res, self.next_at)
                        self.next_at = next_point(max(res.version, version) + 1, freq)
                    await asyncio.sleep(self.poll_s)
        finally:
            runner.close()

    def _publish(self, res: HeldOutResult, point: int) -> None:
        if self._stopping.is_set():
            return
        self.results.append(res)
        row = {**res.row(), "point": point}  # the evaluation point it was started for (version is what it saw)
        with self.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.record is not None:
            try:
                self.record(row)
            except Exception as e:  # noqa: BLE001 - the file has it; the control plane is a convenience
                log.warning("cannot record the evaluation for the control plane: %s", e)
