"""pexi_fetch.py against the real PEP, next to the Rust pexi-fetch it mirrors: same output, same exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import PACKAGE, REPO


def run(args, endpoint):
    return subprocess.run(
        [sys.executable, str(PACKAGE / "pexi_fetch.py"), *args],
        capture_output=True,
        env={**os.environ, "PEXI_ENDPOINT": endpoint, "PYTHONPATH": str(PACKAGE)},
        timeout=60,
    )


def rust_fetch():
    binary = REPO / "target" / "debug" / "pexi-fetch"
    if not binary.exists():
        subprocess.run(["cargo", "build", "-q", "-p", "pexi-fetch"], cwd=REPO, check=True)
    return binary


@pytest.mark.parametrize(
    "case",
    [
        ("get", lambda base: [f"{base}/hello"], 0),
        ("post", lambda base: ["-d", "some body", "-H", "x-test: 1", f"{base}/echo"], 0),
        ("missing", lambda base: [f"{base}/missing"], 22),
        ("denied", lambda base: ["https://denied.example/"], 1),
        ("check-allowed", lambda base: ["--check", f"{base}/hello"], 0),
        ("check-denied", lambda base: ["--check", "https://denied.example/"], 1),
    ],
    ids=lambda case: case[0],
)
def test_same_behaviour_as_the_rust_pexi_fetch(case, pep, upstream):
    _, make_args, status = case
    args = make_args(upstream.base)
    python = run(args, pep.endpoint)
    rust = subprocess.run(
        [str(rust_fetch()), *args],
        capture_output=True,
        env={**os.environ, "PEXI_ENDPOINT": pep.endpoint},
        timeout=60,
    )
    assert python.returncode == status, python.stderr
    assert rust.returncode == status, rust.stderr
    if case[0] == "post":
        # The echo includes the client's own headers: compare what matters.
        assert b'"body_length": 9' in python.stdout and b'"body_length": 9' in rust.stdout
    else:
        assert python.stdout == rust.stdout
    # Decision ids differ; the reasons printed do not.
    reasons = lambda out: [line for line in out.decode().splitlines() if line.startswith("  ") and "decision" not in line]  # noqa: E731
    assert reasons(python.stderr) == reasons(rust.stderr)


def test_a_bad_endpoint_is_exit_2():
    result = run(["http://127.0.0.1/"], "tcp:nowhere")
    assert result.returncode == 2
    assert b"expected unix:PATH" in result.stderr
