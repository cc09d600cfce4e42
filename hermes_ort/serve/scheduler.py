"""Continuous batching: one thread owns the decoder and runs every request's next token in one
pass, so each streamed block is read once per step for the whole batch (docs/design.md §2.9).

Each step: requests waiting are admitted while the batch has a row free and the KV cache pool
holds the batch with them (past and present of every row at the longest row's horizon); each
admitted one is prefilled alone (in the plan's chunks) and its cache joins the batch
(tensors/batch_cache.py); then one decode pass runs every row. A request that finishes,
fails or is cancelled (its client gone, a stop string seen) leaves the batch before the next
pass, its rows and cache freed at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hermes_ort.core.choices import Choice
from hermes_ort.core.units import format_bytes
from hermes_ort.generation.token_loop import Sampling, choose_next, prompt_positions, step_feeds
from hermes_ort.serve.api_errors import ApiError, bad_request, overloaded
from hermes_ort.tensors.batch_cache import BatchCache
from hermes_ort.tensors.prefill import prefill_spans

RATE_WINDOW_S = 10.0  # tokens/s on /metrics: over this many seconds


class Finish(Choice):
    """Why a request's generation ended (OpenAI's finish_reason, and ours)."""

    STOP = "stop"  # an end-of-sequence id (or the client's stop string)
    LENGTH = "length"  # max_tokens or the context reached
    CANCELLED = "cancelled"  # the client went away, or the server is stopping
    ERROR = "error"  # the model failed (the server's log says how)


@dataclass(frozen=True)
class SchedulerOptions:
    max_batch: int  # requests decoding at once
    max_queue: int  # requests waiting for a row; more get 503
    kv_bytes: int | None  # the KV cache pool (None: no budget, no limit)
    prefill_chunk: int | None  # positions per prefill pass (None: the whole prompt)


# on_token(token, None) for each new token; on_token(None, finish) once at the end
TokenSink = Callable[[int | None, Finish | None], None]


class Sequence:
    """One request's generation: its prompt ids, how many tokens it may add, how it samples,
    which ids end it, and where its tokens go."""

    def __init__(
        self,
        prompt: list[int],
        max_new_tokens: int,
        sampling: Sampling,
        eos: tuple[int, ...],
        sink: TokenSink,
    ) -> None:
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.sampling, self.eos, self.sink = sampling, eos, sink
        self.rng = np.random.default_rng(sampling.seed)
        self.tokens: list[int] = []
        self.finish: Finish | None = None
        self.cancelled = False
        self.ended = False  # its sink has had the end

    @property
    def horizon(self) -> int:
        """Positions it may reach: prompt + max_new_tokens."""
        return len(self.prompt) + self.max_new_tokens

    def take(self, logits: np.ndarray) -> bool:
        """Choose the next token from its logits [vocab] and hand it on; True once it is done."""
        token = choose_next(logits, self.sampling, self.rng)
        if token in self.eos:  # the end of its turn: not part of its text
            self.finish = Finish.STOP
        else:
            self.tokens.append(token)
            self.sink(token, None)
            if len(self.tokens) >= self.max_new_tokens:
                self.finish = Finish.LENGTH
        return self.finish is not None


@dataclass(frozen=True)
class SchedulerStats:
    """What /metrics shows of the scheduler."""

    waiting: int
    running: int
    tokens_total: int
    prompt_tokens_total: int
    passes_total: int
    bytes_read_total: int
    tokens_per_s: float  # over the last RATE_WINDOW_S
    kv_cache_bytes: int  # the batch's cache now
    kv_pool_bytes: int | None


class Scheduler:
    """The decoding thread: `submit` a Sequence, `cancel` it, `close` at the end. `run_pass`
    is one pass of the model (feeds -> outputs, bytes it read)."""

    def __init__(
        self,
        run_pass: Callable[[dict[str, np.ndarray]], tuple[dict[str, np.ndarray], int]],
        cache: BatchCache,
        options: SchedulerOptions,
        on_error: Callable[[BaseException], None] = lambda e: None,
    ) -> None:
        self.run_pass, self.cache, self.options, self.on_error = run_pass, cache, options, on_error
        self.per_token = cache.sig.cache_bytes(1, 1)
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # row r of the cache is _running[r]
        self._admitting = 0  # taken from the queue, being prefilled
        self._cond = threading.Condition()
        self._closing = False
        self._counts = {"tokens": 0, "prompt": 0, "passes": 0, "read": 0}
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of each step
        self._thread = threading.Thread(target=self._loop, name="hermes-serve-decode", daemon=True)
        self._thread.start()

    # -- the callers' side (the event loop's threads) --

    def kv_need(self, rows: int, horizon: int) -> int:
        """KV bytes of `rows` requests the longest of which reaches `horizon`: past and present
        side by side during a pass, ballast rows counted."""
        return 2 * self.per_token * max(rows, self.cache.min_rows) * horizon

    def submit(self, seq: Sequence) -> None:
        """Queue `seq`; ApiError 400 if it could never fit the KV pool, 503 if the queue is
        full or the server is stopping."""
        pool = self.options.kv_bytes
        if pool is not None and self.kv_need(1, seq.horizon) > pool:
            fits = pool // (2 * self.per_token * self.cache.min_rows)
            raise bad_request(
                f"prompt of {len(seq.prompt)} tokens + max_tokens {seq.max_new_tokens} needs "
                f"{format_bytes(self.kv_need(1, seq.horizon))} of KV cache, more than this "
                f"server's {format_bytes(pool)} (room for {fits} positions): ask for fewer "
                f"tokens, or start the server with a larger --budget or --kv-cache",
                param="max_tokens",
                code="context_length_exceeded",
            )
        with self._cond:
            if self._closing:
                raise ApiError(503, "the server is shutting down", type="server_error")
            # rows free now take requests at once; the queue is what waits beyond them
            busy = len(self._running) + self._admitting
            free = max(0, self.options.max_batch - busy)
            if len(self._waiting) >= free + self.options.max_queue:
                raise overloaded(retry_after_s=self._retry_after_s())
            self._waiting.append(seq)
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        """Stop `seq` (its client left, or its stop string came): it leaves before the next
        pass and gets no more tokens."""
        with self._cond:
            seq.cancelled = True
            self._cond.notify()

    def stats(self) -> SchedulerStats:
        with self._cond:
            now = time.monotonic()
            recent = sum(n for t, n in self._recent if t >= now - RATE_WINDOW_S)
            return SchedulerStats(
                waiting=len(self._waiting),
                running=len(self._running),
                tokens_total=self._counts["tokens"],
                prompt_tokens_total=self._counts["prompt"],
                passes_total=self._counts["passes"],
                bytes_read_total=self._counts["read"],
                tokens_per_s=recent / RATE_WINDOW_S,
                kv_cache_bytes=self.cache.nbytes,
                kv_pool_bytes=self.options.kv_bytes,
            )

    def close(self, timeout_s: float = 10.0) -> None:
        """Take no more requests; cancel those waiting and running; stop the thread."""
        with self._cond:
            self._closing = True
            for seq in (*self._waiting, *self._running):
                seq.cancelled = True
            self._cond.notify()
        self._thread.join(timeout_s)

    def _retry_after_s(self) -> int:
        """A guess of when a row frees: the tokens the running requests have left, at the
        recent rate (1..60 s)."""
        left = sum(s.max_new_tokens - len(s.tokens) for s in self._running)
        rate = sum(n for _, n in self._recent) / RATE_WINDOW_S or 1.0
        return int(min(60, max(1, left / rate / max(1, len(self._running)))))

    # -- the decoding thread --

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._drop_cancelled_waiting()
                while not (self._waiting or self._running or self._closing):
                    self._cond.wait()
                    self._drop_cancelled_waiting()
                if self._closing and not self._running and not self._waiting:
                    return
                admitted = self._admit()
                self._admitting = len(admitted)
            try:
                for seq in admitted:
                    self._prefill(seq)
                self._leave_finished()
                if self._running:
                    self._decode()
                    self._leave_finished()
            except Exception as e:  # the model failed: every request in flight ends with it
                self.on_error(e)
                self._fail_all(admitted)
            finally:
                with self._cond:
                    self._admitting = 0

    def _drop_cancelled_waiting(self) -> None:
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            self._end(seq, Finish.CANCELLED)

    def _admit(self) -> list[Sequence]:
        """The waiting requests that join now, in order of arrival: while a row is free and
        the pool holds the batch with them."""
        taken: list[Sequence] = []
        pool = self.options.kv_bytes
        while self._waiting and len(self._running) + len(taken) < self.options.max_batch:
            seq = self._waiting[0]
            batch = [*self._running, *taken, seq]
            if pool is not None and self.kv_need(len(batch), max(s.horizon for s in batch)) > pool:
                break  # it waits for rows to finish (it fits alone: submit checked)
            taken.append(self._waiting.popleft())
        return taken

    def _prefill(self, seq: Sequence) -> None:
        """Run `seq`'s prompt alone, choose its first token, and add its cache to the batch."""
        sig = self.cache.sig
        ids = np.array([seq.prompt], np.int64)  # [1, T]
        mask = np.ones_like(ids)
        positions = prompt_positions(mask)
        past = sig.empty_cache(1)
        for start, end in prefill_spans(ids.shape[1], self.options.prefill_chunk):
            feeds = step_feeds(sig, ids[:, start:end], mask[:, :end], positions[:, start:end], past)
            outputs = self._pass(feeds)
            past = {s.past: outputs[s.present] for s in sig.slots}
        self._counts["prompt"] += len(seq.prompt)
        if seq.cancelled:
            self._end(seq, Finish.CANCELLED)
            return
        done = seq.take(outputs[sig.logits][0, -1])
        self._count_tokens(1)
        if done:
            self._end(seq, seq.finish)
            return
        with self._cond:
            self.cache.add(past)
            self._running.append(seq)
            self._admitting -= 1

    def _decode(self) -> None:
        """One pass: every running row's next token."""
        rows = self._running
        outputs = self._pass(self.cache.step_feeds([s.tokens[-1] for s in rows]))
        self.cache.update(outputs)
        logits = outputs[self.cache.sig.logits]  # [batch_rows, 1, vocab]
        for r, seq in enumerate(rows):
            if not seq.cancelled:
                seq.take(logits[r, -1])
        self._count_tokens(len(rows))

    def _pass(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs, read = self.run_pass(feeds)
        self._counts["passes"] += 1
        self._counts["read"] += read
        return outputs

    def _count_tokens(self, n: int) -> None:
        now = time.monotonic()
        with self._cond:
            self._counts["tokens"] += n
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def _leave_finished(self) -> None:
        """Rows whose request finished or was cancelled leave the batch (their cache freed)."""
        with self._cond:
            done = [s.finish is not None or s.cancelled for s in self._running]
            if not any(done):
                return
            self.cache.remove(*(r for r, d in enumerate(done) if d))
            ended = [s for s, d in zip(self._running, done, strict=True) if d]
            self._running = [s for s, d in zip(self._running, done, strict=True) if not d]
            for seq in ended:
                self._end(seq, seq.finish or Finish.CANCELLED)

    def _fail_all(self, admitted: list[Sequence]) -> None:
        with self._cond:
            for seq in (*self._running, *admitted):
                self._end(seq, Finish.ERROR)
            self._running.clear()
            self.cache.clear()

    @staticmethod
    def _end(seq: Sequence, finish: Finish) -> None:
        if seq.ended:
            return
        seq.finish, seq.ended = finish, True
        seq.sink(None, finish)
