# HTTP egress decisions for the pexi PEP. See docs/policy.md.
#
# The PEP evaluates `data.pexi.http.decision` for every hop of every request (pep.http.request and
# pep.policy.check alike) and acts only on exactly one object {"allow": bool, "reasons": [string]}:
# anything else (undefined, an error, another shape) is a deny.
#
# Deny by default. A request is allowed when some entry of data.pexi.allow matches all of it and no entry of
# data.pexi.deny matches it. Entries come from config.toml ([[pep.policy.allow]], [[pep.policy.deny]]),
# policies/data/*.json and PEP_ALLOWED_DOMAINS; the PEP validates them at load. An entry:
#
#   {"host": "api.example.com"}   exact name         "*.example.com"   subdomains only
#   {"host": "**.example.com"}    apex + subdomains  "10.1.2.3", "10.0.0.0/8", "2001:db8::/32"  IP literals
#   "ports":   [443]              default: 443 for https, 80 for http (deny entries: any port)
#   "methods": ["GET", "POST"]    default: any
#   "paths":   ["/v1/"]           prefixes; "/v1" matches /v1 and /v1/..., not /v10; default: any
#   "schemes": ["https"]          default: http and https
#   "tunnel": true                a tunnel-only destination: reached only with pep.net.connect (opaque TCP,
#                                 for certificate-pinned clients), never with HTTP requests; host and
#                                 ports only (default port 443)
#
# Name patterns never match IP-literal hosts, and IP patterns never match names.
#
# Extension point: a module in its own package under pexi.rules (e.g. `package pexi.rules.uploads`) may
# define a `denials` set; each reason in it denies the request, whatever the allowlist says (see
# docs/policy.md, "Adding rules"). Extensions get their own package instead of joining this one: regorus
# mis-evaluates this package's rules under `with` (as the tests use it) once the package spans two files.
package pexi.http

import rego.v1

decision := object.union({"allow": allow, "reasons": reasons}, body_obligation)

# Extensions bound the request body by defining `max_body_bytes` (for every request, or under conditions of
# their own); the smallest applies. The PEP counts the body as it streams, so the bound holds whether or not
# the guest announced a length (`request.body_length` is null when it did not).
body_limits contains n if {
	some extension in data.pexi.rules
	n := extension.max_body_bytes
	is_number(n)
}

default body_obligation := {}

body_obligation := {"max_body_bytes": min(body_limits)} if count(body_limits) > 0

default allow := false

allow if {
	count(denials) == 0
	count(allowed_by) > 0
}

denials contains sprintf("denied by denylist entry %s", [host]) if some host in denied_by

denials contains reason if {
	some extension in data.pexi.rules
	some reason in extension.denials
}

req := input.request

default allow_entries := []

allow_entries := data.pexi.allow

default deny_entries := []

deny_entries := data.pexi.deny

# pep.net.connect asks for an opaque tunnel; only tunnel entries allow one, and they allow nothing else.
tunnel_request if input.method == "pep.net.connect"

allowed_by contains entry.host if {
	not tunnel_request
	some entry in allow_entries
	not entry.tunnel
	host_matches(entry.host)
	scheme_ok(entry)
	port_ok(entry)
	method_ok(entry)
	path_ok(entry)
	upgrade_ok(entry)
}

allowed_by contains entry.host if {
	tunnel_request
	some entry in allow_entries
	entry.tunnel
	host_matches(entry.host)
	req.port in object.get(entry, "ports", [443])
}

denied_by contains entry.host if {
	some entry in deny_entries
	host_matches(entry.host)
	req.scheme in object.get(entry, "schemes", [req.scheme])
	req.port in object.get(entry, "ports", [req.port])
	req.method in object.get(entry, "methods", [req.method])
	path_ok(entry)
}

reasons := sort(denials) if {
	count(denials) > 0
} else := [sprintf("allowed by allowlist entry %s", [h]) | some h in sort(allowed_by)] if {
	count(allowed_by) > 0
} else := [sprintf("host %s is not in the allowlist", [req.host])] if {
	count(host_entries) == 0
} else := [sprintf("%s:%d is not a tunnel destination", [req.host, req.port])] if {
	tunnel_request
} else := sort(field_misses)

# Entries whose host matches but that refuse something else: say what.
host_entries := [entry | some entry in allow_entries; host_matches(entry.host)]

field_misses contains sprintf("%s is a tunnel-only destination (pep.net.connect)", [req.host]) if {
	some entry in host_entries
	entry.tunnel
}

field_misses contains sprintf("scheme %s not allowed for %s", [req.scheme, req.host]) if {
	some entry in host_entries
	not entry.tunnel
	not scheme_ok(entry)
}

field_misses contains sprintf("port %d not allowed for %s", [req.port, req.host]) if {
	some entry in host_entries
	not entry.tunnel
	not port_ok(entry)
}

field_misses contains sprintf("method %s not allowed for %s", [req.method, req.host]) if {
	some entry in host_entries
	not entry.tunnel
	not method_ok(entry)
}

field_misses contains sprintf("path %s not allowed for %s", [req.path, req.host]) if {
	some entry in host_entries
	not entry.tunnel
	not path_ok(entry)
}

field_misses contains sprintf("upgrade to %s not allowed for %s (an allow entry lists it in upgrade)", [req.upgrade, req.host]) if {
	some entry in host_entries
	not entry.tunnel
	not upgrade_ok(entry)
}

default_port := 443 if req.scheme == "https"

default_port := 80 if req.scheme == "http"

scheme_ok(entry) if req.scheme in object.get(entry, "schemes", ["http", "https"])

port_ok(entry) if req.port in object.get(entry, "ports", [default_port])

# An entry without `methods` allows any method but these: TRACE (and IIS's TRACK) make an upstream send the
# request back, headers and all, and CONNECT hands the connection over. An entry that names them allows them.
echoing_methods := {"TRACE", "TRACK", "CONNECT"}

# An upgrade (WebSocket) carries bytes both ways past what methods and paths describe: only an entry that
# lists the protocol in `upgrade` allows it.
upgrade_ok(_) if object.get(req, "upgrade", null) == null

upgrade_ok(entry) if req.upgrade in object.get(entry, "upgrade", [])

method_ok(entry) if req.method in entry.methods

method_ok(entry) if {
	not entry.methods
	not upper(req.method) in echoing_methods
}

path_ok(entry) if not entry.paths

path_ok(entry) if {
	some prefix in entry.paths
	path_has_prefix(prefix)
}

path_has_prefix(prefix) if req.path == prefix

path_has_prefix(prefix) if {
	endswith(prefix, "/")
	startswith(req.path, prefix)
}

path_has_prefix(prefix) if {
	not endswith(prefix, "/")
	startswith(req.path, concat("", [prefix, "/"]))
}

# Host patterns.

host_matches(pattern) if {
	req.host_kind == "dns"
	p := lower(pattern)
	not startswith(p, "*")
	not is_ip_pattern(p)
	req.host == p
}

host_matches(pattern) if {
	req.host_kind == "dns"
	p := lower(pattern)
	startswith(p, "*.")
	endswith(req.host, substring(p, 1, -1))
}

host_matches(pattern) if {
	req.host_kind == "dns"
	p := lower(pattern)
	startswith(p, "**.")
	req.host == substring(p, 3, -1)
}

host_matches(pattern) if {
	req.host_kind == "dns"
	p := lower(pattern)
	startswith(p, "**.")
	endswith(req.host, substring(p, 2, -1))
}

host_matches(pattern) if {
	req.host_kind != "dns"
	is_ip_pattern(lower(pattern))
	net.cidr_contains(as_cidr(lower(pattern)), req.host)
}

is_ip_pattern(p) if contains(p, ":")

# Digits, dots and slashes only: an IPv4 address or CIDR. Trimming that cutset leaves nothing. (It was
# `regex.match`, which cost a third of every decision: see docs/benchmarks.md.)
is_ip_pattern(p) if {
	p != ""
	trim(p, "0123456789./") == ""
}

as_cidr(p) := p if contains(p, "/")

as_cidr(p) := concat("", [p, "/128"]) if {
	not contains(p, "/")
	contains(p, ":")
}

as_cidr(p) := concat("", [p, "/32"]) if {
	not contains(p, "/")
	not contains(p, ":")
}
