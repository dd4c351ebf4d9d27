"""Continuous (dynamic) batching text generation on one worker thread.

A single daemon thread owns the model. Each loop iteration is one step boundary:

1. queued requests are admitted while the batch has room (FIFO); cancelled ones leave;
2. newcomers are prefilled together (left-padded), sample their first token, and their KV
   cache is merged into the running batch's (both left-padded to a common length);
3. the whole batch decodes one token per row in a single forward pass.

Rows that finish are index-selected out of the KV cache, and leading columns that became
padding for every remaining row are trimmed, so a long-gone long prompt doesn't keep
costing attention. Left padding works because every forward gets an explicit attention
mask and explicit per-row position ids.

Sampling is per row. Each request draws exactly one uniform number per token from its own
`torch.Generator`, and maps it through its own row's distribution, so a seeded request
gets the same tokens whoever shares its batch.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from backends.local._text import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    seed: int | None = None  # same seed + prompt + params => same output, whatever the batch-mates
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenDelta:
    """Newly safe text. Not one per token: held-back text (partial characters, possible
    stop-string beginnings) comes out later or never."""

    text: str
    completion_tokens: int  # tokens generated so far
    token_ids: tuple[int, ...] = ()  # the tokens behind `text` (held-back text's tokens come with it)


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (eos or stop string) | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


GenerationEvent = TokenDelta | Finished
Emit = Callable[[GenerationEvent], None]


@dataclass(frozen=True)
class EngineStats:
    queued: int  # submitted, waiting for a batch slot
    active: int  # holding a batch slot
    forward_passes: int  # prefill and decode passes
    prefill_passes: int
    rows_processed: int  # sum of batch sizes over decode steps
    max_batch_seen: int  # largest decode batch
    last_batch_size: int  # size of the latest decode batch
    tokens_generated: int


class _Request:
    """One generation's state; touched only by the worker thread, except `cancelled`."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        emit: Emit,
        decode: Callable[[Sequence[int]], str],
        max_context: int | None,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.emit = emit
        self.arrival = time.monotonic()
        self.cancelled = False  # set from any thread; a bool store is atomic
        self.finished = False
        self.admitted = False  # holds (or is about to hold) a batch slot
        self.emit_failed = False
        self.completion_tokens = 0
        self.unshown_ids: list[int] = []
        self.detok = IncrementalDetokenizer(decode, prompt_ids)
        self.stopper = StopMatcher(params.stop)
        # The context window caps the whole sequence: prompt plus completion.
        room = max_context - len(prompt_ids) if max_context is not None else params.max_tokens
        self.limit = min(params.max_tokens, room)
        self.rejection: str | None = None
        if not prompt_ids:
            self.rejection = "the prompt is empty"
        elif max_context is not None and len(prompt_ids) >= max_context:
            self.rejection = f"the prompt has {len(prompt_ids)} tokens; the context window is {max_context}"
        self.greedy = params.temperature <= 0
        self.generator: torch.Generator | None = None
        if not self.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(seed)


class GenerationHandle:
    def __init__(self, engine: GenerationEngine, request: _Request) -> None:
        self._engine = engine
        self._request = request

    def cancel(self) -> None:
        """Thread-safe and idempotent; the request ends with Finished("cancelled") at the
        next step boundary (unless it finished first) and its batch slot is freed."""
        if self._request.finished or self._request.cancelled:
            return
        self._request.cancelled = True
        self._engine._wake()


class _Batch:
    """The running batch: rows, their shared KV cache and per-row decoding state."""

    def __init__(
        self,
        rows: list[_Request],
        cache: DynamicCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        tokens: torch.Tensor,
    ) -> None:
        self.rows = rows
        self.cache = cache
        self.mask = mask  # [B, L] 1 = real token, 0 = left padding; L = KV length
        self.positions = positions  # [B] position id of `tokens`
        self.tokens = tokens  # [B] the token each row feeds next

    def layers(self) -> list[DynamicLayer]:
        layers: list[DynamicLayer] = []
        for layer in self.cache.layers:
            # Only plain full-attention layers can be padded, merged and trimmed like this.
            if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
                raise TypeError(f"unsupported KV cache layer {type(layer).__name__}")
            layers.append(layer)
        return layers

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.mask.device)
        for layer in self.layers():
            assert layer.keys is not None and layer.values is not None
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.tokens = self.tokens.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]
        self._trim_shared_padding()

    def _trim_shared_padding(self) -> None:
        real = self.mask.any(dim=0)
        drop = int(real.to(torch.int8).argmax())  # first column holding a real token for some row
        if drop == 0:
            return
        for layer in self.layers():
            assert layer.keys is not None and layer.values is not None
            layer.keys = layer.keys[:, :, drop:, :]
            layer.values = layer.values[:, :, drop:, :]
        self.mask = self.mask[:, drop:]

    def merge(self, other: _Batch) -> None:
        """Append `other`'s rows, left-padding whichever KV cache is shorter."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        mine, theirs = self.layers(), other.layers()
        # Build everything before assigning anything: a failure must not leave a half-merge.
        keys = [
            torch.cat([_left_pad(a.keys, length), _left_pad(b.keys, length)]) for a, b in zip(mine, theirs, strict=True)
        ]
        values = [
            torch.cat([_left_pad(a.values, length), _left_pad(b.values, length)])
            for a, b in zip(mine, theirs, strict=True)
        ]
        mask = torch.cat([_left_pad_mask(self.mask, length), _left_pad_mask(other.mask, length)])
        for layer, k, v in zip(mine, keys, values, strict=True):
            layer.keys, layer.values = k, v
        self.mask = mask
        self.positions = torch.cat([self.positions, other.positions])
        self.tokens = torch.cat([self.tokens, other.tokens])
        self.rows = self.rows + other.rows


def _left_pad(kv: torch.Tensor | None, length: int) -> torch.Tensor:
    assert kv is not None
    missing = length - kv.shape[-2]
    return kv if missing == 0 else F.pad(kv, (0, 0, missing, 0))


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - mask.shape[1]
    return mask if missing == 0 else F.pad(mask, (missing, 0))


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(getattr(model, "config", None), "eos_token_id", None),
    ):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(i for i in source if isinstance(i, int))
    return frozenset(ids)


class GenerationEngine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.01,
        max_context: int | None = None,
        name: str = "engine",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = max(0.0, batch_wait_s)
        config = getattr(model, "config", None)
        self.max_context = max_context if max_context is not None else getattr(config, "max_position_embeddings", None)
        self.name = name
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self._pad_id = pad if isinstance(pad, int) else 0
        self._device = next(model.parameters()).device
        # Fail at construction, not at the first merge, for models whose cache can't be merged.
        probe = DynamicCache(config=config)
        bad = {type(layer).__name__ for layer in probe.layers if type(layer) is not DynamicLayer}
        if bad:
            raise TypeError(f"the batching engine needs full-attention KV cache layers; this model uses {bad}")

        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batch: _Batch | None = None
        self._active = 0
        self._forward_passes = 0
        self._prefill_passes = 0
        self._rows_processed = 0
        self._max_batch_seen = 0
        self._last_batch_size = 0
        self._tokens_generated = 0

    # ---- public API (any thread) -------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None or self._stopping:
                raise RuntimeError(f"engine {self.name!r} was already started")
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-generation", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish every live request with Finished("cancelled") and join the worker."""
        with self._cond:
            self._stopping = True
            thread = self._thread
            self._cond.notify_all()
        if thread is None:
            self._cancel_all()  # never started: no worker will drain the queue
            return
        thread.join(timeout)
        if thread.is_alive():
            log.warning("engine %s: worker still busy after %.1f s; it ends after its current step", self.name, timeout)

    def submit(self, prompt_ids: list[int], params: SamplingParams, emit: Emit) -> GenerationHandle:
        """Queue a generation. `emit` is called on the worker thread, in order, and ends with
        exactly one Finished. On a stopped engine, Finished("cancelled") is emitted at once
        on the calling thread."""
        request = _Request(list(prompt_ids), params, emit, self._decode, self.max_context)
        with self._cond:
            stopping = self._stopping
            if not stopping:
                self._queue.append(request)
                self._cond.notify_all()
        if stopping:
            self._finish(request, "cancelled")
        return GenerationHandle(self, request)

    @property
    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(
                queued=len(self._queue),
                active=self._active,
                forward_passes=self._forward_passes,
                prefill_passes=self._prefill_passes,
                rows_processed=self._rows_processed,
                max_batch_seen=self._max_batch_seen,
                last_batch_size=self._last_batch_size,
                tokens_generated=self._tokens_generated,
            )

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    # ---- worker thread --------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                admitted = self._take_work()
                if admitted is None:
                    break
                try:
                    self._step(admitted)
                except Exception as exc:  # a bug outside the guarded forward passes
                    log.exception("engine %s: step failed", self.name)
                    self._fail_batch(exc)
                    for request in admitted:
                        self._finish(request, "error", exc)
        self._cancel_all()

    def _take_work(self) -> list[_Request] | None:
        """Wait for something to do; return the newly admitted requests (maybe none), or None
        when the engine stops."""
        cancelled: list[_Request] = []
        with self._cond:
            while True:
                if self._stopping:
                    admitted = None
                    break
                self._drop_cancelled_queued(cancelled)
                busy = self._batch is not None
                if self._queue and not busy:
                    # Idle and work arrived: give concurrent requests a moment to join the first
                    # prefill, counted from the oldest arrival so no request waits twice.
                    deadline = self._queue[0].arrival + self.batch_wait_s
                    remaining = deadline - time.monotonic()
                    if len(self._queue) < self.max_batch_size and remaining > 0:
                        self._cond.wait(remaining)
                        continue
                if self._queue or busy:
                    room = self.max_batch_size - (len(self._batch.rows) if self._batch else 0)
                    admitted = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
                    for request in admitted:
                        request.admitted = True
                    self._active += len(admitted)
                    break
                self._cond.wait()
        for request in cancelled:
            self._finish(request, "cancelled")
        return admitted

    def _drop_cancelled_queued(self, into: list[_Request]) -> None:
        if any(r.cancelled for r in self._queue):
            into.extend(r for r in self._queue if r.cancelled)
            self._queue = deque(r for r in self._queue if not r.cancelled)

    def _step(self, admitted: list[_Request]) -> None:
        self._drop_cancelled_rows()
        newcomers = []
        for request in admitted:
            if request.cancelled:
                self._finish(request, "cancelled")
            elif request.rejection is not None:
                self._finish(request, "error", request.rejection)
            elif request.limit <= 0:
                self._finish(request, "length")
            else:
                newcomers.append(request)
        if newcomers:
            self._admit(newcomers)
        if self._batch is not None:
            self._decode_step(self._batch)

    def _drop_cancelled_rows(self) -> None:
        batch = self._batch
        if batch is None or not any(r.cancelled for r in batch.rows):
            return
        keep = []
        for i, request in enumerate(batch.rows):
            if request.cancelled:
                self._finish(request, "cancelled")
            else:
                keep.append(i)
        self._shrink(batch, keep)

    def _admit(self, newcomers: list[_Request]) -> None:
        try:
            fresh = self._prefill(newcomers)
        except Exception as exc:
            log.exception("engine %s: prefill failed", self.name)
            for request in newcomers:
                self._finish(request, "error", exc)
            return
        if fresh is None:
            return
        if self._batch is None:
            self._batch = fresh
            return
        try:
            self._batch.merge(fresh)
        except Exception as exc:
            log.exception("engine %s: merging a prefill into the batch failed", self.name)
            self._fail_batch(exc)
            for request in fresh.rows:
                self._finish(request, "error", exc)

    def _prefill(self, requests: list[_Request]) -> _Batch | None:
        width = max(len(r.prompt_ids) for r in requests)
        ids = [[self._pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests]
        mask_rows = [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests]
        input_ids = torch.tensor(ids, dtype=torch.long, device=self._device)
        mask = torch.tensor(mask_rows, dtype=torch.long, device=self._device)
        position_ids = (mask.cumsum(dim=1) - 1).clamp_(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # the full [B, L, vocab] logits of a long prompt would be huge
        )
        self._count_pass(prefill=True, rows=len(requests))
        tokens = self._sample(out.logits[:, -1, :], requests)
        positions = torch.tensor([len(r.prompt_ids) for r in requests], dtype=torch.long, device=self._device)
        fresh = _Batch(list(requests), cache, mask, positions, tokens)
        keep = self._accept_tokens(fresh.rows, tokens)
        if not keep:
            return None
        if len(keep) < len(fresh.rows):
            fresh.select(keep)
        return fresh

    def _decode_step(self, batch: _Batch) -> None:
        try:
            mask = F.pad(batch.mask, (0, 1), value=1)
            out = self.model(
                input_ids=batch.tokens[:, None],
                attention_mask=mask,
                position_ids=batch.positions[:, None],
                past_key_values=batch.cache,
                use_cache=True,
            )
            batch.mask = mask
            batch.positions = batch.positions + 1
            self._count_pass(prefill=False, rows=len(batch.rows))
            batch.tokens = self._sample(out.logits[:, -1, :], batch.rows)
        except Exception as exc:
            # The rows share one KV cache that may now be half-updated: all of them fail.
            log.exception("engine %s: decode step failed", self.name)
            self._fail_batch(exc)
            return
        keep = self._accept_tokens(batch.rows, batch.tokens)
        self._shrink(batch, keep)

    def _shrink(self, batch: _Batch, keep: list[int]) -> None:
        if not keep:
            self._batch = None
        elif len(keep) < len(batch.rows):
            batch.select(keep)

    def _count_pass(self, *, prefill: bool, rows: int) -> None:
        with self._cond:
            self._forward_passes += 1
            if prefill:
                self._prefill_passes += 1
            else:
                self._rows_processed += rows
                self._last_batch_size = rows
                self._max_batch_seen = max(self._max_batch_seen, rows)

    def _sample(self, logits: torch.Tensor, rows: Sequence[_Request]) -> torch.Tensor:
        """One next token per row: argmax for greedy rows, per-row seeded sampling otherwise."""
        tokens = logits.argmax(dim=-1)
        plain = [i for i, r in enumerate(rows) if not r.greedy and r.params.top_p >= 1.0]
        nucleus = [i for i, r in enumerate(rows) if not r.greedy and r.params.top_p < 1.0]
        # A row's path depends only on its own params, never on its batch-mates': that is
        # what makes seeded output independent of the batch.
        for group, top_p in ((plain, False), (nucleus, True)):
            if group:
                index = torch.tensor(group, device=logits.device)
                tokens[index] = self._sample_rows(logits.index_select(0, index), [rows[i] for i in group], top_p)
        return tokens

    def _sample_rows(self, logits: torch.Tensor, rows: list[_Request], top_p: bool) -> torch.Tensor:
        temperature = torch.tensor([r.params.temperature for r in rows], device=logits.device)
        probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
        draws = torch.tensor([float(torch.rand((), generator=r.generator)) for r in rows], device=logits.device)
        order: torch.Tensor | None = None
        if top_p:
            probs, order = probs.sort(dim=-1, descending=True)
            limit = torch.tensor([r.params.top_p for r in rows], device=logits.device)
            # Keep the smallest head of the sorted distribution whose mass reaches top_p (the
            # first token always survives).
            outside = (probs.cumsum(dim=-1) - probs) >= limit[:, None]
            probs = probs.masked_fill(outside, 0.0)
        # Inverse-CDF sampling: one uniform draw per row per token, scaled to the row's mass.
        cdf = probs.cumsum(dim=-1)
        targets = (draws * cdf[:, -1])[:, None]
        picks = torch.searchsorted(cdf, targets, right=True).clamp_(max=cdf.shape[-1] - 1)
        if order is not None:
            picks = order.gather(1, picks)
        return picks[:, 0]

    def _accept_tokens(self, rows: list[_Request], tokens: torch.Tensor) -> list[int]:
        """Feed each row its new token; finish rows that are done. Returns rows to keep."""
        keep = []
        for i, (request, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            if self._accept(request, token):
                keep.append(i)
        with self._cond:
            self._tokens_generated += len(rows)
        return keep

    def _accept(self, request: _Request, token: int) -> bool:
        request.completion_tokens += 1
        if token in self.eos_ids:
            self._drain(request)
            self._finish(request, "stop")
            return False
        request.unshown_ids.append(token)
        text, stopped = request.stopper.push(request.detok.push(token))
        if text:
            self._emit(request, TokenDelta(text, request.completion_tokens, self._take_ids(request)))
        if stopped:
            self._finish(request, "stop")
            return False
        if request.completion_tokens >= request.limit:
            self._finish(request, "stop" if self._drain(request) else "length")
            return False
        return True

    def _drain(self, request: _Request) -> bool:
        """Release text held back at the end of generation. True if a stop string matched."""
        text, stopped = request.stopper.push(request.detok.flush())
        if not stopped:
            text += request.stopper.flush()
        if text:
            self._emit(request, TokenDelta(text, request.completion_tokens, self._take_ids(request)))
        return stopped

    @staticmethod
    def _take_ids(request: _Request) -> tuple[int, ...]:
        ids = tuple(request.unshown_ids)
        request.unshown_ids.clear()
        return ids

    def _fail_batch(self, exc: BaseException) -> None:
        batch, self._batch = self._batch, None
        if batch is not None:
            for request in batch.rows:
                self._finish(request, "error", exc)

    def _cancel_all(self) -> None:
        with self._cond:
            queued = list(self._queue)
            self._queue.clear()
        batch, self._batch = self._batch, None
        for request in (batch.rows if batch else []) + queued:
            self._finish(request, "cancelled")

    def _finish(self, request: _Request, reason: str, error: BaseException | str | None = None) -> None:
        if request.finished:
            return
        request.finished = True
        message = None
        if isinstance(error, BaseException):
            message = f"{type(error).__name__}: {error}"
        elif error is not None:
            message = error
        if request.admitted:
            with self._cond:
                self._active -= 1
        self._emit(request, Finished(reason, len(request.prompt_ids), request.completion_tokens, message))

    def _emit(self, request: _Request, event: GenerationEvent) -> None:
        try:
            request.emit(event)
        except Exception:
            # The consumer's problem must not become every other request's problem.
            if not request.emit_failed:
                request.emit_failed = True
                log.exception("engine %s: emit callback raised; ignoring it", self.name)
