"""CRC-32C (Castagnoli), as §2.1 of the protocol defines it: reflected polynomial 0x82F63B78, initial value
and final XOR 0xFFFFFFFF. The standard library has only CRC-32 (zlib's polynomial), so this is a table-driven
implementation; `check()` is the spec's check value."""

_POLY = 0x82F63B78


def _table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The CRC-32C of `data`; pass a previous result as `crc` to continue over more bytes."""
    crc ^= 0xFFFFFFFF
    table = _TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def check() -> int:
    """0xE3069283 for a correct implementation (§2.1)."""
    return crc32c(b"123456789")
