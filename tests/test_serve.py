"""The HTTP server, through real clients over loopback: JSON, server-sent events, limits, threads."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import PYTHON

from charrnn.apps.server import make_server

HOST = "127.0.0.1"  # the only address these tests ever bind
MAX_LENGTH = 300
MAX_BODY = 4096
TIMEOUT = 60  # seconds, for every socket: generous, the machine is busy


@pytest.fixture
def server(sampler):
    """A server on an ephemeral loopback port, shut down and joined after the test."""
    srv = make_server(sampler, HOST, 0, max_length=MAX_LENGTH, max_body_bytes=MAX_BODY, max_concurrent=2, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def request(srv, method, path, body=None, headers=None):
    """(status, headers, body bytes) of one request made with http.client."""
    conn = http.client.HTTPConnection(HOST, srv.server_address[1], timeout=TIMEOUT)
    try:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def complete(srv, **fields):
    status, headers, body = request(srv, "POST", "/complete", fields)
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json")
    return json.loads(body)


def parse_sse(raw: bytes) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event."""
    events = []
    for block in raw.decode("utf-8").split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", None
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data = json.loads(value)
        events.append((name, data))
    return events


def stream(srv, **fields):
    """The joined text and the final event of a streamed completion."""
    status, headers, body = request(srv, "POST", "/complete", {**fields, "stream": True})
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(body)
    assert [name for name, _ in events[:-1]] == ["message"] * (len(events) - 1)
    assert events[-1][0] == "done"
    return "".join(data["text"] for _, data in events[:-1]), events[-1][1], len(events) - 1


def error_of(status_body, status):
    got, headers, body = status_body
    assert got == status, body
    assert headers["Content-Type"].startswith("application/json")
    return json.loads(body)["error"]


# --- completions ---------------------------------------------------------------------------------


def test_health(server):
    status, _, body = request(server, "GET", "/health")
    info = json.loads(body)
    assert status == 200 and info["status"] == "ok"
    assert info["limits"]["max_length"] == MAX_LENGTH and info["limits"]["max_body_bytes"] == MAX_BODY
    assert info["model"]["hidden_size"] == 32


def test_a_completion_is_the_library_text_and_the_seed_repeats_it(server, sampler):
    options = dict(prompt="ROMEO:\n", length=120, temperature=0.9, top_k=20, seed=7)
    first, again = complete(server, **options), complete(server, **options)
    assert first == again
    expected = sampler.generate("ROMEO:\n", length=120, temperature=0.9, top_k=20, seed=7)
    assert first == {"text": expected, "finish_reason": "length", "seed": 7, "length": 120, "warnings": []}
    assert complete(server, **{**options, "seed": 8})["text"] != expected


def test_without_a_seed_the_answer_names_one_that_reproduces_it(server):
    a = complete(server, prompt="KING:\n", length=60)
    b = complete(server, prompt="KING:\n", length=60)
    assert a["seed"] != b["seed"]
    assert complete(server, prompt="KING:\n", length=60, seed=a["seed"])["text"] == a["text"]
    assert a["length"] == len(a["text"]) == 60  # the default temperature and the given length


def test_a_stop_string_ends_the_text_and_says_so(server):
    answer = complete(server, prompt="ROMEO:\n", length=MAX_LENGTH, seed=1, stop=["\n\n", "queen"])
    assert answer["finish_reason"] == "stop"
    assert "\n\n" not in answer["text"] and "queen" not in answer["text"]
    assert answer["length"] == len(answer["text"]) < MAX_LENGTH


def test_the_sse_stream_joined_is_the_json_completion(server):
    for options in (dict(length=150, seed=3), dict(length=200, seed=4, stop="\n\n"), dict(length=40, temperature=0, seed=9)):
        text, done, pieces = stream(server, prompt="JULIET:\n", **options)
        answer = complete(server, prompt="JULIET:\n", **options)
        assert pieces > 1, "it streamed"
        assert text == answer.pop("text")
        assert done == answer


def test_the_length_may_reach_the_limit_but_not_pass_it(server):
    assert complete(server, prompt="a", length=MAX_LENGTH, seed=1)["length"] == MAX_LENGTH
    message = error_of(request(server, "POST", "/complete", {"prompt": "a", "length": MAX_LENGTH + 1}), 400)
    assert message == f"length {MAX_LENGTH + 1} is above this server's limit of {MAX_LENGTH} characters"


# --- bad requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"prompt": "ROMEO', "the body is not valid JSON"),
        (b"\xff\xfe", "the body is not UTF-8 text"),
        (b'["ROMEO"]', "the body must be a JSON object"),
        (b'{"promt": "ROMEO"}', "unknown field(s) promt"),
        (b'{"prompt": 3}', "prompt must be a string"),
        (b'{"temperature": "hot"}', "temperature must be float, got 'hot'"),
        (b'{"temperature": -1}', "temperature must be >= 0"),
        (b'{"length": 2.5}', "length must be int"),
        (b'{"seed": -1}', "seed must be an integer in [0, 2**63 - 1]"),
        (b'{"seed": true}', "seed must be an integer"),
        (b'{"stream": "yes"}', "stream must be true or false"),
        (b'{"stop": [""]}', "stop strings must be non-empty strings"),
        (b'{"stop": ["a","b","c","d","e","f","g","h","i"]}', "at most 8 strings"),
        ('{"prompt": "ЖЖЖ"}'.encode(), "made only of characters the model never saw"),
    ],
)
def test_a_bad_request_is_a_400_with_a_json_message(server, body, fragment):
    assert fragment in error_of(request(server, "POST", "/complete", body), 400)


@pytest.mark.parametrize("copies", [1_000, 50_000], ids=["13kB", "650kB"])
def test_an_oversize_body_is_a_413(server, copies):
    body = json.dumps({"prompt": "the cat sat. " * copies}).encode()
    assert len(body) > MAX_BODY
    # Small socket buffers, as on a real network: 650 kB cannot sit in them, so the
    # server must read (and drop) the body for its 413 to reach the client at all.
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn = http.client.HTTPConnection(HOST, server.server_address[1], timeout=TIMEOUT)
    try:
        conn.connect()
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        conn.request("POST", "/complete", body=body)
        response = conn.getresponse()
        status, message = response.status, json.loads(response.read())["error"]
    finally:
        conn.close()
    assert status == 413
    assert message == f"the body is {len(body):,} bytes; this server takes at most {MAX_BODY:,}"
    # The server lives on.
    assert complete(server, prompt="a", length=5, seed=1)["length"] == 5


def raw_exchange(srv, head: bytes) -> tuple[int, dict]:
    """Send raw request bytes; the status and JSON body of the answer (the server closes the connection)."""
    with socket.create_connection((HOST, srv.server_address[1]), timeout=TIMEOUT) as sock:
        sock.sendall(head)
        data = b""
        for _ in range(1000):  # bounded: the answer is small and ends with the connection
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def test_an_oversize_body_announced_with_expect_100_is_refused_before_it_is_sent(server):
    head = (
        b"POST /complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000000\r\nExpect: 100-continue\r\n\r\n"
    )
    status, body = raw_exchange(server, head)
    assert status == 413 and "10,000,000 bytes" in body["error"]


def test_a_body_without_content_length_is_a_411(server):
    status, body = raw_exchange(server, b"POST /complete HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert status == 411 and "Content-Length" in body["error"]


def test_unknown_paths_and_methods(server):
    assert "use POST /complete" in error_of(request(server, "GET", "/nope"), 404)
    assert error_of(request(server, "GET", "/complete"), 405) == "/complete takes POST"
    assert error_of(request(server, "POST", "/health", b"{}"), 405) == "/health takes GET"


# --- many clients ------------------------------------------------------------------------------------


def test_requests_at_once_each_get_their_own_answer(server, sampler):
    """Six clients at once (two generations run, the rest queue): each gets what it gets alone."""
    seeds = list(range(20, 26))
    expected = {s: sampler.generate("KING:\n", length=150, temperature=1.0, seed=s) for s in seeds}
    start = threading.Barrier(len(seeds))

    def client(seed):
        start.wait(TIMEOUT)
        if seed % 2:
            return seed, stream(server, prompt="KING:\n", length=150, temperature=1.0, seed=seed)[0]
        return seed, complete(server, prompt="KING:\n", length=150, temperature=1.0, seed=seed)["text"]

    with ThreadPoolExecutor(len(seeds)) as pool:
        results = dict(pool.map(client, seeds))
    assert results == expected


def test_a_client_leaving_mid_stream_does_not_hurt_the_server(server):
    conn = http.client.HTTPConnection(HOST, server.server_address[1], timeout=TIMEOUT)
    conn.request("POST", "/complete", body=json.dumps({"prompt": "a", "length": MAX_LENGTH, "stream": True, "seed": 1}))
    response = conn.getresponse()
    assert response.status == 200
    assert response.fp.readline().startswith(b"data: ")
    conn.close()  # gone after one event
    assert complete(server, prompt="a", length=10, seed=1)["length"] == 10


# --- the command line ---------------------------------------------------------------------------------


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
        conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
        conn.request("POST", "/complete", body=b'{"prompt": "ROMEO:\\n", "length": 30, "seed": 5}')
        answer = json.loads(conn.getresponse().read())
        conn.close()
        assert answer["length"] == 30 and answer["seed"] == 5
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
    assert "default length 5000 must be in [1, max length 2000]" in capsys.readouterr().err
