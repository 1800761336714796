"""A tiny, real, offline policy: a small Qwen2/Llama-architecture HF checkpoint, its byte-level
tokenizer, and the supervised warm start that gives GRPO something to improve."""

from asyncgrpo.tiny.model import PRESETS, build_tiny_model, build_tokenizer

__all__ = ["PRESETS", "build_tiny_model", "build_tokenizer"]
