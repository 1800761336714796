"""The scheduler isolates failures (in-process, on the tiny model): a request that fails while being prefilled
or sampled fails alone; running requests go on and produce exactly the tokens they produce alone.

The HTTP side refuses all of these requests before they reach the engine (test_hostile.py); here they are put
into the engine's queue directly, as a bug upstream would, to hold the engine to its own guarantee."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from asyncgrpo.genserver.engine import Engine, EngineError, Request
from asyncgrpo.genserver.sampling import SamplingSpec

PROMPT = [81, 58, 32, 49, 43, 49, 61, 63, 10, 65, 58]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    eng = Engine(model, AutoTokenizer.from_pretrained(tiny_model_dir), model_path=str(tiny_model_dir), max_batch_size=8)
    eng.start()
    try:
        yield eng
    finally:
        eng.shutdown()


class Job:
    def __init__(self, rid: str, input_ids: list[int], spec: SamplingSpec) -> None:
        self.done = threading.Event()
        self.req = Request(rid=rid, input_ids=input_ids, spec=spec, return_logprob=True,
                           on_event=lambda r, fin: fin and self.done.set())

    def wait(self, timeout: float = 60) -> Request:
        assert self.done.wait(timeout), f"{self.req.rid} never finished"
        return self.req


def good(rid: str, seed: int, n: int = 40) -> Job:
    return Job(rid, PROMPT[: 3 + seed % 8], SamplingSpec(max_new_tokens=n, ignore_eos=True, sampling_seed=seed))


def alone(engine: Engine, seed: int, n: int = 40) -> list[int]:
    j = good(f"alone-{seed}", seed, n)
    engine.add_request(j.req)
    return j.wait().output_ids


def inject(engine: Engine, *jobs: Job) -> None:
    """Queue jobs past add_request's checks, in one admission wave (as a caller bug would)."""
    done = threading.Event()
    engine.submit(lambda: engine.waiting.extend(j.req for j in jobs), lambda *_: done.set())
    assert done.wait(10)


def wait_running(engine: Engine, n: int) -> None:
    for _ in range(2000):
        if engine.num_running >= n:
            return
        threading.Event().wait(0.005)
    raise AssertionError(f"never saw {n} running rows")


def test_a_failing_prefill_fails_only_its_own_rows(engine: Engine) -> None:
    running = [good(f"run-{s}", s, 200) for s in (1, 2, 3)]
    for j in running:
        engine.add_request(j.req)
    wait_running(engine, 3)
    # one admission wave: a row whose prefill fails (ids past the embedding) beside a good one
    bad = Job("bad-ids", [1, 384], SamplingSpec(max_new_tokens=5))
    joiner = good("joiner", 4, 40)
    inject(engine, bad, joiner)
    r = bad.wait()
    assert r.finish_reason["type"] == "abort" and "IndexError" in r.finish_reason["message"], r.finish_reason
    outs = {j.req.rid: j.wait() for j in (*running, joiner)}
    for j in (*running, joiner):
        assert j.req.finish_reason == {"type": "length", "length": j.req.spec.max_new_tokens}, j.req.finish_reason
    assert [outs[f"run-{s}"].output_ids for s in (1, 2, 3)] == [alone(engine, s, 200) for s in (1, 2, 3)]
    assert outs["joiner"].output_ids == alone(engine, 4, 40)


@pytest.mark.parametrize("spec", [
    SamplingSpec(max_new_tokens=5, top_k=0),  # topk(lp, 0) has no k-th value: the filter raises
    SamplingSpec(max_new_tokens=5, temperature=float("nan")),  # NaN log-probs: nothing can be drawn
], ids=["filter-raises", "nan-temperature"])
def test_a_row_whose_sampling_fails_fails_alone(engine: Engine, spec: SamplingSpec) -> None:
    running = [good(f"s-run-{s}", s, 120) for s in (5, 6)]
    for j in running:
        engine.add_request(j.req)
    wait_running(engine, 2)
    bad, joiner = Job("bad-sample", PROMPT, spec), good("s-joiner", 7, 30)
    inject(engine, bad, joiner)
    r = bad.wait()
    assert r.finish_reason["type"] == "abort" and r.finish_reason["message"].startswith("engine error:"), r.finish_reason
    assert r.output_ids == []  # its first draw failed: no garbage token
    assert [j.wait().output_ids for j in running] == [alone(engine, s, 120) for s in (5, 6)]
    assert joiner.wait().output_ids == alone(engine, 7, 30)


def test_a_callback_that_raises_does_not_stop_the_scheduler(engine: Engine) -> None:
    def boom(r: Request, finished: bool) -> None:
        raise RuntimeError("client side broke")

    engine.add_request(Request(rid="boom", input_ids=PROMPT, spec=SamplingSpec(max_new_tokens=3), return_logprob=False,
                               on_event=boom))
    assert len(alone(engine, 9, 10)) == 10 and engine._thread.is_alive()


@pytest.mark.parametrize("ids, spec, message", [
    ([1, 384], SamplingSpec(), r"input_ids: token id 384 is outside the model's vocabulary \[0, 384\)"),
    ([-1], SamplingSpec(), r"input_ids: token id -1 is outside"),
    ([1], SamplingSpec(stop_token_ids=[2**40]), r"stop_token_ids: token id 1099511627776 is outside"),
    ([1], SamplingSpec(temperature=float("nan")), r"temperature nan must be a finite number"),
    ([], SamplingSpec(), r"input_ids is empty"),
])
def test_add_request_guards_the_batch(engine: Engine, ids, spec, message) -> None:
    with pytest.raises(EngineError, match=message):
        engine.add_request(Request(rid="x", input_ids=ids, spec=spec, return_logprob=False, on_event=lambda *_: None))
    assert engine.vocab_size == 384
