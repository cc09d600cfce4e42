"""The bodies the server answers with, as OpenAI's API shapes them: chat completions and their
streamed chunks, text completions and theirs, embeddings, the model list, and server-sent events
(`data: {json}` then a blank line; `data: [DONE]` at the end)."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import numpy as np

from hermes_ort.serve.openai_requests import EncodingFormat

OWNER = "hermes-ort"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def event(body: dict[str, Any] | str) -> str:
    """One server-sent event."""
    data = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
    return f"data: {data}\n\n"


DONE = event("[DONE]")


class ReplyShape:
    """Bodies of one reply (`chat`: chat.completion, else text_completion), with its id, time
    and model fixed."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str, prompt: int, completion: int) -> dict[str, Any]:
        """The reply in one body."""
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            return {
                **self._head("chat.completion"),
                "choices": [choice],
                "usage": usage(prompt, completion),
            }
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {
            **self._head("text_completion"),
            "choices": [choice],
            "usage": usage(prompt, completion),
        }

    def chunk(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        """A streamed piece: `text` added (the chat's first chunk also names the role), or the
        last chunk with `finish`."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, prompt: int, completion: int) -> dict[str, Any]:
        """stream_options.include_usage: a last chunk with no choices and the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(prompt, completion)}


def embeddings_body(
    model: str, vectors: np.ndarray, encoding: EncodingFormat, prompt_tokens: int
) -> dict[str, Any]:
    """vectors [n, dim] float32 as a list of embeddings; base64: the float32 bytes, little
    endian, as OpenAI sends them (and its Python client asks for by default)."""
    data = []
    for i, v in enumerate(vectors.astype("<f4")):
        value = (
            base64.b64encode(v.tobytes()).decode("ascii")
            if encoding == EncodingFormat.BASE64
            else [float(x) for x in v]
        )
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def models_body(model: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": OWNER}],
    }
