#!/usr/bin/env python3
"""The Python reference client's driver for the guest conformance runner (protocol/conformance/README.md):
reads one action as a JSON line on stdin, performs it through the public `pexi_client.Client` API against
PEXI_ENDPOINT, prints the outcome as one JSON line, and exits when stdin closes.

    pexi-conformance guest --name python -- python3 examples/python-client/conformance_driver.py
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time

from pexi_client import Client, PexiError


def pattern(size: int) -> bytes:
    """The body the scenarios move: `a` to `z`, repeating."""
    alphabet = bytes(range(ord("a"), ord("z") + 1))
    return (alphabet * (size // 26 + 1))[:size]


def failure(error: PexiError) -> dict:
    return {"error": {"code": error.code, "retryable": error.retryable, "reasons": list(error.reasons)}}


def request(client: Client, spec: dict) -> dict:
    body = None
    if "body_bytes" in spec:
        body = pattern(spec["body_bytes"])
    elif "body" in spec:
        body = spec["body"].encode()
    try:
        response = client.request(
            spec.get("method", "GET"), spec["url"], headers=[tuple(h) for h in spec.get("headers", [])], body=body
        )
    except PexiError as error:
        return failure(error)
    if spec.get("cancel_after_head"):
        response.close()
        return {"status": response.status, "cancelled": True}
    try:
        data = response.read()
    except PexiError as error:
        return {**failure(error), "status": response.status}
    outcome = {"status": response.status, "body_bytes": len(data), "body_sha256": hashlib.sha256(data).hexdigest()}
    if len(data) <= 4096:
        try:
            outcome["body"] = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return outcome


def perform(client: Client, action: dict) -> dict:
    if "check" in action:
        spec = action["check"]
        try:
            decision = client.check(spec.get("method", "GET"), spec["url"])
        except PexiError as error:
            return failure(error)
        return {"allow": decision.allow, "reasons": list(decision.reasons), "decision_id": decision.decision_id}
    if "request" in action:
        return request(client, action["request"])
    if "sequence" in action:
        return {"results": [perform(client, a) for a in action["sequence"]]}
    if "concurrent" in action:
        results: list = [None] * len(action["concurrent"])

        def one(index: int, sub: dict) -> None:
            results[index] = perform(client, sub)

        threads = [threading.Thread(target=one, args=(i, a)) for i, a in enumerate(action["concurrent"])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {"results": results}
    if "sleep_ms" in action:
        time.sleep(action["sleep_ms"] / 1000)
        return {"slept": action["sleep_ms"]}
    return {"error": {"code": "driver", "message": f"unknown action {action}"}}


def main() -> None:
    action = json.loads(sys.stdin.readline())
    client = Client()
    try:
        outcome = perform(client, action)
    except Exception as error:  # the runner reports any other failure as the outcome
        outcome = {"error": {"code": "driver", "message": repr(error)}}
    print(json.dumps(outcome), flush=True)
    # The client (and its session) stays up until the runner is done with it: it closes stdin.
    sys.stdin.read()
    client.close()


if __name__ == "__main__":
    main()
