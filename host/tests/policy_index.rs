//! The shipped policy finds entries through `data.pexi.index` instead of walking the lists. This holds it to
//! the policy it replaced (`tests/policy/linear.rego`, which walks every entry) over generated lists and
//! requests: the same decision, allow and reasons alike, on the bytecode VM the PEP serves with, and on
//! the interpreter both with the index the loader builds and without one (the Rego `index_of` fallback).
//! It also checks that the loader's index (Rust) and `index_of` (Rego) are the same document. Each round
//! loads a bundle with its generated lists, so the shipped tests (which set their own lists with `with`)
//! also pass beside an index built from other lists.

use pexi_host::policy::entries::Entry;
use pexi_host::policy::{Bundle, PolicyEngine, PolicyRoot};
use serde_json::{json, Value};

const LINEAR: &str = include_str!("policy/linear.rego");
const SHIPPED: &str = include_str!("../../policies/pexi/http.rego");
const QUERY: &str = "data.pexi.http.decision";
/// A phrase of each kind of reason the shipped policy gives.
const REASONS: &[&str] = &[
    "allowed by allowlist entry",
    "denied by denylist entry",
    "is not in the allowlist",
    "is not a tunnel destination",
    "is a tunnel-only destination",
    "scheme",
    "port",
    "method",
    "path",
    "upgrade to",
];

/// splitmix64: a fixed seed gives the same corpus on every run, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const LABELS: &[&str] = &[
    "api", "www", "a", "b", "example", "test", "corp", "x-1", "cdn", "v2",
];
const TLDS: &[&str] = &["com", "test", "example"];

fn name(rng: &mut Rng, most: usize) -> String {
    let labels = 1 + rng.below(most);
    let mut parts: Vec<&str> = (0..labels).map(|_| *rng.pick(LABELS)).collect();
    parts.push(*rng.pick(TLDS));
    parts.join(".")
}

fn ipv4(rng: &mut Rng) -> [u8; 4] {
    // A small space, so entries and requests meet often.
    [
        *rng.pick(&[10u8, 11, 127, 192]),
        *rng.pick(&[0u8, 1, 168]),
        rng.below(4) as u8,
        rng.below(8) as u8,
    ]
}

fn ipv6(rng: &mut Rng) -> std::net::Ipv6Addr {
    let segments = [
        *rng.pick(&[0x2001u16, 0xfd00, 0, 0xfe80]),
        *rng.pick(&[0x0db8u16, 0, 1]),
        0,
        rng.below(3) as u16,
        0,
        0,
        *rng.pick(&[0u16, 0xffff]),
        rng.below(5) as u16,
    ];
    std::net::Ipv6Addr::from(segments)
}

fn host_pattern(rng: &mut Rng) -> String {
    match rng.below(9) {
        0..=2 => name(rng, 2),
        3 => format!("*.{}", name(rng, 1)),
        4 => format!("**.{}", name(rng, 1)),
        5 => std::net::Ipv4Addr::from(ipv4(rng)).to_string(),
        6 => {
            let ip = std::net::Ipv4Addr::from(ipv4(rng));
            let length = *rng.pick(&[0u8, 8, 12, 16, 23, 24, 30, 32]);
            ipnet::Ipv4Net::new(ip, length)
                .expect("prefix")
                .trunc()
                .to_string()
        }
        7 => ipv6(rng).to_string(),
        _ => {
            let length = *rng.pick(&[0u8, 16, 32, 64, 96, 100, 127, 128]);
            ipnet::Ipv6Net::new(ipv6(rng), length)
                .expect("prefix")
                .trunc()
                .to_string()
        }
    }
}

fn entry(rng: &mut Rng, deny: bool) -> Entry {
    let mut value = json!({"host": host_pattern(rng)});
    if !deny && rng.chance(15) {
        value["tunnel"] = json!(true);
        if rng.chance(50) {
            value["ports"] = json!([443, 8883]);
        }
        return serde_json::from_value(value).expect("valid entry");
    }
    if rng.chance(30) {
        value["ports"] = json!([*rng.pick(&[80, 443, 8080])]);
    }
    if rng.chance(30) {
        value["methods"] = json!([*rng.pick(&["GET", "POST", "TRACE"])]);
    }
    if rng.chance(25) {
        value["paths"] = json!([*rng.pick(&["/v1", "/v1/", "/static/"])]);
    }
    if rng.chance(20) {
        value["schemes"] = json!(["https"]);
    }
    if !deny && rng.chance(10) {
        value["upgrade"] = json!(["websocket"]);
    }
    serde_json::from_value(value).expect("valid entry")
}

/// A request host near `entry` (or, without one, something unrelated): its host, a name above or below
/// it, an address in or beside its network.
fn request_host(rng: &mut Rng, entry: Option<&Entry>) -> (String, &'static str) {
    let classify = |host: String| {
        let kind = match host.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(_)) => "ipv4",
            Ok(std::net::IpAddr::V6(_)) => "ipv6",
            Err(_) => "dns",
        };
        (host, kind)
    };
    let Some(entry) = entry else {
        return match rng.below(3) {
            0 => classify(name(rng, 3)),
            1 => classify(std::net::Ipv4Addr::from(ipv4(rng)).to_string()),
            _ => classify(ipv6(rng).to_string()),
        };
    };
    let bare = entry
        .host
        .as_str()
        .trim_start_matches("**.")
        .trim_start_matches("*.")
        .to_string();
    if let Ok(net) = bare.parse::<ipnet::IpNet>() {
        // An address of the network (its first, or one a few past it), its last, or the one after it.
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let step = rng.below(3) as u128;
        let shift = |ip: IpAddr, by: u128| match ip {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4).wrapping_add(by as u32))),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6).wrapping_add(by))),
        };
        let host = match rng.below(3) {
            0 => shift(net.network(), step),
            1 => net.broadcast(),
            _ => shift(net.broadcast(), 1),
        };
        return classify(host.to_string());
    }
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return classify(bare);
    }
    match rng.below(4) {
        0 => classify(bare),
        1 => classify(format!("{}.{bare}", rng.pick(LABELS))),
        2 => classify(format!("{}.{}.{bare}", rng.pick(LABELS), rng.pick(LABELS))),
        _ => classify(
            bare.split_once('.')
                .map_or(bare.clone(), |(_, parent)| parent.to_string()),
        ),
    }
}

/// One of `values` (strings or numbers) of an entry's field, if it has the field.
fn one_of(rng: &mut Rng, entry: &Value, field: &str) -> Option<Value> {
    let values = entry.get(field)?.as_array()?;
    (!values.is_empty()).then(|| values[rng.below(values.len())].clone())
}

/// Most requests are made to fit one entry, each field but now and then one, so every outcome and reason
/// occurs; the rest are random.
fn request(rng: &mut Rng, entries: &[Entry]) -> Value {
    let fit = (!entries.is_empty() && rng.chance(75)).then(|| rng.pick(entries).clone());
    let (host, kind) = request_host(rng, fit.as_ref());
    let fit = fit.map(|e| serde_json::to_value(e).expect("entry"));
    let fits = |rng: &mut Rng| fit.is_some() && rng.chance(85);
    let tunnel = match &fit {
        Some(entry) => (entry["tunnel"] == json!(true)) != rng.chance(10),
        None => rng.chance(15),
    };
    let scheme = if tunnel {
        json!("tcp")
    } else if fits(rng) {
        fit.as_ref()
            .and_then(|e| one_of(rng, e, "schemes"))
            .unwrap_or_else(|| json!(*rng.pick(&["https", "http"])))
    } else {
        json!(*rng.pick(&["https", "http"]))
    };
    let method = if tunnel {
        json!("CONNECT")
    } else if fits(rng) {
        fit.as_ref()
            .and_then(|e| one_of(rng, e, "methods"))
            .unwrap_or_else(|| json!(*rng.pick(&["GET", "POST"])))
    } else {
        json!(*rng.pick(&["GET", "POST", "DELETE", "TRACE"]))
    };
    let default_port = if scheme == "http" { 80 } else { 443 };
    let port = if fits(rng) {
        fit.as_ref()
            .and_then(|e| one_of(rng, e, "ports"))
            .unwrap_or_else(|| json!(default_port))
    } else {
        json!(*rng.pick(&[443u16, 80, 8080, 8883]))
    };
    let path = if tunnel {
        json!("")
    } else if fits(rng) {
        let prefix = fit
            .as_ref()
            .and_then(|e| one_of(rng, e, "paths"))
            .and_then(|p| p.as_str().map(str::to_string))
            .unwrap_or_else(|| "/".into());
        json!(format!("{prefix}{}", rng.pick(&["", "/x", "x"])))
    } else {
        json!(*rng.pick(&["/", "/v1", "/v1/models", "/v10", "/static/a.css", "/static"]))
    };
    let upgrade = (!tunnel && method == "GET" && rng.chance(10)).then_some("websocket");
    let url = format!(
        "{}://{host}{}",
        scheme.as_str().unwrap_or_default(),
        path.as_str().unwrap_or_default()
    );
    json!({
        "method": if tunnel { "pep.net.connect" } else { "pep.http.request" },
        "request": {"method": method, "scheme": scheme, "host": host, "host_kind": kind, "port": port,
            "path": path, "query": null, "headers": {}, "body_length": null,
            "url": url, "secrets": [], "upgrade": upgrade},
        "hop": 0,
        "previous_url": null,
        "session": {"id": "0000000000000000", "guest": {"name": "differential", "version": "0"}},
    })
}

fn engine(policy: &str, data: &Value) -> regorus::Engine {
    let mut engine = regorus::Engine::new();
    engine
        .add_policy("http.rego".into(), policy.into())
        .expect("policy parses");
    engine
        .add_data(regorus::Value::from_json_str(&data.to_string()).expect("data"))
        .expect("data added");
    engine
}

fn evaluate(engine: &regorus::Engine, input: &Value) -> Value {
    let mut engine = engine.clone();
    engine.set_input(regorus::Value::from(input.clone()));
    let value = engine.eval_rule(QUERY.into()).expect("evaluates");
    serde_json::from_str(&value.to_json_str().expect("json")).expect("json")
}

#[test]
fn the_indexed_policy_decides_as_the_linear_one() {
    let mut rng = Rng(0x5eed_0f1e_0e5e);
    let mut decisions = 0;
    let mut allowed = 0;
    let mut seen = std::collections::BTreeSet::new();
    for round in 0..30 {
        let allow: Vec<Entry> = (0..rng.below(25)).map(|_| entry(&mut rng, false)).collect();
        let deny: Vec<Entry> = (0..rng.below(6)).map(|_| entry(&mut rng, true)).collect();
        let bundle = Bundle::load(&PolicyRoot::Embedded, &allow, &deny).expect("bundle");
        let served = PolicyEngine::load(&bundle, QUERY, 10_000).expect("policy loads");
        let lists = json!({"pexi": {"allow": bundle.data["pexi"]["allow"], "deny": bundle.data["pexi"]["deny"]}});
        let linear = engine(LINEAR, &lists);
        // The index as the PEP serves it names the lists it was built from (there, the same arrays).
        let mut served_data = bundle.data.clone();
        served_data["pexi"]["index"]["lists"] = lists["pexi"].clone();
        let indexed = engine(SHIPPED, &served_data);
        let fallback = engine(SHIPPED, &lists);

        // The loader's index and the policy's own are one document.
        let mut rego_index = fallback.clone();
        let built = rego_index
            .eval_rule("data.pexi.http.index".into())
            .expect("index_of evaluates");
        let built: Value = serde_json::from_str(&built.to_json_str().expect("json")).expect("json");
        assert_eq!(
            built, bundle.data["pexi"]["index"],
            "round {round}: index_of and the loader's index differ for {lists}"
        );

        let mut everything = allow.clone();
        everything.extend(deny.iter().cloned());
        for _ in 0..70 {
            let input = request(&mut rng, &everything);
            let reference = evaluate(&linear, &input);
            let context = || format!("round {round}, lists {lists}, input {input}");
            assert_eq!(
                evaluate(&indexed, &input),
                reference,
                "interpreter, index: {}",
                context()
            );
            assert_eq!(
                evaluate(&fallback, &input),
                reference,
                "interpreter, index_of: {}",
                context()
            );
            let decision = served.decide(&input);
            assert_eq!(
                json!(decision.allow),
                reference["allow"],
                "VM: {}",
                context()
            );
            assert_eq!(
                json!(decision.reasons),
                reference["reasons"],
                "VM: {}",
                context()
            );
            decisions += 1;
            allowed += usize::from(decision.allow);
            for reason in &decision.reasons {
                if let Some(kind) = REASONS.iter().find(|kind| reason.contains(*kind)) {
                    seen.insert(*kind);
                }
            }
        }
    }
    // The corpus must reach every outcome and every kind of reason, or agreeing would prove little.
    let missing: Vec<_> = REASONS
        .iter()
        .filter(|kind| !seen.contains(*kind))
        .collect();
    assert!(missing.is_empty(), "no decision said {missing:?}");
    eprintln!("{decisions} decisions agreed, {allowed} of them allowed");
    assert!(allowed * 10 > decisions, "{allowed} of {decisions} allowed");
    assert!(
        allowed * 10 < decisions * 9,
        "{allowed} of {decisions} allowed"
    );
}
