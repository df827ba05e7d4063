# Tests of pexi.http, in OPA's layout: `pexi policy test policies/` (or `opa test policies/`) runs every
# rule named test_* below.
package pexi.http_test

import rego.v1

import data.pexi.http

request(method, url_scheme, host, host_kind, port, path) := {"request": {
	"method": method,
	"scheme": url_scheme,
	"host": host,
	"host_kind": host_kind,
	"port": port,
	"path": path,
	"query": null,
	"headers": {},
	"body_length": null,
}}

get(host) := request("GET", "https", host, "dns", 443, "/")

# Tests gate every reload, so they run beside whatever data and extensions are deployed: each one sets the
# lists and the extensions (none) it relies on.
decide(inp, allow_list, deny_list) := d if {
	d := http.decision with input as inp
		with data.pexi.allow as allow_list
		with data.pexi.deny as deny_list
		with data.pexi.rules as {}
		with data.pexi.approvals as {"enabled": false}
}

# The same with [pep.approvals] enabled: the policy may ask a person.
decide_asking(inp, allow_list, deny_list, rules) := d if {
	d := http.decision with input as inp
		with data.pexi.allow as allow_list
		with data.pexi.deny as deny_list
		with data.pexi.rules as rules
		with data.pexi.approvals as {"enabled": true}
}

allowed(inp, allow_list) if decide(inp, allow_list, []).allow == true

denied(inp, allow_list) if decide(inp, allow_list, []).allow == false

# Deny by default.

test_nothing_is_allowed_without_an_allowlist if {
	d := decide(get("example.com"), [], [])
	d.allow == false
	d.reasons == ["host example.com is not in the allowlist"]
}

test_the_decision_has_exactly_two_keys if {
	d := decide(get("example.com"), [{"host": "example.com"}], [])
	object.keys(d) == {"allow", "reasons"}
	d.reasons == ["allowed by allowlist entry example.com"]
}

test_the_decision_is_defined_with_empty_lists if {
	d := decide(get("example.com"), [], [])
	d.allow == false
}

# Host patterns.

test_exact_names_match_only_themselves if {
	allowed(get("example.com"), [{"host": "example.com"}])
	denied(get("www.example.com"), [{"host": "example.com"}])
	denied(get("example.com.evil.test"), [{"host": "example.com"}])
	denied(get("notexample.com"), [{"host": "example.com"}])
}

test_single_star_is_subdomains_only if {
	allowed(get("api.example.com"), [{"host": "*.example.com"}])
	allowed(get("a.b.example.com"), [{"host": "*.example.com"}])
	denied(get("example.com"), [{"host": "*.example.com"}])
	denied(get("badexample.com"), [{"host": "*.example.com"}])
}

test_double_star_is_apex_and_subdomains if {
	allowed(get("example.com"), [{"host": "**.example.com"}])
	allowed(get("api.example.com"), [{"host": "**.example.com"}])
	denied(get("badexample.com"), [{"host": "**.example.com"}])
}

test_patterns_are_case_insensitive if {
	allowed(get("api.example.com"), [{"host": "API.Example.COM"}])
}

test_name_patterns_never_match_ip_literals if {
	denied(request("GET", "https", "10.1.2.3", "ipv4", 443, "/"), [{"host": "*.example.com"}])
	denied(request("GET", "https", "127.0.0.1", "ipv4", 443, "/"), [{"host": "**.0.0.1"}])
}

test_ip_literals_and_cidrs if {
	allowed(request("GET", "https", "10.1.2.3", "ipv4", 443, "/"), [{"host": "10.1.2.3"}])
	denied(request("GET", "https", "10.1.2.4", "ipv4", 443, "/"), [{"host": "10.1.2.3"}])
	allowed(request("GET", "https", "10.9.9.9", "ipv4", 443, "/"), [{"host": "10.0.0.0/8"}])
	denied(request("GET", "https", "11.0.0.1", "ipv4", 443, "/"), [{"host": "10.0.0.0/8"}])
	allowed(request("GET", "https", "2001:db8::5", "ipv6", 443, "/"), [{"host": "2001:db8::/32"}])
	allowed(request("GET", "https", "::1", "ipv6", 443, "/"), [{"host": "::1"}])
	denied(request("GET", "https", "::2", "ipv6", 443, "/"), [{"host": "::1"}])
}

test_ip_patterns_never_match_names if {
	denied(get("10.1.2.3.example.com"), [{"host": "10.1.2.3"}])
}

# Ports, methods, paths, schemes.

test_ports_default_to_the_scheme_port if {
	allowed(get("example.com"), [{"host": "example.com"}])
	allowed(request("GET", "http", "example.com", "dns", 80, "/"), [{"host": "example.com"}])
	d := decide(request("GET", "https", "example.com", "dns", 8443, "/"), [{"host": "example.com"}], [])
	d.allow == false
	d.reasons == ["port 8443 not allowed for example.com"]
	denied(request("GET", "http", "example.com", "dns", 443, "/"), [{"host": "example.com"}])
}

test_explicit_ports if {
	allowed(request("GET", "https", "example.com", "dns", 8443, "/"), [{"host": "example.com", "ports": [8443]}])
	denied(get("example.com"), [{"host": "example.com", "ports": [8443]}])
}

test_echoing_methods_need_an_entry_that_names_them if {
	entry := {"host": "api.example.com"}
	every method in ["TRACE", "TRACK", "CONNECT", "trace"] {
		d := decide(request(method, "https", "api.example.com", "dns", 443, "/"), [entry], [])
		d.allow == false
		d.reasons == [sprintf("method %s not allowed for api.example.com", [method])]
	}
}

test_an_entry_that_names_trace_allows_it if {
	allowed(request("TRACE", "https", "api.example.com", "dns", 443, "/"), [{"host": "api.example.com", "methods": ["TRACE"]}])
	allowed(request("DELETE", "https", "api.example.com", "dns", 443, "/"), [{"host": "api.example.com"}])
}

test_an_upgrade_needs_an_entry_that_lists_it if {
	ws := object.union(request("GET", "https", "api.example.com", "dns", 443, "/socket"), {"request": {"upgrade": "websocket"}})
	d := decide(ws, [{"host": "api.example.com", "methods": ["GET"]}], [])
	d.allow == false
	d.reasons == ["upgrade to websocket not allowed for api.example.com (an allow entry lists it in upgrade)"]
	allowed(ws, [{"host": "api.example.com", "methods": ["GET"], "upgrade": ["websocket"]}])
	allowed(request("GET", "https", "api.example.com", "dns", 443, "/"), [{"host": "api.example.com", "upgrade": ["websocket"]}])
}

test_methods if {
	entry := {"host": "api.example.com", "methods": ["GET", "POST"]}
	allowed(request("POST", "https", "api.example.com", "dns", 443, "/"), [entry])
	d := decide(request("DELETE", "https", "api.example.com", "dns", 443, "/"), [entry], [])
	d.allow == false
	d.reasons == ["method DELETE not allowed for api.example.com"]
}

test_path_prefixes if {
	entry := {"host": "api.example.com", "paths": ["/v1", "/static/"]}
	allowed(request("GET", "https", "api.example.com", "dns", 443, "/v1"), [entry])
	allowed(request("GET", "https", "api.example.com", "dns", 443, "/v1/models"), [entry])
	allowed(request("GET", "https", "api.example.com", "dns", 443, "/static/a.css"), [entry])
	d := decide(request("GET", "https", "api.example.com", "dns", 443, "/v10"), [entry], [])
	d.reasons == ["path /v10 not allowed for api.example.com"]
	denied(request("GET", "https", "api.example.com", "dns", 443, "/static"), [entry])
	denied(request("GET", "https", "api.example.com", "dns", 443, "/admin"), [entry])
}

test_schemes if {
	entry := {"host": "example.com", "schemes": ["https"]}
	d := decide(request("GET", "http", "example.com", "dns", 80, "/"), [entry], [])
	d.allow == false
	d.reasons == ["scheme http not allowed for example.com"]
}

test_one_matching_entry_is_enough if {
	entries := [{"host": "example.com", "methods": ["GET"]}, {"host": "example.com", "methods": ["POST"]}]
	allowed(request("POST", "https", "example.com", "dns", 443, "/"), entries)
}

test_every_refusal_is_named_when_several_fields_miss if {
	entry := {"host": "api.example.com", "methods": ["GET"], "paths": ["/v1"]}
	d := decide(request("PUT", "https", "api.example.com", "dns", 8443, "/v2"), [entry], [])
	d.reasons == [
		"method PUT not allowed for api.example.com",
		"path /v2 not allowed for api.example.com",
		"port 8443 not allowed for api.example.com",
	]
}

# The denylist wins.

test_deny_wins_over_allow if {
	d := decide(get("evil.example.com"), [{"host": "**.example.com"}], [{"host": "evil.example.com"}])
	d.allow == false
	d.reasons == ["denied by denylist entry evil.example.com"]
	allowed(get("good.example.com"), [{"host": "**.example.com"}])
}

test_deny_entries_default_to_any_port_and_scheme if {
	deny_list := [{"host": "api.example.com"}]
	d := decide(request("GET", "http", "api.example.com", "dns", 8080, "/"), [{"host": "api.example.com", "ports": [8080]}], deny_list)
	d.allow == false
}

test_deny_can_be_narrow if {
	allow_list := [{"host": "api.example.com", "methods": ["GET", "DELETE"]}]
	deny_list := [{"host": "api.example.com", "methods": ["DELETE"], "paths": ["/v1/admin"]}]
	decide(request("DELETE", "https", "api.example.com", "dns", 443, "/v1/admin/x"), allow_list, deny_list).allow == false
	decide(request("DELETE", "https", "api.example.com", "dns", 443, "/v1/other"), allow_list, deny_list).allow == true
}

# Redirect hops are decided like first hops: the hop number does not widen anything.

test_a_redirect_hop_is_decided_on_its_own_host if {
	inp := object.union(get("evil.test"), {"hop": 1, "previous_url": "https://example.com/"})
	d := decide(inp, [{"host": "example.com"}], [])
	d.allow == false
	d.reasons == ["host evil.test is not in the allowlist"]
}

# Undefined is a deny: with no request at all nothing is allowed.

test_missing_request_fields_never_allow if {
	not allows_without_a_request
}

allows_without_a_request if {
	http.decision.allow == true with input as {}
		with data.pexi.allow as [{"host": "example.com"}]
		with data.pexi.deny as []
		with data.pexi.rules as {}
		with data.pexi.approvals as {"enabled": false}
}

# Extensions under pexi.rules add denials.

test_an_extension_denial_wins_over_the_allowlist if {
	d := http.decision with input as request("DELETE", "https", "api.example.com", "dns", 443, "/v1/x")
		with data.pexi.allow as [{"host": "api.example.com"}]
		with data.pexi.deny as []
		with data.pexi.rules as {"no_deletes": {"denials": {"DELETE is not allowed anywhere"}}}
		with data.pexi.approvals as {"enabled": false}
	d.allow == false
	d.reasons == ["DELETE is not allowed anywhere"]
}

# Tunnel-only destinations: pep.net.connect only, and only to them.

tunnel(host, port) := {"method": "pep.net.connect", "request": {
	"method": "CONNECT",
	"scheme": "tcp",
	"host": host,
	"host_kind": "dns",
	"port": port,
	"path": "",
	"query": null,
	"headers": {},
	"body_length": null,
}}

test_a_tunnel_entry_allows_a_tunnel_on_its_ports if {
	allowed(tunnel("pinned.example.com", 443), [{"host": "pinned.example.com", "tunnel": true}])
	allowed(tunnel("pinned.example.com", 8883), [{"host": "pinned.example.com", "tunnel": true, "ports": [8883]}])
	denied(tunnel("pinned.example.com", 8883), [{"host": "pinned.example.com", "tunnel": true}])
}

test_an_http_entry_allows_no_tunnel if {
	d := decide(tunnel("api.example.com", 443), [{"host": "api.example.com"}], [])
	d.allow == false
	d.reasons == ["api.example.com:443 is not a tunnel destination"]
}

test_a_tunnel_entry_allows_no_http_request if {
	d := decide(get("pinned.example.com"), [{"host": "pinned.example.com", "tunnel": true}], [])
	d.allow == false
	d.reasons == ["pinned.example.com is a tunnel-only destination (pep.net.connect)"]
}

test_a_tunnel_to_an_unlisted_host_is_not_in_the_allowlist if {
	d := decide(tunnel("evil.example", 443), [{"host": "pinned.example.com", "tunnel": true}], [])
	d.reasons == ["host evil.example is not in the allowlist"]
}

test_a_deny_entry_wins_over_a_tunnel_entry if {
	d := decide(tunnel("pinned.example.com", 443), [{"host": "**.example.com", "tunnel": true}], [{"host": "pinned.example.com"}])
	d.allow == false
}

# Approvals: with them enabled, a request to a host on no list is a deny that asks a person; everything
# else is decided as without them.

# Entries for some VMs only (`vms`): input.vm is set by the host, per listener or `pexi vm run --name`.

from_vm(inp, name) := object.union(inp, {"vm": {"name": name, "profile": ""}})

test_an_entry_for_one_vm_allows_that_vm_only if {
	entries := [{"host": "api.example.com", "vms": ["alice"]}]
	allowed(from_vm(get("api.example.com"), "alice"), entries)
	d := decide(from_vm(get("api.example.com"), "bob"), entries, [])
	d.allow == false
	d.reasons == ["host api.example.com is not in the allowlist"]
	denied(get("api.example.com"), entries)
	denied(from_vm(get("api.example.com"), ""), entries)
}

test_an_entry_for_several_vms_and_one_for_every_vm if {
	entries := [{"host": "a.example.com", "vms": ["alice", "carol"]}, {"host": "b.example.com"}]
	allowed(from_vm(get("a.example.com"), "carol"), entries)
	denied(from_vm(get("a.example.com"), "bob"), entries)
	allowed(from_vm(get("b.example.com"), "bob"), entries)
	allowed(get("b.example.com"), entries)
}

test_a_deny_entry_for_one_vm_denies_that_vm_only if {
	allow_list := [{"host": "**.example.com"}]
	deny_list := [{"host": "files.example.com", "vms": ["bob"]}]
	decide(from_vm(get("files.example.com"), "bob"), allow_list, deny_list).allow == false
	decide(from_vm(get("files.example.com"), "alice"), allow_list, deny_list).allow == true
}

test_an_ip_entry_for_one_vm if {
	entries := [{"host": "10.0.0.0/8", "vms": ["alice"]}]
	allowed(from_vm(request("GET", "https", "10.1.2.3", "ipv4", 443, "/"), "alice"), entries)
	denied(from_vm(request("GET", "https", "10.1.2.3", "ipv4", 443, "/"), "bob"), entries)
}

test_an_unlisted_host_is_asked_about_when_approvals_are_on if {
	d := decide_asking(get("new.example.com"), [{"host": "api.example.com"}], [], {})
	d == {"allow": false, "reasons": ["host new.example.com is not in the allowlist"], "ask": {"scope": "host"}}
}

test_nothing_is_asked_when_approvals_are_off if {
	d := decide(get("new.example.com"), [], [])
	object.keys(d) == {"allow", "reasons"}
}

test_a_listed_host_is_not_asked_about if {
	d := decide_asking(get("api.example.com"), [{"host": "api.example.com"}], [], {})
	object.keys(d) == {"allow", "reasons"}
	d.allow == true
}

test_a_listed_host_that_refuses_the_method_is_denied_without_asking if {
	d := decide_asking(
		request("DELETE", "https", "api.example.com", "dns", 443, "/"),
		[{"host": "api.example.com", "methods": ["GET"]}], [], {},
	)
	object.keys(d) == {"allow", "reasons"}
	d.reasons == ["method DELETE not allowed for api.example.com"]
}

test_a_denylisted_host_is_denied_without_asking if {
	d := decide_asking(get("bad.example.com"), [], [{"host": "**.example.com"}], {})
	object.keys(d) == {"allow", "reasons"}
	d.allow == false
}

test_an_extension_denial_is_not_asked_about if {
	d := decide_asking(get("new.example.com"), [], [], {"x": {"denials": {"no"}}})
	object.keys(d) == {"allow", "reasons"}
}

test_a_tunnel_is_not_asked_about if {
	d := decide_asking(tunnel("new.example.com", 443), [], [], {})
	object.keys(d) == {"allow", "reasons"}
	d.allow == false
}
