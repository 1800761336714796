"""The scheduler: one thread owns the model and runs continuous batching with a KV cache.

Batch state is a set of rows, each a request whose cache holds prompt + output[:-1] (its last sampled
token is fed at the next decode step). Caches are kept per layer as [B, H, L, D] tensors, left-padded to
a common length, with a [B, L] attention mask and per-row positions. Between decode steps the scheduler
admits waiting requests (a prefill of just the new rows, left-padded, then concatenated onto the batch)
and drops finished rows. So a request joins and leaves the running batch at any step (continuous
batching), and every row keeps its own sampling params and torch.Generator.

Device: all batch state lives on the model's device (`self.device`: cpu, cuda:N): the KV cache, the
attention mask, positions, temperatures and the last sampled token of every row; seeded requests get a
torch.Generator on that device when they join, and unseeded rows draw from one engine generator there. A
decode step therefore copies nothing between host and device except one read-back of the sampled tokens
and their log-probs (`sample_batch_logprobs`); a prefill copies its prompt ids in. A CPU engine is the
same code with device cpu.

Everything that touches the model or the batch (steps, pause, abort, weight application, reads of
weights) runs on this thread; the HTTP side talks to it through `submit()` and per-request callbacks,
so the event loop is never blocked by a forward pass.

One bad request never affects another: the HTTP side validates every request before it gets here, and the
scheduler still isolates failures. A prefill that fails fails only the rows it was admitting (retried one
by one to find the culprit; the running batch is untouched), and a row whose sampling fails is finished
alone. Only a failed decode step, which all rows share, fails the whole batch.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from asyncgrpo.genserver.sampling import SamplingSpec, device_generator, sample_batch_logprobs, tempered_logprobs
from asyncgrpo.genserver.weights import all_finite
from asyncgrpo.utils.metrics import counter, gauge, histogram

log = logging.getLogger(__name__)

M_RUNNING = gauge("genserver_running_requests", "Requests in the running batch.")
M_WAITING = gauge("genserver_waiting_requests", "Requests waiting to join the batch (incl. while paused).")
M_TOKENS = counter("genserver_generated_tokens_total", "Output tokens generated.")
M_TPS = gauge("genserver_tokens_per_second", "Output tokens per second over the last ~2 s of stepping.")
M_VERSION = gauge("genserver_weight_version", "Served weight version (numeric versions; -1 if not a number).")
M_VERSION_INFO = gauge("genserver_weight_version_info", "1 for the served weight version label.", ["version"])
M_BATCH = histogram("genserver_batch_size", "Rows per decode step.", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
M_PAUSED = gauge("genserver_paused", "1 while generation is paused.")


@dataclass
class Request:
    """One sequence being generated. Mutated only on the engine thread; the HTTP side reads snapshots."""

    rid: str
    input_ids: list[int]
    spec: SamplingSpec
    return_logprob: bool
    on_event: Callable[["Request", bool], None]  # (request, finished) called on the engine thread
    stream: bool = False
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    finish_reason: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    # a seeded request draws from its own generator, so its tokens do not depend on what shares its batch;
    # an unseeded one (None) draws from the engine's shared generator, all such rows in one call. Made on the
    # CPU here; the engine remakes it on its device (same seed) when the request first joins the batch.
    generator: torch.Generator | None = None
    stop_text: str | None = None  # matched stop string, to trim the text

    def __post_init__(self) -> None:
        if self.spec.sampling_seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(int(self.spec.sampling_seed))


class EngineError(RuntimeError):
    """A command failed on the engine thread; becomes HTTP 400 with this message."""


def model_vocab_size(model: torch.nn.Module) -> int:
    """Token ids the model can take and produce: the smallest of config.vocab_size, the input embedding rows
    and the output layer rows (a padded embedding has more rows than the tokenizer has tokens)."""
    sizes = [int(getattr(model.config, "vocab_size", 0) or 0)]
    emb = model.get_input_embeddings()
    sizes.append(int(emb.weight.shape[0]))
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        sizes.append(int(out.weight.shape[0]))
    return min(s for s in sizes if s > 0)


def _failure(e: BaseException) -> dict[str, Any]:
    return {"type": "abort", "message": f"engine error: {type(e).__name__}: {e}", "err_type": "internal"}


class Engine:
    """Owns model + tokenizer; `start()` runs the scheduler thread."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, model_path: str, max_batch_size: int = 128,
                 weight_version: str = "default", max_context: int | None = None,
                 num_continuous_decode_steps: int = 1) -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self.model_path = model_path
        self.max_batch_size = max_batch_size
        if num_continuous_decode_steps < 1 or max_batch_size < 1:
            raise ValueError(f"num_continuous_decode_steps={num_continuous_decode_steps} and max_batch_size="
                             f"{max_batch_size} must both be >= 1")
        self.num_continuous_decode_steps = int(num_continuous_decode_steps)
        self._decodes_since_admit = 0
        self.max_context = int(max_context or getattr(model.config, "max_position_embeddings", 4096))
        self.vocab_size = model_vocab_size(model)
        self.weight_version = weight_version
        eos = getattr(model.config, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad_id = int(getattr(model.config, "pad_token_id", None) or next(iter(self.eos_ids), 0))
        self.n_layers = int(model.config.num_hidden_layers)
        self.device = next(model.parameters()).device
        self.waiting: deque[Request] = deque()
        self.rows: list[Request] = []
        self._reset_batch()
        self.paused: str | None = None
        self._cmds: queue.Queue[tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]]] = queue.Queue()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = {"steps": 0, "max_batch_seen": 0, "prefills": 0, "tokens": 0, "requests": 0}
        self._tps_window: deque[tuple[float, int]] = deque()
        self._tps_tokens = 0  # the window's token count, kept as it moves instead of re-summed every step
        self._rng = device_generator(self.device, random.getrandbits(63))  # unseeded requests draw from it
        self._set_version_metric()

    # ---- thread plumbing ----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="genserver-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)

    def submit(self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """Run fn on the engine thread between steps; done(result, error) is called there afterwards."""
        self._cmds.put((fn, done))
        self._wake.set()

    def add_request(self, req: Request) -> None:
        """Queue a request; EngineError for one that cannot run (the HTTP side has checked all of this
        already: this is the engine's own guard, so no caller can put a poisoned row into the batch)."""
        self.stats["requests"] += 1
        if not req.input_ids:
            raise EngineError("input_ids is empty")
        if len(req.input_ids) >= self.max_context:
            raise EngineError(f"prompt has {len(req.input_ids)} tokens; the model's context is {self.max_context}")
        for what, ids in (("input_ids", req.input_ids), ("stop_token_ids", req.spec.stop_token_ids)):
            if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
                bad = next(t for t in ids if not 0 <= t < self.vocab_size)
                raise EngineError(f"{what}: token id {bad} is outside the model's vocabulary [0, {self.vocab_size})")
        if not math.isfinite(req.spec.temperature) or req.spec.temperature < 0:
            raise EngineError(f"temperature {req.spec.temperature} must be a finite number >= 0")
        if req.spec.max_new_tokens == 0:  # nothing to generate: answer at once, as SGLang does
            self.submit(lambda: self._finish(req, {"type": "length", "length": 0}), lambda r, e: None)
            return
        self.submit(lambda: self.waiting.append(req), lambda r, e: None)

    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.device.type == "cuda":  # kernels without an explicit device (HF internals) go to the model's GPU
            torch.cuda.set_device(self.device)
        while not self._stop:
            self._run_commands()
            if self.paused is None and (self.rows or self.waiting):
                try:
                    self._step()
                except Exception as e:  # a failed decode must not kill the server: fail the batch, keep serving
                    log.exception("engine step failed; failing the %d running requests", len(self.rows))
                    for r in self.rows:
                        if r.finish_reason is None:
                            self._finish(r, _failure(e))
                    self._reset_batch()
            else:
                self._wake.wait(0.05)
                self._wake.clear()
            M_RUNNING.set(len(self.rows))
            M_WAITING.set(len(self.waiting))

    def _run_commands(self) -> None:
        while True:
            try:
                fn, done = self._cmds.get_nowait()
            except queue.Empty:
                return
            try:
                res, err = fn(), None
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                res, err = None, e
            done(res, err)

    # ---- batch bookkeeping ----
    def _reset_batch(self) -> None:
        """An empty batch. Per-row state on the device: mask [B, L] (1 = a cached token), pos [B] (the position
        the next fed token takes = the row's cached length), temps [B], last [B] (the token fed next); on the
        host: lens (pos's values, so trimming the cache never reads the device)."""
        self.rows, self.kv = [], []
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)
        self.temps = torch.zeros(0, dtype=torch.float32, device=self.device)
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)
        self.lens: list[int] = []

    def _finish(self, req: Request, reason: dict[str, Any]) -> None:
        req.finish_reason = reason
        try:
            req.on_event(req, True)
        except Exception:  # noqa: BLE001 - one request's callback must not take the scheduler down
            log.exception("finishing request %s failed", req.rid)

    def _fail(self, req: Request, e: BaseException) -> None:
        log.warning("request %s failed alone: %s: %s", req.rid, type(e).__name__, e)
        if req.finish_reason is None:
            self._finish(req, _failure(e))

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                 kv: list[tuple[torch.Tensor, torch.Tensor]] | None) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        new_kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return out.logits[:, -1, :], new_kv

    def _prefill(self, reqs: list[Request]) -> torch.Tensor:
        """Prefill prompt + output so far for new rows, append them to the batch; returns their last logits."""
        seqs = [r.input_ids + r.output_ids for r in reqs]
        L = max(len(s) for s in seqs)
        # left-padded ids and their mask, built on the host and copied in once
        both = torch.tensor([[[self.pad_id] * (L - len(s)) + s for s in seqs],
                             [[0] * (L - len(s)) + [1] * len(s) for s in seqs]], dtype=torch.long, device=self.device)
        ids, mask = both[0], both[1]
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        logits, kv = self._forward(ids, mask, pos, None)
        self.stats["prefills"] += 1
        # merge with the running batch: left-pad the shorter cache so both share one length. Built aside and
        # assigned at the end, so a failure on the way leaves the running batch as it was.
        if self.rows:
            L0 = self.mask.shape[1]
            Lmax = max(L0, L)
            new_kv = [(torch.cat([_lpad(k0, Lmax), _lpad(k1, Lmax)]), torch.cat([_lpad(v0, Lmax), _lpad(v1, Lmax)]))
                      for (k0, v0), (k1, v1) in zip(self.kv, kv)]
            new_mask = torch.cat([_lpad_mask(self.mask, Lmax), _lpad_mask(mask, Lmax)])
        else:
            new_kv, new_mask = kv, mask
        lens = [len(s) for s in seqs]
        new_pos = torch.cat([self.pos, torch.tensor(lens, dtype=torch.long, device=self.device)])
        new_temps = torch.cat([self.temps, torch.tensor([r.spec.temperature for r in reqs], dtype=torch.float32,
                                                        device=self.device)])
        new_last = torch.cat([self.last, torch.zeros(len(reqs), dtype=torch.long, device=self.device)])  # set by _sample
        self.kv, self.mask, self.pos, self.rows = new_kv, new_mask, new_pos, self.rows + reqs
        self.temps, self.last, self.lens = new_temps, new_last, self.lens + lens
        return logits

    def _decode(self) -> torch.Tensor:
        """One decode step of every row: feed each row's last sampled token (already on the device)."""
        mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long, device=self.device)], dim=1)
        logits, self.kv = self._forward(self.last[:, None], mask, self.pos[:, None], self.kv)
        self.mask = mask
        self.pos = self.pos + 1
        self.lens = [n + 1 for n in self.lens]
        return logits

    def _keep(self, keep: list[int]) -> None:
        """Keep only these batch rows; drop left columns no row needs any more."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._reset_batch()
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.lens = [self.lens[i] for i in keep]
        self.mask = self.mask[idx]
        self.pos = self.pos[idx]
        self.temps = self.temps[idx]
        self.last = self.last[idx]
        self.kv = [(k[idx], v[idx]) for k, v in self.kv]
        # every row's cached tokens are the rightmost lens[i] columns (left padding): the longest row says how
        # many left columns no row needs; from the host copy of the lengths, so no device read
        first = self.mask.shape[1] - max(self.lens)
        if first > 0:
            self.mask = self.mask[:, first:]
            self.kv = [(k[:, :, first:], v[:, :, first:]) for k, v in self.kv]

    # ---- one scheduler step ----
    def _step(self) -> None:
        free = self.max_batch_size - len(self.rows)
        if self.waiting and free > 0 and (not self.rows or self._decodes_since_admit >= self.num_continuous_decode_steps):
            self._admit([self.waiting.popleft() for _ in range(min(free, len(self.waiting)))])
            self._decodes_since_admit = 0
        # rows whose prefill just sampled their first token still need a decode step like everyone else
        if self.rows:
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(self.rows))
            M_BATCH.observe(len(self.rows))
            logits = self._decode()
            self._decodes_since_admit += 1
            self.stats["steps"] += 1
            self._sample(list(range(len(self.rows))), logits)

    def _admit(self, new: list[Request]) -> None:
        """Prefill new rows into the batch and sample their first token. A failing prefill leaves the running
        batch untouched and fails only the new rows: each alone, so the culprit fails and the others join."""
        n_old = len(self.rows)
        for r in new:
            self._bind_generator(r)
        try:
            logits = self._prefill(new)
        except Exception as e:  # noqa: BLE001 - isolated below
            if len(new) == 1:
                self._fail(new[0], e)
                return
            log.warning("prefill of %d new requests failed (%s); admitting them one by one", len(new), e)
            for r in new:
                self._admit([r])
            return
        try:
            self._sample(list(range(n_old, n_old + len(new))), logits)
        except Exception as e:  # noqa: BLE001 - a failure of the new rows' batch sampling: drop just them
            joined = {id(r) for r in new}
            for r in new:
                self._fail(r, e)
            self._keep([i for i, r in enumerate(self.rows) if id(r) not in joined])

    def _bind_generator(self, r: Request) -> None:
        """A seeded request's generator on the engine's device (seeded with its sampling_seed), made once: a
        retracted request keeps its advanced generator when it re-joins."""
        seed = r.spec.sampling_seed
        if seed is not None and (r.generator is None or r.generator.device != self.device):
            r.generator = device_generator(self.device, seed)

    def _sample(self, row_idx: list[int], logits: torch.Tensor) -> None:
        """Sample the next token of the batch rows row_idx (a contiguous range) from their last logits, on the
        device; one read-back of the tokens and their log-probs."""
        assert row_idx == list(range(row_idx[0], row_idx[-1] + 1)), "rows sampled together are contiguous"
        span = slice(row_idx[0], row_idx[-1] + 1)
        reqs = self.rows[span]
        lps = tempered_logprobs(logits, self.temps[span])
        live = [k for k, r in enumerate(reqs) if r.finish_reason is None]
        every = len(live) == len(reqs)
        live_idx = None if every else torch.tensor(live, dtype=torch.long, device=self.device)
        toks, picked, tok_t = sample_batch_logprobs(
            lps if live_idx is None else lps[live_idx], [reqs[k].spec for k in live],
            [reqs[k].generator for k in live], [self._banned(reqs[k]) for k in live], self._rng)
        if live_idx is None:  # the next decode step feeds these tokens from the device
            self.last[span] = tok_t
        elif live:
            self.last[row_idx[0] + live_idx] = tok_t
        sampled_rows = set(row_idx)
        keep = [i for i in range(len(self.rows)) if i not in sampled_rows]
        for k, tok, lp in zip(live, toks, picked):
            r = reqs[k]
            if isinstance(tok, Exception):  # this row fails alone; the others go on
                self._fail(r, tok)
                continue
            try:
                if self._record(r, tok, lp):
                    keep.append(row_idx[k])
            except Exception as e:  # noqa: BLE001 - this row fails alone; the others go on
                self._fail(r, e)
        self._count_tokens(len(reqs))
        self._keep(sorted(keep))

    def _banned(self, r: Request) -> list[int] | None:
        """Tokens a row may not draw yet: eos and stop ids until min_new_tokens are out."""
        if len(r.output_ids) < r.spec.min_new_tokens:
            return sorted((set() if r.spec.ignore_eos else self.eos_ids) | set(r.spec.stop_token_ids))
        return None

    def _record(self, r: Request, tok: int, lp: float) -> bool:
        """Record one drawn token of a row; True while the row goes on."""
        r.output_ids.append(tok)
        r.logprobs.append(lp)
        r.versions.append(self.weight_version)
        reason = self._check_finish(r, tok)
        if reason is not None:
            self._finish(r, reason)
            return False
        if r.stream and len(r.output_ids) % r.spec.stream_interval == 0:
            r.on_event(r, False)
        return True

    def _check_finish(self, r: Request, tok: int) -> dict[str, Any] | None:
        n = len(r.output_ids)
        if n > r.spec.min_new_tokens or n == r.spec.min_new_tokens:
            if not r.spec.ignore_eos and tok in self.eos_ids:
                return {"type": "stop", "matched": tok}
            if tok in r.spec.stop_token_ids:
                return {"type": "stop", "matched": tok}
            if r.spec.stop:
                tail_n = max(len(s) for s in r.spec.stop) + 8
                tail = self.tok.decode(r.output_ids[-tail_n:], skip_special_tokens=r.spec.skip_special_tokens)
                for s in r.spec.stop:
                    if s in tail:
                        r.stop_text = s
                        return {"type": "stop", "matched": s}
        if n >= r.spec.max_new_tokens:
            return {"type": "length", "length": n}
        if len(r.input_ids) + n >= self.max_context:
            return {"type": "length", "length": n}
        return None

    def _count_tokens(self, n: int) -> None:
        now = time.monotonic()
        self.stats["tokens"] += n
        M_TOKENS.inc(n)
        self._tps_window.append((now, n))
        self._tps_tokens += n
        while self._tps_window and now - self._tps_window[0][0] > 2.0:
            self._tps_tokens -= self._tps_window.popleft()[1]
        span = now - self._tps_window[0][0]
        if span > 0:
            M_TPS.set(self._tps_tokens / span)

    # ---- commands (run on the engine thread via submit) ----
    def cmd_abort(self, rid: str = "", abort_all: bool = False, message: str = "aborted by request") -> int:
        """Abort running and waiting requests whose rid starts with `rid` (all with abort_all)."""
        hit = (lambda r: True) if abort_all else (lambda r: bool(rid) and r.rid.startswith(rid))
        reason = {"type": "abort", "message": message, "status_code": 200, "err_type": "abort"}
        n = 0
        for r in [r for r in self.waiting if hit(r)]:
            self.waiting.remove(r)
            self._finish(r, dict(reason))
            n += 1
        keep = []
        for i, r in enumerate(self.rows):
            if hit(r):
                self._finish(r, dict(reason))
                n += 1
            else:
                keep.append(i)
        self._keep(keep)
        return n

    def cmd_pause(self, mode: str) -> None:
        if mode not in ("abort", "retract", "in_place"):
            raise EngineError(f"pause mode {mode!r}: use abort, retract or in_place")
        if mode == "abort":
            self.cmd_abort(abort_all=True, message="aborted by pause_generation")
        elif mode == "retract":
            # back to the head of the queue with their tokens; re-prefilled on continue
            for r in reversed(self.rows):
                self.waiting.appendleft(r)
            self._reset_batch()
        self.paused = mode
        M_PAUSED.set(1)

    def cmd_continue(self) -> None:
        self.paused = None
        M_PAUSED.set(0)

    def cmd_set_version(self, version: str, abort_all: bool = False) -> None:
        if abort_all:
            self.cmd_abort(abort_all=True, message="aborted by weight version update")
        self.weight_version = str(version)
        self._set_version_metric()

    def cmd_apply_weights(self, tensors: dict[str, torch.Tensor], version: str | None, abort_all: bool = False) -> None:
        """Copy validated tensors into the model (all or nothing) and set the version."""
        params = self.state()
        errors = validate_tensors(params, tensors)
        if errors:
            raise EngineError("; ".join(errors[:5]) + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""))
        if abort_all:
            self.cmd_abort(abort_all=True, message="aborted by weight update")
        with torch.no_grad():
            for name, t in tensors.items():
                params[name].copy_(t.to(params[name].device))
        if version is not None:
            self.weight_version = str(version)
        self._set_version_metric()

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict(keep_vars=False))

    def _set_version_metric(self) -> None:
        try:
            M_VERSION.set(float(self.weight_version))
        except ValueError:
            M_VERSION.set(-1)
        M_VERSION_INFO.clear()
        M_VERSION_INFO.labels(version=self.weight_version).set(1)


def validate_tensors(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Problems that would make applying `tensors` to `params` partial or wrong (empty when fine)."""
    errors = []
    for name, t in tensors.items():
        p = params.get(name)
        if p is None:
            errors.append(f"unknown parameter {name!r}")
        elif tuple(p.shape) != tuple(t.shape):
            errors.append(f"{name}: shape {tuple(t.shape)} != model's {tuple(p.shape)}")
        elif not all_finite(t):  # one min/max pass in the native dtype (isfinite(t.float()) was ~14x slower)
            errors.append(f"{name}: contains NaN or inf")
    return errors


def _lpad(x: torch.Tensor, L: int) -> torch.Tensor:
    """Left-pad a [B, H, l, D] cache tensor with zeros to length L."""
    if x.shape[2] == L:
        return x
    return torch.nn.functional.pad(x, (0, 0, L - x.shape[2], 0))


def _lpad_mask(m: torch.Tensor, L: int) -> torch.Tensor:
    if m.shape[1] == L:
        return m
    return torch.nn.functional.pad(m, (L - m.shape[1], 0))
