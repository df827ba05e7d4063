# The default egress policy of the pexi PEP: deny by default, allow only hosts on the allowlist.
#
# The PEP evaluates `data.pexi.egress.decision` once per hop of every request (pep.http.request and
# pep.policy.check alike) and acts only on exactly one defined object {"allow": bool, "reasons": [string]}.
# Anything else (undefined, an error, a malformed object) is a deny. The policy issue grows this into the
# full model; see docs/policy.md once it lands.
#
# input.request: method, scheme, host (canonical: lowercase, punycode, no trailing dot, IPv4 dotted quad),
#                host_kind ("dns" | "ipv4" | "ipv6"), port, path, query, headers ({name: [values]}, secrets
#                redacted), body_length (null when unknown)
# input.hop, input.previous_url: 0 and null for the first hop; the redirect count and the URL that redirected
# input.method: the protocol method ("pep.http.request" | "pep.policy.check")
# input.session: id, guest {name, version}
# data.allowed_domains: from config.toml [pep.policy.data] or PEP_ALLOWED_DOMAINS; "*.example.com" also
#                       allows every subdomain of example.com (not example.com itself)
package pexi.egress

import rego.v1

default allow := false

allow if host_allowlisted

host_allowlisted if {
	some domain in data.allowed_domains
	input.request.host == lower(domain)
}

host_allowlisted if {
	some domain in data.allowed_domains
	startswith(domain, "*.")
	endswith(input.request.host, lower(substring(domain, 1, -1)))
}

reasons contains sprintf("host %s is on the allowlist", [input.request.host]) if allow

reasons contains sprintf("host %s is not on the allowlist (deny by default)", [input.request.host]) if not allow

decision := {"allow": allow, "reasons": sort([r | some r in reasons])}
