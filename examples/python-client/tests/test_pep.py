"""The Python client against a real `pexi serve` and a real loopback server."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
from conftest import pattern

from pexi_client import Client, PexiError


@pytest.fixture()
def client(pep):
    with Client(pep.endpoint) as c:
        yield c


def test_allowed_get(client, upstream, pep):
    response = client.get(f"{upstream.base}/hello")
    assert response.status == 200
    assert response.header("content-type") == b"text/plain"
    assert response.final_url == f"{upstream.base}/hello"
    assert response.read() == b"hello from upstream\n"
    decision = pep.wait_record(lambda r: r["kind"] == "decision" and r.get("decision_id") == response.decision_id)
    assert decision["decision"]["allow"] is True
    assert decision["guest"]["name"] == "pexi-python"


def test_post_bytes_and_a_streamed_body(client, upstream):
    seen = client.request("POST", f"{upstream.base}/echo", body=b"x" * 300_000, headers=[("x-test", "yes")]).json()
    assert seen["method"] == "POST"
    assert seen["body_length"] == 300_000
    assert seen["headers"]["content-length"] == "300000"
    assert seen["headers"]["x-test"] == "yes"

    def chunks():
        for i in range(20):
            yield f"chunk {i};".encode() * 1000

    seen = client.request("PUT", f"{upstream.base}/echo", body=chunks()).json()
    assert seen["method"] == "PUT"
    assert seen["body_length"] == sum(len(f"chunk {i};") * 1000 for i in range(20))
    assert seen["headers"].get("transfer-encoding") == "chunked"


def test_denied_with_reasons(client, pep):
    with pytest.raises(PexiError) as caught:
        client.get("https://denied.example/secrets")
    error = caught.value
    assert error.code == "policy_denied"
    assert error.retryable is False
    assert error.reasons == ["host denied.example is not in the allowlist"]
    record = pep.wait_record(lambda r: r["kind"] == "decision" and r.get("decision_id") == error.decision_id)
    assert record["decision"]["allow"] is False


def test_policy_check(client, upstream):
    allowed = client.check("GET", f"{upstream.base}/hello")
    assert allowed.allow is True
    denied = client.check("DELETE", "https://denied.example/")
    assert denied.allow is False
    assert denied.reasons == ("host denied.example is not in the allowlist",)


def test_streaming_download(client, upstream):
    size = 2 * 1024 * 1024
    response = client.get(f"{upstream.base}/big?bytes={size}")
    digest = hashlib.sha256()
    chunks = 0
    for chunk in response.iter_bytes():
        digest.update(chunk)
        chunks += 1
    assert chunks > 8, "the body streamed in pieces"
    assert digest.hexdigest() == hashlib.sha256(pattern(size)).hexdigest()


def test_events_arrive_as_they_are_sent(client, upstream):
    # The upstream sends each token only after the previous one reached this test (event order, no
    # clock): had the client or the PEP buffered the response, the first token would never arrive and
    # the upstream would give up and cut the body.
    response = client.get(f"{upstream.base}/sse?tokens=4&step=py-sse")
    text = b""
    seen = 0
    for chunk in response.iter_bytes():
        text += chunk
        while text.count(b"\n\n") > seen:
            seen += 1
            upstream.release("py-sse")
    assert text == b"".join(f"data: token-{i}\n\n".encode() for i in range(4))
    assert seen == 4


def test_cancel_stops_the_upstream(client, upstream, pep):
    response = client.get(f"{upstream.base}/forever?id=py-cancel")
    stream = response.iter_bytes()
    assert next(stream).startswith(b"tick")
    response.close()
    deadline = time.monotonic() + 10
    while not any(e[0] == "closed" and e[1] == "py-cancel" for e in upstream.events):
        assert time.monotonic() < deadline, "the upstream request was never abandoned"
        time.sleep(0.02)
    outcome = pep.wait_record(lambda r: r["kind"] == "outcome" and r.get("decision_id") == response.decision_id)
    assert outcome["error"] == "cancelled"


def test_concurrent_streams_share_one_session(client, upstream, pep):
    results = {}

    def fetch(i):
        results[i] = client.request("POST", f"{upstream.base}/echo", body=f"request {i}".encode()).json()

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == list(range(40))
    for i, seen in results.items():
        assert seen["body_head"] == f"request {i}"
    sessions = {r["session_id"] for r in pep.records() if r["kind"] == "decision" and r["guest"]["name"] == "pexi-python"}
    assert client.session is not None
    assert format(client.session.session_id, "016x") in sessions


def test_version_refusal(pep):
    with Client(pep.endpoint, versions=(99,)) as refused:
        with pytest.raises(PexiError) as caught:
            refused.get("http://127.0.0.1/")
    assert caught.value.code == "unsupported_version"
    assert caught.value.details.supported_versions == (1,)


def test_no_pep_is_a_retryable_connect_error(tmp_path):
    with Client(f"unix:{tmp_path / 'none.sock'}", connect_timeout=0.3) as nowhere:
        with pytest.raises(PexiError) as caught:
            nowhere.get("http://127.0.0.1/")
    assert caught.value.code == "connect"
    assert caught.value.retryable is True
