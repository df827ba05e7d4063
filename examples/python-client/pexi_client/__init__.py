"""pexi-client: a Python reference client of the pexi protocol, written from `docs/protocol.md` and
`schemas/` alone. The frame codec (`frame`), payloads (`payload`) and session (`session`) are sans-IO;
`client` runs them over a Unix socket, a vsock socket or a character device (a virtio-serial port)."""

__version__ = "0.1.0"

from .client import Client, PexiError, Response  # noqa: E402
from .transport import Endpoint  # noqa: E402

__all__ = ["Client", "Endpoint", "PexiError", "Response", "__version__"]
