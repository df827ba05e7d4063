"""The client over a character device path, as inside a VM with a virtio-serial port. A pseudo-terminal in
raw mode stands in for the port: the client opens `/dev/pts/N` like `/dev/vport0p1`, and a relay plays
QEMU's chardev, copying bytes between the pty and the PEP's Unix socket. The relay can drop and redo its
host connection, which a port's guest side does not see (no connection boundary, §1)."""

from __future__ import annotations

import os
import selectors
import socket
import termios
import threading
import tty

import pytest

from pexi_client import Client, PexiError


class PtyRelay:
    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave, termios.TCSANOW)
        self.path = os.ttyname(self.slave)
        os.set_blocking(self.master, False)
        self.sock = self._connect()
        self.lose_next = False
        self.stop_r, self.stop_w = os.pipe()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _connect(self):
        # Blocking: the relay thread only reads it when select says so, and its writes must not drop bytes.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.socket_path)
        return sock

    def reconnect(self, lose_next: bool = False):
        """The host end goes away and comes back: the PEP sees a new connection with no session. With
        `lose_next`, the guest's next write is lost in the cut, as a host reconnect can lose bytes."""
        with self.lock:
            self.sock.close()
            self.sock = self._connect()
            self.lose_next = lose_next

    def _run(self):
        selector = selectors.DefaultSelector()
        selector.register(self.stop_r, selectors.EVENT_READ, "stop")
        selector.register(self.master, selectors.EVENT_READ, "pty")
        current = None
        while True:
            with self.lock:
                if current is not self.sock:
                    if current is not None:
                        try:
                            selector.unregister(current)
                        except (KeyError, ValueError):
                            pass
                    current = self.sock
                    selector.register(current, selectors.EVENT_READ, "sock")
            for key, _ in selector.select(0.05):
                try:
                    if key.data == "stop":
                        return
                    if key.data == "pty":
                        data = os.read(self.master, 65536)
                        with self.lock:
                            sock, lose, self.lose_next = self.sock, self.lose_next, False
                        if data and not lose:
                            sock.sendall(data)
                    else:
                        data = current.recv(65536)
                        if data:
                            view = memoryview(data)
                            while view:
                                try:
                                    view = view[os.write(self.master, view) :]
                                except BlockingIOError:
                                    selectors.DefaultSelector().select(0.01)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    continue

    def close(self):
        os.write(self.stop_w, b"x")
        self.thread.join(timeout=5)
        for fd in (self.master, self.slave, self.stop_r, self.stop_w):
            os.close(fd)
        self.sock.close()


@pytest.fixture()
def relay(pep):
    bridge = PtyRelay(str(pep.socket))
    yield bridge
    bridge.close()


def test_requests_over_a_character_device(relay, upstream, pep):
    with Client(f"virtio:{relay.path}") as client:
        assert client.endpoint.kind == "virtio"
        response = client.get(f"{upstream.base}/big?bytes=300000")
        assert len(response.read()) == 300_000
        with pytest.raises(PexiError) as caught:
            client.get("https://denied.example/")
        assert caught.value.code == "policy_denied"


def test_a_host_reconnect_under_the_port_starts_a_new_session(relay, upstream, pep):
    with Client(f"virtio:{relay.path}") as client:
        assert client.get(f"{upstream.base}/hello").read() == b"hello from upstream\n"
        first = client.session.session_id
        relay.reconnect()
        # The request's OPEN reaches a PEP connection with no session: it answers session_reset (§4.0), the
        # request fails with that retryable code, never replayed, and the client sends HELLO again.
        with pytest.raises(PexiError) as caught:
            client.get(f"{upstream.base}/hello")
        assert caught.value.code == "session_reset"
        assert caught.value.retryable is True
        assert client.get(f"{upstream.base}/hello").read() == b"hello from upstream\n"
        assert client.session.session_id != first


def test_bytes_lost_in_a_host_reconnect_are_noticed_by_keepalive(relay, upstream, pep):
    """The request's OPEN vanishes in the cut, so nothing will ever answer it. After `keepalive` of silence the
    client PINGs; the new host connection has no session and answers session_reset, so the request in flight
    fails with that retryable code instead of hanging, and the next one goes through on a new session."""
    with Client(f"virtio:{relay.path}", keepalive=0.3) as client:
        assert client.get(f"{upstream.base}/hello").read() == b"hello from upstream\n"
        first = client.session.session_id
        relay.reconnect(lose_next=True)
        with pytest.raises(PexiError) as caught:
            client.get(f"{upstream.base}/hello")
        assert caught.value.code == "session_reset"
        assert caught.value.retryable is True
        assert client.get(f"{upstream.base}/hello").read() == b"hello from upstream\n"
        assert client.session.session_id != first
