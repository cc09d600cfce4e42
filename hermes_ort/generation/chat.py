"""One chat turn with an instruct model: the conversation rendered by the model's chat template,
the assistant's reply generated until its end-of-turn token, and streamed as text.

Both models (`HermesModel`, the cluster's `ClusterModel`) answer `chat` with `chat_reply` over
their own `generate`. Each turn renders and runs the whole conversation again (no cache is kept
between turns).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hermes_ort.core.errors import InputError
from hermes_ort.generation.chat_template import load_chat_template
from hermes_ort.generation.token_loop import default_eos
from hermes_ort.generation.tokenizer import TextTokenizer, load_tokenizer
from hermes_ort.tensors.kv_cache import DecoderSignature

ROLES_HINT = 'a list of {"role": ..., "content": ...} messages, or the user\'s text'


def conversation(messages: Any, system: str | None) -> list[dict[str, Any]]:
    """The messages checked, as a list of dicts (a str: one user message), with `system` as the
    first message if given."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError(f"chat takes {ROLES_HINT}; got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m):
            raise InputError(f"message {i} is not a dict with 'role' and 'content': {m!r:.80}")
    out = [dict(m) for m in messages]
    if system is not None:
        if out[0]["role"] == "system":
            raise InputError("the messages start with a system message: give system= or that")
        out.insert(0, {"role": "system", "content": system})
    return out


def stop_ids(model_dir: Path, tokenizer: TextTokenizer, eos_token: str | None) -> tuple[int, ...]:
    """Where a reply ends: generation_config.json's eos ids and the tokenizer's eos token (an
    instruct model's end of turn, e.g. `<|im_end|>`), in that order, once each."""
    ids = list(default_eos(model_dir))
    own = tokenizer.token_id(eos_token) if eos_token else None
    if own is not None and own not in ids:
        ids.append(own)
    return tuple(ids)


class TextStream:
    """Token ids in, text out as it becomes whole: decodes all ids so far each time and hands
    `emit` what was added, holding back an incomplete UTF-8 sequence (a character split over
    several tokens) until the rest of it comes."""

    def __init__(self, tokenizer: TextTokenizer, emit: Callable[[str], Any]) -> None:
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.shown = ""

    def add(self, token: int) -> None:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._show(text)

    def finish(self) -> None:
        """What is left (an incomplete sequence at the end shows as U+FFFD, as decode has it)."""
        self._show(self.tokenizer.decode(self.ids))

    def _show(self, text: str) -> None:
        if len(text) > len(self.shown):  # shown text cannot be taken back: only what was added
            self.emit(text[len(self.shown) :])
            self.shown = text


def require_decoder(model_dir: Path, decoder: DecoderSignature | None) -> None:
    if decoder is None:
        raise InputError(
            f"model '{model_dir}' is not a decoder with a KV cache: chat needs one (exported "
            f"for text-generation with its cache, not --no-kv-cache)"
        )


def chat_reply(
    model_dir: Path,
    decoder: DecoderSignature | None,
    generate: Callable[..., Any],
    messages: Any,
    max_new_tokens: int,
    system: str | None,
    sampling: dict[str, Any],
    streamer: Callable[[str], Any] | None,
) -> str:
    """The assistant's next message for `messages` (see `HermesModel.chat`), generated with
    `generate(ids, max_new_tokens=..., eos_token_id=..., streamer=..., **sampling)`."""
    require_decoder(model_dir, decoder)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    template = load_chat_template(model_dir)
    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.encode(
        template.render(conversation(messages, system)), add_special_tokens=False
    )
    stops = stop_ids(model_dir, tokenizer, template.special.get("eos_token"))
    room = (decoder.max_positions or len(ids) + max_new_tokens) - len(ids)
    if room < 1:
        raise InputError(
            f"the conversation is {len(ids)} tokens, no room left in the model's "
            f"{decoder.max_positions} positions: start a new one"
        )
    stream = TextStream(tokenizer, streamer) if streamer is not None else None

    def each_token(token: int) -> None:
        if token not in stops:  # the end-of-turn token is not part of the reply
            stream.add(token)

    out = generate(
        ids,
        max_new_tokens=min(max_new_tokens, room),
        eos_token_id=list(stops),
        streamer=each_token if stream else None,
        **sampling,
    )
    new = _reply_ids(out, len(ids), stops)
    if stream:
        stream.finish()
    return tokenizer.decode(new)


def _reply_ids(out: Any, prompt_length: int, stops: Sequence[int]) -> list[int]:
    new = [int(t) for t in list(out)[prompt_length:]]
    return new[:-1] if new and new[-1] in stops else new
