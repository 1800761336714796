"""The engine's decode path is device-resident (what makes it fast on CUDA), checked on the CPU.

A GPU is not needed to hold the code to the rules that matter there. A torch function mode watches every
tensor factory and every device->host read that engine.py and sampling.py make while requests are prefilled,
decoded, sampled and dropped:
- every factory call names the engine's device (nothing is made on the default device, cpu, by accident);
- a steady decode step (no request joining or leaving) reads the device exactly once: the sampled tokens and
  their log-probs, in one copy;
- seeded requests get a generator on the engine's device, and so does the engine's shared one.
With the default device set to "meta" for the whole decode, a tensor made without a device would be a meta
tensor and the step would fail: it does not. And bf16 decodes on the CPU with its KV cache in bf16.
The same properties on a real GPU are tests/gpu/test_genserver_gpu.py.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from asyncgrpo.genserver.engine import Engine, Request
from asyncgrpo.genserver.sampling import SamplingSpec, parse_sampling_params, sample_batch_logprobs

PROMPT = [81, 58, 32, 49, 43, 49, 61, 63, 10, 65, 58]
TORCH_DIR = os.path.dirname(torch.__file__)
WATCHED = ("genserver/engine.py", "genserver/sampling.py")
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.as_tensor,
             torch.rand, torch.randn, torch.randint, torch.eye, torch.linspace}
READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__int__,
         torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__index__}


def _caller() -> str | None:
    """file:line of the engine/sampling frame that made this torch call directly (None for torch/HF internals)."""
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename.startswith(TORCH_DIR) or f.f_code.co_filename == __file__):
        f = f.f_back
    if f is None:
        return None
    name = f.f_code.co_filename.replace(os.sep, "/")
    return f"{Path(name).name}:{f.f_lineno}" if name.endswith(WATCHED) else None


class Watch(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.factories: list[tuple[str, Any, str]] = []
        self.reads: list[tuple[int, str, str]] = []
        self.moves: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        where = _caller()
        if where is not None:
            if func in FACTORIES:
                self.factories.append((getattr(func, "__name__", str(func)), kwargs.get("device"), where))
            elif func in READS:
                self.reads.append((self.step, getattr(func, "__name__", str(func)), where))
            elif func is torch.Tensor.to:
                self.moves.append((str(args[1:]) + str(kwargs), where))
        return func(*args, **kwargs)


def make_engine(model_dir: Path, dtype: torch.dtype = torch.float32) -> Engine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return Engine(model, AutoTokenizer.from_pretrained(model_dir), model_path=str(model_dir), max_batch_size=8)


def requests(specs: list[dict[str, Any]]) -> list[Request]:
    out = []
    for i, sp in enumerate(specs):
        spec = SamplingSpec(max_new_tokens=sp.pop("n", 6), ignore_eos=True, **sp)
        out.append(Request(rid=f"r{i}", input_ids=PROMPT[: 3 + i % 8], spec=spec, return_logprob=True,
                           on_event=lambda r, fin: None))
    return out


def drive(eng: Engine, reqs: list[Request], watch: Watch | None = None, max_steps: int = 200,
          join_at: dict[int, list[Request]] | None = None) -> Iterator[int]:
    """Run the scheduler on this thread (not started) until every request finished; yields after each step.
    join_at: requests added before that step."""
    join_at = join_at or {}
    everyone = reqs + [r for later in join_at.values() for r in later]
    for r in reqs:
        eng.add_request(r)
    for step in range(max_steps):
        if all(r.finish_reason is not None for r in everyone):
            return
        for r in join_at.get(step, []):
            eng.add_request(r)
        if watch is not None:
            watch.step = step
        eng._run_commands()
        eng._step()
        yield step
    raise AssertionError("requests did not finish")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path) -> Path:
    torch.set_num_threads(1)
    return tiny_model_dir


def test_decode_path_makes_everything_on_the_engine_device_and_reads_back_once_per_step(model_dir: Path) -> None:
    eng = make_engine(model_dir)
    # unseeded and seeded rows, lengths that end at different steps (rows leave the batch), and a late joiner
    reqs = requests([{"n": 5}, {"n": 14, "sampling_seed": 1}, {"n": 10, "sampling_seed": 2}, {"n": 14, "temperature": 0}])
    late = requests([{"n": 4, "sampling_seed": 3}] * 5)[4:]
    watch = Watch()
    steady: list[int] = []
    before = (-1, -1)
    with watch:
        for step in drive(eng, reqs, watch, join_at={2: late}):
            now = (eng.stats["prefills"], len(eng.rows))
            if now == before:  # nobody joined or left in this step
                steady.append(step)
            before = now
    assert all(len(r.output_ids) == r.spec.max_new_tokens for r in reqs + late)
    assert watch.factories, "the mode saw no factory call: the watch is broken"
    no_device = [(f, w) for f, d, w in watch.factories if d is None]
    assert not no_device, f"tensors made without a device (they would land on cpu next to a cuda model): {no_device}"
    wrong = [(f, d, w) for f, d, w in watch.factories if torch.device(d) != eng.device]
    assert not wrong, wrong
    assert not watch.moves, f"explicit .to() on the decode path: {watch.moves}"
    # a steady decode step: exactly one read of the device, the sampled tokens and log-probs
    assert len(steady) >= 3, steady
    for step in steady:
        reads = [(f, w) for s, f, w in watch.reads if s == step]
        assert len(reads) == 1 and reads[0][0] == "tolist" and reads[0][1].startswith("sampling.py"), (step, reads)
    # every read anywhere is that one tolist (no per-row reads: no filters or bans here)
    assert {(f, w) for _, f, w in watch.reads} == {("tolist", watch.reads[0][2])}, set(watch.reads)
    assert all(r.generator is not None and r.generator.device == eng.device for r in reqs[1:3] + late)
    assert eng._rng.device == eng.device


def test_no_tensor_is_made_on_the_default_device(model_dir: Path) -> None:
    """With the default device set to meta, any tensor the engine made without naming its device would be a meta
    tensor, and mixing it with the model's cpu tensors fails the step: the requests finish with real tokens."""
    eng = make_engine(model_dir)
    reqs = requests([{"n": 6, "sampling_seed": 5}, {"n": 4}, {"n": 6, "temperature": 0},
                     {"n": 5, "top_k": 5, "sampling_seed": 9}])
    reference = requests([{"n": 6, "sampling_seed": 5}])
    for _ in drive(make_engine(model_dir), reference):
        pass
    torch.set_default_device("meta")
    try:
        for _ in drive(eng, reqs):
            pass
    finally:
        torch.set_default_device(None)
    assert [r.finish_reason["type"] for r in reqs] == ["length"] * 4, [r.finish_reason for r in reqs]
    assert reqs[0].output_ids == reference[0].output_ids  # the same seed, whatever shares the batch
    assert all(isinstance(x, float) for r in reqs for x in r.logprobs)


def test_bf16_decode_keeps_cache_and_state_on_device_in_bf16(model_dir: Path) -> None:
    eng = make_engine(model_dir, torch.bfloat16)
    reqs = requests([{"n": 6, "sampling_seed": 1}, {"n": 6, "sampling_seed": 2}])
    seen = False
    for _ in drive(eng, reqs):
        if eng.rows:
            k, v = eng.kv[0]
            assert k.dtype == v.dtype == torch.bfloat16 and k.device == eng.device
            assert eng.mask.device == eng.pos.device == eng.last.device == eng.temps.device == eng.device
            assert eng.mask.shape[0] == len(eng.rows) == len(eng.lens) and max(eng.lens) <= eng.mask.shape[1]
            assert eng.pos.tolist() == eng.lens
            seen = True
    assert seen
    assert all(len(r.output_ids) == 6 and all(x == x and x <= 0 for x in r.logprobs) for r in reqs)
    again = requests([{"n": 6, "sampling_seed": 1}])
    for _ in drive(eng, again):
        pass
    assert again[0].output_ids == reqs[0].output_ids  # bf16 on one device: a seed repeats


def test_sample_batch_logprobs_returns_device_tokens_and_their_logprobs() -> None:
    torch.manual_seed(0)
    lps = torch.log_softmax(torch.randn(5, 40) * 3, -1)
    specs = [parse_sampling_params(p) for p in ({}, {"temperature": 0}, {"top_k": 3}, {}, {})]
    gens = [torch.Generator().manual_seed(1), None, torch.Generator().manual_seed(2), None, None]
    toks, picked, tok_t = sample_batch_logprobs(lps, specs, gens, [None, None, None, [0], None])
    assert tok_t.device == lps.device and tok_t.dtype == torch.long and tok_t.tolist() == toks
    assert picked == lps.gather(1, tok_t[:, None])[:, 0].double().tolist()
    assert toks[1] == int(lps[1].argmax()) and toks[3] != 0
    assert sample_batch_logprobs(lps[:0], [], [], [])[0] == []


def test_a_seeded_request_gets_a_generator_on_the_engine_device_once(model_dir: Path) -> None:
    """A request made elsewhere (its generator on another device, as a CPU-made one is for a CUDA engine) is given
    a generator on the engine's device with its seed when it joins; after a retract it re-joins with that same,
    advanced generator (not re-seeded), so its tokens are those of an uninterrupted run."""
    from types import SimpleNamespace

    ref = requests([{"n": 12, "sampling_seed": 11}])
    for _ in drive(make_engine(model_dir), ref):
        pass
    eng = make_engine(model_dir)
    moved = requests([{"n": 12, "sampling_seed": 11}])
    moved[0].generator = SimpleNamespace(device=torch.device("meta"))  # a generator of another device
    for step in drive(eng, moved):
        if step == 0:
            assert isinstance(moved[0].generator, torch.Generator) and moved[0].generator.device == eng.device
            bound = moved[0].generator
        if step == 4:
            eng.cmd_pause("retract")
            assert not eng.rows and list(eng.waiting) == moved
            eng.cmd_continue()
    assert moved[0].generator is bound
    assert moved[0].output_ids == ref[0].output_ids


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_genserver_refuses_cuda_without_a_gpu_in_one_line(model_dir: Path) -> None:
    import subprocess

    p = subprocess.run([sys.executable, "-m", "asyncgrpo.cli", "genserver", "--model", str(model_dir), "--device", "cuda",
                        "--api-key", "", "--admin-api-key", ""], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "--device cuda but torch sees no GPU" in p.stderr and "use --device cpu" in p.stderr
