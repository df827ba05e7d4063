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
#   "vms":     ["alice"]          for these VMs only (input.vm.name, set by the host); default: every VM
#   "tunnel": true                a tunnel-only destination: reached only with pep.net.connect (opaque TCP,
#                                 for certificate-pinned clients), never with HTTP requests; host and
#                                 ports only (default port 443)
#
# Name patterns never match IP-literal hosts, and IP patterns never match names.
#
# Entries are found by key, not by walking the lists, so a decision costs the same with 10 entries or
# 100 000: `data.pexi.index` groups each list's entries by the name their pattern is about
# (`*.example.com` and `**.example.com` under example.com) and by network (the bits of a CIDR's prefix).
# The PEP builds it when the bundle loads; for any other lists (tests that set them with `with`, a bare
# `opa eval`), `index_of` builds the same.
#
# Extension point: a module in its own package under pexi.rules (e.g. `package pexi.rules.uploads`) may
# define a `denials` set; each reason in it denies the request, whatever the allowlist says (see
# docs/policy.md, "Adding rules"). Extensions get their own package instead of joining this one: regorus
# mis-evaluates this package's rules under `with` (as the tests use it) once the package spans two files.
package pexi.http

import rego.v1

decision := object.union(object.union({"allow": allow, "reasons": reasons}, body_obligation), ask_person)

# Approvals (docs/approvals.md): with [pep.approvals] enabled, an HTTP request to a host that no list
# names, and that nothing denies, is held while a person is asked (`ask`); the PEP denies it when nobody
# answers. Tunnels and anything a list or an extension refuses are denied without asking, as when
# approvals are off.
default ask_person := {}

ask_person := {"ask": {"scope": "host"}} if {
	data.pexi.approvals.enabled == true
	not tunnel_request
	count(denials) == 0
	count(allow_candidates) == 0
}

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

# The PEP's index serves only the lists it was built from: a test that sets other lists with `with` (or
# data without an index) gets one built here. The PEP hands the policy the very same arrays in both
# places, so in the PEP this comparison costs no more than comparing two pointers.
index := data.pexi.index if {
	data.pexi.index.lists == {"allow": allow_entries, "deny": deny_entries}
} else := index_of(allow_entries, deny_entries)

# The entries of each list whose host pattern matches this request's host, looked up: one key per label of
# the name (or per prefix length in use, for an IP). What is found matches the host, so the other fields
# are all that is left to check.
allow_candidates := candidates(index.allow)

# Most deployments list nothing to deny: then there is nothing to look up.
deny_candidates := candidates(index.deny) if {
	count(deny_entries) > 0
} else := []

candidates(list) := [entry |
	some name in host_and_parents
	some entry in list.hosts[name]
	wildcard := trim_suffix(lower(entry.host), name)
	wildcard in {true: {"", "**."}, false: {"*.", "**."}}[name == req.host]
	vm_ok(entry)
] if req.host_kind == "dns"

candidates(list) := [entry |
	some length in object.get(list.lengths, substring(request_bits, 0, 2), [])
	some entry in list.networks[substring(request_bits, 0, length + 2)]
	vm_ok(entry)
] if req.host_kind != "dns"

# An entry that names VMs (`vms`) is for those VMs only; to any other it is as if it were not listed.
# `input.vm` is what the host set up (the listener, `pexi vm run --name`), never what the guest says.
vm_ok(entry) if not entry.vms

vm_ok(entry) if object.get(input, ["vm", "name"], "") in entry.vms

# Computed once for both lists.
request_bits := ip_bits(req.host) if req.host_kind != "dns"

# For a.b.example.com: itself, b.example.com, example.com and com. Entries are filed under the name their
# pattern is about (`*.example.com` under example.com); under the host itself, exact names and `**.`
# patterns match, under a parent `*.` and `**.` ones.
host_and_parents := array.concat(
	[req.host],
	[substring(req.host, dot + 1, -1) | some dot in indexof_n(req.host, ".")],
)

# pep.net.connect asks for an opaque tunnel; only tunnel entries allow one, and they allow nothing else.
tunnel_request if input.method == "pep.net.connect"

allowed_by contains entry.host if {
	not tunnel_request
	some entry in allow_candidates
	not entry.tunnel
	scheme_ok(entry)
	port_ok(entry)
	method_ok(entry)
	path_ok(entry)
	upgrade_ok(entry)
}

allowed_by contains entry.host if {
	tunnel_request
	some entry in allow_candidates
	entry.tunnel
	req.port in object.get(entry, "ports", [443])
}

denied_by contains entry.host if {
	some entry in deny_candidates
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
	count(allow_candidates) == 0
} else := [sprintf("%s:%d is not a tunnel destination", [req.host, req.port])] if {
	tunnel_request
} else := sort(field_misses)

# Entries whose host matches but that refuse something else: say what.
field_misses contains sprintf("%s is a tunnel-only destination (pep.net.connect)", [req.host]) if {
	some entry in allow_candidates
	entry.tunnel
}

field_misses contains refusal_reason(field) if {
	some entry in allow_candidates
	not entry.tunnel
	some field in refusals(entry)
}

# The fields of an HTTP entry that refuse this request (for the reasons; the allow checks the same).
refusals(entry) := {field |
	some field, allowed in {
		"scheme": scheme_ok(entry),
		"port": port_ok(entry),
		"method": method_ok(entry),
		"path": path_ok(entry),
		"upgrade": upgrade_ok(entry),
	}
	allowed == false
}

# Each is true or false (never undefined), so a check reads the same in a body and as a value.
scheme_ok(entry) := req.scheme in object.get(entry, "schemes", ["http", "https"])

port_ok(entry) := req.port in object.get(entry, "ports", [object.get({"https": 443, "http": 80}, req.scheme, 0)])

method_ok(entry) := req.method in object.get(entry, "methods", any_method)

# An upgrade (WebSocket) carries bytes both ways past what methods and paths describe: only an entry that
# lists the protocol in `upgrade` allows it.
upgrade_ok(entry) := object.get(req, "upgrade", null) in array.concat([null], object.get(entry, "upgrade", []))

refusal_reason("scheme") := sprintf("scheme %s not allowed for %s", [req.scheme, req.host])

refusal_reason("port") := sprintf("port %d not allowed for %s", [req.port, req.host])

refusal_reason("method") := sprintf("method %s not allowed for %s", [req.method, req.host])

refusal_reason("path") := sprintf("path %s not allowed for %s", [req.path, req.host])

refusal_reason("upgrade") := sprintf(
	"upgrade to %s not allowed for %s (an allow entry lists it in upgrade)",
	[req.upgrade, req.host],
)

# An entry without `methods` allows any method but these: TRACE (and IIS's TRACK) make an upstream send the
# request back, headers and all, and CONNECT hands the connection over. An entry that names them allows them.
any_method := [req.method] if {
	not upper(req.method) in {"TRACE", "TRACK", "CONNECT"}
} else := []

# Without `paths`, any path; with them, a path under one of the prefixes.
path_ok(entry) := true if {
	not entry.paths
} else := count([prefix | some prefix in entry.paths; path_has_prefix(prefix)]) > 0

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

is_ip_pattern(p) if contains(p, ":")

# Digits, dots and slashes only: an IPv4 address or CIDR. Trimming that cutset leaves nothing. (It was
# `regex.match`, which cost a third of every decision: see docs/benchmarks.md.)
is_ip_pattern(p) if {
	p != ""
	trim(p, "0123456789./") == ""
}

# The index: each list's entries grouped by the key a request's host looks up.

index_of(allow, deny) := {"allow": list_index(allow), "deny": list_index(deny)}

list_index(entries) := {
	"hosts": grouped([[key, entry] | some entry in entries; key := name_key(entry.host)]),
	"networks": grouped(networks),
	"lengths": {family: sort({length |
		some pair in networks
		startswith(pair[0], family)
		length := count(pair[0]) - 2
	}) |
		some family in ["4:", "6:"]
	},
} if {
	networks := [[key, entry] | some entry in entries; key := network_key(entry.host)]
}

# [key, entry] pairs as {key: [entry, ...]}, entries in list order.
grouped(pairs) := {key: [pair[1] | some pair in pairs; pair[0] == key] | some [key, _] in pairs}

# The name a pattern is about: `*.example.com` and `**.example.com` are filed under example.com.
name_key(pattern) := trim_prefix(trim_prefix(p, "**."), "*.") if {
	p := lower(pattern)
	not is_ip_pattern(p)
}

# The network's bits: "4:" or "6:", then as many bits as the prefix is long.
network_key(pattern) := substring(ip_bits(address), 0, length + 2) if {
	p := lower(pattern)
	is_ip_pattern(p)
	[address, length] := address_and_length(p)
}

address_and_length(p) := [parts[0], to_number(parts[1])] if {
	contains(p, "/")
	parts := split(p, "/")
}

address_and_length(p) := [p, 128] if {
	not contains(p, "/")
	contains(p, ":")
}

address_and_length(p) := [p, 32] if {
	not contains(p, "/")
	not contains(p, ":")
}

# An IP literal's bits, "4:" or "6:" first. IPv6 "::" stands for as many zero groups as are missing; a
# dotted IPv4 tail (::ffff:10.1.2.3) is its last 32 bits.
ip_bits(ip) := concat("", ["4:", ipv4_bits(ip)]) if not contains(ip, ":")

ip_bits(ip) := concat("", ["6:", ipv6_bits(lower(ip))]) if contains(ip, ":")

# The address as one number, written in base 2 and padded to 32 digits.
ipv4_bits(ip) := concat("", [substring("00000000000000000000000000000000", 0, 32 - count(digits)), digits]) if {
	o := split(ip, ".")
	count(o) == 4
	n := ((to_number(o[0]) * 256 + to_number(o[1])) * 256 + to_number(o[2])) * 256 + to_number(o[3])
	digits := format_int(n, 2)
}

ipv6_bits(ip) := groups_bits(ip) if not contains(ip, "::")

ipv6_bits(ip) := concat("", [left, zero_bits((128 - count(left)) - count(right)), right]) if {
	halves := split(ip, "::")
	left := groups_bits(halves[0])
	right := groups_bits(halves[1])
}

groups_bits(text) := "" if text == ""

groups_bits(text) := concat("", [group_bits(group) | some group in split(text, ":")]) if text != ""

group_bits(group) := ipv4_bits(group) if contains(group, ".")

group_bits(group) := concat("", [hex_bits(substring(padded, i, 1)) | some i in [0, 1, 2, 3]]) if {
	not contains(group, ".")
	padded := concat("", [substring("0000", 0, 4 - count(group)), group])
}

hex_bits(digit) := {
	"0": "0000", "1": "0001", "2": "0010", "3": "0011", "4": "0100", "5": "0101", "6": "0110", "7": "0111",
	"8": "1000", "9": "1001", "a": "1010", "b": "1011", "c": "1100", "d": "1101", "e": "1110", "f": "1111",
}[digit]

zero_bits(n) := "" if n == 0

zero_bits(n) := concat("", ["0" | some _ in numbers.range(1, n)]) if n > 0
