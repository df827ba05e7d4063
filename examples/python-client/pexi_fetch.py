#!/usr/bin/env python3
"""pexi_fetch.py: curl for a guest with no network, in Python; the same options and exit codes as the Rust
`pexi-fetch`. Every request goes to the host PEP, which decides it with policy and performs it; the body
streams to stdout as it arrives.

    PEXI_ENDPOINT=unix:$(pexi paths socket) pexi_fetch.py https://api.example.com/v1/models
    pexi_fetch.py -X POST -H 'content-type: application/json' -d @request.json https://api.example.com/v1/messages
    pexi_fetch.py --check https://evil.example/      # ask the policy only

Exit status: 0 for a 2xx/3xx response (or an allowing --check), 22 for a 4xx/5xx response (as curl -f),
1 for a denial, 2 for any other error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pexi_client import Client, PexiError
from pexi_client.transport import EndpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pexi_fetch.py", description="HTTP through the pexi PEP")
    parser.add_argument("-X", "--request", dest="method", help="HTTP method (default GET, or POST with -d)")
    parser.add_argument("-H", "--header", dest="headers", action="append", default=[], help="a request header, 'Name: value' (repeatable)")
    parser.add_argument("-d", "--data", help="request body: text, or @FILE to send a file")
    parser.add_argument("--check", action="store_true", help="only ask the policy (pep.policy.check)")
    parser.add_argument("-i", "--include", action="store_true", help="print the status line and headers to stderr")
    parser.add_argument("--endpoint", help="the PEP endpoint (default: PEXI_ENDPOINT, else the virtio port)")
    parser.add_argument("url")
    args = parser.parse_args(argv)
    method = args.method or ("POST" if args.data is not None else "GET")
    try:
        with Client(args.endpoint) as client:
            if args.check:
                decision = client.check(method, args.url)
                print(f"{'allow' if decision.allow else 'deny'} (decision {decision.decision_id})", file=sys.stderr)
                for reason in decision.reasons:
                    print(f"  {reason}", file=sys.stderr)
                return 0 if decision.allow else 1
            headers = []
            for header in args.headers:
                name, sep, value = header.partition(":")
                if not sep:
                    print(f"pexi_fetch.py: header {header!r} is not `Name: value`", file=sys.stderr)
                    return 2
                headers.append((name.strip(), value.strip()))
            body = None
            if args.data is not None:
                body = Path(args.data[1:]).read_bytes() if args.data.startswith("@") else args.data.encode()
            with client.request(method, args.url, headers=headers, body=body) as response:
                if args.include:
                    print(f"HTTP {response.status} ({response.final_url})", file=sys.stderr)
                    for name, value in response.headers:
                        print(f"{name}: {value.decode('utf-8', 'replace')}", file=sys.stderr)
                out = sys.stdout.buffer
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    # Flush per chunk: a stream of events must reach whoever reads stdout as it arrives.
                    out.flush()
                return 22 if response.status >= 400 else 0
    except PexiError as error:
        print(f"pexi_fetch.py: {error}", file=sys.stderr)
        for reason in error.reasons:
            print(f"  {reason}", file=sys.stderr)
        if error.decision_id:
            print(f"  decision {error.decision_id}", file=sys.stderr)
        return 1 if error.code == "policy_denied" else 2
    except (EndpointError, OSError) as error:
        print(f"pexi_fetch.py: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
