"""Prompts for the rollout service: records from JSONL (or parquet), a prompt template, token ids, and
a deterministic per-epoch order so that (epoch, position) — what the Redis cursor stores — names the
same prompt in every process and after every restart."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncgrpo.tasks.jsonl import TaskDataError, read_records


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str
    answer: str
    input_ids: list[int]
    # the record's other fields, for reward functions (RewardInput.metadata); not part of the prompt's identity
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TaskDataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert the file to JSONL") from None
    return pq.read_table(path).to_pylist()


def load_records(path: str | Path, prompt_key: str, answer_key: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not str(path):
        raise TaskDataError("train_dataset.path is empty; set it to a JSONL file of prompts (asyncgrpo make-task writes one)")
    if p.suffix == ".parquet":
        records = _read_parquet(p)
        for i, rec in enumerate(records):
            for key in (prompt_key, answer_key):
                if key not in rec:
                    raise TaskDataError(f"{p}: row {i}: field '{key}' is missing; set train_dataset.prompt_key/answer_key")
        if not records:
            raise TaskDataError(f"{p}: no rows")
        return records
    return read_records(p, required=(prompt_key, answer_key))


class PromptDataset:
    """Records + template + tokenizer. `order(epoch)` is a pure function of (seed, epoch, size)."""

    def __init__(self, records: Sequence[dict[str, Any]], encode: Callable[[str], list[int]], *, template: str = "{prompt}",
                 prompt_key: str = "prompt", answer_key: str = "answer", seed: int = 1, shuffle: bool = True) -> None:
        if not records:
            raise TaskDataError("dataset has no records")
        self.records = list(records)
        self.encode = encode
        self.template = template
        self.prompt_key = prompt_key
        self.answer_key = answer_key
        self.seed = seed
        self.shuffle = shuffle
        self._orders: dict[int, list[int]] = {}
        self.render(0)  # a bad template fails at start-up, naming the field

    def __len__(self) -> int:
        return len(self.records)

    def fingerprint(self) -> str:
        """Identifies the prompt list (ids and texts), so a restart against another file is caught."""
        h = hashlib.sha256()
        for rec in self.records:
            h.update(str(rec.get("id", "")).encode() + b"\0" + str(rec[self.prompt_key]).encode() + b"\0")
        return h.hexdigest()[:16]

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            idx = list(range(len(self.records)))
            if self.shuffle:
                random.Random(f"{self.seed}:{epoch}").shuffle(idx)
            self._orders = {epoch: idx}  # keep one epoch: the cursor moves forward
        return self._orders[epoch]

    def render(self, row: int) -> str:
        rec = self.records[row]
        fields = dict(rec)
        fields.setdefault("prompt", rec[self.prompt_key])
        try:
            return self.template.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise TaskDataError(
                f"train_dataset.prompt_template {self.template!r}: cannot format record {rec.get('id', row)!r} "
                f"({type(e).__name__}: {e}); use {{field}} names of the record: {sorted(rec)}"
            ) from None

    def get(self, epoch: int, position: int) -> Prompt:
        row = self.order(epoch)[position]
        rec = self.records[row]
        text = self.render(row)
        meta = {k: v for k, v in rec.items() if k not in (self.prompt_key, self.answer_key)}
        return Prompt(str(rec.get("id", row)), text, str(rec[self.answer_key]), list(self.encode(text)), meta)


def tokenizer_encoder(model_path: str) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """(encode, decode) from the HF tokenizer in the model directory (no special tokens added: the template
    is the whole prompt)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)

    def encode(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False))

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    return encode, decode
