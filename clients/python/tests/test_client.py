"""The blocking client against a real manager."""

import http.server
import threading

import httpx
import pytest

import arl


def test_the_five_line_example(url: str, token: str | None) -> None:
    session = arl.Client(url, token).create_session()
    assert session.execute("1+1").result == "2"
    session.delete()


def test_state_output_errors_and_rich_results(url: str, token: str | None) -> None:
    with arl.Client(url, token) as client, client.create_session() as session:
        assert session.execute("x = 41").result is None
        assert session.execute("x + 1").result == "42"
        shown: list[str] = []
        ex = session.execute("print('a')\nprint('b')\nx", on_stdout=shown.append)
        assert "".join(shown) == "a\nb\n" and ex.stdout == "a\nb\n" and ex.result == "41"
        failed = session.execute("1/0")
        assert failed.error is not None and failed.error.type == "ZeroDivisionError"
        assert "Traceback" in failed.error.traceback
        frame = session.execute("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
        assert "<table" in frame.results[-1]["text/html"]
        late = session.execute("import time\ntime.sleep(5)", timeout_ms=200)
        assert late.rolled_back and late.rollback_reason == "deadline"
        assert session.execute("x").result == "41"
        assert [h.code for h in session.history()][:2] == ["x = 41", "x + 1"]


def test_a_session_is_deleted_on_exit(url: str, token: str | None) -> None:
    client = arl.Client(url, token)
    with client.create_session(metadata={"who": "test"}) as session:
        assert any(s.id == session.id and s.metadata == {"who": "test"} for s in client.sessions())
    with pytest.raises((arl.SessionNotFound, arl.SessionEnded)) as gone:
        session.execute("1")
    assert gone.value.status in (404, 410)
    assert {"sessions", "capacity"} <= set(client.load())


def test_files_fork_snapshot_restore(url: str, token: str | None) -> None:
    client = arl.Client(url, token)
    with client.create_session() as session:
        written = session.files.write("d/a.txt", "hello")
        assert written.path == "d/a.txt" and written.size == 5
        assert session.execute("open('d/a.txt').read()").result == "'hello'"
        assert [f.path for f in session.files.list("d")] == ["d/a.txt"]
        assert session.files.read_text("d/a.txt") == "hello"
        session.execute("y = 'kept'")
        with session.fork() as fork:
            assert fork.execute("y").result == "'kept'"
            assert fork.files.read("d/a.txt") == b"hello"
        snap = session.snapshot()
        with client.restore(snap.id) as restored:
            assert restored.execute("y").result == "'kept'"
        session.files.delete("d")
        with pytest.raises(arl.FileNotFound):
            session.files.read("d/a.txt")
        with pytest.raises(arl.InvalidRequest) as bad:
            session.files.read("../etc/passwd")
        assert bad.value.code == "invalid_path"


def test_bad_input_fails_fast_naming_url_and_status(url: str, token: str | None) -> None:
    with pytest.raises(arl.SessionNotFound) as missing:
        arl.Client(url, token).session("nope").execute("1")
    assert missing.value.status == 404 and "/v1/sessions/nope/execute" in missing.value.url
    with pytest.raises(arl.InvalidRequest) as limits:
        arl.Client(url, token).create_session(memory_mib=1)
    assert limits.value.code == "invalid_request" and "memory_mib" in str(limits.value)
    with pytest.raises(arl.TransportError) as unreachable:
        arl.Client("http://127.0.0.1:9", token, timeout=2).create_session()
    assert "127.0.0.1:9" in str(unreachable.value)
    if token:
        with pytest.raises(arl.Unauthorized) as refused:
            arl.Client(url, "wrong").create_session()
        assert refused.value.status == 401 and url in str(refused.value)


def test_creates_are_retried_on_429_then_give_up() -> None:
    answers = [429, 503, 201]
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        status = answers.pop(0) if answers else 429
        if status == 201:
            return httpx.Response(201, json={"id": "s1", "runtime": "python"})
        body = {"error": {"code": "capacity_exhausted", "message": "full"}}
        return httpx.Response(status, json=body, headers={"retry-after": "0"})

    client = arl.Client("http://arl.test", transport=httpx.MockTransport(handler), backoff=0)
    assert client.create_session().id == "s1" and len(seen) == 3
    patient = arl.Client(
        "http://arl.test", transport=httpx.MockTransport(handler), create_retries=2, backoff=0
    )
    with pytest.raises(arl.CapacityExhausted) as full:
        patient.create_session()
    assert full.value.retry_after == 0 and full.value.status == 429 and len(seen) == 6


def test_a_session_reaches_what_its_network_allows(url: str, token: str | None) -> None:
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("content-length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    fetch = f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/').read()"
    try:
        with arl.Client(url, token) as client:
            with client.create_session(network={"allow": [f"127.0.0.1:{port}"]}) as open_:
                assert open_.execute(fetch).result == "b'hello'"
                assert open_.info().network["allow"] == [f"127.0.0.1:{port}"]
                assert open_.info().network["requests"] == 1
            with client.create_session() as closed:
                refused = closed.execute(fetch).error
                assert refused is not None and refused.type == "NetworkRefused"
            with pytest.raises(arl.InvalidRequest):
                client.create_session(network={"allow": ["*.com"]})
    finally:
        server.shutdown()
