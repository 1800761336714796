"""Supervised warm start: fine-tune an HF causal LM on the task's worked solutions.

A randomly initialised policy never emits a well-formed "#### <answer>" line, so every GRPO group would
have reward 0 and zero advantage. A short SFT on (prompt, solution) pairs teaches the format and some of
the arithmetic; GRPO then has groups with mixed rewards to learn from.

Loss: next-token cross entropy on the completion tokens and the eos only (prompt and padding are masked
with -100), averaged over those tokens. Plain torch AdamW on CPU, one thread, seeded: the same inputs and
seed give the same checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100


def _stderr(msg: str) -> None:
    # Progress goes to stderr so that stdout carries only the command's JSON result.
    print(msg, file=sys.stderr, flush=True)


@dataclass
class WarmStartConfig:
    steps: int = 1500  # prepare.py: what each length gives, and why this one
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 100

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class WarmStartResult:
    out_dir: str
    steps: int
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss over the last log window)
    first_loss: float = math.nan
    final_loss: float = math.nan


def encode_pair(tok: Any, prompt: str, completion: str, eos_id: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one example: labels copy the completion tokens and the eos, -100 elsewhere.
    Prompt and completion are encoded separately so the boundary is exact (the same split the rollout
    sees: it generates after the prompt tokens)."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [eos_id]
    return p + c, [IGNORE_INDEX] * len(p) + c


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch; padding gets attention 0 and label -100."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def completion_loss(logits: Any, labels: Any) -> Any:
    """Mean cross entropy of token t+1 given tokens <= t, over positions whose label is not -100."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX)


def lr_at(step: int, cfg: WarmStartConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr (step counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(model: Any, tok: Any, src_dir: Path, out_dir: Path, meta: dict[str, Any]) -> None:
    """Write an HF checkpoint dir atomically: build it next to out_dir, then rename, so an interrupted run
    never leaves a directory that looks finished."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    for extra in ("generation_config.json", "asyncgrpo_tiny.json"):
        if (src_dir / extra).exists() and not (tmp / extra).exists():
            shutil.copy(src_dir / extra, tmp / extra)
    (tmp / "asyncgrpo_warm_start.json").write_text(json.dumps(meta, indent=1) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def warm_start(model_dir: str | Path, train_file: str | Path, out_dir: str | Path, cfg: WarmStartConfig | None = None,
               prompt_key: str = "prompt", completion_key: str = "solution", log: Any = _stderr) -> WarmStartResult:
    """Fine-tune the checkpoint in model_dir on train_file's (prompt, solution) pairs; write out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asyncgrpo.tasks.jsonl import read_records

    cfg = cfg or WarmStartConfig()
    cfg.validate()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    records = read_records(train_file, required=(prompt_key, completion_key))
    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    eos_id = tok.eos_token_id
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_id
    examples = [encode_pair(tok, r[prompt_key], r[completion_key], eos_id) for r in records]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    # No weight decay on norms and biases, as usual for transformers.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    result = WarmStartResult(out_dir=str(out_dir), steps=cfg.steps, seconds=0.0)
    window: list[float] = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:  # next epoch: a fresh seeded permutation
            order.extend(torch.randperm(len(examples), generator=gen).tolist())
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = collate([examples[i] for i in idx], pad_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = completion_loss(logits, batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        window.append(loss.item())
        if step == 0:
            result.first_loss = window[0]
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean = sum(window) / len(window)
            result.losses.append((step + 1, mean))
            log(f"warm-start step {step + 1}/{cfg.steps} loss {mean:.4f} lr {lr_at(step, cfg):.2e} {time.perf_counter() - t0:.1f}s")
            window = []
    result.seconds = time.perf_counter() - t0
    result.final_loss = result.losses[-1][1]
    model.eval()
    # 1500 steps at this learning rate amplify last-bit differences between kernel sets (AVX-512 vs AVX2 end at
    # different weights, even in float64): record which ran, so two warm starts' numbers can be told apart
    meta = {"source": str(model_dir), "train_file": str(train_file), "config": asdict(cfg), "examples": len(examples),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "mkl_enable_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
            "seconds": round(result.seconds, 2), "first_loss": result.first_loss, "final_loss": result.final_loss,
            "losses": result.losses}
    save_checkpoint(model, tok, model_dir, out_dir, meta)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = WarmStartConfig()
    parser.add_argument("--model", required=True, help="HF checkpoint directory to start from")
    parser.add_argument("--data", required=True, help="task JSONL with prompt and solution fields (train.jsonl)")
    parser.add_argument("--out", required=True, help="directory to write the fine-tuned HF checkpoint into")
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW; warmup then cosine)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed for data order and dropout-free training")
    parser.add_argument("--log-every", type=int, default=d.log_every, help="print the mean loss every N steps (stderr)")
    parser.add_argument("--prompt-key", default="prompt", help="record field holding the prompt")
    parser.add_argument("--completion-key", default="solution", help="record field holding the target completion")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 keeps results reproducible)")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    torch.set_num_threads(args.threads)
    cfg = WarmStartConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed,
                          log_every=args.log_every)
    res = warm_start(args.model, args.data, args.out, cfg, prompt_key=args.prompt_key, completion_key=args.completion_key)
    print(json.dumps({"out": res.out_dir, "steps": res.steps, "seconds": round(res.seconds, 1),
                      "first_loss": round(res.first_loss, 4), "final_loss": round(res.final_loss, 4)}))
    return 0
