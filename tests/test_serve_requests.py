"""The server's request checks (serve/openai_requests.py), its error bodies (serve/api_errors.py)
and its stop-string matcher (serve/stop_text.py): pure Python, no HTTP server. The bodies the
official `openai` client sends are captured by running it against an httpx2 MockTransport."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from hermes_ort.serve import api_errors
from hermes_ort.serve.api_errors import ApiError
from hermes_ort.serve.openai_requests import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    EncodingFormat,
    Limits,
    TextParams,
    chat_request,
    completion_request,
    embedding_request,
    parse_json,
)
from hermes_ort.serve.stop_text import StopText

LIMITS = Limits(model="tiny-gpt2", context=64, max_inputs=3)
CHAT = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "tiny-gpt2", "prompt": "Once"}
EMBEDDING = {"model": "tiny-gpt2", "input": "hello"}
PARSERS = {"chat": (chat_request, CHAT), "completion": (completion_request, COMPLETION)}
PARSERS["embedding"] = (embedding_request, EMBEDDING)
DEFAULTS = TextParams(None, 1.0, 1.0, None, (), stream=False, include_usage=False)


def refusal(endpoint: str, status: int = 400, **fields) -> ApiError:
    parse, base = PARSERS[endpoint]
    with pytest.raises(ApiError) as caught:
        parse({**base, **fields}, LIMITS)
    assert caught.value.status == status, caught.value.message
    return caught.value


# --- the body ------------------------------------------------------------------------------------


def test_parse_json_takes_an_object_and_refuses_the_rest():
    assert parse_json(b'{"model": "m"}') == {"model": "m"}
    for body, word in [
        (b"{", "invalid JSON"),
        (b"", "invalid JSON"),
        (b"\xff\xfe{", "invalid JSON"),
        (b'{"temperature": NaN}', "NaN"),
        (b"[1, 2]", "JSON object"),
        (b'"text"', "JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
    ]:
        with pytest.raises(ApiError) as caught:
            parse_json(body)
        assert caught.value.status == 400 and word in caught.value.message


def test_an_unknown_field_is_refused_as_openai_words_it():
    e = refusal("chat", foo=1)
    assert (e.param, e.message) == ("foo", "Unrecognized request argument supplied: foo")
    e = refusal("embedding", foo=1, bar=2)
    assert e.message == "Unrecognized request arguments supplied: foo, bar"


@pytest.mark.parametrize("endpoint", PARSERS)
def test_the_model_is_required_and_must_be_the_served_one(endpoint):
    assert "must provide a model" in refusal(endpoint, model=None).message
    assert refusal(endpoint, model=7).param == "model"
    e = refusal(endpoint, 404, model="gpt-4o")
    assert (e.param, e.code, e.type) == ("model", "model_not_found", "invalid_request_error")
    assert "gpt-4o" in e.message and "tiny-gpt2" in e.message


# --- chat ----------------------------------------------------------------------------------------


def test_a_chat_request_with_defaults():
    request = chat_request(CHAT, LIMITS)
    assert request == ChatRequest("tiny-gpt2", ({"role": "user", "content": "hi"},), DEFAULTS)
    assert not request.params.greedy


def test_chat_messages_are_normalised():
    messages = [
        {"role": "developer", "content": "be brief", "name": "ops"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok", "refusal": None, "annotations": [], "audio": None},
        {"role": "user", "content": ""},
    ]
    request = chat_request({**CHAT, "messages": messages}, LIMITS)
    assert request.messages == (
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": ""},
    )


@pytest.mark.parametrize(
    "messages, param, word",
    [
        (None, "messages", "Missing"),
        ([], "messages", "non-empty"),
        ("hi", "messages", "non-empty"),
        (["hi"], "messages[0]", "object"),
        ([{"content": "hi"}], "messages[0].role", "one of"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role", "one of"),
        ([{"role": "tool", "content": "4", "tool_call_id": "x"}], "messages[0].role", "not supp"),
        ([{"role": "user"}], "messages[0].content", "string or a non-empty list"),
        ([{"role": "user", "content": None}], "messages[0].content", "string"),
        ([{"role": "user", "content": []}], "messages[0].content", "non-empty list"),
        ([{"role": "user", "content": "hi", "age": 3}], "messages[0].age", "not a field"),
        ([{"role": "user", "content": "hi", "name": 3}], "messages[0].name", "string"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0]",
            "not supported",
        ),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0]", "STRING"),
        (
            [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}],
            "messages[0].tool_calls",
            "not supported",
        ),
    ],
)
def test_bad_chat_messages_are_refused(messages, param, word):
    e = refusal("chat", messages=messages)
    assert e.param == param and word in e.message, e.message


def test_max_tokens_and_max_completion_tokens():
    def max_tokens(**fields):
        return chat_request({**CHAT, **fields}, LIMITS).params.max_tokens

    assert max_tokens(max_tokens=8) == max_tokens(max_completion_tokens=8) == 8
    assert max_tokens(max_tokens=8, max_completion_tokens=8) == 8
    assert max_tokens(max_tokens=64) == 64  # the whole context
    e = refusal("chat", max_tokens=8, max_completion_tokens=9)
    assert e.param == "max_completion_tokens" and "differ" in e.message
    for field in ("max_tokens", "max_completion_tokens"):
        for value, word in [(0, "at least 1"), (-1, "at least 1"), (2.5, "integer")]:
            e = refusal("chat", **{field: value})
            assert e.param == field and word in e.message
        assert "integer" in refusal("chat", **{field: True}).message  # a bool is not an int
        e = refusal("chat", **{field: 65})
        assert "context of 64" in e.message and e.param == field


def test_sampling_fields():
    params = chat_request(
        {**CHAT, "temperature": 0, "top_p": 0.5, "seed": 7, "stop": "\n"}, LIMITS
    ).params
    assert (params.temperature, params.top_p, params.seed, params.stop) == (0.0, 0.5, 7, ("\n",))
    assert params.greedy
    assert chat_request({**CHAT, "temperature": 2}, LIMITS).params.temperature == 2.0
    assert chat_request({**CHAT, "seed": -1}, LIMITS).params.seed == 2**64 - 1
    assert chat_request({**CHAT, "stop": ["a", "b", "c", "d"]}, LIMITS).params.stop == tuple("abcd")
    assert chat_request({**CHAT, "stop": []}, LIMITS).params.stop == ()
    for field, value, word in [
        ("temperature", 2.5, "[0, 2]"),
        ("temperature", -0.1, "[0, 2]"),
        ("temperature", "hot", "number"),
        ("temperature", True, "number"),
        ("top_p", 0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("seed", 1.5, "integer"),
        ("seed", 2**63, "64-bit"),
        ("stop", ["a", "b", "c", "d", "e"], "at most 4"),
        ("stop", [""], "empty"),
        ("stop", "", "empty"),
        ("stop", [1], "list of strings"),
        ("stream", "yes", "true or false"),
    ]:
        e = refusal("chat", **{field: value})
        assert e.param == field and word in e.message, (field, value, e.message)


def test_stream_options_only_with_stream():
    params = chat_request(
        {**CHAT, "stream": True, "stream_options": {"include_usage": True}}, LIMITS
    ).params
    assert params.stream and params.include_usage
    body = {**CHAT, "stream": True, "stream_options": {"include_obfuscation": False}}
    assert not chat_request(body, LIMITS).params.include_usage
    assert not chat_request({**CHAT, "stream_options": None}, LIMITS).params.include_usage
    e = refusal("chat", stream_options={"include_usage": True})
    assert e.param == "stream_options" and "only allowed when 'stream' is true" in e.message
    e = refusal("chat", stream=True, stream_options={"include_usage": 1})
    assert e.param == "stream_options.include_usage"
    e = refusal("chat", stream=True, stream_options={"chunk": 3})
    assert e.param == "stream_options.chunk" and "not supported" in e.message
    e = refusal("completion", stream=False, stream_options={"include_usage": True})
    assert e.param == "stream_options"


def test_unimplemented_fields_pass_at_their_neutral_value_only():
    neutral = {
        "n": 1,
        "frequency_penalty": 0.0,
        "presence_penalty": 0,
        "logprobs": False,
        "top_logprobs": None,
        "response_format": {"type": "text"},
        "logit_bias": {},
        "tools": [],
        "tool_choice": "none",
        "parallel_tool_calls": True,
        "user": "u-1",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
    }
    assert chat_request({**CHAT, **neutral}, LIMITS).params == DEFAULTS
    for field, value in [
        ("n", 2),
        ("n", True),
        ("frequency_penalty", 0.5),
        ("presence_penalty", -1),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("response_format", {"type": "json_object"}),
        ("logit_bias", {"50256": -100}),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "required"),
        ("store", True),
        ("reasoning_effort", "low"),
    ]:
        e = refusal("chat", **{field: value})
        assert e.param == field and "not supported by this server" in e.message, e.message
    assert refusal("chat", user=3).param == "user"


# --- completions ---------------------------------------------------------------------------------


def test_a_completion_request_defaults_to_16_tokens_as_openai():
    request = completion_request(COMPLETION, LIMITS)
    assert request == CompletionRequest("tiny-gpt2", "Once", replace(DEFAULTS, max_tokens=16))
    assert completion_request({**COMPLETION, "prompt": ["Once"]}, LIMITS).prompt == "Once"
    small = Limits(model="tiny-gpt2", context=8)
    assert completion_request(COMPLETION, small).params.max_tokens == 8
    neutral = {"echo": False, "suffix": None, "best_of": 1, "logprobs": None, "n": 1, "user": "u"}
    assert completion_request({**COMPLETION, **neutral}, LIMITS).params.max_tokens == 16


@pytest.mark.parametrize(
    "fields, param, word",
    [
        ({"prompt": None}, "prompt", "Missing"),
        ({"prompt": ""}, "prompt", "non-empty string"),
        ({"prompt": []}, "prompt", "non-empty string"),
        ({"prompt": ["a", "b"]}, "prompt", "several prompts"),
        ({"prompt": [1, 2, 3]}, "prompt", "token ids"),
        ({"prompt": [[1, 2]]}, "prompt", "token ids"),
        ({"prompt": 3}, "prompt", "non-empty string"),
        ({"echo": True}, "echo", "not supported"),
        ({"suffix": "end"}, "suffix", "not supported"),
        ({"best_of": 2}, "best_of", "not supported"),
        ({"logprobs": 0}, "logprobs", "not supported"),
        ({"max_completion_tokens": 8}, "max_completion_tokens", "Unrecognized"),
        ({"messages": []}, "messages", "Unrecognized"),
    ],
)
def test_bad_completion_requests_are_refused(fields, param, word):
    e = refusal("completion", **fields)
    assert e.param == param and word in e.message, e.message


# --- embeddings ----------------------------------------------------------------------------------


def test_an_embedding_request():
    assert embedding_request(EMBEDDING, LIMITS) == EmbeddingRequest(
        "tiny-gpt2", ("hello",), EncodingFormat.FLOAT
    )
    body = {**EMBEDDING, "input": ["a", "b", "c"], "encoding_format": "base64", "user": "u"}
    request = embedding_request({**body, "dimensions": None}, LIMITS)
    assert request.texts == ("a", "b", "c") and request.encoding_format is EncodingFormat.BASE64


@pytest.mark.parametrize(
    "fields, param, word",
    [
        ({"input": None}, "input", "Missing"),
        ({"input": ""}, "input", "empty string"),
        ({"input": ["a", ""]}, "input", "empty string (at 1)"),
        ({"input": []}, "input", "non-empty list"),
        ({"input": ["a", 3]}, "input", "list of strings"),
        ({"input": [1, 2, 3]}, "input", "token ids"),
        ({"input": [[1, 2], [3]]}, "input", "token ids"),
        ({"input": ["a"] * 4}, "input", "more than this server's 3"),
        ({"encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
        ({"dimensions": 64}, "dimensions", "not supported"),
        ({"temperature": 0}, "temperature", "Unrecognized"),
    ],
)
def test_bad_embedding_requests_are_refused(fields, param, word):
    e = refusal("embedding", **fields)
    assert e.param == param and word in e.message, e.message


# --- errors --------------------------------------------------------------------------------------


def test_the_error_constructors():
    e = api_errors.bad_request("'x' is wrong", param="x")
    assert (e.status, e.headers()) == (400, {})
    assert e.body() == {
        "error": {
            "message": "'x' is wrong",
            "type": "invalid_request_error",
            "param": "x",
            "code": None,
        }
    }
    assert (api_errors.unauthorized().status, api_errors.unauthorized().code) == (
        401,
        "invalid_api_key",
    )
    assert "1024 bytes" in api_errors.too_large(1024).message
    assert api_errors.too_large(1024).status == 413
    busy = api_errors.overloaded(retry_after_s=3)
    assert (busy.status, busy.type, busy.code) == (503, "server_error", "overloaded")
    assert busy.headers() == {"Retry-After": "3"}
    broken = api_errors.internal()
    assert (broken.status, broken.type) == (500, "server_error")
    assert "Traceback" not in broken.message
    json.dumps(busy.body())  # plain JSON


# --- the official client's bodies ----------------------------------------------------------------


def openai_client(answer=None):
    """The openai client over an httpx2 MockTransport (no network), and the (path, JSON body) of
    every request it sends; each is answered by `answer(body)`'s ApiError (default a 400) so no
    response needs faking."""
    openai = pytest.importorskip("openai")
    httpx2 = pytest.importorskip("httpx2")
    sent = []

    def handler(request):
        sent.append((request.url.path, json.loads(request.content)))
        error = answer(sent[-1][1]) if answer else api_errors.bad_request("captured")
        return httpx2.Response(error.status, json=error.body(), headers=error.headers())

    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    client = openai.OpenAI(base_url="http://test/v1", api_key="k", max_retries=0, http_client=http)
    return client, sent


def client_bodies(calls):
    """The JSON bodies the openai client sends for each of `calls(client)`."""
    openai = pytest.importorskip("openai")
    client, sent = openai_client()
    for call in calls:
        with pytest.raises(openai.BadRequestError):
            call(client)
    return sent


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_the_openai_clients_chat_bodies_parse():
    bodies = client_bodies(
        [
            lambda c: c.chat.completions.create(model="tiny-gpt2", messages=MESSAGES),
            lambda c: c.chat.completions.create(
                model="tiny-gpt2", messages=MESSAGES, max_tokens=8, temperature=0, stream=False
            ),
            lambda c: c.chat.completions.create(
                model="tiny-gpt2",
                messages=MESSAGES,
                max_completion_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            ),
            lambda c: c.chat.completions.create(
                model="tiny-gpt2",
                messages=MESSAGES,
                stream=False,
                stream_options=None,
                max_tokens=None,
                temperature=None,
                top_p=None,
                seed=None,
                stop=None,
                n=None,
            ),
        ]
    )
    assert [path for path, _ in bodies] == ["/v1/chat/completions"] * 4
    sent = {**CHAT, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": False}
    assert bodies[1][1] == sent
    assert bodies[3][1]["stop"] is None  # None goes as null
    requests = [chat_request(body, LIMITS) for _, body in bodies]
    system, user = {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}
    assert requests[0] == ChatRequest("tiny-gpt2", (system, user), DEFAULTS)
    greedy = TextParams(8, 0.0, 1.0, None, (), stream=False, include_usage=False)
    assert requests[1].params == greedy
    assert requests[2].params == TextParams(8, 0.0, 1.0, None, (), stream=True, include_usage=True)
    assert requests[3].params == DEFAULTS


def test_the_openai_clients_completion_and_embedding_bodies_parse():
    bodies = client_bodies(
        [
            lambda c: c.completions.create(model="tiny-gpt2", prompt="Once"),
            lambda c: c.completions.create(
                model="tiny-gpt2",
                prompt="Once",
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            ),
            lambda c: c.embeddings.create(model="tiny-gpt2", input="hello"),
            lambda c: c.embeddings.create(model="tiny-gpt2", input=["a", "b"]),
            lambda c: c.embeddings.create(model="tiny-gpt2", input="a", encoding_format="float"),
        ]
    )
    (_, plain), (_, streamed), *embeddings = bodies
    assert completion_request(plain, LIMITS).params.max_tokens == 16
    params = completion_request(streamed, LIMITS).params
    assert (params.max_tokens, params.greedy, params.stream, params.include_usage) == (
        8,
        True,
        True,
        True,
    )
    # the client asks for base64 unless told otherwise
    assert [body.get("encoding_format") for _, body in embeddings] == ["base64", "base64", "float"]
    requests = [embedding_request(body, LIMITS) for _, body in embeddings]
    assert [r.texts for r in requests] == [("hello",), ("a", "b"), ("a",)]
    assert [r.encoding_format for r in requests] == ["base64", "base64", "float"]


def test_a_replayed_response_message_parses():
    """`messages.append(r.choices[0].message)` sends every field of the response's message."""
    openai = pytest.importorskip("openai")
    message = openai.types.chat.ChatCompletionMessage.model_validate(
        {"role": "assistant", "content": "hello", "refusal": None, "annotations": []}
    )
    bodies = client_bodies(
        [lambda c: c.chat.completions.create(model="tiny-gpt2", messages=[*MESSAGES, message])]
    )
    [(_, body)] = bodies
    assert "refusal" in body["messages"][2]
    assert chat_request(body, LIMITS).messages[2] == {"role": "assistant", "content": "hello"}


def test_the_openai_client_reads_the_error_body():
    openai = pytest.importorskip("openai")

    def answer(body):
        with pytest.raises(ApiError) as caught:
            chat_request(body, LIMITS)
        return caught.value

    client, _ = openai_client(answer)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert (caught.value.status_code, caught.value.code, caught.value.param) == (
        404,
        "model_not_found",
        "model",
    )
    assert "gpt-4o" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-gpt2", messages=MESSAGES, n=2)
    assert caught.value.param == "n" and "not supported" in caught.value.message


# --- stop strings --------------------------------------------------------------------------------


def run(stops, pieces):
    """What StopText shows for each piece, then at the end, and whether it stopped."""
    text = StopText(stops)
    shown = [text.add(p) for p in pieces]
    return shown, text.finish(), text.stopped


def test_without_stops_every_piece_shows_at_once():
    assert run([], ["Hel", "lo", " world"]) == (["Hel", "lo", " world"], "", False)


def test_a_stop_string_inside_one_piece():
    assert run(["\n"], ["Hello", " wo\nrld", "more"]) == (["Hello", " wo", ""], "", True)


def test_a_stop_string_split_over_two_and_three_pieces():
    assert run(["END"], ["Hi E", "ND there"]) == (["Hi ", ""], "", True)
    assert run(["END"], ["Hi E", "N", "D", "!"]) == (["Hi ", "", "", ""], "", True)
    # the stop at the very start: nothing is shown
    assert run(["<|x|>"], ["<|", "x", "|>", "tail"]) == (["", "", "", ""], "", True)


def test_a_false_start_is_released():
    assert run(["END"], ["Hi E", "N", "d of it"]) == (["Hi ", "", "ENd of it"], "", False)
    # held at the end of generation: finish hands it back
    assert run(["END"], ["Hi E", "N"]) == (["Hi ", ""], "EN", False)
    # a false start that itself holds the start of the stop: "EEND" stops after "E"
    assert run(["END"], ["E", "E", "ND"]) == (["", "E", ""], "", True)


def test_several_stops_the_first_to_appear_wins():
    stops = ["\n\n", "User:", "###"]
    assert run(stops, ["a\n", "b Use", "r: c"]) == (["a", "\nb ", ""], "", True)
    assert run(stops, ["one #", "## two\n\n"]) == (["one ", ""], "", True)
    # two stops in one piece: the text before the earlier one
    assert run(["b", "a"], ["xyab"]) == (["xy"], "", True)
    # the longest open tail over all stops is held ("ab" of "abc", though "b" of "bz" is shorter)
    assert run(["abc", "bz"], ["xab", "q"]) == (["x", "abq"], "", False)


def test_after_a_stop_nothing_more_shows():
    text = StopText(["."])
    assert (text.add("a.b"), text.add("c"), text.finish(), text.stopped) == ("a", "", "", True)


def test_the_first_stop_to_complete_wins_whatever_the_pieces():
    # "b" is complete before "abc" is: one piece or three, the same text
    assert run(["abc", "b"], ["abc"]) == (["a"], "", True)
    assert run(["abc", "b"], ["a", "b", "c"]) == (["", "a", ""], "", True)
    # complete at the same time: the longer one
    assert run(["bc", "abc"], ["xabc"]) == (["x"], "", True)


def first_stop(text: str, stops: list[str]) -> str:
    """The text before the first stop string to complete, read character by character."""
    for end in range(len(text) + 1):
        done = [text[:end].find(s) for s in stops if text[:end].endswith(s)]
        if done:
            return text[: min(done)]
    return text


def test_the_shown_text_is_the_same_for_every_split():
    stops = ["ab", "bca", "cc", "abcab"]
    for source in ["xabcx", "bcbcaxx", "ccc", "xbcbx", "acbacb", "abcabc", "zz"]:
        expected = first_stop(source, stops)
        for size in (1, 2, 3, len(source)):
            pieces = [source[i : i + size] for i in range(0, len(source), size)]
            shown, tail, stopped = run(stops, pieces)
            assert "".join(shown) + tail == expected, (source, size)
            assert stopped == (expected != source)
