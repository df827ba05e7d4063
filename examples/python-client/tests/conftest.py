"""Test parts: a real `pexi serve` process with a config written for the test, and a real HTTP server on
loopback. Nothing of pexi is mocked."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

PACKAGE = Path(__file__).resolve().parent.parent
REPO = PACKAGE.parent.parent
sys.path.insert(0, str(PACKAGE))

VECTORS = REPO / "protocol" / "vectors" / "frames.json"
SCHEMAS = REPO / "schemas"


def pexi_binary() -> str:
    if os.environ.get("PEXI_BIN"):
        return os.environ["PEXI_BIN"]
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    binary = target / "debug" / "pexi"
    if not binary.exists():
        pytest.fail(f"{binary} is missing: run `cargo build -p pexi-host` first (or set PEXI_BIN)")
    return str(binary)


class Pep:
    """A `pexi serve` process allowing `allow` ([(host, [ports])]) and loopback addresses."""

    def __init__(self, allow):
        self.dir = Path(tempfile.mkdtemp(prefix="pexi-py-"))
        self.socket = self.dir / "pep.sock"
        self.audit = self.dir / "audit.jsonl"
        config = (REPO / "host" / "default-config.toml").read_text()
        for old, new in [
            ('listen = ["unix:{runtime_dir}/pep.sock"]', f'listen = ["unix:{self.socket}"]'),
            ('dir = "policies"', f'dir = "{REPO / "policies"}"'),
            ("allowed_cidrs = []", 'allowed_cidrs = ["127.0.0.0/8"]'),
            ('path = "{state_dir}/audit.jsonl"', f'path = "{self.audit}"'),
        ]:
            assert old in config, f"host/default-config.toml no longer contains {old}"
            config = config.replace(old, new)
        for host, ports in allow:
            config += f'\n[[pep.policy.allow]]\nhost = "{host}"\nports = {json.dumps(ports)}\n'
        (self.dir / "config.toml").write_text(config)
        self.process = subprocess.Popen(
            [pexi_binary(), "serve", "--config", str(self.dir / "config.toml")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"pexi serve exited: {self.process.stderr.read().decode()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("pexi serve did not listen within 20 s")
            time.sleep(0.02)
        self.endpoint = f"unix:{self.socket}"

    def records(self):
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line]

    def wait_record(self, predicate, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            for record in self.records():
                if predicate(record):
                    return record
            if time.monotonic() > deadline:
                raise AssertionError("no matching audit record")
            time.sleep(0.02)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def pattern(size: int) -> bytes:
    """A body whose every 4 bytes say their offset: a lost or reordered chunk shows."""
    return b"".join((i).to_bytes(4, "big") for i in range(0, size, 4))[:size]


class Upstream:
    """Loopback HTTP server. Routes: /hello, /echo, /big?bytes=N, /sse?tokens=N&gap=MS, /sse?tokens=N&step=ID
    (each token after the previous one is released with `release(ID)`), /forever?id=X."""

    def __init__(self):
        self.events = []
        # Lockstep streams: a test proves a response streams by event order, not by timing.
        self.steps: dict[str, threading.Semaphore] = {}
        self.steps_lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    data = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return bytes(data)
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("content-length", 0)))

            def _send(self, status, body: bytes, content_type="text/plain"):
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._route()

            def do_POST(self):
                self._route()

            def do_PUT(self):
                self._route()

            def _route(self):
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                body = self._body()
                if url.path == "/hello":
                    self._send(200, b"hello from upstream\n")
                elif url.path == "/echo":
                    seen = {
                        "method": self.command,
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body_length": len(body),
                        "body_head": body[:64].decode("latin-1"),
                    }
                    self._send(200, json.dumps(seen).encode(), "application/json")
                elif url.path == "/big":
                    size = int(query.get("bytes", 1 << 20))
                    data = pattern(size)
                    self.send_response(200)
                    self.send_header("content-length", str(size))
                    self.end_headers()
                    for at in range(0, size, 64 * 1024):
                        self.wfile.write(data[at : at + 64 * 1024])
                elif url.path == "/sse":
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    step = query.get("step")
                    for i in range(int(query.get("tokens", 3))):
                        chunk = f"data: token-{i}\n\n".encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                        if step is None:
                            time.sleep(int(query.get("gap", 100)) / 1000)
                        elif not upstream.gate(step).acquire(timeout=20):
                            # Never released: the token never reached the test. Close without the
                            # last chunk, so the client sees a cut body.
                            self.close_connection = True
                            return
                    self.wfile.write(b"0\r\n\r\n")
                elif url.path == "/forever":
                    self.send_response(200)
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    sent = 0
                    try:
                        while True:
                            self.wfile.write(b"5\r\ntick\n\r\n")
                            self.wfile.flush()
                            sent += 1
                            time.sleep(0.02)
                    except OSError:
                        upstream.events.append(("closed", query.get("id"), sent))
                else:
                    self._send(404, b"not found")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def gate(self, step: str) -> threading.Semaphore:
        with self.steps_lock:
            return self.steps.setdefault(step, threading.Semaphore(0))

    def release(self, step: str):
        """Lets a lockstep /sse send its next token."""
        self.gate(step).release()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def upstream():
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pep(upstream):
    process = Pep([("127.0.0.1", [upstream.port])])
    yield process
    process.stop()


@pytest.fixture(scope="session")
def vectors():
    return json.loads(VECTORS.read_text())
