"""Batched scoring: requests wait in a queue, a loop takes up to max_batch_size of them (waiting at most
batch_wait_s for more once one is there) and scores them in one forward pass on a worker thread."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from asyncgrpo.utils.metrics import counter, histogram

log = logging.getLogger(__name__)


class ScoreError(ValueError):
    """A request the model cannot score (too long, empty); the message names the field and the fix."""


@dataclass
class _Item:
    ids: list[int]
    future: asyncio.Future[list[Any]] = field(repr=False)
    positions: list[int] | None = None  # token classification (PRM): the logits at these positions


class _Metrics:
    def __init__(self) -> None:
        self.requests = counter("reward_server_sequences_total", "Sequences scored.")
        self.batch = histogram("reward_server_batch_size", "Sequences per forward pass.", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.forward = histogram("reward_server_forward_seconds", "Seconds of one batched forward pass.")


class Scorer:
    """`await scorer.score(ids)` -> the model's logits for that sequence (num_labels floats); with `positions`
    (a token-classification model, a PRM), the logits at each of those token positions."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int = 32, batch_wait_s: float = 0.005) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.model = model.eval()
        self.tok = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_len = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        # HF's sequence-classification heads score the last non-pad token: they need a pad id in the config
        pad = model.config.pad_token_id
        if pad is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            model.config.pad_token_id = pad
        self.pad_id = int(pad)
        self.num_labels = int(model.config.num_labels)
        # a token-classification model is a process reward model: it scores steps (at their last tokens)
        self.process = type(model).__name__.endswith("ForTokenClassification")
        if self.process and self.num_labels not in (1, 2):
            raise ScoreError(f"a process reward model needs 1 label (a logit) or 2 (wrong, right), not {self.num_labels}")
        self.m = _Metrics()
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = threading.Lock()  # one forward at a time (torch threads are shared)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=True))

    def encode_steps(self, prompt: str, steps: list[str]) -> tuple[list[int], list[int]]:
        """The ids of prompt + steps joined and, per step, the position of the token holding its last character
        (character offsets of a fast tokenizer; else the length of each prefix's encoding)."""
        from asyncgrpo.rewards.steps import char_ends

        text = prompt + "".join(steps)
        ends = [len(prompt) + e for e in char_ends(steps)]
        if getattr(self.tok, "is_fast", False):
            enc = self.tok(text, add_special_tokens=True, return_offsets_mapping=True)
            spans = [(i, a, b) for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a]  # special tokens: (0, 0)
            pos = [max((i for i, a, _ in spans if a < e), default=0) for e in ends]
            return list(enc["input_ids"]), pos
        return self.encode(text), [max(len(self.encode(text[:e])) - 1, 0) for e in ends]

    def step_probability(self, logits: list[list[float]]) -> list[float]:
        """A PRM's logits at step ends as the probability the step is right: sigmoid of one label, softmax's
        'right' (label 1) of two (Qwen2.5-Math-PRM's convention)."""
        t = torch.tensor(logits, dtype=torch.float32)
        if self.num_labels == 1:
            return torch.sigmoid(t[:, 0]).tolist()
        return torch.softmax(t, dim=-1)[:, 1].tolist()

    def check(self, ids: list[int], where: str) -> None:
        if not ids:
            raise ScoreError(f"{where}: empty sequence; give at least one token")
        if self.max_len is not None and len(ids) > self.max_len:
            raise ScoreError(f"{where}: {len(ids)} tokens, more than the model's context of {self.max_len}; "
                             "shorten the text (e.g. rollout.max_new_tokens)")
        vocab = int(self.model.config.vocab_size)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ScoreError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab})")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="reward-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def score(self, ids: list[int], positions: list[int] | None = None) -> list[Any]:
        assert self._queue is not None, "Scorer.start() first"
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(ids, fut, positions))
        return await fut

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0 and self._queue.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), max(timeout, 0)))
                except asyncio.TimeoutError:
                    break
            live = [b for b in batch if not b.future.done()]  # a client that gave up is not scored
            if not live:
                continue
            try:
                scores = await loop.run_in_executor(None, self.forward, [b.ids for b in live], [b.positions for b in live])
            except Exception as e:  # noqa: BLE001 - reported to each waiting request, the loop goes on
                log.exception("reward model forward failed")
                for b in live:
                    if not b.future.done():
                        b.future.set_exception(e)
                continue
            for b, s in zip(live, scores):
                if not b.future.done():
                    b.future.set_result(s)

    def forward(self, seqs: list[list[int]], positions: list[list[int] | None] | None = None) -> list[list[Any]]:
        """Logits of each sequence, right-padded into one batch: the head reads each one's last real token, or for a
        sequence given positions, each of those tokens."""
        positions = positions or [None] * len(seqs)
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        device = next(self.model.parameters()).device
        rows = [[len(s) - 1] if p is None else p for s, p in zip(seqs, positions)]
        row = torch.tensor([i for i, r in enumerate(rows) for _ in r], device=device)
        col = torch.tensor([c for r in rows for c in r], device=device)
        with self._lock, torch.no_grad(), self.m.forward.time():
            if hasattr(self.model, "score"):
                # Llama/Qwen2/Mistral-style heads: score each sequence's own tokens. HF's sequence pooling finds the
                # last one by looking for pad ids, which misreads a sequence that itself ends in the pad id.
                hidden = self.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
                logits = self.model.score(hidden[row, col])
            else:
                out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                logits = out[row, col] if out.dim() == 3 else out[row]
        self.m.batch.observe(len(seqs))
        self.m.requests.inc(len(seqs))
        flat = logits.float().cpu().tolist()
        out_rows, i = [], 0
        for s, p in zip(rows, positions):
            out_rows.append(flat[i] if p is None else flat[i : i + len(s)])
            i += len(s)
        return out_rows
