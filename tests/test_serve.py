"""The OpenAI-compatible server, through real clients over loopback: the official ``openai``
SDK, ``http.client`` and raw sockets; the state cache; errors; attacks a server must survive."""

from __future__ import annotations

import http.client
import json
import logging
import signal
import socket
import subprocess
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import PYTHON

import charrnn
from charrnn.errors import ConfigError
from charrnn.serve.jobs import chat_pieces
from charrnn.serve.settings import ServeConfig
from charrnn.serve.state_cache import StateCache, piece_keys
from charrnn.serve.testing import ServerThread

HOST = "127.0.0.1"  # the only address these tests ever bind
MAX_LENGTH = 300
MAX_BODY = 4096
TIMEOUT = 60  # seconds, for every client socket: generous, the machine is busy
DEADLINE = 3.0  # the servers' request deadline here: short, so the slow-client tests are quick
LIMITS = dict(host=HOST, port=0, max_length=MAX_LENGTH, max_body_bytes=MAX_BODY, max_concurrent=2, quiet=True)


@pytest.fixture
def server(sampler):
    """A server on an ephemeral loopback port, stopped after the test."""
    with ServerThread(sampler, ServeConfig(**LIMITS, request_timeout=DEADLINE, model_name="tiny")) as running:
        yield running


def client(srv, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=srv.url + "/v1", api_key=kwargs.pop("api_key", "none"), timeout=TIMEOUT, max_retries=0, **kwargs
    )


def request(srv, method, path, body=None, headers=None):
    """(status, headers, body bytes) of one request made with http.client."""
    conn = http.client.HTTPConnection(HOST, srv.port, timeout=TIMEOUT)
    try:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        if body is not None and headers is None:
            headers = {"Content-Type": "application/json"}  # as every OpenAI client sends it
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def error_of(answer, status):
    """The OpenAI error object of an answer that must have ``status`` and be JSON."""
    got, headers, body = answer
    assert got == status, body
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def chat_body(text="the cat sat.", **fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], **fields}


def assert_answers(srv):
    """A normal client is still answered."""
    reply = client(srv).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=5, seed=1)
    assert reply.choices[0].finish_reason in ("stop", "length")


# --- the protocol, through the official SDK ----------------------------------------------------


def test_the_sdk_lists_the_model(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].owned_by == "charrnn"
    assert client(server).models.retrieve("tiny").id == "tiny"


def test_a_completion_is_the_library_text(server, sampler):
    answer = client(server).completions.create(
        model="tiny", prompt="ROMEO:\n", max_tokens=120, temperature=0.9, top_p=0.95, seed=7
    )
    expected = sampler.generate("ROMEO:\n", length=120, temperature=0.9, top_p=0.95, seed=7)
    assert answer.object == "text_completion" and answer.choices[0].text == expected
    assert answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (7, 120)  # characters
    again = client(server).completions.create(
        model="tiny", prompt="ROMEO:\n", max_tokens=120, temperature=0.9, top_p=0.95, seed=7
    )
    assert again.choices[0].text == expected
    echoed = client(server).completions.create(
        model="tiny", prompt="ROMEO:\n", max_tokens=20, seed=7, echo=True, extra_body={"top_k": 5}
    )
    assert echoed.choices[0].text == "ROMEO:\n" + sampler.generate("ROMEO:\n", length=20, seed=7, top_k=5)


def test_a_chat_is_the_chat_session_reply(server, sampler):
    """Messages are written through the chat template as charrnn chat writes them, and the reply ends at its stop."""
    session = sampler.chat(
        template=charrnn.ChatTemplate(), seed=3, length=200, temperature=0.8, preamble="KING:\nthe old king sang.\n\n"
    )
    messages = [{"role": "system", "content": "KING:\nthe old king sang.\n\n"}]
    for text in ("the cat sat on the mat.", "the dog ran.", "a bird flew over the house."):
        messages.append({"role": "user", "content": text})
        answer = client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=200, temperature=0.8, seed=3)
        reply = answer.choices[0].message.content
        # The session keeps one random stream across turns; a request starts its own from the seed.
        expected = sampler.continue_from(session_context(sampler, messages), length=200, temperature=0.8, seed=3, stop="\n\n")
        assert reply == "".join(expected)
        assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
        assert "\n\n" not in reply
        messages.append({"role": "assistant", "content": reply})
    assert session.template.stops == ("\n\n",)


def session_context(sampler, messages):
    """The context after a conversation, read as the server reads it (the pieces of chat_pieces)."""
    context = None
    turns = [(m["role"], m["content"]) for m in messages]
    for piece in chat_pieces(charrnn.ChatTemplate(), turns):
        context = sampler.read(piece, context)
    return context


def test_chat_pieces_write_the_chat_sessions_text(sampler):
    template = charrnn.ChatTemplate()
    turns = [("system", "KING:\nhail.\n"), ("user", "hi"), ("assistant", "ho\n"), ("user", "bye")]
    text = "".join(chat_pieces(template, turns))
    assert text == "KING:\nhail.\n" + "\nROMEO:\nhi\n\nJULIET:\nho\n" + "\nROMEO:\nbye\n\nJULIET:\n"
    # The session writes the same text: its turns read the same characters.
    session = sampler.chat(template=template, preamble="KING:\nhail.\n", length=0)
    assert session.turn_text("hi") == "\nROMEO:\nhi\n\nJULIET:\n"


def test_a_streamed_chat_joins_to_the_whole_reply(server):
    sdk = client(server)
    fields = dict(
        model="tiny", messages=[{"role": "user", "content": "the king said."}], max_tokens=250, temperature=1.0, seed=11
    )
    whole = sdk.chat.completions.create(**fields).choices[0].message.content
    chunks = list(sdk.chat.completions.create(**fields, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(whole)
    # The raw stream ends with data: [DONE].
    status, headers, body = request(server, "POST", "/v1/chat/completions", {**fields, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert body.endswith(b"data: [DONE]\n\n")


def test_a_streamed_completion_and_n_choices(server, sampler):
    sdk = client(server)
    stream = sdk.completions.create(model="tiny", prompt="KING:\n", max_tokens=60, seed=5, stream=True)
    assert "".join(c.choices[0].text for c in stream) == sampler.generate("KING:\n", length=60, seed=5)
    many = sdk.chat.completions.create(**chat_body(), max_tokens=40, seed=9, n=3)
    one = sdk.chat.completions.create(**chat_body(), max_tokens=40, seed=9)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].message.content == one.choices[0].message.content  # choice i has seed + i
    streamed = sdk.chat.completions.create(**chat_body(), max_tokens=40, seed=9, n=3, stream=True)
    texts = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in many.choices]


def test_without_a_seed_the_answer_names_one_that_reproduces_it(server):
    status, _, body = request(server, "POST", "/v1/completions", {"prompt": "KING:\n", "max_tokens": 40})
    first = json.loads(body)
    assert status == 200 and isinstance(first["seed"], int)
    again = json.loads(
        request(server, "POST", "/v1/completions", {"prompt": "KING:\n", "max_tokens": 40, "seed": first["seed"]})[2]
    )
    assert again["choices"][0]["text"] == first["choices"][0]["text"]


def test_penalties_through_the_sdk_are_the_library_penalties(server, sampler):
    penalties = dict(frequency_penalty=0.7, presence_penalty=0.3)
    extra = dict(repetition_penalty=1.3, dry_multiplier=0.8, dry_allowed_length=3, penalty_window=64)
    answer = client(server).completions.create(
        model="tiny", prompt="ROMEO:\n", max_tokens=80, temperature=0.9, seed=7, **penalties, extra_body=extra
    )
    expected = sampler.generate("ROMEO:\n", length=80, temperature=0.9, seed=7, **penalties, **extra)
    assert answer.choices[0].text == expected and not getattr(answer, "warnings", None)
    assert expected != sampler.generate("ROMEO:\n", length=80, temperature=0.9, seed=7)


def test_unknown_fields_are_ignored_and_named(server):
    status, _, body = request(server, "POST", "/v1/chat/completions", chat_body(max_tokens=5, temprature=0.1, user="u"))
    answer = json.loads(body)
    assert status == 200 and answer["warnings"] == ["ignored unknown field(s) temprature"]
    neutral = chat_body(max_tokens=5, presence_penalty=0, logit_bias={}, logprobs=False, response_format={"type": "text"})
    assert request(server, "POST", "/v1/chat/completions", neutral)[0] == 200


# --- the state cache ------------------------------------------------------------------------------


def test_a_cached_conversation_replies_as_an_uncached_one(sampler):
    """Replayed turn by turn on a cached and an uncached server: the same replies; the cached one reads only the new text."""
    replies = {}
    for entries in (1024, 0):
        with ServerThread(sampler, ServeConfig(**LIMITS, cache_entries=entries)) as srv:
            sdk, messages, cached = client(srv), [], []
            for turn, text in enumerate(["the cat sat.", "the dog ran.", "the king said.", "a bird flew."]):
                messages.append({"role": "user", "content": text})
                answer = sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=100, seed=turn, temperature=1.0)
                messages.append({"role": "assistant", "content": answer.choices[0].message.content})
                cached.append(answer.usage.prompt_tokens_details.cached_tokens)
                assert answer.usage.prompt_tokens == sum(map(len, chat_pieces(charrnn.ChatTemplate(), turns(messages[:-1]))))
            replies[entries] = [m["content"] for m in messages]
            health = json.loads(request(srv, "GET", "/health")[2])["cache"]
        if entries:
            # Turn 1 misses; every later turn starts from the state after the previous prompt.
            assert cached[0] == 0 and all(c > 0 for c in cached[1:])
            assert health["hits"] == 3 and health["misses"] == 1 and health["entries"] == 4
        else:
            assert cached == [0, 0, 0, 0] and health["entries"] == 0
    assert replies[1024] == replies[0]


def turns(messages):
    return [(m["role"], m["content"]) for m in messages]


def test_the_state_cache_is_bounded_by_count_and_bytes(sampler):
    context = sampler.read("the cat")
    size = sum(t.numel() * t.element_size() for t in (context.logits, *context.hidden.tensors()))
    cache = StateCache(max_entries=3, max_bytes=10 * size)
    for key in "abcd":
        cache.put(key, context)
    assert len(cache) == 3 and cache.get("a") is None  # least recently used out first
    assert cache.get("b") is not None
    cache.put("e", context)  # "c" is now the oldest
    assert cache.get("c") is None and cache.get("b") is not None
    small = StateCache(max_entries=100, max_bytes=2 * size)
    for key in "abc":
        small.put(key, context)
    assert len(small) == 2 and small.bytes == 2 * size
    assert piece_keys(["ab", "c"]) != piece_keys(["a", "bc"])  # the same text read in other pieces is another key


# --- errors: JSON, the right status, the field named ---------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param", "fragment"),
    [
        ("/v1/chat/completions", b'{"messages": [', None, "not valid JSON"),
        ("/v1/chat/completions", b"\xff\xfe", None, "not UTF-8"),
        ("/v1/chat/completions", b"[1]", None, "must be a JSON object"),
        ("/v1/chat/completions", b"", None, "the body is empty"),
        ("/v1/chat/completions", b'{"messages": []}', "messages", "non-empty list"),
        ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "a"}]}', "messages[0].role", "is not a role here"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 3}]}', "messages[0].content", "must be a string"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}], "temperature": "hot"}',
            "temperature",
            "finite number",
        ),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "temperature": -1}', "temperature", ">= 0"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "top_p": 0}', "top_p", "(0, 1]"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": 301}',
            "max_tokens",
            "[0, 300]",
        ),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": 2.5}', "max_tokens", "integer"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}], "seed": -1}',
            "seed",
            "seed must be an integer from 0",
        ),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "n": 9}', "n", "n must be in [1, 4]"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "stream": "yes"}', "stream", "true or false"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "stop": [""]}', "stop", "non-empty strings"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}], "presence_penalty": 2.5}',
            "presence_penalty",
            "presence_penalty must be between -2 and 2",
        ),
        (
            "/v1/completions",
            b'{"prompt": "a", "dry_multiplier": -1}',
            "dry_multiplier",
            "dry_multiplier must be between 0 and 100",
        ),
        ("/v1/completions", b'{"prompt": "a", "repetition_penalty": "2"}', "repetition_penalty", "number"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}], "logprobs": true, "top_logprobs": 21}',
            "top_logprobs",
            "top_logprobs must be in [0, 20]",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}',
            "top_logprobs",
            "needs logprobs",
        ),
        ("/v1/completions", b'{"prompt": "a", "logprobs": 6}', "logprobs", "logprobs must be in [0, 5]"),
        ("/v1/completions", b'{"prompt": "a", "n": 3, "best_of": 2}', "best_of", "best_of must be from n (3)"),
        ("/v1/completions", b'{"prompt": "a", "best_of": 2, "stream": true}', "best_of", "cannot be streamed"),
        (
            "/v1/completions",
            b'{"prompt": "a", "structured_outputs": {"regex": "(a"}}',
            "structured_outputs.regex",
            "unclosed group",
        ),
        (
            "/v1/completions",
            b'{"prompt": "a", "structured_outputs": {"choice": ["ok", "Zed"]}}',
            "structured_outputs.choice",
            "never saw",
        ),
        ("/v1/completions", b'{"prompt": "a", "structured_outputs": {}}', "structured_outputs", "one of regex, choice"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_schema"}}',
            "response_format",
            "needs its json_schema",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}',
            "tools",
            "not supported",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "ЖЖЖ"}]}'.encode(),
            "messages[0].content",
            "never saw",
        ),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "\\ud800": 1}', "\\ud800", "lone surrogate"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
            "messages[0].content",
            "lone surrogate",
        ),
        ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, None, None),  # too deep to parse: still a 400 (or 413)
        ("/v1/completions", b'{"prompt": [1, 2, 3]}', "prompt", "token ids"),
        ("/v1/completions", b'{"prompt": "a", "suffix": "b"}', "suffix", "not supported"),
        ("/v1/completions", b'{"prompt": "a", "seed": 1' + b"0" * 5000 + b"}", None, "not JSON this server reads"),
    ],
)
def test_a_bad_request_is_a_400_naming_the_field(server, path, body, param, fragment):
    status, headers, raw = request(server, "POST", path, body, {"Content-Type": "application/json"})
    if len(body) > MAX_BODY:
        assert status == 413
        return
    error = error_of((status, headers, raw), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert fragment in error["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("HEAD", "/v1/chat/completions", 405),
        ("OPTIONS", "/v1/chat/completions", 200),
        ("PUT", "/v1/chat/completions", 405),
        ("DELETE", "/health", 405),
        ("FROB", "/v1/models", 405),
        ("GET", "/nope", 404),
        ("HEAD", "/nope", 404),
        ("OPTIONS", "/nope", 404),
        ("POST", "/complete", 410),
        ("GET", "/v1/models/other", 404),
    ],
)
def test_every_method_and_path_is_answered_in_json(server, method, path, status):
    got, headers, body = request(server, method, path)
    assert got == status and headers["content-type"].startswith("application/json")
    if method != "HEAD":
        payload = json.loads(body)
        assert ("error" in payload) == (status >= 400)
    if status == 405:
        assert "Allow" in headers or "allow" in headers


def test_health_and_the_head_of_get(server):
    status, headers, body = request(server, "GET", "/health")
    info = json.loads(body)
    assert status == 200 and info["status"] == "ok" and info["model"]["hidden_size"] == 32
    assert info["limits"]["max_length"] == MAX_LENGTH and info["limits"]["max_body_bytes"] == MAX_BODY
    assert request(server, "HEAD", "/health")[:2][0] == 200


def test_an_unexpected_exception_is_a_500_in_json_and_one_log_line(server, caplog):
    def broken(pieces, go_on):
        raise ZeroDivisionError("a bug")

    server.server.context_for = broken
    with caplog.at_level(logging.ERROR, logger="charrnn.serve"):
        error = error_of(request(server, "POST", "/v1/chat/completions", chat_body()), 500)
    assert error["type"] == "server_error" and "see the server log" in error["message"]
    lines = [r.getMessage() for r in caplog.records if r.name == "charrnn.serve"]
    assert len(lines) == 1 and "ZeroDivisionError: a bug" in lines[0] and "\n" not in lines[0]


def test_an_api_key_is_required_when_given(sampler):
    with ServerThread(sampler, ServeConfig(**LIMITS, api_key="s3cret", cors_origin=("http://localhost:3000",))) as srv:
        with pytest.raises(openai.AuthenticationError):
            client(srv, api_key="wrong").models.list()
        error = error_of(request(srv, "GET", "/v1/models"), 401)
        assert error["code"] == "invalid_api_key"
        assert [m.id for m in client(srv, api_key="s3cret").models.list().data]
        status, _, health = request(srv, "GET", "/health")  # the page and /health need no key,
        assert status == 200 and not {"cache", "load"} & set(json.loads(health))  # but its counters do
        keyed = json.loads(request(srv, "GET", "/health", headers={"Authorization": "Bearer s3cret"})[2])
        assert keyed["cache"]["entries"] >= 0 and keyed["load"] == {"running": 0, "waiting": 0}
        _, headers, _ = request(srv, "OPTIONS", "/v1/chat/completions", headers={"Origin": "http://localhost:3000"})
        assert headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "Authorization" in headers["access-control-allow-headers"]
        _, headers, _ = request(srv, "GET", "/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in headers


def test_a_full_queue_gets_429_then_503(sampler):
    """One slot, one waiting place: the third request at once is refused at once, the waiting one after the queue timeout."""
    config = ServeConfig(**{**LIMITS, "max_concurrent": 1}, max_queue=1, queue_timeout=1.0)
    with ServerThread(sampler, config) as srv:
        gate, reading = threading.Event(), threading.Event()
        real = srv.server.context_for

        def held(pieces, go_on):
            reading.set()
            gate.wait(TIMEOUT)
            return real(pieces, go_on)

        srv.server.context_for = held
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(request, srv, "POST", "/v1/chat/completions", chat_body(max_tokens=5))
            assert reading.wait(TIMEOUT)
            waiting = pool.submit(request, srv, "POST", "/v1/chat/completions", chat_body(max_tokens=5))
            deadline = time.monotonic() + TIMEOUT
            while srv.server.slots.waiting == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert (
                error_of(request(srv, "POST", "/v1/chat/completions", chat_body(max_tokens=5)), 429)["type"] == "rate_limit_error"
            )
            assert error_of(waiting.result(TIMEOUT), 503)["code"] == "server_busy"
            gate.set()
            assert first.result(TIMEOUT)[0] == 200
        assert_answers(srv)


# --- attacks: none stops a normal client being answered ------------------------------------------


def read_all(sock) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_megabyte_of_escaped_quotes_is_refused_while_health_answers(sampler):
    """Once the nesting scan was quadratic and ran on the event loop: this body held every client for half an hour."""
    body = b'{"model": "tiny", "prompt": "' + b'\\"' * (2**19 - 32)
    with ServerThread(sampler, ServeConfig(**{**LIMITS, "max_body_bytes": 2**20}, request_timeout=TIMEOUT)) as srv:
        with ThreadPoolExecutor(1) as pool:
            hostile = pool.submit(request, srv, "POST", "/v1/completions", body, {"Content-Type": "application/json"})
            status, _, health = request(srv, "GET", "/health")
            assert status == 200 and json.loads(health)["status"] == "ok"
            error = error_of(hostile.result(timeout=TIMEOUT), 400)
        assert "JSON" in error["message"]
        assert_answers(srv)


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:1", "[::1]:8000", "a.localhost", "10.0.0.7"])
def test_addresses_and_localhost_names_are_answered(server, host):
    assert request(server, "GET", "/health", headers={"Host": host})[0] == 200


def test_a_rebound_host_name_is_refused_unless_allowed(server, sampler):
    """DNS rebinding: a page on evil.example points its name at 127.0.0.1; its requests still say Host: evil.example."""
    error = error_of(request(server, "POST", "/v1/chat/completions", chat_body(), {"Host": "evil.example:8000"}), 421)
    assert error["code"] == "host_not_allowed" and "--allowed-host" in error["message"]
    assert error_of(request(server, "GET", "/health", headers={"Host": "evil.example"}), 421)
    with ServerThread(sampler, ServeConfig(**LIMITS, allowed_host=("models.example",))) as srv:
        assert request(srv, "GET", "/health", headers={"Host": "models.example:80"})[0] == 200
        assert request(srv, "GET", "/health", headers={"Host": "evil.example"})[0] == 421


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_that_is_not_declared_json_is_refused(server, content_type):
    """A web page can send these three without asking the server first (no CORS preflight): never act on them."""
    headers = {"Content-Type": content_type} if content_type else {}
    error = error_of(request(server, "POST", "/v1/chat/completions", json.dumps(chat_body()).encode(), headers), 415)
    assert error["code"] == "unsupported_media_type"
    answer = request(
        server, "POST", "/v1/chat/completions", chat_body(max_tokens=3), {"Content-Type": "application/json; charset=utf-8"}
    )
    assert answer[0] == 200


def _raw(srv, data: bytes) -> bytes:
    """What the server answers to ``data`` on a fresh connection, until it closes it."""
    with socket.create_connection((HOST, srv.port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        return read_all(sock)


@pytest.mark.parametrize(
    "data",
    [
        b"GET * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET http://127.0.0.1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    ],
)
def test_odd_requests_get_json_and_a_closed_connection(server, data):
    answer = _raw(server, data)  # returns only once the server closed the connection
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 4"), answer[:200]
    assert b"content-type: application/json" in head.lower() and b"x-content-type-options: nosniff" in head.lower()
    assert "message" in json.loads(body)["error"]
    assert_answers(server)


def test_answers_are_never_sniffed_and_the_page_is_never_framed(server):
    for method, path in (("GET", "/health"), ("GET", "/nowhere"), ("POST", "/v1/models")):
        assert request(server, method, path)[1]["x-content-type-options"] == "nosniff"
    _, headers, _ = request(server, "GET", "/")
    assert "frame-ancestors 'none'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize("key", ["s3cret ", " s3cret", "sécret", "s3\tcret", "two words"])
def test_an_api_key_no_header_can_carry_is_refused_at_start(key):
    with pytest.raises(ConfigError, match="api_key must be printable ASCII without spaces"):
        ServeConfig(api_key=key)


def test_a_slow_client_is_cut_off_at_the_deadline(server):
    """A byte a second: the headers (or the body) never finish in time; the client gets a 408 and is dropped."""
    results = {}

    def drip(name, head, body):
        """Send ``head``, then ``body`` a byte a second, reading what comes back as it comes."""
        answer = b""
        with socket.create_connection((HOST, server.port), timeout=TIMEOUT) as sock:
            started = time.monotonic()
            sock.sendall(head)
            sock.settimeout(1.0)
            for byte in body:
                try:
                    sock.sendall(bytes([byte]))
                    chunk = sock.recv(65536)  # waits up to a second: the drip's pace
                except TimeoutError:
                    continue
                except OSError:  # the server closed the connection: what should happen
                    break
                if not chunk:
                    break
                answer += chunk
            results[name] = (answer, time.monotonic() - started)

    body = json.dumps(chat_body()).encode()
    headers = f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    threads = [
        threading.Thread(target=drip, args=("headers", b"", headers)),
        threading.Thread(target=drip, args=("body", headers, body)),
    ]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert_answers(server)  # answered while both drip
    for t in threads:
        t.join(TIMEOUT)
    for name, (answer, seconds) in results.items():
        assert answer.startswith(b"HTTP/1.1 408 "), (name, answer)
        assert b"application/json" in answer and seconds < DEADLINE + 3, (name, seconds)
    assert_answers(server)


def test_200_idle_connections_do_not_stop_a_client(server):
    socks = [socket.create_connection((HOST, server.port), timeout=TIMEOUT) for _ in range(200)]
    try:
        started = time.monotonic()
        assert_answers(server)
        assert request(server, "GET", "/health")[0] == 200
        assert time.monotonic() - started < 10
    finally:
        for s in socks:
            s.close()


def test_a_content_length_larger_than_the_body_gets_a_408(server):
    with socket.create_connection((HOST, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(
            b'POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"messages": []}'
        )
        assert_answers(server)  # while it waits for the rest
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within" in answer


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_a_413(server, declared):
    body = json.dumps(chat_body("the cat sat. " * 2000)).encode()
    assert len(body) > MAX_BODY
    if declared:
        answer = request(server, "POST", "/v1/chat/completions", body)
    else:  # no Content-Length to trust: the limit holds while reading
        answer = request(server, "POST", "/v1/chat/completions", iter([body[:3000], body[3000:]]))
    error = error_of(answer, 413)
    assert "4,096 bytes" in error["message"]
    assert_answers(server)


def test_a_client_leaving_mid_stream_stops_its_generation(sampler, monkeypatch):
    """A slow model (5 ms a character, 2,000 asked for): the client leaves after one event; sampling stops soon after."""
    drawn = []
    real = sampler.continue_from

    class Slow:
        """A Continuation whose every character takes 5 ms."""

        def __init__(self, reply):
            self.reply = reply

        def __iter__(self):
            return self

        def __next__(self):
            piece = next(self.reply)
            time.sleep(0.005)
            drawn.append(piece)
            return piece

        def close(self):
            self.reply.close()

        finish_reason = property(lambda self: self.reply.finish_reason)

    def slow(*args, **kwargs):
        return Slow(real(*args, **kwargs))

    monkeypatch.setattr(sampler, "continue_from", slow)
    with ServerThread(sampler, ServeConfig(**{**LIMITS, "max_length": 2000}, request_timeout=TIMEOUT)) as srv:
        conn = http.client.HTTPConnection(HOST, srv.port, timeout=TIMEOUT)
        body = json.dumps({"prompt": "a", "max_tokens": 2000, "stream": True, "seed": 1})
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.read(6) == b"data: "
        conn.close()  # gone after one event
        deadline = time.monotonic() + TIMEOUT
        while srv.server.slots.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.server.slots.running == 0
        assert len(drawn) < 1000  # 2,000 would take 10 s: it stopped when the client left
        assert_answers(srv)


def test_a_conversation_is_bounded_in_all_not_per_message(trained_run):
    sampler = charrnn.load(trained_run.best, device="cpu")
    sampler.max_prompt_chars = 1000
    with ServerThread(sampler, ServeConfig(**{**LIMITS, "max_body_bytes": 2**20}, request_timeout=TIMEOUT)) as srv:
        messages = [{"role": "system", "content": "ab"}] * 600  # 1,200 characters, none of them long
        error = error_of(request(srv, "POST", "/v1/chat/completions", {"messages": messages}), 400)
        assert error["param"] == "messages"
        assert "the conversation (with the chat template) has 1,210 characters in all" in error["message"]  # + the reply start
        assert "at most 1,000 per request" in error["message"]
        assert_answers(srv)


def test_unknown_characters_are_told_to_the_client_and_never_pile_up_as_warnings(server):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(20):  # a distinct set of unknown characters each time
            answer = request(server, "POST", "/v1/completions", {"prompt": f"the {chr(0x4E00 + i)} cat", "max_tokens": 2})
            assert answer[0] == 200 and "never saw" in json.loads(answer[2])["warnings"][0]
    assert [str(w.message) for w in caught] == []


def _slow_reads(sampler, monkeypatch, seconds: float) -> list[str]:
    """Every piece a server reads takes ``seconds``; the pieces read so far."""
    read, real = [], sampler.read

    def slow(text="", context=None, **options):
        time.sleep(seconds)
        read.append(text)
        return real(text, context, **options)

    monkeypatch.setattr(sampler, "read", slow)
    return read


def test_a_prompt_read_stops_at_the_deadline_and_frees_its_slot(sampler, monkeypatch):
    read = _slow_reads(sampler, monkeypatch, 0.05)
    config = ServeConfig(**{**LIMITS, "max_body_bytes": 2**20, "max_concurrent": 1}, request_timeout=1.0)
    with ServerThread(sampler, config) as srv:
        messages = [{"role": "system", "content": "a"}] * 400  # 20 s of reading
        started = time.monotonic()
        error = error_of(request(srv, "POST", "/v1/chat/completions", {"messages": messages}), 504)
        assert "deadline" in error["message"]
        while srv.server.slots.running and time.monotonic() - started < 10:
            time.sleep(0.01)
        assert time.monotonic() - started < 4  # the 1 s deadline, not the 20 s the reading would take
        assert len(read) < 100
        monkeypatch.undo()
        assert_answers(srv)  # the one slot is free again


def test_shutdown_stops_a_prompt_read_and_answers_503(sampler, monkeypatch):
    _slow_reads(sampler, monkeypatch, 0.05)
    srv = ServerThread(sampler, ServeConfig(**{**LIMITS, "max_body_bytes": 2**20}, request_timeout=TIMEOUT))
    messages = [{"role": "system", "content": "a"}] * 400
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(request, srv, "POST", "/v1/chat/completions", {"messages": messages})
        while not srv.server.slots.running:
            time.sleep(0.01)
        started = time.monotonic()
        srv.stop()
        assert time.monotonic() - started < 3  # not the 20 s of reading
        error = error_of(answer.result(TIMEOUT), 503)
    assert error["code"] == "shutting_down" and "shutting down" in error["message"]


# --- the command line -------------------------------------------------------------------------------


def test_charrnn_serve_runs_on_loopback_and_stops_on_sigterm(trained_run, subprocess_env, tmp_path):
    proc = subprocess.Popen(
        [PYTHON, "-m", "charrnn", "serve", "--checkpoint", str(trained_run.best), "--port", "0", "--device", "cpu", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env,
        cwd=tmp_path,
    )
    try:
        line = proc.stdout.readline()  # "charrnn-serve: listening on http://127.0.0.1:PORT ..."
        assert "listening on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        assert [m.id for m in sdk.models.list().data] == [trained_run.best.parent.name]
        answer = sdk.chat.completions.create(model="x", messages=[{"role": "user", "content": "the cat"}], max_tokens=30, seed=5)
        assert answer.usage.completion_tokens == len(answer.choices[0].message.content) <= 30
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        proc.stdout.close()
        proc.stderr.close()


def test_charrnn_serve_startup_mistakes_exit_2(trained_run, capsys):
    from charrnn.cli.serve import main

    assert main(["--checkpoint", str(trained_run.best), "--port", "70000"]) == 2
    assert capsys.readouterr().err.startswith("error: --port must be in [0, 65535]")
    assert main(["--checkpoint", str(trained_run.best), "--device", "cpu", "--default-length", "5000"]) == 2
    assert "--default-length 5000 must be in [0, --max-length 2000]" in capsys.readouterr().err
    assert main(["--checkpoint", str(trained_run.best), "--device", "cpu", "--user-prefix", "ЖЖ:"]) == 2
    assert "the chat template uses characters the model never saw" in capsys.readouterr().err
