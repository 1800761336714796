"""Sample a policy on a task file and score it with the reward functions.

Sampling is plain ancestral sampling at a temperature (top-k and top-p off), the same distribution the
rollout service draws GRPO groups from, so the reported mean reward is what GRPO starts from. Greedy
decoding gives a second, noise-free number (accuracy of the argmax answer).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EvalConfig:
    temperature: float = 1.0
    n_samples: int = 4
    max_new_tokens: int = 32
    max_prompts: int | None = None
    batch_size: int = 256
    seed: int = 0
    greedy: bool = True
    reward_fns: tuple[str, ...] = ("gsm8k",)
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    prompt_template: str = "{prompt}"  # as train_dataset.prompt_template: the prompt GRPO trains on
    device: str = "auto"  # auto: the first CUDA device when there is one (a real model on CPU takes hours), else cpu


@dataclass
class EvalResult:
    model: str
    data: str
    prompts: int
    samples: int
    reward: dict[str, float]  # fn -> mean reward over all sampled completions
    greedy_reward: dict[str, float] = field(default_factory=dict)  # fn -> mean reward of the greedy completion
    mean_completion_tokens: float = 0.0
    finished_fraction: float = 0.0  # completions that ended with eos within max_new_tokens
    seconds: float = 0.0
    examples: list[dict[str, Any]] = field(default_factory=list)
    per_prompt: dict[str, list[float]] = field(default_factory=dict)  # fn -> each prompt's mean sampled reward
    greedy_per_prompt: dict[str, list[float]] = field(default_factory=dict)  # fn -> each prompt's greedy reward


def cut_at_eos(tokens: Sequence[int], eos_id: int) -> tuple[list[int], bool]:
    """The tokens before the first eos, and whether an eos was there."""
    out = list(tokens)
    if eos_id in out:
        return out[: out.index(eos_id)], True
    return out, False


def generate(model: Any, tok: Any, prompts: Sequence[str], *, n: int, temperature: float | None, max_new_tokens: int,
             batch_size: int) -> list[list[tuple[str, int, bool]]]:
    """For each prompt, n completions as (text, token count, finished). temperature None = greedy."""
    import torch

    eos_id = tok.eos_token_id
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_id
    tok.padding_side = "left"  # generation continues from the right end of every row
    per_batch = max(1, batch_size // n)
    out: list[list[tuple[str, int, bool]]] = []
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature is not None else dict(do_sample=False)
    for start in range(0, len(prompts), per_batch):
        chunk = list(prompts[start : start + per_batch])
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            seqs = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=n, eos_token_id=eos_id,
                                  pad_token_id=pad_id, **sampling)
        gen = seqs[:, enc["input_ids"].shape[1] :].tolist()
        for i in range(len(chunk)):
            rows = []
            for j in range(n):
                toks, finished = cut_at_eos(gen[i * n + j], eos_id)
                rows.append((tok.decode(toks, skip_special_tokens=True), len(toks) + int(finished), finished))
            out.append(rows)
    return out


def evaluate(model_dir: str | Path, data: str | Path, cfg: EvalConfig | None = None, n_examples: int = 3) -> EvalResult:
    """Mean reward of the policy in model_dir on the records of data (see EvalConfig)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asyncgrpo.rewards import RewardInput, is_async, resolve_reward_fn
    from asyncgrpo.rollout.dataset import PromptDataset, load_records

    cfg = cfg or EvalConfig()
    if cfg.temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {cfg.temperature}); greedy accuracy is reported separately")
    fns = {name: resolve_reward_fn(name) for name in cfg.reward_fns}
    served = [n for n, fn in fns.items() if is_async(fn)]
    if served:
        raise ValueError(f"reward {served[0]!r} is async (a served reward model): the offline evaluation takes rule "
                         "rewards only; evaluate with a rule reward such as gsm8k")
    records = load_records(data, cfg.prompt_key, cfg.answer_key)  # JSONL or parquet, as the rollout reads them
    if cfg.max_prompts is not None:
        records = records[: cfg.max_prompts]
    ds = PromptDataset(records, lambda t: [], template=cfg.prompt_template, prompt_key=cfg.prompt_key,
                       answer_key=cfg.answer_key, shuffle=False)
    prompts = [ds.render(i) for i in range(len(records))]
    answers = [str(r[cfg.answer_key]) for r in records]
    tok = AutoTokenizer.from_pretrained(model_dir)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 on a GPU, as the generation servers sample; fp32 on CPU, where bf16 matmuls are slow
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    torch.manual_seed(cfg.seed)  # HF sampling draws from the global generator
    t0 = time.perf_counter()
    sampled = generate(model, tok, prompts, n=cfg.n_samples, temperature=cfg.temperature,
                       max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    flat = [(c, a) for rows, a in zip(sampled, answers) for c in rows]

    metas = [{k: v for k, v in rec.items() if k not in (cfg.prompt_key, cfg.answer_key)} for rec in records]
    meta_of = dict(zip(prompts, metas))
    failures: list[str] = []

    def r(fn: Any, prompt: str, completion: str, answer: str) -> float:
        try:  # a plug-in that raises scores 0, as in the rollout, instead of ending the evaluation
            v = float(fn(RewardInput(prompt, completion, answer, meta_of.get(prompt, {}))))
            return v if math.isfinite(v) else 0.0
        except Exception as e:  # noqa: BLE001 - user code
            failures.append(f"{type(e).__name__}: {e}")
            return 0.0

    # per prompt, so that two models evaluated on the same prompts compare pairwise (paired intervals)
    per_prompt = {name: [sum(r(fn, p, c[0], a) for c in rows) / len(rows) for p, rows, a in zip(prompts, sampled, answers)]
                  for name, fn in fns.items()}
    reward = {name: sum(v) / len(v) for name, v in per_prompt.items()}
    greedy_reward: dict[str, float] = {}
    greedy_per_prompt: dict[str, list[float]] = {}
    if cfg.greedy:
        greedy = generate(model, tok, prompts, n=1, temperature=None, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        greedy_per_prompt = {name: [r(fn, p, rows[0][0], a) for p, rows, a in zip(prompts, greedy, answers)]
                             for name, fn in fns.items()}
        greedy_reward = {name: sum(v) / len(v) for name, v in greedy_per_prompt.items()}
    if failures:
        print(f"evaluate: {len(failures)} reward calls failed and scored 0, e.g. {failures[0]}", flush=True)
    examples = [{"prompt": p, "answer": a, "completion": rows[0][0]} for p, a, rows in list(zip(prompts, answers, sampled))[:n_examples]]
    return EvalResult(
        model=str(model_dir), data=str(data), prompts=len(prompts), samples=len(flat), reward=reward,
        greedy_reward=greedy_reward, mean_completion_tokens=sum(c[1] for c, _ in flat) / len(flat),
        finished_fraction=sum(c[2] for c, _ in flat) / len(flat), seconds=time.perf_counter() - t0, examples=examples,
        per_prompt=per_prompt, greedy_per_prompt=greedy_per_prompt,
    )


def solution_probabilities(model_dir: str | Path, prompts: Sequence[str], solutions: Sequence[str], *,
                           temperature: float = 1.0, batch_size: int = 512) -> list[float]:
    """For each prompt, the probability that sampling at `temperature` writes exactly `solution` and then eos:
    exp of the summed token log-probs of a teacher-forced forward pass. On a task whose right answers come in
    one canonical form (the tiny arithmetic task: " 29-1=28 #### 28") this is the sampled accuracy of the prompt
    computed exactly, without sampling noise, so two models compare on far fewer prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asyncgrpo.tiny.warm_start import IGNORE_INDEX, collate, encode_pair

    if len(prompts) != len(solutions):
        raise ValueError(f"{len(prompts)} prompts but {len(solutions)} solutions")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        batch = collate([encode_pair(tok, p, s, eos) for p, s in zip(prompts[start:start + batch_size],
                                                                       solutions[start:start + batch_size])], pad_id=eos)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        lp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)  # position t predicts token t + 1
        labels = batch["labels"][:, 1:]
        taken = labels != IGNORE_INDEX
        tok_lp = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * taken
        out.extend(torch.exp(tok_lp.sum(-1)).tolist())
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = EvalConfig()
    parser.add_argument("--model", required=True, help="HF checkpoint directory of the policy")
    parser.add_argument("--data", required=True, help="task JSONL (prompt and answer fields), e.g. runs/tiny/task/test.jsonl")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature (top-k/top-p off)")
    parser.add_argument("--n-samples", type=int, default=d.n_samples, help="completions sampled per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="completion length limit in tokens")
    parser.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per generate call")
    parser.add_argument("--seed", type=int, default=d.seed, help="sampling seed")
    parser.add_argument("--reward-fns", default=",".join(d.reward_fns), help="comma-separated reward functions (exact, gsm8k, boxed)")
    parser.add_argument("--no-greedy", action="store_true", help="skip the greedy pass")
    parser.add_argument("--prompt-key", default=d.prompt_key, help="record field holding the prompt")
    parser.add_argument("--answer-key", default=d.answer_key, help="record field holding the reference answer")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    torch.set_num_threads(args.threads)
    cfg = EvalConfig(temperature=args.temperature, n_samples=args.n_samples, max_new_tokens=args.max_new_tokens,
                     max_prompts=args.max_prompts, batch_size=args.batch_size, seed=args.seed, greedy=not args.no_greedy,
                     reward_fns=tuple(f.strip() for f in args.reward_fns.split(",") if f.strip()),
                     prompt_key=args.prompt_key, answer_key=args.answer_key)
    print(json.dumps(asdict(evaluate(args.model, args.data, cfg)), indent=1))
    return 0
