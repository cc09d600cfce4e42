"""A request's text: its prompt as ids (a chat rendered by the model's template, or a completion's
prompt), its generation submitted to the scheduler, and the tokens coming back turned into text
pieces as they become whole characters, cut at the client's stop strings.

The scheduler's thread hands tokens over with `loop.call_soon_threadsafe`; the request's task
reads them from an asyncio queue, so nothing of the event loop runs in the decoding thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermes_ort.core.errors import HermesError
from hermes_ort.generation.chat import TextStream, conversation, stop_ids
from hermes_ort.generation.chat_template import load_chat_template
from hermes_ort.generation.token_loop import Sampling, default_eos
from hermes_ort.generation.tokenizer import TextTokenizer, load_tokenizer
from hermes_ort.serve.api_errors import ApiError, bad_request
from hermes_ort.serve.openai_requests import TextParams
from hermes_ort.serve.scheduler import Finish, Scheduler, Sequence
from hermes_ort.serve.stop_text import StopText

DISCONNECT_POLL_S = 0.5  # a plain (not streamed) request checks its client this often


@dataclass(frozen=True)
class TextModel:
    """What the server knows of the decoder's text: its tokenizer, its chat template (None
    without one: chat completions are refused), the ids that end a completion and a chat turn,
    and the positions a request may reach."""

    tokenizer: TextTokenizer
    template: Any
    eos: tuple[int, ...]  # generation_config.json's
    chat_eos: tuple[int, ...]  # and the template's end-of-turn token
    context: int

    @classmethod
    def of(cls, model_dir: Path, context: int) -> TextModel:
        tokenizer = load_tokenizer(model_dir)  # TokenizerError: the server cannot start
        try:
            template = load_chat_template(model_dir)
        except HermesError:
            template = None
        chat_eos = default_eos(model_dir)
        if template is not None:
            chat_eos = stop_ids(model_dir, tokenizer, template.special.get("eos_token"))
        return cls(tokenizer, template, default_eos(model_dir), chat_eos, context)

    def chat_ids(self, messages: tuple[dict, ...]) -> list[int]:
        if self.template is None:
            raise bad_request(
                "this model has no chat template (tokenizer_config.json's chat_template): use "
                "/v1/completions",
                code="no_chat_template",
            )
        try:
            text = self.template.render(conversation(list(messages), None))
        except HermesError as e:  # the template's own checks (e.g. roles must alternate)
            raise bad_request(str(e), param="messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def completion_ids(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)


def new_tokens(prompt: list[int], params: TextParams, context: int, field: str) -> int:
    """The tokens a request may add: max_tokens, or what the context leaves; 400 when the
    prompt (its request's `field`) and max_tokens do not fit the context."""
    room = context - len(prompt)
    asked = params.max_tokens
    if room < 1 or (asked is not None and asked > room):
        wanted = f" + max_tokens {asked}" if asked is not None else ""
        raise bad_request(
            f"this request has {len(prompt)} prompt tokens{wanted}, more than the server's "
            f"context of {context} positions (--ctx)",
            param=field if asked is None or room < 1 else "max_tokens",
            code="context_length_exceeded",
        )
    return asked if asked is not None else room


def sampling_of(params: TextParams) -> Sampling:
    if params.greedy:
        return Sampling(do_sample=False, seed=params.seed)
    top_p = params.top_p if params.top_p < 1 else None
    return Sampling(True, params.temperature, None, top_p, params.seed)


class TextGeneration:
    """One request's generation, read as text: `pieces()` yields each piece of text; then
    `finish_reason` and the token counts are set."""

    def __init__(
        self,
        scheduler: Scheduler,
        text: TextModel,
        prompt: list[int],
        params: TextParams,
        eos: tuple[int, ...],
        field: str,
    ) -> None:
        """`field`: where the request holds its prompt ("messages", "prompt"), for errors."""
        self.scheduler, self.text, self.params = scheduler, text, params
        self.prompt_tokens = len(prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int | None, Finish | None]] = asyncio.Queue()

        def sink(token: int | None, finish: Finish | None) -> None:  # the decoding thread
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
                loop.call_soon_threadsafe(self._queue.put_nowait, (token, finish))

        max_new = new_tokens(prompt, params, text.context, field)
        self.sequence = Sequence(prompt, max_new, sampling_of(params), eos, sink)

    def start(self) -> None:
        """Queue it (ApiError 400/503 from the scheduler)."""
        self.scheduler.submit(self.sequence)

    def cancel(self) -> None:
        self.scheduler.cancel(self.sequence)

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text piece by piece, until its end; ApiError 500 if the model failed."""
        out: list[str] = []
        stream = TextStream(self.text.tokenizer, out.append)
        stops = StopText(self.params.stop)
        try:
            while True:
                token, finish = await self._queue.get()
                if token is not None:
                    self.completion_tokens += 1
                    stream.add(token)
                else:
                    stream.finish()
                shown = "".join(stops.add(p) for p in out)
                out.clear()
                if stops.stopped:
                    self.finish_reason = "stop"
                    self.cancel()  # no more tokens for this request
                    if shown:
                        yield shown
                    return
                if finish is not None:
                    shown += stops.finish()
                    if shown:
                        yield shown
                    self._end(finish)
                    return
                if shown:
                    yield shown
        finally:
            if self.finish_reason is None:  # the client went away (the task was cancelled)
                self.cancel()

    def _end(self, finish: Finish) -> None:
        if finish == Finish.ERROR:
            raise ApiError(500, "the model failed on this request", type="server_error")
        # cancelled here: the server is stopping (a client that left reads nothing more)
        self.finish_reason = "stop" if finish == Finish.STOP else "length"

    async def text_until_done(self, disconnected: Callable[[], Awaitable[bool]]) -> str:
        """The whole reply; the generation cancelled as soon as `disconnected()` turns true."""

        async def watch() -> None:
            while not await disconnected():
                await asyncio.sleep(DISCONNECT_POLL_S)
            self.cancel()

        watcher = asyncio.create_task(watch())
        try:
            return "".join([piece async for piece in self.pieces()])
        finally:
            watcher.cancel()
