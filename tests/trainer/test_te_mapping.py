"""The HF mapping for both megatron layer specs: local (CPU, no Transformer Engine) and Transformer Engine.

The two specs differ, for a Qwen2 / Llama decoder, only in where the two RMSNorm weights of a layer live. TE fuses
each norm into the linear that follows it (`TELayerNormColumnParallelLinear`, TE's `LayerNormLinear`), whose
parameters are `weight`, `bias` (only with a bias), `layer_norm_weight`, and `layer_norm_bias` only for
LayerNorm, not for RMSNorm (TE's layernorm_linear.py: `if self.normalization != "RMSNorm": ... layer_norm_bias`).
So under the TE spec

    decoder.layers.N.input_layernorm.weight   -> decoder.layers.N.self_attention.linear_qkv.layer_norm_weight
    decoder.layers.N.pre_mlp_layernorm.weight -> decoder.layers.N.mlp.linear_fc1.layer_norm_weight

and every other name (embedding, linear_qkv weight / bias, linear_proj, linear_fc1 / fc2 weights, the final norm
`decoder.final_layernorm.weight`, which is TENorm's `weight`, the untied output layer) is the same.

Transformer Engine is not installed here (it needs CUDA and nvcc), so the real TE-spec model cannot be built and
megatron's `get_gpt_layer_with_transformer_engine_spec()` raises NameError on its TESpecProvider. These tests
therefore build the TE-spec model from megatron's OWN spec function with its backend provider replaced by CPU
stand-ins: every module path and submodule name is megatron's, only the leaf classes are stand-ins; the one
class whose parameter names matter, the fused norm + column-parallel linear, is a megatron ColumnParallelLinear
with TE's `layer_norm_weight` added (and RMSNorm applied to its input, as TE does). That model's parameter names
are checked against hf_mapping's te_spec names, loaded through the mapping, and its logits compared with the
local-spec model's on norm weights made distinct (a swapped norm changes the logits). The name itself is also
checked against megatron-core's source text (its TE spec's sharded-state-dict key map and its TE extension name
`layer_norm_weight`), read as text so that nothing imports TE. Where TE is importable (a GPU machine with TE),
test_real_te_spec_names_match builds the real TE-spec model and compares its names.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from asyncgrpo.trainer.hf_mapping import ModelArch, hf_to_megatron, megatron_param_names, megatron_param_to_hf, megatron_to_hf, tp_split_dim
from trainer import numerics


def _source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, module
    return Path(spec.origin).read_text()


def test_te_names_in_megatron_source() -> None:
    """The fused-norm names are megatron's own: its TE spec maps the op-fuser MLP's norm onto
    `mlp.linear_fc1.layer_norm_weight`, its TE extension reads `layer_norm_weight` off the fused linear, and the
    TE spec builds linear_qkv and linear_fc1 from `column_parallel_layer_norm_linear()` with no separate
    input / pre-MLP norm (IdentityOp)."""
    specs = _source("megatron.core.models.gpt.gpt_layer_specs")
    assert '"mlp.0.weight": "mlp.linear_fc1.layer_norm_weight"' in specs
    assert "linear_qkv=backend.column_parallel_layer_norm_linear()" in specs
    assert "linear_fc1 = backend.column_parallel_layer_norm_linear()" in specs
    assert "pre_mlp_layernorm=backend.layer_norm() if num_experts else IdentityOp" in specs
    te_ext = _source("megatron.core.extensions.transformer_engine")
    assert "layer_norm_weight" in te_ext and "class TELayerNormColumnParallelLinear" in te_ext


def _counting(hf: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Counter]:
    """The HF dict, counting every read of a tensor."""
    reads: Counter = Counter()

    class Counting(dict):
        def __getitem__(self, k: str) -> torch.Tensor:
            reads[k] += 1
            return super().__getitem__(k)

    return Counting(hf), reads


@pytest.mark.parametrize("te_spec", [False, True], ids=["local", "te"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("which", ["qwen2_tied", "llama_untied"])
def test_mapping_both_specs(which: str, tp: int, te_spec: bool, tiny_model_dir: Path, llama_untied_dir: Path) -> None:
    """hf_to_megatron reads every HF tensor exactly once per TP rank; every rank's state dict has exactly the
    spec's names with the full shape split along tp_split_dim; megatron_to_hf emits every HF name exactly once and
    the round trip is bit-exact; the two specs differ exactly in the two norm names per layer."""
    d = tiny_model_dir if which == "qwen2_tied" else llama_untied_dir
    arch = ModelArch.from_dir(d)
    hf = load_file(str(d / "model.safetensors"))
    names = megatron_param_names(arch, te_spec)
    assert len(names) == len(set(names))
    full = hf_to_megatron(hf, arch, 0, 1, te_spec)  # full (TP=1) shapes
    shards = []
    for r in range(tp):
        counted, reads = _counting(hf)
        sd = hf_to_megatron(counted, arch, r, tp, te_spec)
        assert set(reads) == set(hf) and set(reads.values()) == {1}, f"rank {r}: HF tensors read != once: {reads}"
        assert set(sd) == set(names), sorted(set(sd) ^ set(names))
        for n, t in sd.items():
            want = list(full[n].shape)
            dim = tp_split_dim(n)
            if dim is not None and tp > 1:
                want[dim] //= tp
            assert list(t.shape) == want, f"{n}: shard shape {list(t.shape)} != {want}"
        shards.append(sd)
    emitted = [h for n in names for h, _ in megatron_param_to_hf(n, [s[n] for s in shards], arch)]
    assert sorted(emitted) == sorted(hf), f"emitted HF names differ: {sorted(set(emitted) ^ set(hf))[:5]}"
    back = megatron_to_hf(shards, arch, te_spec)
    for k, v in hf.items():
        assert torch.equal(back[k], v), k
    other = set(megatron_param_names(arch, not te_spec))
    te_only = (set(names) - other) if te_spec else (other - set(names))
    want_te = {f"decoder.layers.{i}.{n}" for i in range(arch.num_layers)
               for n in ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")}
    assert te_only == want_te, sorted(te_only ^ want_te)
    assert len(set(names) ^ other) == 4 * arch.num_layers


# --- the TE spec's structure from megatron's own spec function, with CPU stand-ins for TE's leaf classes -------

def _standin_te_spec():
    """megatron's get_gpt_layer_with_transformer_engine_spec() with TESpecProvider replaced by CPU stand-ins."""
    import megatron.core.models.gpt.gpt_layer_specs as specs
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    class LayerNormColumnParallelLinear(ColumnParallelLinear):
        """Stand-in for TELayerNormColumnParallelLinear: TE's parameter names (`weight`, `bias` if any,
        `layer_norm_weight`; no `layer_norm_bias` with RMSNorm) and its function (RMSNorm, then the GEMM)."""

        def __init__(self, input_size, output_size, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            assert config.normalization == "RMSNorm"
            self.eps = config.layernorm_epsilon
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))

        def forward(self, x, *args, **kwargs):
            x = torch.nn.functional.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.eps)
            return super().forward(x, *args, **kwargs)

    class StandInTEProvider(LocalSpecProvider):
        def fuse_layernorm_and_linear(self) -> bool:
            return True

        def column_parallel_layer_norm_linear(self):
            return LayerNormColumnParallelLinear

        def layer_norm(self, rms_norm: bool = False, for_qk: bool = False):
            return super().layer_norm(rms_norm=True, for_qk=for_qk)

    had = hasattr(specs, "TESpecProvider")
    saved = getattr(specs, "TESpecProvider", None)
    specs.TESpecProvider = StandInTEProvider
    try:
        return specs.get_gpt_layer_with_transformer_engine_spec()
    finally:
        if had:
            specs.TESpecProvider = saved
        else:
            del specs.TESpecProvider


def _distinct_norms(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint with every norm weight made distinct (random around 1), so a misplaced norm shows."""
    g = torch.Generator().manual_seed(5)
    out = dict(hf)
    for k, v in hf.items():
        if k.endswith("norm.weight"):
            out[k] = 1.0 + 0.5 * torch.randn(v.shape, generator=g)
    return out


@pytest.mark.usefixtures("megatron_world1")
def test_te_spec_model_loads_through_the_mapping(tiny_model_dir: Path) -> None:
    """The (stand-in) TE-spec GPTModel has exactly hf_mapping's te_spec names and shapes; loaded through the
    mapping (load_megatron_state is strict), it computes the local-spec model's logits, with every norm weight
    distinct: swapping the two fused norms moves the logits by O(1), far above the fp32 tolerance
    numerics.LOGIT_ATOL (1e-5; the stand-in computes the same RMSNorm formula as the local spec)."""
    from asyncgrpo.trainer.logprobs import forward_logits
    from asyncgrpo.trainer.model import build_gpt_model, is_te_model, layer_spec, load_megatron_state

    arch = ModelArch.from_dir(tiny_model_dir)
    hf = _distinct_norms(load_file(str(tiny_model_dir / "model.safetensors")))
    te = build_gpt_model(arch, 1, spec=_standin_te_spec())
    local = build_gpt_model(arch, 1, spec=layer_spec(use_te=False))
    assert is_te_model(te) and not is_te_model(local)
    got = {n for n, _ in te.named_parameters()}
    assert got == set(megatron_param_names(arch, te_spec=True)), sorted(got ^ set(megatron_param_names(arch, te_spec=True)))
    load_megatron_state(te, hf_to_megatron(hf, arch, 0, 1, te_spec=True))
    load_megatron_state(local, hf_to_megatron(hf, arch, 0, 1, te_spec=False))
    ids = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z_te, z_local = forward_logits(te, ids), forward_logits(local, ids)
        diff = float((z_te - z_local).abs().max())
        assert diff < numerics.LOGIT_ATOL, f"TE-spec vs local-spec logits: max|diff| {diff:.3e} >= {numerics.LOGIT_ATOL:g}"
        # the check can fail: the two fused norms swapped
        swapped = hf_to_megatron(hf, arch, 0, 1, te_spec=True)
        for i in range(arch.num_layers):
            a, b = f"decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight", f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight"
            swapped[a], swapped[b] = swapped[b], swapped[a]
        load_megatron_state(te, swapped)
        wrong = float((forward_logits(te, ids) - z_local).abs().max())
    assert wrong > 100 * numerics.LOGIT_ATOL, f"swapped norms moved the logits by only {wrong:.3e}"
    from asyncgrpo.trainer.model import export_hf_state_dict

    load_megatron_state(te, hf_to_megatron(hf, arch, 0, 1, te_spec=True))
    exported = dict(export_hf_state_dict(te, arch))
    assert set(exported) == set(hf) and all(torch.equal(exported[k], hf[k]) for k in hf)
    print(f"[te-mapping] TE-spec (stand-in) vs local logits max|diff| {diff:.1e}; swapped norms {wrong:.2e}")


@pytest.mark.skipif(not importlib.util.find_spec("transformer_engine") or not torch.cuda.is_available(),
                    reason="Transformer Engine (and CUDA) not available: the real TE-spec model cannot be built")
@pytest.mark.usefixtures("megatron_world1")
def test_real_te_spec_names_match(tiny_model_dir: Path) -> None:  # pragma: no cover - needs TE
    from asyncgrpo.trainer.model import build_gpt_model, layer_spec

    arch = ModelArch.from_dir(tiny_model_dir)
    te = build_gpt_model(arch, 1, spec=layer_spec(use_te=True))
    assert {n for n, _ in te.named_parameters()} == set(megatron_param_names(arch, te_spec=True))
