//! `data.pexi.index`: the allow and deny entries grouped by the key a request's host looks up (the name a
//! pattern is about, `*.example.com` under example.com; the prefix bits of an IP or CIDR), built once
//! when a bundle loads, so the shipped policy finds the entries that can match a host in as many lookups as
//! the name has labels (or as there are prefix lengths in use, for an IP) instead of walking every entry.
//!
//! The policy defines the same index in Rego (`index_of` in `policies/pexi/http.rego`) for when the data
//! carries none; the two must agree exactly, and a generated test holds them to it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde_json::{json, Value};

use super::entries::Entry;

/// `{"allow": .., "deny": ..}`, each `{"hosts": {key: [entry]}, "networks": {key: [entry]},
/// "lengths": {"4:": [..], "6:": [..]}}`; entries in list order under each key.
pub fn build(allow: &[Entry], deny: &[Entry]) -> Value {
    json!({"allow": list(allow), "deny": list(deny)})
}

fn list(entries: &[Entry]) -> Value {
    let mut hosts: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut networks: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut lengths: BTreeMap<&str, BTreeSet<u8>> =
        [("4:", BTreeSet::new()), ("6:", BTreeSet::new())]
            .into_iter()
            .collect();
    for entry in entries {
        // Serialising a validated entry (strings, numbers, booleans) cannot fail.
        let value = serde_json::to_value(entry).unwrap_or(Value::Null);
        match network_key(entry.host.as_str()) {
            Some((family, key)) => {
                if let Some(set) = lengths.get_mut(family) {
                    set.insert((key.len() - family.len()) as u8);
                }
                networks.entry(key).or_default().push(value);
            }
            None => {
                let pattern = entry.host.as_str().to_ascii_lowercase();
                let name = pattern
                    .strip_prefix("**.")
                    .or_else(|| pattern.strip_prefix("*."))
                    .unwrap_or(&pattern);
                hosts.entry(name.to_string()).or_default().push(value)
            }
        }
    }
    json!({"hosts": hosts, "networks": networks, "lengths": lengths})
}

/// An IP or CIDR pattern's key: its family (`4:` or `6:`) and the bits of its prefix.
fn network_key(pattern: &str) -> Option<(&'static str, String)> {
    let (address, length) = match pattern.parse::<ipnet::IpNet>() {
        Ok(net) => (net.addr(), net.prefix_len()),
        Err(_) => {
            let ip = pattern.parse::<IpAddr>().ok()?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let (family, octets) = match address {
        IpAddr::V4(v4) => ("4:", v4.octets().to_vec()),
        IpAddr::V6(v6) => ("6:", v6.octets().to_vec()),
    };
    let bits: String = octets.iter().map(|o| format!("{o:08b}")).collect();
    Some((family, format!("{family}{}", &bits[..usize::from(length)])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(hosts: &[&str]) -> Vec<Entry> {
        hosts
            .iter()
            .map(|h| Entry::host(h).expect("valid"))
            .collect()
    }

    #[test]
    fn names_are_keyed_by_pattern_and_ips_by_prefix_bits() {
        let index = build(
            &entries(&[
                "api.example.com",
                "*.example.com",
                "10.0.0.0/8",
                "::1",
                "api.example.com",
            ]),
            &[],
        );
        let allow = &index["allow"];
        assert_eq!(
            allow["hosts"]["api.example.com"].as_array().map(Vec::len),
            Some(2)
        );
        assert_eq!(allow["hosts"]["example.com"][0]["host"], "*.example.com");
        assert_eq!(allow["networks"]["4:00001010"][0]["host"], "10.0.0.0/8");
        let loopback = format!("6:{}1", "0".repeat(127));
        assert_eq!(allow["networks"][&loopback][0]["host"], "::1");
        assert_eq!(allow["lengths"], json!({"4:": [8], "6:": [128]}));
        assert_eq!(index["deny"]["hosts"], json!({}));
    }
}
