"""Build a small HF checkpoint directory (config.json, model.safetensors, tokenizer.json, ...) from a
config alone, so tests and CPU runs never download anything. transformers, our trainer and a real SGLang
load it like any Qwen2 or Llama checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EOS_TOKEN = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
# ChatML, as Qwen2 writes it, so that chat-style clients also work against the tiny model.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Shapes are small enough for CPU tests, but keep GQA (kv heads < heads), RoPE and SwiGLU so the
# weight mapping and the numerics exercise what a real model has.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "base": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2),
}
VOCAB_SIZE = 384  # 256 bytes + specials, padded to a multiple of 128 so TP=2 splits it evenly


def build_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per byte (digit-level for arithmetic),
    any UTF-8 text round-trips, and it saves as an ordinary tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN, *CHAT_TOKENS])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, additional_special_tokens=list(CHAT_TOKENS),
        model_max_length=4096, clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_tiny_model(
    out_dir: str | Path,
    preset: str = "tiny",
    arch: str = "qwen2",
    seed: int = 0,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 1024,
    **overrides: Any,
) -> Path:
    """Write a randomly initialised (seeded) model plus tokenizer to out_dir and return the path."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} unknown; choose from {sorted(PRESETS)}")
    if arch not in ("qwen2", "llama"):
        raise ValueError(f"arch {arch!r} unknown; choose qwen2 or llama")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    eos_id = tok.convert_tokens_to_ids(EOS_TOKEN)
    shape = {**PRESETS[preset], **overrides}
    common = dict(
        vocab_size=VOCAB_SIZE, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=tie_word_embeddings, bos_token_id=eos_id,
        eos_token_id=eos_id, pad_token_id=eos_id, initializer_range=0.02, **shape,
    )
    cfg = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    cfg.torch_dtype = "float32"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id, do_sample=True).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "asyncgrpo_tiny.json").write_text(json.dumps({"preset": preset, "arch": arch, "seed": seed, **shape}, indent=1))
    return out
