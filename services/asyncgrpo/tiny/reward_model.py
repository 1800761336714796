"""Tiny reward models, built offline, on a tiny causal LM's backbone: a sequence-classification head (ORM) and a
token-classification head (PRM)."""

from __future__ import annotations

from pathlib import Path


def build_reward_model(backbone_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A *ForSequenceClassification checkpoint with one label (the score) on `backbone_dir`'s transformer, its
    head initialised (seeded); with the backbone's tokenizer. Loads in asyncgrpo reward-server and in SGLang."""
    from transformers import AutoModelForSequenceClassification

    return _build_head(AutoModelForSequenceClassification, backbone_dir, out_dir, seed)


def _build_head(auto_cls, backbone_dir: str | Path, out_dir: str | Path, seed: int) -> Path:  # type: ignore[no-untyped-def]
    """`auto_cls` (an HF Auto*Classification class) with one label on `backbone_dir`'s transformer, its head
    initialised (seeded), saved with the backbone's tokenizer."""
    import torch
    from transformers import AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = auto_cls.from_pretrained(backbone_dir, num_labels=1, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(backbone_dir).save_pretrained(out)
    return out


def answer_pairs(records: list[dict[str, str]], seed: int) -> list[tuple[str, str]]:
    """(right, wrong) texts per record: the prompt with its worked solution, and the same solution with the result
    off by 1-9 (both where it is worked out and after ####), so only the arithmetic tells them apart."""
    import random

    rng = random.Random(seed)
    out = []
    for r in records:
        right = int(r["answer"])
        wrong = right + rng.choice([d for d in range(-9, 10) if d])
        bad = r["solution"].replace(f"={right} ", f"={wrong} ").replace(f"#### {right}", f"#### {wrong}")
        out.append((r["prompt"] + r["solution"], r["prompt"] + bad))
    return out


def train_reward_model(model_dir: str | Path, records: list[dict[str, str]], *, steps: int = 300, batch_size: int = 32,
                       lr: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Train the ORM at `model_dir` in place with the pairwise (Bradley-Terry) loss -log sigmoid(s_right - s_wrong)
    on answer_pairs(records); returns the final loss and the pair accuracy on fresh wrong answers."""
    import random

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def scores(texts: list[str]) -> torch.Tensor:
        enc = [tok.encode(t) for t in texts]
        n = max(len(e) for e in enc)
        ids = torch.full((len(enc), n), int(model.config.pad_token_id), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, : len(e)], mask[i, : len(e)] = torch.tensor(e), 1
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = torch.tensor([len(e) - 1 for e in enc])
        return model.score(hidden[torch.arange(len(enc)), last]).squeeze(-1)

    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        pairs = answer_pairs(rng.sample(records, min(batch_size, len(records))), seed=seed * 100003 + step)
        s = scores([a for a, _ in pairs] + [b for _, b in pairs])
        loss = -F.logsigmoid(s[: len(pairs)] - s[len(pairs):]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pairs = answer_pairs(records, seed=seed + 7)
        s = scores([a for a, _ in pairs] + [b for _, b in pairs])
        acc = float((s[: len(pairs)] > s[len(pairs):]).float().mean())
    model.save_pretrained(model_dir, safe_serialization=True)
    return {"loss": loss.item(), "pair_accuracy": acc}


# The tiny task's worked answer " 47+85=132 #### 132" as two steps: the computation, and the final answer.
TINY_STEP_SEPARATOR = " ####"


def build_prm_model(backbone_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A *ForTokenClassification checkpoint with one label (a step's logit of being right) on `backbone_dir`'s
    transformer, its head initialised (seeded), with the backbone's tokenizer: a process reward model that
    asyncgrpo reward-server serves on /score_steps."""
    from transformers import AutoModelForTokenClassification

    return _build_head(AutoModelForTokenClassification, backbone_dir, out_dir, seed)


def step_examples(records: list[dict[str, str]], seed: int) -> list[tuple[str, list[str], list[float]]]:
    """(prompt, steps, labels) per record, steps split by TINY_STEP_SEPARATOR, a step labelled 1 when its number is
    the right result: the worked solution (1, 1), or one of three corruptions drawn at random, a wrong result copied
    to the end (0, 0), a right result miscopied (1, 0), or a wrong result with the right final answer (0, 1)."""
    import random

    from asyncgrpo.rewards.steps import split_steps

    rng = random.Random(seed)
    out = []
    for r in records:
        right = int(r["answer"])
        wrong = right + rng.choice([d for d in range(-9, 10) if d])
        kind = rng.randrange(4)
        work, final = [(right, right), (wrong, wrong), (right, wrong), (wrong, right)][kind]
        sol = r["solution"].replace(f"={right} ", f"={work} ").replace(f"#### {right}", f"#### {final}")
        out.append((r["prompt"], list(split_steps(sol, TINY_STEP_SEPARATOR)), [float(work == right), float(final == right)]))
    return out


def train_prm_model(model_dir: str | Path, records: list[dict[str, str]], *, steps: int = 300, batch_size: int = 32,
                    lr: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Train the PRM at `model_dir` in place: binary cross-entropy of each step's logit at its last token against its
    label (step_examples); returns the final loss and the step accuracy (prob > 0.5) on fresh corruptions."""
    import random

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForTokenClassification.from_pretrained(model_dir, dtype=torch.float32)
    pad = int(model.config.pad_token_id if model.config.pad_token_id is not None else tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def logits(batch: list[tuple[str, list[str], list[float]]]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs, rows, cols, labels = [], [], [], []
        for i, (prompt, st, lab) in enumerate(batch):
            ids = tok.encode(prompt)
            for s, y in zip(st, lab):
                ids = ids + tok.encode(s)  # the tiny tokenizer is byte-level: pieces encode as the whole does
                rows.append(i)
                cols.append(len(ids) - 1)
                labels.append(y)
            seqs.append(ids)
        n = max(len(s) for s in seqs)
        x = torch.full((len(seqs), n), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, s in enumerate(seqs):
            x[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        out = model(input_ids=x, attention_mask=mask).logits[..., 0]
        return out[torch.tensor(rows), torch.tensor(cols)], torch.tensor(labels)

    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        batch = step_examples(rng.sample(records, min(batch_size, len(records))), seed=seed * 100003 + step)
        z, y = logits(batch)
        loss = F.binary_cross_entropy_with_logits(z, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        z, y = logits(step_examples(records, seed=seed + 7))
        acc = float(((z > 0).float() == y).float().mean())
    model.save_pretrained(model_dir, safe_serialization=True)
    return {"loss": loss.item(), "step_accuracy": acc}
