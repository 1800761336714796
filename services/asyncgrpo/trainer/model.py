"""The megatron-core GPTModel policy: parallel setup, construction from an HF checkpoint, HF export.

Local layer spec on CPU (and wherever Transformer Engine is missing), TE spec where it imports. The
weights come in through our own mapping (hf_mapping.py) and go out the same way, gathered over TP.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from asyncgrpo.trainer import megatron_compat
from asyncgrpo.trainer.hf_mapping import ModelArch, hf_to_megatron, megatron_param_names, megatron_param_to_hf, tp_split_dim
from asyncgrpo.utils.net import is_loopback, pin_gloo_interface, tcp_store

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "asyncgrpo_tiny.json")


def te_available() -> bool:
    """Transformer Engine importable (then the TE layer spec is used)."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def compute_device() -> torch.device:
    """The device this process computes on: the current CUDA device (init_parallel sets it from LOCAL_RANK)
    when CUDA is there, else the CPU. (megatron_compat's shim that makes torch.cuda.current_device() answer
    the CPU device is installed only without CUDA, so on a GPU this is the real index.)"""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_parallel(tp_size: int = 1, seed: int = 0, backend: str | None = None, timeout_s: float = 600,
                  bind_host: str = "127.0.0.1") -> None:
    """Initialise torch.distributed (world size 1 from defaults if no launcher set the env) and megatron's
    model-parallel groups: TP = tp_size, DP = world_size / tp_size. Idempotent. The rendezvous store
    listens on `bind_host` (lone process) or MASTER_ADDR (a launcher's env), never on every interface;
    under torchrun's agent store the agent owns that listener (set its --master-addr / --rdzv-endpoint)."""
    from megatron.core import parallel_state, tensor_parallel

    megatron_compat.install()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        timeout = timedelta(seconds=timeout_s)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun: its agent hosts the store
            dist.init_process_group(backend=backend, timeout=timeout)
        elif "WORLD_SIZE" in os.environ:  # a launcher set the env:// variables (our spawn helpers, plain env)
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
            pin_gloo_interface(addr if is_loopback(addr) or rank == 0 else "")
            store = tcp_store(addr, port, world, rank == 0, timeout)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:  # a lone process: world size 1 on a private port (no MASTER_* in os.environ: children inherit it)
            pin_gloo_interface(bind_host)  # even a world of one opens gloo listeners
            store = tcp_store(bind_host, 0, 1, True, timeout)
            dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)
    world = dist.get_world_size()
    if world % tp_size:
        raise ValueError(f"trainer.tensor_parallel_size={tp_size} does not divide the world size {world}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size)
    # Dropout is 0 in GRPO, so the inference tracker (fork = no-op) is exact and needs no CUDA RNG.
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not torch.cuda.is_available())


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def transformer_config(arch: ModelArch, tp_size: int, dtype: torch.dtype):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp_size,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        attention_softmax_in_fp32=True,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=False,  # every weight is loaded from the checkpoint
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def layer_spec(use_te: bool | None = None):
    """megatron's GPT layer spec: Transformer Engine's where TE imports (and CUDA is there), the local one
    otherwise. The two name the pre-attention and pre-MLP RMSNorm weights differently (TE fuses them into the
    next linear: `self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`; local:
    `input_layernorm.weight`, `pre_mlp_layernorm.weight`); hf_mapping's te_spec flag follows the built model
    (is_te_model), so loading and export work with either."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec

    if use_te is None:
        use_te = te_available()
    return get_gpt_layer_with_transformer_engine_spec() if use_te else get_gpt_layer_local_spec(normalization="RMSNorm")


def build_gpt_model(arch: ModelArch, tp_size: int, dtype: torch.dtype = torch.float32, spec=None):
    """An uninitialised GPTModel of the given architecture (weights come from load_hf_weights); `spec`: a
    megatron layer spec (default layer_spec(): TE where available, local otherwise)."""
    from megatron.core.models.gpt import GPTModel

    arch.check_tp(tp_size)
    cfg = transformer_config(arch, tp_size, dtype)
    spec = layer_spec() if spec is None else spec
    with megatron_compat.cuda_on_cpu():
        model = GPTModel(
            config=cfg,
            transformer_layer_spec=spec,
            vocab_size=arch.padded_vocab_size(tp_size),
            max_sequence_length=arch.max_position_embeddings,
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    _mark_tp_params(model, tp_size)
    return model


def _mark_tp_params(model: torch.nn.Module, tp_size: int) -> None:
    """Megatron sets `tensor_model_parallel` on split weights only inside its initialisers, which
    perform_initialization=False skips; without it the grad norm counts split weights on TP rank 0 only."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for name, p in model.named_parameters():
        dim = tp_split_dim(name)
        if dim is not None and not getattr(p, "tensor_model_parallel", False):
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                if hasattr(p, attr):
                    delattr(p, attr)
            set_tensor_model_parallel_attributes(p, True, dim, 1)


class LazySafetensors(Mapping):
    """A read-only name -> tensor view over the *.safetensors files of an HF directory, loading on access."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}: save the HF checkpoint with safe_serialization=True")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def __getitem__(self, name: str) -> Tensor:
        return self._where[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel under DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def is_te_model(model: torch.nn.Module) -> bool:
    return any("layer_norm_weight" in n for n, _ in unwrap(model).named_parameters())


def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path, arch: ModelArch) -> None:
    """Load this TP rank's slice of the HF checkpoint into the GPTModel (strict on parameters)."""
    from megatron.core import parallel_state

    gpt = unwrap(model)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    sd = hf_to_megatron(LazySafetensors(hf_dir), arch, tp_rank, tp_size, te_spec=is_te_model(gpt))
    load_megatron_state(gpt, sd)


def load_megatron_state(gpt: torch.nn.Module, sd: dict[str, Tensor]) -> None:
    params = dict(gpt.named_parameters())
    missing = sorted(set(params) - set(sd))
    unexpected = sorted(set(sd) - set(params))
    if missing or unexpected:
        raise RuntimeError(f"megatron state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            src = sd[name]
            if tuple(src.shape) != tuple(p.shape):
                raise RuntimeError(f"{name}: checkpoint shape {tuple(src.shape)} != model shape {tuple(p.shape)}")
            p.copy_(src.to(p.dtype))


def export_hf_state_dict(
    model: torch.nn.Module, arch: ModelArch, dtype: torch.dtype | None = None, attr: str | None = None
) -> Iterator[tuple[str, Tensor]]:
    """Yield (hf_name, full tensor) for every HF weight in a stable order, gathering TP shards.

    Collective over the TP group: every TP rank must iterate it to the end. Tensors are CPU copies.
    `attr="main_grad"` exports megatron DDP's gradient buffers in HF layout instead (for tests/debugging).
    """
    from megatron.core import parallel_state

    gpt = unwrap(model)
    params = dict(gpt.named_parameters())
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    for name in megatron_param_names(arch, te_spec=is_te_model(gpt)):
        local = (params[name] if attr is None else getattr(params[name], attr)).detach()
        if tp_size > 1 and tp_split_dim(name) is not None:
            shards = [torch.empty_like(local) for _ in range(tp_size)]
            dist.all_gather(shards, local.contiguous(), group=group)
        else:
            shards = [local]
        for hf_name, t in megatron_param_to_hf(name, [s.cpu() for s in shards], arch):
            # Always a copy: the caller may hold it across optimizer steps (weight sync, HF save).
            yield hf_name, t.to(dtype or t.dtype, copy=True).contiguous()


def save_hf_checkpoint(model: torch.nn.Module, arch: ModelArch, src_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path | None:
    """Write model.safetensors + config.json + tokenizer files to out_dir (on global rank 0; collective)."""
    from safetensors.torch import save_file

    tensors = dict(export_hf_state_dict(model, arch, dtype))
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((Path(src_dir) / "config.json").read_text())
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).exists():
            shutil.copy2(Path(src_dir) / name, out / name)
    return out
