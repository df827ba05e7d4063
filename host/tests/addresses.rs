//! The address guard end to end. The PEP runs in a fresh network namespace that has only loopback
//! (`unshare -n`), so even if the guard were wrong no packet could leave: 10.x, 169.254.x and the rest are
//! simply unreachable there. Policy allows every host below; the guard alone must refuse them.

mod support;

use support::{PepOptions, TestPep};

const NAMES: &[(&str, &[&str])] = &[
    ("loop.test", &["127.0.0.1"]),
    ("meta.test", &["169.254.169.254"]),
    ("private.test", &["10.0.0.1"]),
    ("cgnat.test", &["100.100.100.200"]),
    ("v6loop.test", &["::1"]),
    ("mapped.test", &["::ffff:10.1.2.3"]),
    ("nat64.test", &["64:ff9b::a9fe:a9fe"]),
    ("sixtofour.test", &["2002:7f00:1::"]),
    ("ula.test", &["fd00:ec2::254"]),
    ("linklocal6.test", &["fe80::1"]),
    ("mixed.test", &["10.0.0.1", "192.168.1.1", "172.16.0.1"]),
    ("multicast.test", &["224.0.0.1"]),
    // IPv4-compatible (deprecated ::/96): refused as a class, though 8.8.8.8 itself is public.
    ("compat.test", &["::8.8.8.8"]),
];

const LITERALS: &[&str] = &[
    "http://169.254.169.254/latest/meta-data/",
    "http://0x7f.1/",
    "http://2130706433/",
    "http://0177.0.0.1/",
    "http://127.1/",
    "http://0/",
    "http://[::1]/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://[::ffff:127.0.0.1]:8080/",
    "http://[fd00:ec2::254]/",
    "http://[fe80::1]/",
    "http://100.100.100.200/",
    "http://192.168.0.1./",
    "http://[::8.8.8.8]/",
];

fn options(allowed_cidrs: &[&str]) -> PepOptions {
    let mut allowed: Vec<String> = NAMES.iter().map(|(n, _)| n.to_string()).collect();
    allowed.extend(
        [
            "169.254.169.254",
            "127.0.0.1",
            "0.0.0.0",
            "::1",
            "fd00:ec2::254",
            "fe80::1",
            "100.100.100.200",
            "192.168.0.1",
            "::8.8.8.8",
        ]
        .map(String::from),
    );
    PepOptions {
        allowed_domains: allowed,
        allowed_cidrs: allowed_cidrs.iter().map(|c| c.to_string()).collect(),
        dns_overrides: NAMES
            .iter()
            .map(|(n, a)| (n.to_string(), a.iter().map(|s| s.to_string()).collect()))
            .collect(),
        isolated_network: true,
        ..PepOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_address_classes_are_blocked_after_an_allow() {
    let pep = TestPep::start(options(&[]));
    let mut guest = pep.guest().await;
    let urls: Vec<String> = NAMES
        .iter()
        .map(|(name, _)| format!("http://{name}/"))
        .chain(LITERALS.iter().map(|u| u.to_string()))
        .collect();
    for url in &urls {
        let reply = guest.get(url).await;
        let error = reply
            .error
            .unwrap_or_else(|| panic!("{url} was not refused"));
        assert_eq!(error.code.as_str(), "blocked_address", "{url}: {error:?}");
        assert!(
            !error.details.reasons.is_empty(),
            "{url}: the refused classes are named"
        );
        let decision_id = error.details.decision_id.expect("decision id");
        let records = pep.wait_records(&decision_id, &["decision", "resolve"]);
        assert_eq!(
            records[0]["decision"]["allow"], true,
            "{url}: policy allowed, the guard refused"
        );
        let resolve = records
            .iter()
            .find(|r| r["kind"] == "resolve")
            .expect("resolution logged");
        assert!(
            resolve["allowed"].as_array().expect("array").is_empty(),
            "{url}"
        );
    }
    assert!(urls.len() >= 25);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configured_cidr_lets_exactly_its_range_through() {
    // With 127.0.0.0/8 allowed, loopback names pass the guard and fail only at connect (nothing listens in
    // the namespace), while everything else is still blocked.
    let pep = TestPep::start(options(&["127.0.0.0/8"]));
    let mut guest = pep.guest().await;
    for url in [
        "http://loop.test/",
        "http://0x7f.1/",
        "http://[::ffff:127.0.0.1]:8080/",
        "http://sixtofour.test/",
    ] {
        let reply = guest.get(url).await;
        assert_eq!(
            reply.error_code(),
            "upstream_connect",
            "{url}: {:?}",
            reply.error
        );
    }
    for url in [
        "http://v6loop.test/",
        "http://meta.test/",
        "http://mixed.test/",
        "http://[::1]/",
    ] {
        let reply = guest.get(url).await;
        assert_eq!(
            reply.error_code(),
            "blocked_address",
            "{url}: {:?}",
            reply.error
        );
    }
}
