"""Typed bodies of genserver's endpoints (pydantic v2), with SGLang 0.5.23's field names and defaults
(sglang/srt/managers/io_struct.py, sglang/api/v1/api_types.py).

FastAPI validates every body against these before a handler runs, so nothing malformed reaches the engine
thread, and the OpenAPI document describes every body. Every number is finite and bounded, every string and
list bounded, types are strict (no "1" for 1, no 1.0 for an int, no 0 for false) and an unknown key is refused
by name. What depends on the served model (token ids below its vocabulary size, prompts shorter than its
context) is checked by `expand_generate`, still before anything is queued.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from asyncgrpo.genserver.sampling import ALL_TOKENS, KNOWN_KEYS, NEUTRAL, SamplingSpec

MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; n > 1 derives seed + i modulo 2**63
MAX_TOKEN_ID = 2**31 - 1  # static bound; the served vocabulary narrows it (x-token-id in the OpenAPI)
MAX_TOKENS = 1 << 24  # max_new_tokens, min_new_tokens, stream_interval, logprob_start_len
MAX_N = 1024
MAX_PROMPTS = 1024  # prompts in one batch request
MAX_SEQUENCES = 4096  # prompts x n of one /generate
MAX_PROMPT_TOKENS = 1 << 20
MAX_TEXT_CHARS = 1 << 20
MAX_STOP = 64
MAX_STOP_CHARS = 512
MAX_STOP_TOKEN_IDS = 1024
MAX_RID_CHARS = 256
MAX_LABEL_CHARS = 256  # weight versions, group names
MAX_PARAM_NAME_CHARS = 512
MAX_PATH_CHARS = 4096
MAX_TENSORS = 1 << 17  # tensors announced by one update
MAX_DIMS = 8
MAX_DIM = 1 << 40
MAX_WORLD = 1 << 16
MAX_TRUNCATE = 1 << 20
WIRE_DTYPES = ("float32", "bfloat16", "float16", "float64")  # what a weight update may send; cast to the model's

TOKEN_ID_MARK = "x-token-id"  # the OpenAPI step sets maximum = vocab - 1 on schemas carrying this mark


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _many_if_list(v: Any) -> str:
    return "many" if isinstance(v, list) else "one"


def _many_if_nested(v: Any) -> str:
    return "many" if isinstance(v, list) and v and isinstance(v[0], list) else "one"


def one_or_many(one: Any, many: Any, pick: Callable[[Any], str] = _many_if_list) -> Any:
    """A value or a list of them (SGLang's single/batch fields), tagged so errors name one branch only."""
    return Annotated[Union[Annotated[one, Tag("one")], Annotated[many, Tag("many")]], Discriminator(pick)]


TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID, json_schema_extra={TOKEN_ID_MARK: True})]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_TOKENS)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Rid = Annotated[str, Field(max_length=MAX_RID_CHARS)]
Label = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]
GroupName = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]
ParamName = Annotated[str, Field(min_length=1, max_length=MAX_PARAM_NAME_CHARS)]
Count = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


def _batch(item: Any) -> Any:
    return Annotated[list[item], Field(min_length=1, max_length=MAX_PROMPTS)]


def _distinct(values: tuple[Any, ...]) -> list[Any]:
    """Values without repeats (0 and 0.0 count once; false stays apart from 0), in order; [] and {} are not
    hashable, so no dict.fromkeys."""
    out: list[Any] = []
    for v in values:
        if not any(v == o and isinstance(v, bool) == isinstance(o, bool) for o in out):
            out.append(v)
    return out


def _neutral_text(ok: tuple[Any, ...]) -> str:
    return " or ".join(json.dumps(x) for x in _distinct(ok))


class SamplingParams(Body):
    """Every key of SGLang's SamplingParams; null means SGLang's default. Keys genserver does not implement
    (penalties, grammars, logit_bias, ...) are accepted only at their neutral value."""

    max_new_tokens: Count | None = 128
    stop: one_or_many(StopText, Annotated[list[StopText], Field(max_length=MAX_STOP)]) | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    stop_regex: one_or_many(Annotated[str, Field(max_length=MAX_STOP_CHARS)],
                            Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)]) | None = None
    temperature: Annotated[float, Field(ge=0.0)] | None = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = 1.0
    top_k: Annotated[int, Field(ge=-1, le=ALL_TOKENS)] | None = ALL_TOKENS
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = 0.0
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    repetition_penalty: float | None = 1.0
    min_new_tokens: Count | None = 0
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = 1
    json_schema: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    regex: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    ebnf: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    structural_tag: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True  # a slow-tokenizer detail; genserver's fast tokenizers ignore it
    no_stop_trim: bool | None = False
    stream_interval: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    logit_bias: Annotated[dict[Annotated[str, Field(max_length=32)], float], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    sampling_seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    custom_params: dict[str, Any] | None = None
    beam_width: Annotated[int, Field(ge=0, le=MAX_N)] | None = None
    watermark: dict[str, Any] | None = None
    choice: Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)] | None = None

    @field_validator(*NEUTRAL)
    @classmethod
    def _neutral(cls, v: Any, info: Any) -> Any:
        ok = NEUTRAL[info.field_name]
        if v not in ok:
            raise PydanticCustomError("not_supported", "not supported by genserver: only {ok} (SGLang implements it)",
                                      {"ok": _neutral_text(ok)})
        return v

    def to_spec(self) -> SamplingSpec:
        s = SamplingSpec()
        for name in ("max_new_tokens", "temperature", "top_p", "min_p", "min_new_tokens", "n", "sampling_seed",
                     "stream_interval", "ignore_eos", "skip_special_tokens", "no_stop_trim"):
            v = getattr(self, name)
            if v is not None:
                setattr(s, name, v)
        if self.top_k is not None:
            s.top_k = ALL_TOKENS if self.top_k in (-1, 0) else self.top_k
        s.stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)
        s.stop_token_ids = list(self.stop_token_ids or [])
        return s


assert set(SamplingParams.model_fields) == KNOWN_KEYS, "SamplingParams must hold exactly SGLang's keys"


# SGLang's other GenerateReqInput fields (sglang/srt/managers/io_struct.py, 0.5.23), so a body an SGLang client
# or sglang-router sends is understood field by field. Those that change nothing on one CPU server with one
# model take any value of their type and are ignored:
GENERATE_IGNORED: dict[str, Any] = {
    "model": Annotated[str, Field(max_length=MAX_LABEL_CHARS)] | None,  # sglang-router adds it (null)
    "log_metrics": bool | None, "no_logs": bool | None,  # per-request metric/log switches
    "session_id": Rid | None, "routing_key": Rid | None, "conversation_id": Rid | None,  # routing hints
    "custom_labels": Annotated[dict[Annotated[str, Field(max_length=MAX_LABEL_CHARS)],
                                    Annotated[str, Field(max_length=MAX_LABEL_CHARS)]], Field(max_length=64)] | None,
    "received_time": float | None,
}
# and those genserver does not implement are accepted only at SGLang's default (null means the default):
GENERATE_NEUTRAL: dict[str, tuple[Any, ...]] = {
    **{k: (None,) for k in (
        "input_embeds", "image_data", "video_data", "audio_data", "mm_hashes", "mm_content_hashes", "video_config",
        "watermark", "token_ids_logprob", "sampling_logprobs_mode", "modalities", "session_params", "lora_path",
        "lora_id", "custom_logit_processor", "positional_embed_overrides", "bootstrap_host", "bootstrap_port",
        "bootstrap_room", "bootstrap_pair_key", "decode_tp_size", "http_worker_ipc", "max_thinking_tokens", "priority",
        "extra_key", "external_trace_header", "need_wait_for_mm_inputs", "num_items_assigned", "encoder_urls",
        "max_dynamic_patch", "min_dynamic_patch", "image_max_dynamic_patch", "video_max_dynamic_patch",
        "images_config", "mm_processor_kwargs", "multi_item_delimiter_indices", "token_indices_to_pool", "cache_salt",
        "kv_hints")},
    **{k: (None, False) for k in (
        "use_audio_in_video", "return_sampling_mask", "return_text_in_logprobs", "return_flat_raw_top_logprobs",
        "return_flat_raw_output_top_logprobs", "return_flat_raw_top_logprobs_b64", "return_hidden_states",
        "return_routed_experts", "return_indexer_topk", "background", "require_reasoning", "return_bytes",
        "return_entropy", "return_prompt_token_ids")},
    **{k: (None, 0) for k in ("routed_experts_start_len", "routed_dp_rank", "data_parallel_rank",
                              "disagg_prefill_dp_rank")},
}


class _GenerateCore(Body):
    """POST /generate: SGLang's GenerateReqInput. A batch (a list of texts or of token-id lists) or n > 1 answers
    a JSON list; a string rid becomes "{rid}_{i}" per sequence."""

    ALLOWED_HINT: ClassVar[str] = ("genserver serves text, input_ids, rid, sampling_params, return_logprob, "
                                   "logprob_start_len, top_logprobs_num, stream (SGLang's other GenerateReqInput "
                                   "fields at their defaults)")

    text: one_or_many(Text, _batch(Text)) | None = None
    input_ids: one_or_many(TokenIds, _batch(TokenIds), _many_if_nested) | None = None
    rid: one_or_many(Rid, _batch(Rid)) | None = None
    sampling_params: one_or_many(SamplingParams, _batch(SamplingParams)) | None = None
    return_logprob: one_or_many(bool, _batch(bool)) | None = None
    # accepted for SGLang clients; genserver returns output log-probs only (no prompt or top-k log-probs)
    logprob_start_len: one_or_many(Annotated[int, Field(ge=-1, le=MAX_TOKENS)],
                                   _batch(Annotated[int, Field(ge=-1, le=MAX_TOKENS)])) | None = None
    top_logprobs_num: one_or_many(Annotated[int, Field(ge=0, le=MAX_TOKENS)],
                                  _batch(Annotated[int, Field(ge=0, le=MAX_TOKENS)])) | None = None
    stream: bool = False

    @field_validator("*")
    @classmethod
    def _neutral(cls, v: Any, info: Any) -> Any:
        ok = GENERATE_NEUTRAL.get(info.field_name)
        if ok is not None and v not in ok:
            raise PydanticCustomError("not_supported", "not supported by genserver: only {ok} (SGLang implements it)",
                                      {"ok": _neutral_text(ok)})
        return v

    @property
    def is_batch(self) -> bool:
        return isinstance(self.text, list) or _many_if_nested(self.input_ids) == "many"

    @property
    def prompts(self) -> list[Any]:
        p = self.text if self.text is not None else self.input_ids
        return list(p) if self.is_batch else [p]  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _shape(self) -> "_GenerateCore":
        if (self.text is None) == (self.input_ids is None):
            raise PydanticCustomError("prompt", "give exactly one of text and input_ids")
        n = len(self.prompts)
        for name in ("rid", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num"):
            v = getattr(self, name)
            if isinstance(v, list) and len(v) != n:
                raise PydanticCustomError("batch", "{name} has {got} entries for {n} prompt(s): give one per prompt",
                                          {"name": name, "got": len(v), "n": n})
        sps = self.sampling_params if isinstance(self.sampling_params, list) else [self.sampling_params] * n
        total = sum((sp.n or 1) if sp is not None else 1 for sp in sps)
        if total > MAX_SEQUENCES:
            raise PydanticCustomError("batch", "the request expands to {total} sequences (prompts x sampling_params.n); "
                                      "at most {most}: split it", {"total": total, "most": MAX_SEQUENCES})
        return self


def _neutral_field(ok: tuple[Any, ...]) -> tuple[Any, Any]:
    return (Any, Field(None, json_schema_extra={"enum": _distinct(ok)},
                       description="An SGLang field genserver does not implement: only its default"))


GenerateReqInput = create_model(
    "GenerateReqInput", __base__=_GenerateCore, __module__=__name__,
    **{k: (t, None) for k, t in GENERATE_IGNORED.items()},
    **{k: _neutral_field(ok) for k, ok in GENERATE_NEUTRAL.items()})


class GenerateRequestError(ValueError):
    """A /generate body that is well-formed but does not fit the served model; the message names the field."""


class GenerateItem(NamedTuple):
    rid: str
    input_ids: list[int]
    spec: SamplingSpec
    return_logprob: bool


def _per_prompt(v: Any, n: int) -> list[Any]:
    return list(v) if isinstance(v, list) else [v] * n


def _first_outside(ids: list[int], vocab_size: int) -> int | None:
    if not ids or (min(ids) >= 0 and max(ids) < vocab_size):
        return None
    return next(i for i, t in enumerate(ids) if not 0 <= t < vocab_size)


def expand_generate(body: _GenerateCore, *, encode: Callable[[str], list[int]], vocab_size: int,
                    max_context: int) -> tuple[list[GenerateItem], bool]:
    """One GenerateItem per generated sequence (prompts x n, SGLang's rid scheme) and whether the answer is a list;
    GenerateRequestError when a prompt or stop token does not fit the model."""
    batch = body.is_batch
    prompts = body.prompts
    n = len(prompts)
    sps = _per_prompt(body.sampling_params, n)
    rid = body.rid
    rids = list(rid) if isinstance(rid, list) else [None] * n if rid is None else (
        [f"{rid}_{i}" for i in range(n)] if batch else [rid])
    rls = _per_prompt(body.return_logprob, n)
    out: list[GenerateItem] = []
    any_n = False
    for i, (prompt, sp, r, lp) in enumerate(zip(prompts, sps, rids, rls)):
        where = f"{'text' if body.text is not None else 'input_ids'}{f'[{i}]' if batch else ''}"
        ids = list(prompt) if isinstance(prompt, list) else list(encode(prompt))
        if not ids:
            raise GenerateRequestError(f"{where}: the prompt encodes to no tokens")
        bad = _first_outside(ids, vocab_size)
        if bad is not None and isinstance(prompt, list):
            raise GenerateRequestError(f"{where}[{bad}]: token id {ids[bad]} is outside the model's vocabulary "
                                       f"[0, {vocab_size})")
        if bad is not None:
            raise GenerateRequestError(f"{where}: encodes to token id {ids[bad]} (position {bad}), outside the model's "
                                       f"vocabulary [0, {vocab_size}): the tokenizer does not match the model")
        if len(ids) >= max_context:
            raise GenerateRequestError(f"{where}: the prompt has {len(ids)} tokens; the model's context is "
                                       f"{max_context}, so at most {max_context - 1}")
        spec = (sp or SamplingParams()).to_spec()
        sp_where = f"sampling_params{f'[{i}]' if isinstance(body.sampling_params, list) else ''}"
        bad = _first_outside(spec.stop_token_ids, vocab_size)
        if bad is not None:
            raise GenerateRequestError(f"{sp_where}.stop_token_ids[{bad}]: token id {spec.stop_token_ids[bad]} is "
                                       f"outside the model's vocabulary [0, {vocab_size})")
        base = r if r is not None else uuid.uuid4().hex
        any_n |= spec.n > 1
        for j in range(spec.n):
            sj = SamplingSpec(**{**spec.__dict__, "n": 1, "stop": list(spec.stop),
                                 "stop_token_ids": list(spec.stop_token_ids)})
            if spec.n > 1 and spec.sampling_seed is not None:
                sj.sampling_seed = (spec.sampling_seed + j) % (MAX_SEED + 1)  # n distinct, reproducible samples
            out.append(GenerateItem(f"{base}_{j}" if spec.n > 1 else base, ids, sj, bool(lp)))
    return out, batch or any_n


# ---------------- control and weight endpoints (SGLang's *ReqInput names) ----------------

class AbortReq(Body):
    """POST /abort_request: rid is a prefix; abort_all aborts everything."""

    rid: Rid | None = ""
    abort_all: bool = False


class PauseGenerationReqInput(Body):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class ContinueGenerationReqInput(Body):
    torch_empty_cache: bool = True


Host = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9._:\[\]%-]+$")]


class InitWeightsUpdateGroupReqInput(Body):
    """POST /init_weights_update_group: join the trainer's group as rank rank_offset (the trainer is rank 0,
    so genserver never hosts the rendezvous store)."""

    master_address: Host
    master_port: Annotated[int, Field(ge=1, le=65535)]
    rank_offset: Annotated[int, Field(ge=1, le=MAX_WORLD - 1)]
    world_size: Annotated[int, Field(ge=2, le=MAX_WORLD)]
    group_name: GroupName = "weight_update_group"
    backend: Literal["gloo", "nccl"] = "gloo"  # SGLang's default is nccl; genserver's is the CPU backend

    @model_validator(mode="after")
    def _rank(self) -> "InitWeightsUpdateGroupReqInput":
        if self.rank_offset >= self.world_size:
            raise PydanticCustomError("rank", "rank_offset {r} must be below world_size {w}",
                                      {"r": self.rank_offset, "w": self.world_size})
        return self


class DestroyWeightsUpdateGroupReqInput(Body):
    group_name: GroupName = "weight_update_group"


Selector = Literal["all", "target"]  # genserver serves no draft model


class BeginWeightUpdateReqInput(Body):
    selector: Selector = "all"


class EndWeightUpdateReqInput(Body):
    pass


Shape = Annotated[list[Annotated[int, Field(ge=0, le=MAX_DIM)]], Field(max_length=MAX_DIMS)]


class UpdateWeightsFromDistributedReqInput(Body):
    """POST /update_weights_from_distributed: the tensors rank 0 broadcasts next, in `names` order (one flat
    uint8 tensor with load_format "flattened_bucket")."""

    names: Annotated[list[ParamName], Field(min_length=1, max_length=MAX_TENSORS)]
    dtypes: Annotated[list[Literal[WIRE_DTYPES]], Field(min_length=1, max_length=MAX_TENSORS)]  # type: ignore[valid-type]
    shapes: Annotated[list[Shape], Field(min_length=1, max_length=MAX_TENSORS)]
    group_name: GroupName = "weight_update_group"
    flush_cache: bool = True  # genserver keeps no prefix cache: nothing to flush
    abort_all_requests: bool = False
    weight_version: Label | None = None
    load_format: Literal["flattened_bucket", "direct"] | None = None
    selector: Selector = "all"
    torch_empty_cache: bool = False

    @model_validator(mode="after")
    def _aligned(self) -> "UpdateWeightsFromDistributedReqInput":
        if not len(self.names) == len(self.dtypes) == len(self.shapes):
            raise PydanticCustomError("lengths", "names ({a}), dtypes ({b}) and shapes ({c}) must have one entry per "
                                      "tensor", {"a": len(self.names), "b": len(self.dtypes), "c": len(self.shapes)})
        if len(set(self.names)) != len(self.names):
            dup = next(n for i, n in enumerate(self.names) if n in self.names[:i])
            raise PydanticCustomError("duplicate", "names lists '{name}' twice: one entry per tensor", {"name": dup})
        return self


MAX_PAYLOAD_CHARS = 1 << 24  # a reference payload is a few hundred bytes per tensor, never the weights


class UpdateWeightsFromTensorReqInput(Body):
    """POST /update_weights_from_tensor: tensors by reference (a CUDA IPC handle, or a shared-memory file on
    CPU), one base64 payload per TP rank (asyncgrpo.sglang.tensor_payload); genserver is one rank."""

    serialized_named_tensors: Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_PAYLOAD_CHARS)]],
                                        Field(min_length=1, max_length=1)]
    load_format: Literal["flattened_bucket", "direct"] | None = None
    flush_cache: bool = True  # genserver keeps no prefix cache: nothing to flush
    abort_all_requests: bool = False
    weight_version: Label | None = None
    selector: Selector = "all"
    torch_empty_cache: bool = False


class UpdateWeightFromDiskReqInput(Body):
    """POST /update_weights_from_disk: an HF checkpoint directory (its *.safetensors) or one .safetensors file."""

    model_path: Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS)]
    load_format: Literal["auto", "safetensors"] | None = None
    abort_all_requests: bool = False
    weight_version: Label | None = None
    flush_cache: bool = True  # nothing to flush (no prefix cache)
    torch_empty_cache: bool = False


class UpdateWeightVersionReqInput(Body):
    new_version: Label
    abort_all_requests: bool = True  # SGLang's default; the project's client sends false


class GetWeightsByNameReqInput(Body):
    name: ParamName
    truncate_size: Annotated[int, Field(ge=0, le=MAX_TRUNCATE)] = 100


class UpdateResult(BaseModel):
    """The answer of the weight and group endpoints (400 with success false when the update failed)."""

    success: bool
    message: str
    weight_version: str | None = None


def set_token_id_maximum(schema: Any, vocab_size: int) -> None:
    """In an OpenAPI document, bound every token id by the served vocabulary (maximum = vocab_size - 1)."""
    if isinstance(schema, dict):
        if schema.pop(TOKEN_ID_MARK, False):
            schema["maximum"] = vocab_size - 1
        for v in schema.values():
            set_token_id_maximum(v, vocab_size)
    elif isinstance(schema, list):
        for v in schema:
            set_token_id_maximum(v, vocab_size)
