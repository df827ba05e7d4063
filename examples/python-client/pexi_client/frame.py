"""Frames (§2): the 24-byte header, frame types and flags, encoding, and a bounded push decoder that
resynchronises after a framing error by scanning for the next valid header (§8)."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .crc32c import crc32c

MAGIC = b"PEXI"
FRAME_FORMAT_VERSION = 1
HEADER_LEN = 24
#: What both sides accept until the handshake announces otherwise (§2.1).
DEFAULT_MAX_FRAME = 65_536
#: No payload may ever be larger (§2.1).
HARD_MAX_FRAME = 16_777_216
MIN_MAX_FRAME = 4_096

#: magic, frame format version, type, flags, stream id, payload length, payload CRC (header CRC follows).
_HEADER = struct.Struct(">4sBBHIII")

FLAG_IGNORABLE = 0x0001


class FrameType(enum.IntEnum):
    HELLO = 0x01
    HELLO_ACK = 0x02
    PING = 0x03
    PONG = 0x04
    WINDOW_UPDATE = 0x05
    GOAWAY = 0x06
    SYNC = 0x07
    SYNC_ACK = 0x08
    OPEN = 0x10
    DATA = 0x11
    HEAD = 0x12
    END = 0x13
    ERROR = 0x14
    CANCEL = 0x15


@dataclass(frozen=True)
class Frame:
    """A decoded frame. `type` is the raw code: an unassigned one is kept, so the session can apply §9."""

    type: int
    flags: int
    stream_id: int
    payload: bytes

    @property
    def kind(self) -> FrameType | None:
        try:
            return FrameType(self.type)
        except ValueError:
            return None

    @property
    def name(self) -> str:
        kind = self.kind
        return kind.name if kind is not None else "UNKNOWN"

    def encode(self) -> bytes:
        return encode_frame(self.type, self.stream_id, self.payload, self.flags)


class FramingError(Exception):
    """The decoder lost its place; `code` is one of the names of §2.1."""

    CODES = ("bad_magic", "bad_header_crc", "unsupported_frame_version", "oversize_length", "bad_payload_crc")

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


def encode_header(frame_type: int, stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    if len(payload) > HARD_MAX_FRAME:
        raise ValueError(f"payload of {len(payload)} bytes exceeds the hard maximum {HARD_MAX_FRAME}")
    head = _HEADER.pack(MAGIC, FRAME_FORMAT_VERSION, frame_type, flags, stream_id, len(payload), crc32c(payload))
    return head + crc32c(head).to_bytes(4, "big")


def encode_frame(frame_type: int, stream_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return encode_header(frame_type, stream_id, payload, flags) + bytes(payload)


class FrameDecoder:
    """Push decoder. `feed()` bytes as they arrive, then call `next()` until it returns None; it returns a
    `Frame` or a `FramingError` (reported once per loss of place; candidates that fail while scanning are
    not reported again). Memory stays bounded by one header plus `max_payload` plus the bytes last fed."""

    def __init__(self, max_payload: int = DEFAULT_MAX_FRAME):
        self.max_payload = max_payload
        self._buf = bytearray()
        self._scanning = False

    def feed(self, data: bytes) -> None:
        self._buf += data

    def reset(self) -> None:
        """Drops buffered input (after a transport reconnect, §1)."""
        self._buf.clear()
        self._scanning = False

    def finish(self) -> str:
        """`ok`, or `truncated` when the input ended inside a frame (§11)."""
        return "ok" if not self._buf or self._scanning else "truncated"

    def _lose_place(self, code: str) -> FramingError | None:
        # Drop the first byte of the failed candidate and scan on; report only the first failure.
        del self._buf[0]
        if self._scanning:
            return None
        self._scanning = True
        return FramingError(code)

    def next(self) -> Frame | FramingError | None:
        buf = self._buf
        while True:
            if self._scanning:
                at = buf.find(MAGIC)
                if at < 0:
                    # A magic may be split across reads: keep what could be its first three bytes.
                    del buf[: max(0, len(buf) - 3)]
                    return None
                del buf[:at]
            # A header is judged only once all 24 of its bytes are here (§2.1), even if its first byte is
            # already wrong: input that ends sooner is a truncation, not a framing error.
            if len(buf) < HEADER_LEN:
                return None
            magic, version, frame_type, flags, stream_id, length, payload_crc = _HEADER.unpack_from(buf)
            header_crc = int.from_bytes(buf[20:24], "big")
            code = None
            if magic != MAGIC:
                code = "bad_magic"
            elif crc32c(buf[:20]) != header_crc:
                code = "bad_header_crc"
            elif version != FRAME_FORMAT_VERSION:
                code = "unsupported_frame_version"
            elif length > self.max_payload:
                # Judged on the header alone: nothing is reserved for a payload that is too long.
                code = "oversize_length"
            if code is not None:
                error = self._lose_place(code)
                if error is not None:
                    return error
                continue
            if len(buf) < HEADER_LEN + length:
                return None
            payload = bytes(buf[HEADER_LEN : HEADER_LEN + length])
            if crc32c(payload) != payload_crc:
                error = self._lose_place("bad_payload_crc")
                if error is not None:
                    return error
                continue
            del buf[: HEADER_LEN + length]
            self._scanning = False
            return Frame(frame_type, flags, stream_id, payload)
