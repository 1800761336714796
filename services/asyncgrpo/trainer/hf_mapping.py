"""HF (Qwen2 / Llama) <-> megatron-core GPTModel weight mapping, tensor-parallel aware.

Pure functions over tensors, no torch.distributed: `hf_to_megatron` gives the state dict of one TP rank,
`megatron_param_to_hf` turns the TP shards of one megatron parameter back into HF tensors (the caller
gathers the shards). Layout facts (notes/megatron-core-on-cpu.md):

* linear_qkv rows are laid out per KV group as [q heads of the group, k, v] (biases alike), so a TP
  shard is a contiguous block of whole KV groups;
* linear_fc1 is [gate_shard; up_shard] on each TP rank;
* column-parallel (qkv, fc1, embedding, output layer) split dim 0, row-parallel (linear_proj, fc2)
  split dim 1, norms are replicated;
* the vocabulary is padded to a multiple of the TP size with zero rows (the trainer masks the padded
  logits), and unpadded on export;
* tied embeddings have no output_layer (share_embeddings_and_output_weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


@dataclass(frozen=True)
class ModelArch:
    """The shape facts of an HF decoder that the mapping and the megatron config need."""

    model_type: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool

    def padded_vocab_size(self, tp_size: int) -> int:
        return -(-self.vocab_size // tp_size) * tp_size

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArch":
        """Read an HF config.json dict; unsupported features raise with the field named."""
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json model_type={mt!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"config.json rope type {rope_type!r} is not supported by the megatron mapping; only default RoPE")
        # transformers 5 keeps rope_theta in rope_parameters; older configs have it at the top level.
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        if mt == "qwen2" and cfg.get("use_sliding_window"):
            raise ValueError("config.json use_sliding_window=true is not supported; set it false")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act={cfg.get('hidden_act')!r}; only silu (SwiGLU) is supported")
        if mt == "llama" and cfg.get("mlp_bias"):
            raise ValueError("config.json mlp_bias=true is not supported")
        n_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(
            model_type=mt,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            ffn_hidden_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=n_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or hidden // n_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=mt == "qwen2" or bool(cfg.get("attention_bias", False)),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelArch":
        p = Path(path) / "config.json"
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: actor.path must be an HF checkpoint directory")
        return cls.from_hf_config(json.loads(p.read_text()))

    def check_tp(self, tp_size: int) -> None:
        if self.num_kv_heads % tp_size or self.num_heads % tp_size:
            raise ValueError(
                f"trainer.tensor_parallel_size={tp_size} must divide num_key_value_heads={self.num_kv_heads} "
                f"and num_attention_heads={self.num_heads}"
            )
        if self.ffn_hidden_size % tp_size:
            raise ValueError(f"trainer.tensor_parallel_size={tp_size} must divide intermediate_size={self.ffn_hidden_size}")


def _chunk(t: Tensor, tp_rank: int, tp_size: int, dim: int) -> Tensor:
    return torch.chunk(t, tp_size, dim=dim)[tp_rank].clone()


def _pad_vocab(w: Tensor, padded: int) -> Tensor:
    if w.shape[0] == padded:
        return w
    return torch.cat([w, w.new_zeros(padded - w.shape[0], *w.shape[1:])], dim=0)


def _qkv_interleave(q: Tensor, k: Tensor, v: Tensor, arch: ModelArch) -> Tensor:
    """HF separate q/k/v (rows = heads * head_dim) -> megatron rows [per KV group: q..., k, v]."""
    g, d = arch.num_kv_heads, arch.head_dim
    qpg = arch.num_heads // g
    tail = q.shape[1:]
    q = q.reshape(g, qpg * d, *tail)
    k = k.reshape(g, d, *tail)
    v = v.reshape(g, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _qkv_split(qkv: Tensor, arch: ModelArch) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of _qkv_interleave on the full (gathered) tensor."""
    g, d = arch.num_kv_heads, arch.head_dim
    qpg = arch.num_heads // g
    tail = qkv.shape[1:]
    x = qkv.reshape(g, (qpg + 2) * d, *tail)
    q, k, v = torch.split(x, [qpg * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def _norm_names(i: int, te_spec: bool) -> tuple[str, str]:
    pre = f"decoder.layers.{i}"
    if te_spec:
        return f"{pre}.self_attention.linear_qkv.layer_norm_weight", f"{pre}.mlp.linear_fc1.layer_norm_weight"
    return f"{pre}.input_layernorm.weight", f"{pre}.pre_mlp_layernorm.weight"


def hf_to_megatron(hf: dict[str, Tensor], arch: ModelArch, tp_rank: int = 0, tp_size: int = 1, te_spec: bool = False) -> dict[str, Tensor]:
    """The megatron GPTModel state dict of TP rank `tp_rank` from a full HF state dict."""
    arch.check_tp(tp_size)
    vp = arch.padded_vocab_size(tp_size)

    def get(name: str) -> Tensor:
        if name not in hf:
            raise KeyError(f"HF checkpoint lacks {name!r} (model_type={arch.model_type})")
        return hf[name]

    out: dict[str, Tensor] = {}
    out["embedding.word_embeddings.weight"] = _chunk(_pad_vocab(get("model.embed_tokens.weight"), vp), tp_rank, tp_size, 0)
    for i in range(arch.num_layers):
        h, m = f"model.layers.{i}", f"decoder.layers.{i}"
        ln1, ln2 = _norm_names(i, te_spec)
        out[ln1] = get(f"{h}.input_layernorm.weight").clone()
        out[ln2] = get(f"{h}.post_attention_layernorm.weight").clone()
        a = f"{h}.self_attn"
        qkv = _qkv_interleave(get(f"{a}.q_proj.weight"), get(f"{a}.k_proj.weight"), get(f"{a}.v_proj.weight"), arch)
        out[f"{m}.self_attention.linear_qkv.weight"] = _chunk(qkv, tp_rank, tp_size, 0)
        if arch.qkv_bias:
            qkv_b = _qkv_interleave(get(f"{a}.q_proj.bias"), get(f"{a}.k_proj.bias"), get(f"{a}.v_proj.bias"), arch)
            out[f"{m}.self_attention.linear_qkv.bias"] = _chunk(qkv_b, tp_rank, tp_size, 0)
        out[f"{m}.self_attention.linear_proj.weight"] = _chunk(get(f"{a}.o_proj.weight"), tp_rank, tp_size, 1)
        gate = _chunk(get(f"{h}.mlp.gate_proj.weight"), tp_rank, tp_size, 0)
        up = _chunk(get(f"{h}.mlp.up_proj.weight"), tp_rank, tp_size, 0)
        out[f"{m}.mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        out[f"{m}.mlp.linear_fc2.weight"] = _chunk(get(f"{h}.mlp.down_proj.weight"), tp_rank, tp_size, 1)
    out["decoder.final_layernorm.weight"] = get("model.norm.weight").clone()
    if not arch.tie_word_embeddings:
        out["output_layer.weight"] = _chunk(_pad_vocab(get("lm_head.weight"), vp), tp_rank, tp_size, 0)
    return out


def megatron_param_names(arch: ModelArch, te_spec: bool = False) -> list[str]:
    """Megatron parameter names in a stable export order (embedding, layers, final norm, output)."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(arch.num_layers):
        m = f"decoder.layers.{i}"
        ln1, ln2 = _norm_names(i, te_spec)
        names += [ln1, f"{m}.self_attention.linear_qkv.weight"]
        if arch.qkv_bias:
            names.append(f"{m}.self_attention.linear_qkv.bias")
        names += [f"{m}.self_attention.linear_proj.weight", ln2, f"{m}.mlp.linear_fc1.weight", f"{m}.mlp.linear_fc2.weight"]
    names.append("decoder.final_layernorm.weight")
    if not arch.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def tp_split_dim(name: str) -> int | None:
    """The dim a megatron parameter is split along under TP (None = replicated)."""
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight")) or name in (
        "embedding.word_embeddings.weight", "output_layer.weight"
    ):
        return 0
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    return None


def megatron_param_to_hf(name: str, shards: list[Tensor], arch: ModelArch) -> list[tuple[str, Tensor]]:
    """HF (name, tensor) pairs from the TP shards (in rank order) of one megatron parameter."""
    tp = len(shards)
    dim = tp_split_dim(name)
    if name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", torch.cat(shards, 0)[: arch.vocab_size])]
    if name == "output_layer.weight":
        return [("lm_head.weight", torch.cat(shards, 0)[: arch.vocab_size])]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", shards[0])]
    parts = name.split(".")
    if parts[:2] != ["decoder", "layers"]:
        raise KeyError(f"unknown megatron parameter {name!r}")
    i, rest = parts[2], ".".join(parts[3:])
    h = f"model.layers.{i}"
    if rest in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
        return [(f"{h}.input_layernorm.weight", shards[0])]
    if rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
        return [(f"{h}.post_attention_layernorm.weight", shards[0])]
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = _qkv_split(torch.cat(shards, 0), arch)
        a = f"{h}.self_attn"
        return [(f"{a}.q_proj.{kind}", q), (f"{a}.k_proj.{kind}", k), (f"{a}.v_proj.{kind}", v)]
    if rest == "self_attention.linear_proj.weight":
        return [(f"{h}.self_attn.o_proj.weight", torch.cat(shards, 1))]
    if rest == "mlp.linear_fc1.weight":
        gates, ups = zip(*(torch.chunk(s, 2, dim=0) for s in shards))
        return [(f"{h}.mlp.gate_proj.weight", torch.cat(gates, 0)), (f"{h}.mlp.up_proj.weight", torch.cat(ups, 0))]
    if rest == "mlp.linear_fc2.weight":
        return [(f"{h}.mlp.down_proj.weight", torch.cat(shards, 1))]
    raise KeyError(f"unknown megatron parameter {name!r} (split dim {dim})")


def megatron_to_hf(shards: list[dict[str, Tensor]], arch: ModelArch, te_spec: bool = False) -> dict[str, Tensor]:
    """The full HF state dict from the megatron state dicts of all TP ranks (rank order)."""
    out: dict[str, Tensor] = {}
    for name in megatron_param_names(arch, te_spec):
        for hf_name, t in megatron_param_to_hf(name, [s[name] for s in shards], arch):
            out[hf_name] = t.contiguous()
    return out
