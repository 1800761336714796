"""What the benchmarks share: the model shapes they build (HF config.json fields of Qwen2.5-0.5B / 1.5B, random
weights: nothing can be downloaded where they run), one builder of such a checkpoint, and the markdown append."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# HF config.json shapes (Qwen/Qwen2.5-0.5B, Qwen/Qwen2.5-1.5B); "smoke" is the tiny preset's, for CPU checks
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    "smoke": dict(model_type="qwen2", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True),
}


def build_qwen2(out: Path, shape: str, dtype: str = "bfloat16", device: str = "cpu") -> Path:
    """An HF checkpoint directory of SHAPES[shape] with random weights (initialised on `device`, fast on a GPU)
    and the project's byte tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    from asyncgrpo.tiny.model import EOS_TOKEN, build_tokenizer

    tok = build_tokenizer()
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    fields = {k: v for k, v in SHAPES[shape].items() if k != "model_type"}
    cfg = Qwen2Config(**fields, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, use_sliding_window=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(eos_token_id=eos, pad_token_id=eos, do_sample=True).save_pretrained(out)
    tok.save_pretrained(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def append_markdown(path: str | Path | None, text: str) -> None:
    """Print a result table and append it to `path` (docs/benchmarks.md) when one is given."""
    print(text)
    if path:
        with open(path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")
