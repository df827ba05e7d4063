"""Where the PEP is (§1), and opening it: `unix:PATH`, `vsock:CID:PORT`, `virtio:NAME` (the port whose
`/sys/class/virtio-ports/*/name` is NAME) or `virtio:/dev/PATH` (a character device given by path)."""

from __future__ import annotations

import os
import socket
import stat
import termios
import tty
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT_NAME = "org.pexi.pep.0"
HOST_CID = 2
VSOCK_PORT = 4041
SYS_PORTS = Path("/sys/class/virtio-ports")


class EndpointError(ValueError):
    pass


@dataclass(frozen=True)
class Endpoint:
    kind: str  # unix | vsock | virtio
    path: str = ""
    cid: int = HOST_CID
    port: int = VSOCK_PORT

    @staticmethod
    def parse(text: str) -> "Endpoint":
        kind, _, rest = text.partition(":")
        if kind == "unix" and rest:
            return Endpoint("unix", path=rest)
        if kind == "virtio":
            return Endpoint("virtio", path=rest or DEFAULT_PORT_NAME)
        if kind == "vsock":
            if not rest:
                return Endpoint("vsock")
            cid, _, port = rest.partition(":")
            if cid.isdigit() and port.isdigit():
                return Endpoint("vsock", cid=int(cid), port=int(port))
        raise EndpointError(f"{text!r}: expected unix:PATH, vsock:CID:PORT, virtio:NAME or virtio:/dev/PATH")

    @staticmethod
    def from_env() -> "Endpoint":
        text = os.environ.get("PEXI_ENDPOINT")
        if text:
            return Endpoint.parse(text)
        if find_virtio_port(DEFAULT_PORT_NAME) is not None:
            return Endpoint("virtio", path=DEFAULT_PORT_NAME)
        raise EndpointError(
            f"PEXI_ENDPOINT is not set and there is no virtio port named {DEFAULT_PORT_NAME}; "
            "set PEXI_ENDPOINT=unix:PATH, vsock:CID:PORT or virtio:NAME"
        )

    @property
    def is_stream_socket(self) -> bool:
        """A socket ends with its connection; a virtio-serial port reads 0 bytes while the host is away."""
        return self.kind in ("unix", "vsock")

    def __str__(self) -> str:
        if self.kind == "vsock":
            return f"vsock:{self.cid}:{self.port}"
        return f"{self.kind}:{self.path}"

    def open(self) -> int:
        """A non-blocking file descriptor to the PEP. The caller owns it."""
        if self.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            sock.setblocking(False)
            return sock.detach()
        if self.kind == "vsock":
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            try:
                sock.connect((self.cid, self.port))
            except OSError:
                sock.close()
                raise
            sock.setblocking(False)
            return sock.detach()
        device = self.path if self.path.startswith("/") else find_virtio_port(self.path)
        if device is None:
            raise FileNotFoundError(f"no virtio port named {self.path}")
        fd = os.open(device, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY)
        if not stat.S_ISCHR(os.fstat(fd).st_mode):
            os.close(fd)
            raise EndpointError(f"{device} is not a character device")
        if os.isatty(fd):
            # A terminal (a pty standing in for the port) must pass bytes through untouched.
            tty.setraw(fd, termios.TCSANOW)
        return fd


def find_virtio_port(name: str, sys: Path = SYS_PORTS) -> str | None:
    """`/dev/vportNpM` of the port named `name`."""
    try:
        entries = list(sys.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            if (entry / "name").read_text().strip() == name:
                return f"/dev/{entry.name}"
        except OSError:
            continue
    return None
