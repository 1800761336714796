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
