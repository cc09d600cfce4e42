"""Request bodies of OpenAI's API (chat completions, completions, embeddings) checked into frozen
dataclasses. Every problem is an `ApiError` (400, or 404 for a model this server does not serve)
whose message names the field and what is wrong, and whose `param` is that field. Fields OpenAI
takes that this server does not implement are accepted at their neutral value only.

What the official client sends (openai 3.60.0, captured through an httpx2 MockTransport; headers
`Authorization: Bearer KEY`, `Content-Type: application/json`, `User-Agent: OpenAI/Python 3.60.0`):
- only the arguments the caller gave, and an argument given as None is sent as null: so null
  means "the default" for every optional field here (`stream=False, stop=None, seed=None` sends
  `"stream": false, "stop": null, "seed": null`);
- chat.completions.create(model, messages, max_tokens=8, temperature=0, stream=True,
  stream_options={"include_usage": True}) -> POST /v1/chat/completions
  {"model", "stream": true, "messages": [...], "max_tokens": 8, "stream_options":
  {"include_usage": true}, "temperature": 0}; `max_completion_tokens` when given instead;
  `stream` only when given. Messages go as given; a response's message appended to the history
  (`messages.append(r.choices[0].message)`) goes with every field the response had, e.g.
  {"content", "refusal": null, "role", "annotations": [], "audio": null, "function_call": null,
  "tool_calls": null}: hence the neutral message fields below;
- completions.create(model, prompt="...", max_tokens=8, stream=True, stream_options=...) ->
  POST /v1/completions {"model", "stream": true, "prompt", "max_tokens": 8, "stream_options"};
- embeddings.create(model, input="hello" | ["a", "b"]) -> POST /v1/embeddings
  {"model", "input", "encoding_format": "base64"}: the client asks for base64 unless the caller
  gives `encoding_format`, and decodes it as float32 in machine order (little-endian).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hermes_ort.core.choices import Choice
from hermes_ort.serve.api_errors import bad_request, not_found_model

MAX_STOPS = 4  # OpenAI's limit
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
INT64 = 2**63


class EncodingFormat(Choice):
    """How /v1/embeddings returns each vector: a list of floats, or base64 of float32 bytes."""

    FLOAT = "float"
    BASE64 = "base64"


@dataclass(frozen=True)
class Limits:
    """What the served model allows a request."""

    model: str  # the served model's id; any other `model` -> 404 model_not_found
    context: int  # positions a request may reach (prompt + max_tokens), for messages
    max_inputs: int = 256  # embeddings inputs per request


@dataclass(frozen=True)
class TextParams:
    """How a chat or completion request generates."""

    max_tokens: int | None  # None: as many as the context leaves (chat's default)
    temperature: float  # 0 = greedy (argmax); OpenAI's default 1.0
    top_p: float  # (0, 1], default 1.0
    seed: int | None  # >= 0 (a negative int64 seed maps to its unsigned twin, as numpy wants)
    stop: tuple[str, ...]  # up to 4 non-empty strings
    stream: bool
    include_usage: bool  # stream_options.include_usage (only with stream)
    ignore_eos: bool = False  # generate max_tokens whatever the model ends with (vLLM's)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[dict, ...]  # {"role": system|user|assistant, "content": str} each
    params: TextParams


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str
    params: TextParams


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    texts: tuple[str, ...]
    encoding_format: EncodingFormat


# Fields OpenAI takes that this server does not implement: null (the default) or one of these
# neutral values, else 400 "not supported". An empty tuple: null only.
NEUTRAL_TEXT = {"n": (1,), "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},)}
NULL_ONLY_CHAT = ("top_logprobs", "audio", "prediction", "reasoning_effort", "verbosity")
NULL_ONLY_CHAT += ("web_search_options", "moderation", "prompt_cache_options")
NEUTRAL_CHAT = {
    **NEUTRAL_TEXT,
    **dict.fromkeys(NULL_ONLY_CHAT, ()),
    "logprobs": (False,),
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "modalities": (["text"],),
    "store": (False,),  # stored completions are not kept here
    "service_tier": ("auto", "default"),
}
NEUTRAL_COMPLETION = {
    **NEUTRAL_TEXT,
    "logprobs": (),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
}
NEUTRAL_EMBEDDING = {"dimensions": ()}
# a history message replayed from a response (see the top)
NEUTRAL_MESSAGE = {
    "tool_calls": ([],),
    "annotations": ([],),
    **dict.fromkeys(("refusal", "function_call", "audio"), ()),
}
# Fields with no effect on the output here, accepted at any value of their type.
IGNORED_CHAT = {
    "user": str,
    "metadata": dict,
    "safety_identifier": str,
    "prompt_cache_key": str,
    "prompt_cache_retention": str,
    "parallel_tool_calls": bool,
}
IGNORED = {"user": str}
# ignore_eos: not OpenAI's; vLLM's and llama.cpp's server's extension (a benchmark's fixed length)
TEXT_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "ignore_eos",
}
CHAT_FIELDS = TEXT_FIELDS | {"messages", "max_completion_tokens", "stream_options"}
COMPLETION_FIELDS = TEXT_FIELDS | {"prompt", "stream_options"}
EMBEDDING_FIELDS = {"model", "input", "encoding_format"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (NaN and Infinity refused: they are not JSON)."""
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError too
        raise bad_request(f"invalid JSON: {e}") from None
    except RecursionError:
        raise bad_request("invalid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise bad_request(f"the body must be a JSON object, got {_kind(value)}")
    return value


def chat_request(body: dict, limits: Limits) -> ChatRequest:
    """A /v1/chat/completions body checked (developer messages become system ones)."""
    _known(body, CHAT_FIELDS, NEUTRAL_CHAT, IGNORED_CHAT)
    model = _model(body, limits)
    messages = body.get("messages")
    if messages is None:
        raise bad_request("Missing required parameter: 'messages'.", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request(f"'messages' must be a non-empty list, got {_kind(messages)}", "messages")
    normalised = tuple(_message(i, m) for i, m in enumerate(messages))
    legacy = _max_tokens(body, "max_tokens", limits)
    newer = _max_tokens(body, "max_completion_tokens", limits)
    if legacy is not None and newer is not None and legacy != newer:
        message = f"'max_tokens' ({legacy}) and 'max_completion_tokens' ({newer}) differ; give one"
        raise bad_request(message, "max_completion_tokens")
    params = _text_params(body, newer if newer is not None else legacy)
    return ChatRequest(model, normalised, params)


def completion_request(body: dict, limits: Limits) -> CompletionRequest:
    """A /v1/completions body checked: one text prompt."""
    _known(body, COMPLETION_FIELDS, NEUTRAL_COMPLETION, IGNORED)
    model = _model(body, limits)
    prompt = _prompt(body)
    max_tokens = _max_tokens(body, "max_tokens", limits)
    default = min(COMPLETION_MAX_TOKENS, limits.context)
    params = _text_params(body, default if max_tokens is None else max_tokens)
    return CompletionRequest(model, prompt, params)


def embedding_request(body: dict, limits: Limits) -> EmbeddingRequest:
    """A /v1/embeddings body checked: one or more non-empty texts."""
    _known(body, EMBEDDING_FIELDS, NEUTRAL_EMBEDDING, IGNORED)
    model = _model(body, limits)
    value = body.get("input")
    if value is None:
        raise bad_request("Missing required parameter: 'input'.", "input")
    texts = [value] if isinstance(value, str) else value
    if _token_ids(texts):
        raise bad_request("'input' as token ids is not supported by this server", "input")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        message = f"'input' must be a string or a non-empty list of strings, got {_shown(value)}"
        raise bad_request(message, "input")
    if "" in texts:
        raise bad_request(f"'input' holds an empty string (at {texts.index('')})", "input")
    if len(texts) > limits.max_inputs:
        message = f"'input' holds {len(texts)} texts, more than this server's {limits.max_inputs}"
        raise bad_request(message, "input")
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in [f.value for f in EncodingFormat]:
        message = f"'encoding_format' must be 'float' or 'base64', got {_shown(encoding)}"
        raise bad_request(message, "encoding_format")
    chosen = EncodingFormat.FLOAT if encoding is None else EncodingFormat(encoding)
    return EmbeddingRequest(model, tuple(texts), chosen)


def _prompt(body: dict) -> str:
    """One non-empty text: a string, or a list holding one."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise bad_request("Missing required parameter: 'prompt'.", "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise bad_request("'prompt' with several prompts is not supported by this server", "prompt")
    if _token_ids(prompt):
        raise bad_request("'prompt' as token ids is not supported by this server", "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise bad_request(f"'prompt' must be a non-empty string, got {_shown(prompt)}", "prompt")
    return prompt


def _token_ids(value: Any) -> bool:
    """A list of ints, or of lists (of ints): OpenAI's token-id prompt or input."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(_is_int(t) or isinstance(t, list) for t in value)
    )


def _known(body: dict, fields: set[str], neutral: dict, ignored: dict) -> None:
    """Every field one this endpoint knows; the unimplemented ones at their neutral values, the
    ignored ones of their type."""
    unknown = [k for k in body if k not in fields and k not in neutral and k not in ignored]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        message = f"Unrecognized request argument{plural} supplied: {', '.join(unknown)}"
        raise bad_request(message, unknown[0])
    _neutral(body, neutral, "")
    for field, kind in ignored.items():
        if body.get(field) is not None and not isinstance(body[field], kind):
            raise bad_request(f"'{field}' must be {_NAMES[kind]}, got {_kind(body[field])}", field)


def _neutral(fields: dict, neutral: dict, where: str) -> None:
    for field, allowed in neutral.items():
        value = fields.get(field)
        if value is not None and not any(_same(value, a) for a in allowed):
            only = " or ".join(["null", *(json.dumps(a) for a in allowed)])
            message = (
                f"'{where}{field}' = {_shown(value)} is not supported by this server (only {only})"
            )
            raise bad_request(message, where + field)


def _model(body: dict, limits: Limits) -> str:
    model = body.get("model")
    if model is None:
        raise bad_request("you must provide a model parameter", "model")
    if not isinstance(model, str):
        raise bad_request(f"'model' must be a string, got {_kind(model)}", "model")
    if model != limits.model:
        raise not_found_model(model, limits.model)
    return model


def _message(i: int, m: Any) -> dict[str, str]:
    """One chat message as {"role", "content"}: text content only, no tools."""
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad_request(f"'{where}' must be an object, got {_kind(m)}", where)
    role = m.get("role")
    if role in ("tool", "function"):
        raise bad_request(
            f"'{where}.role' {role!r} is not supported by this server", f"{where}.role"
        )
    if not isinstance(role, str) or role not in ROLES:
        message = f"'{where}.role' must be one of {', '.join(ROLES)}; got {_shown(role)}"
        raise bad_request(message, f"{where}.role")
    for key in m:
        if key not in ("role", "content", "name") and key not in NEUTRAL_MESSAGE:
            raise bad_request(f"'{where}.{key}' is not a field of a message", f"{where}.{key}")
    if m.get("name") is not None and not isinstance(m["name"], str):
        raise bad_request(
            f"'{where}.name' must be a string, got {_kind(m['name'])}", f"{where}.name"
        )
    _neutral(m, NEUTRAL_MESSAGE, f"{where}.")
    return {"role": ROLES[role], "content": _content(m.get("content"), f"{where}.content")}


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or its text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        message = (
            f"'{where}' must be a string or a non-empty list of text parts, got {_shown(content)}"
        )
        raise bad_request(message, where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind != "text":
            raise bad_request(f"'{at}' of type {kind!r} is not supported by this server", at)
        if kind != "text" or set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise bad_request(f'\'{at}\' must be {{"type": "text", "text": STRING}}', at)
        texts.append(part["text"])
    return "\n".join(texts)


def _text_params(body: dict, max_tokens: int | None) -> TextParams:
    stream = _bool(body, "stream")
    return TextParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0, low_open=False),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=_seed(body),
        stop=_stop(body),
        stream=stream,
        include_usage=_stream_options(body, stream),
        ignore_eos=_bool(body, "ignore_eos"),
    )


def _max_tokens(body: dict, field: str, limits: Limits) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if not _is_int(value):
        raise bad_request(f"'{field}' must be an integer, got {_shown(value)}", field)
    if value < 1:
        raise bad_request(f"'{field}' must be at least 1, got {value}", field)
    if value > limits.context:
        message = f"'{field}' = {value} is more than the model's context of {limits.context} tokens"
        raise bad_request(message, field)
    return value


def _number(
    body: dict, field: str, default: float, low: float, high: float, *, low_open: bool
) -> float:
    value = body.get(field)
    if value is None:
        return default
    inside = _is_number(value) and (low < value if low_open else low <= value) and value <= high
    if not inside:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad_request(f"'{field}' must be a number in {span}, got {_shown(value)}", field)
    return float(value)


def _seed(body: dict) -> int | None:
    seed = body.get("seed")
    if seed is None:
        return None
    if not _is_int(seed) or not -INT64 <= seed < INT64:
        raise bad_request(f"'seed' must be a 64-bit integer, got {_shown(seed)}", "seed")
    return seed % 2**64  # numpy's default_rng takes no negative seed


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request(
            f"'stop' must be a string or a list of strings, got {_shown(value)}", "stop"
        )
    if len(stops) > MAX_STOPS:
        raise bad_request(f"'stop' holds {len(stops)} strings, at most {MAX_STOPS}", "stop")
    if "" in stops:
        raise bad_request("'stop' holds an empty string", "stop")
    return tuple(stops)


def _bool(body: dict, field: str) -> bool:
    value = body.get(field)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"'{field}' must be true or false, got {_shown(value)}", field)
    return value is True


def _stream_options(body: dict, stream: bool) -> bool:
    """stream_options.include_usage (include_obfuscation is taken and ignored: no padding here)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        message = "'stream_options' is only allowed when 'stream' is true"
        raise bad_request(message, "stream_options")
    if not isinstance(options, dict):
        raise bad_request(
            f"'stream_options' must be an object, got {_kind(options)}", "stream_options"
        )
    for key, value in options.items():
        field = f"stream_options.{key}"
        if key not in ("include_usage", "include_obfuscation"):
            raise bad_request(f"'{field}' is not supported by this server", field)
        if value is not None and not isinstance(value, bool):
            raise bad_request(f"'{field}' must be true or false, got {_shown(value)}", field)
    return options.get("include_usage") is True


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(value: Any, neutral: Any) -> bool:
    """JSON equality: 0 == 0.0, but false is not 0 and true is not 1."""
    if _is_number(neutral):
        return _is_number(value) and value == neutral
    return type(value) is type(neutral) and value == neutral


_NAMES = {str: "a string", dict: "an object", bool: "true or false"}
_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _kind(value: Any) -> str:
    """A JSON value's type, for a message."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return _KINDS.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    """A value for a message: short JSON text (a long one cut)."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
