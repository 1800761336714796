"""HF <-> megatron weight mapping as pure tensor functions (no torch.distributed needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from asyncgrpo.trainer.hf_mapping import ModelArch, hf_to_megatron, megatron_to_hf


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("which", ["qwen2_tied", "llama_untied"])
def test_round_trip_bit_exact(which: str, tp: int, tiny_model_dir: Path, llama_untied_dir: Path) -> None:
    d = tiny_model_dir if which == "qwen2_tied" else llama_untied_dir
    arch = ModelArch.from_dir(d)
    hf = load_file(str(d / "model.safetensors"))
    shards = [hf_to_megatron(hf, arch, r, tp) for r in range(tp)]
    back = megatron_to_hf(shards, arch)
    assert set(back) == set(hf)
    for k, v in hf.items():
        assert torch.equal(back[k], v), k


def test_arch_facts(tiny_model_dir: Path, llama_untied_dir: Path) -> None:
    q = ModelArch.from_dir(tiny_model_dir)
    l = ModelArch.from_dir(llama_untied_dir)
    assert (q.qkv_bias, q.tie_word_embeddings, q.rope_theta) == (True, True, 10000.0)
    assert (l.qkv_bias, l.tie_word_embeddings) == (False, False)
    hf = load_file(str(llama_untied_dir / "model.safetensors"))
    sd = hf_to_megatron(hf, l, 0, 1)
    assert "output_layer.weight" in sd and not any(k.endswith("linear_qkv.bias") for k in sd)


def test_qkv_layout_per_kv_group(tiny_model_dir: Path) -> None:
    """Rank r of TP=2 holds KV group r as [q heads of the group, k, v] (the layout megatron's attention splits)."""
    arch = ModelArch.from_dir(tiny_model_dir)
    hf = load_file(str(tiny_model_dir / "model.safetensors"))
    d, qpg = arch.head_dim, arch.num_heads // arch.num_kv_heads
    a = "model.layers.0.self_attn"
    for r in range(2):
        qkv = hf_to_megatron(hf, arch, r, 2)["decoder.layers.0.self_attention.linear_qkv.weight"]
        assert torch.equal(qkv[: qpg * d], hf[f"{a}.q_proj.weight"][r * qpg * d : (r + 1) * qpg * d])
        assert torch.equal(qkv[qpg * d : (qpg + 1) * d], hf[f"{a}.k_proj.weight"][r * d : (r + 1) * d])
        assert torch.equal(qkv[(qpg + 1) * d :], hf[f"{a}.v_proj.weight"][r * d : (r + 1) * d])
        fc1 = hf_to_megatron(hf, arch, r, 2)["decoder.layers.0.mlp.linear_fc1.weight"]
        half = arch.ffn_hidden_size // 2
        assert torch.equal(fc1[:half], hf["model.layers.0.mlp.gate_proj.weight"][r * half : (r + 1) * half])
        assert torch.equal(fc1[half:], hf["model.layers.0.mlp.up_proj.weight"][r * half : (r + 1) * half])


def test_vocab_padding_round_trip(tiny_model_dir: Path) -> None:
    """A vocabulary not divisible by TP is padded with zero rows and unpadded on export."""
    arch = ModelArch.from_dir(tiny_model_dir)
    odd = ModelArch(**{**arch.__dict__, "vocab_size": 383})
    hf = load_file(str(tiny_model_dir / "model.safetensors"))
    hf["model.embed_tokens.weight"] = hf["model.embed_tokens.weight"][:383]
    shards = [hf_to_megatron(hf, odd, r, 2) for r in range(2)]
    assert shards[1]["embedding.word_embeddings.weight"].shape[0] == 192
    assert torch.equal(shards[1]["embedding.word_embeddings.weight"][-1], torch.zeros(arch.hidden_size))
    assert torch.equal(megatron_to_hf(shards, odd)["model.embed_tokens.weight"], hf["model.embed_tokens.weight"])


def test_bad_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="model_type"):
        ModelArch.from_hf_config({"model_type": "gpt2"})
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 6, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1}
    with pytest.raises(ValueError, match="rope type"):
        ModelArch.from_hf_config({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        ModelArch.from_hf_config(base).check_tp(2)
