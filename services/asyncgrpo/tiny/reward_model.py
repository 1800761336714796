"""Tiny reward models, built offline: a sequence-classification head (ORM) on a tiny causal LM's backbone."""

from __future__ import annotations

from pathlib import Path


def build_reward_model(backbone_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A *ForSequenceClassification checkpoint with one label (the score) on `backbone_dir`'s transformer, its
    head initialised (seeded); with the backbone's tokenizer. Loads in asyncgrpo reward-server and in SGLang."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(backbone_dir, num_labels=1, dtype=torch.float32)
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
