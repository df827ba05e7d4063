"""The shipped policy under upstream OPA and under pexi's regorus, side by side (docs/fleet.md,
"Portable policies").

OPA is OPA's own Go engine (PyPI's opa-golib-python-bindings wraps it as a C library); regorus is the
engine inside `pexi`, reached through `pexi policy eval --jsonl`. Both get the same modules
(policies/pexi/*.rego), the same allow and deny lists and the same generated corpus of inputs, once with
approvals off and once on. The PEP hands regorus a host index it builds in Rust; OPA gets the bare lists
and builds the index in Rego (`index_of`), so the two index builders are compared too. Every `test_*`
rule of the policy's tests must also pass under OPA.

Usage: python differential.py PEXI REPO [--inputs N] [--seed S]. Exit status 0 when every decision is the
same, 1 when any differs (the first ones are printed), 2 on error.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

from opa_bindings import OpaEngine, OpaError

QUERY = "data.pexi.http.decision"

# Written as `pexi` normalises entries (lower-case hosts, upper-case methods), so both engines get the
# very same data; checked against `pexi policy list --json` below.
ALLOW = [
    {"host": "api.example.com"},
    {"host": "*.svc.example.com", "methods": ["GET", "POST"], "paths": ["/v1/"]},
    {"host": "**.cdn.example.net", "schemes": ["https"]},
    {"host": "10.0.0.0/8", "ports": [8080]},
    {"host": "2001:db8::/32"},
    {"host": "192.168.1.7"},
    {"host": "pinned.example.org", "ports": [443, 8443], "tunnel": True},
    {"host": "ws.example.com", "paths": ["/socket"], "upgrade": ["websocket"]},
    {"host": "trace.example.com", "methods": ["TRACE", "GET"]},
    {"host": "alice.example.com", "vms": ["alice"]},
    {"host": "shared.example.com", "ports": [443, 8443], "vms": ["alice", "bob"]},
]
DENY = [
    {"host": "bad.svc.example.com"},
    {"host": "api.example.com", "methods": ["DELETE"], "paths": ["/admin"]},
    {"host": "10.9.0.0/16"},
    {"host": "shared.example.com", "paths": ["/private/"], "vms": ["bob"]},
]

NAMES = [
    "api.example.com", "www.api.example.com", "example.com", "svc.example.com", "a.svc.example.com",
    "x.y.svc.example.com", "bad.svc.example.com", "cdn.example.net", "img.cdn.example.net",
    "a.b.cdn.example.net", "pinned.example.org", "ws.example.com", "trace.example.com",
    "alice.example.com", "shared.example.com", "unlisted.example", "com", "localhost",
    "API.EXAMPLE.COM", "api.example.com.", "",
]
IPV4 = ["10.0.0.1", "10.255.255.255", "10.9.3.4", "11.0.0.1", "192.168.1.7", "192.168.1.8", "127.0.0.1",
        "0.0.0.0"]
IPV6 = ["2001:db8::1", "2001:db8:ffff::", "2001:db9::1", "::1", "fe80::1", "2001:db8::", "::"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "TRACK", "CONNECT",
           "PURGE"]
PATHS = ["/", "/v1", "/v1/", "/v1/chat", "/v10", "/admin", "/admin/x", "/administrator", "/socket",
         "/socket/x", "/private/a", "/private", "/public"]
VMS = ["", "alice", "bob", "carol"]


def host():
    kind = random.random()
    if kind < 0.6:
        return random.choice(NAMES), "dns"
    if kind < 0.85:
        return random.choice(IPV4), "ipv4"
    return random.choice(IPV6), "ipv6"


def an_input():
    """An input document and whether the PEP could build it (canonical and complete)."""
    name, kind = host()
    protocol = random.choices(
        ["pep.http.request", "pep.net.connect", "pep.policy.check"], [8, 1, 1]
    )[0]
    scheme = "tcp" if protocol == "pep.net.connect" else random.choice(["http", "https"])
    port = random.choice([{"https": 443, "http": 80, "tcp": 443}[scheme], 80, 443, 8080, 8443, 22])
    path = "" if scheme == "tcp" else random.choice(PATHS)
    method = "CONNECT" if scheme == "tcp" else random.choice(METHODS)
    request = {
        "method": method,
        "scheme": scheme,
        "host": name,
        "host_kind": kind,
        "port": port,
        "path": path,
        "query": random.choice([None, "a=1"]),
        "headers": {},
        "body_length": random.choice([None, 0, 512, 10_000_000]),
        "url": f"{scheme}://{name}:{port}{path}",
        "secrets": [],
        "upgrade": random.choice([None, None, None, "websocket"]),
    }
    document = {
        "method": protocol,
        "request": request,
        "hop": random.choice([0, 0, 1]),
        "previous_url": None,
        "session": {"id": "0000000000000001", "guest": {"name": "g", "version": "1"}},
        "vm": {"name": random.choice(VMS), "profile": ""},
    }
    # Now and then a document no PEP builds: a wrong kind, a missing or mistyped field. The engines
    # must still agree (a deny, or both undefined).
    odd = random.random()
    if odd < 0.03:
        request["host_kind"] = random.choice(["dns", "ipv4", "ipv6", "other"])
    elif odd < 0.05:
        del request[random.choice(list(request))]
    elif odd < 0.06:
        request["port"] = str(port)
    elif odd < 0.07:
        del document["vm"]
    canonical = odd >= 0.07 and name == name.lower().rstrip(".") and name != ""
    return document, canonical


def allows(decision):
    """Whether the PEP would let the request go (anything but exactly allow: true is a deny)."""
    return isinstance(decision, dict) and decision.get("allow") is True


def opa_engine(policies, data):
    engine = OpaEngine()
    for name in sorted(os.listdir(policies)):
        if name.endswith(".rego"):
            with open(os.path.join(policies, name), encoding="utf-8") as f:
                engine.add_policy(f"pexi/{name}", f.read())
    if data is not None:
        engine.add_data(data)
    return engine


def opa_decide(engine, document):
    # An evaluation error is a deny in the PEP: compared as an error, whatever its wording.
    try:
        bindings = engine.eval_query(f"x := {QUERY}", input=document)
    except OpaError:
        return "<error>"
    return bindings[0]["x"] if bindings else "<undefined>"


def pexi_decide(pexi, repo, approvals, inputs_path, scratch):
    folder = os.path.join(scratch, f"approvals-{approvals}")
    os.makedirs(os.path.join(folder, "policies", "pexi"), exist_ok=True)
    os.makedirs(os.path.join(folder, "policies", "data"), exist_ok=True)
    for name in os.listdir(os.path.join(repo, "policies", "pexi")):
        if name.endswith(".rego"):
            with open(os.path.join(repo, "policies", "pexi", name), encoding="utf-8") as src:
                with open(os.path.join(folder, "policies", "pexi", name), "w", encoding="utf-8") as dst:
                    dst.write(src.read())
    with open(os.path.join(folder, "policies", "data", "corpus.json"), "w", encoding="utf-8") as f:
        json.dump({"allow": ALLOW, "deny": DENY}, f)
    config = os.path.join(folder, "config.toml")
    with open(config, "w", encoding="utf-8") as f:
        f.write(
            f'[pep]\nlisten = ["unix:{folder}/pep.sock"]\n'
            f'[pep.policy]\ndir = "policies"\n'
            f'[pep.audit]\npath = "{folder}/audit.jsonl"\n'
            f"[pep.approvals]\nenabled = {'true' if approvals else 'false'}\n"
            f'file = "{folder}/approvals.json"\n'
        )
    env = dict(os.environ, PEP_ALLOWED_DOMAINS="")
    listed = subprocess.run(
        [pexi, "policy", "list", "--config", config, "--json"],
        check=True, capture_output=True, text=True, env=env,
    )
    entries = json.loads(listed.stdout)
    got = {
        "allow": [e["entry"] for e in entries["entries"] if e["list"] == "allow"],
        "deny": [e["entry"] for e in entries["entries"] if e["list"] == "deny"],
    }
    if got != {"allow": ALLOW, "deny": DENY}:
        print("pexi normalised the corpus's entries differently:", json.dumps(got), file=sys.stderr)
        sys.exit(2)
    evaluated = subprocess.run(
        [pexi, "policy", "eval", "--config", config, "--input", inputs_path, "--jsonl"],
        check=True, capture_output=True, text=True, env=env,
    )
    results = []
    for line in evaluated.stdout.splitlines():
        result = json.loads(line)
        if "error" in result:
            results.append("<error>")
        else:
            value = result.get("result")
            results.append("<undefined>" if value in (None, "<undefined>") else value)
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("pexi")
    parser.add_argument("repo")
    parser.add_argument("--inputs", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=28)
    args = parser.parse_args()
    random.seed(args.seed)
    policies = os.path.join(args.repo, "policies", "pexi")

    # The policy's own tests, under OPA: each sets the data it needs with `with`.
    tests = opa_engine(policies, None)
    document = tests.eval_document("pexi.http_test")
    names = sorted(k for k in document if k.startswith("test_"))
    rules = []
    with open(os.path.join(policies, "http_test.rego"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("test_"):
                rules.append(line.split()[0])
    failed = sorted(set(rules) - {n for n in names if document[n] is True})
    if not rules or failed:
        print(f"under OPA, {len(failed)} of {len(rules)} policy tests fail: {failed}", file=sys.stderr)
        return 1
    print(f"policy tests under OPA: {len(rules)} passed, 0 failed")

    generated = [an_input() for _ in range(args.inputs)]
    corpus = [document for document, _ in generated]
    canonical = [flag for _, flag in generated]
    mismatches = []
    with tempfile.TemporaryDirectory(prefix="pexi-opa-") as scratch:
        inputs_path = os.path.join(scratch, "inputs.jsonl")
        with open(inputs_path, "w", encoding="utf-8") as f:
            for document in corpus:
                f.write(json.dumps(document) + "\n")
        outcomes = {}
        for approvals in (False, True):
            data = {"pexi": {"allow": ALLOW, "deny": DENY, "approvals": {"enabled": approvals}}}
            engine = opa_engine(policies, data)
            theirs = [opa_decide(engine, document) for document in corpus]
            ours = pexi_decide(args.pexi, args.repo, approvals, inputs_path, scratch)
            if len(ours) != len(theirs):
                print(f"pexi returned {len(ours)} results for {len(theirs)} inputs", file=sys.stderr)
                return 2
            for document, exact, a, b in zip(corpus, canonical, theirs, ours):
                # A document the PEP builds must get the very same decision, reasons and all. One it
                # never builds (a field missing or mistyped, a host not in canonical form) must be
                # allowed by both or by neither: there the engines may fail differently (OPA stops
                # with an error where regorus goes on to a deny that asks, each formats a string
                # that sprintf expects as a number its own way), and the PEP denies an error, an
                # undefined result and an ask alike.
                if a != b if exact else allows(a) != allows(b):
                    mismatches.append((approvals, document, a, b))
                key = a.strip("<>") if isinstance(a, str) else (
                    "allow" if a.get("allow") else ("ask" if "ask" in a else "deny"))
                outcomes[key] = outcomes.get(key, 0) + 1
    for approvals, document, opa, regorus in mismatches[:10]:
        print(f"DIFFERENT (approvals {'on' if approvals else 'off'}):\n  input   {json.dumps(document)}\n"
              f"  OPA     {json.dumps(opa)}\n  regorus {json.dumps(regorus)}")
    total = 2 * len(corpus)
    exact = 2 * sum(canonical)
    print(f"OPA's decisions ({', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))}); "
          f"{exact} inputs the PEP builds compared exactly, {total - exact} others by verdict")
    print(f"differential: {total - len(mismatches)} passed, {len(mismatches)} failed")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
