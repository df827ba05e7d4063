//! Transparent mode, for programs that ignore proxy settings (`ws`, Node 20's `fetch` and `https`, Go and
//! Rust binaries with their own HTTP stacks): the guest's resolver points at a DNS stub served here, which
//! answers every name with a synthetic address from a reserved loopback range and remembers the name; the
//! capture ports (80 and 443 by default) listen on the wildcard address, so a connection to a synthetic
//! address lands here, and the address gives the name back. The connection then takes the proxy's CONNECT
//! path ([`crate::proxy::Proxy::intercept`]): an opaque `pep.net.connect` tunnel where the policy marks the
//! destination tunnel-only, otherwise inspected HTTP (TLS terminated with the per-boot CA), so the PEP
//! decides every request and a refusal comes back as pexi's 403.
//!
//! The guest still has no interface but `lo`: the synthetic addresses are loopback addresses, and nothing
//! here opens a socket to anywhere but the PEP's transport.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// How long a client may cache an answer. Short: an address is reused once the range has been handed out
/// in full, and a client that cached it longer would then reach the new name.
const TTL_SECONDS: u32 = 30;

/// The reserved loopback range synthetic addresses come from, e.g. `127.77.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    base: u32,
    size: u32,
}

impl std::str::FromStr for Range {
    type Err = String;

    fn from_str(text: &str) -> Result<Range, String> {
        let (address, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text}: a range is ADDRESS/PREFIX, e.g. 127.77.0.0/16"))?;
        let address: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("{text}: {address} is not an IPv4 address"))?;
        let prefix: u32 = prefix
            .parse()
            .ok()
            .filter(|p| (9..=30).contains(p))
            .ok_or_else(|| format!("{text}: the prefix length must be 9 to 30"))?;
        let size = 1u32 << (32 - prefix);
        let base = u32::from(address);
        if base % size != 0 {
            return Err(format!(
                "{text}: host bits are set (the range starts at a multiple of its size)"
            ));
        }
        let range = Range { base, size };
        if !address.is_loopback() {
            return Err(format!(
                "{text}: synthetic addresses must be loopback (inside 127.0.0.0/8)"
            ));
        }
        for reserved in [Ipv4Addr::LOCALHOST, Ipv4Addr::new(127, 0, 0, 53)] {
            if range.contains(reserved) {
                return Err(format!(
                    "{text}: the range must not contain {reserved}, which local services use"
                ));
            }
        }
        Ok(range)
    }
}

impl Range {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip).wrapping_sub(self.base) < self.size
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            Ipv4Addr::from(self.base),
            32 - self.size.trailing_zeros()
        )
    }
}

/// The names handed out, both ways. Bounded by the range: once every address has been given, the oldest
/// is given again (to the new name), so a guest that asks for a million names uses a fixed amount of memory
/// and confuses only its own connections, each of which the PEP still decides by the name it stands for.
pub struct Names {
    range: Range,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    by_name: HashMap<String, u32>,
    by_offset: HashMap<u32, String>,
    /// The next offset to hand out: 1 .. size-2 (not the range's first and last address), in turn.
    next: u32,
}

impl Names {
    pub fn new(range: Range) -> Names {
        Names {
            range,
            table: Mutex::new(Table::default()),
        }
    }

    /// The synthetic address for `name` (already canonical: lower case, no trailing dot).
    pub fn address_for(&self, name: &str) -> Ipv4Addr {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(offset) = table.by_name.get(name) {
            return Ipv4Addr::from(self.range.base + offset);
        }
        let usable = self.range.size - 2;
        let offset = table.next % usable + 1;
        table.next = (table.next + 1) % usable;
        if let Some(old) = table.by_offset.insert(offset, name.to_string()) {
            table.by_name.remove(&old);
        }
        table.by_name.insert(name.to_string(), offset);
        Ipv4Addr::from(self.range.base + offset)
    }

    /// The name a synthetic address stands for, if it was handed out.
    pub fn name_of(&self, ip: Ipv4Addr) -> Option<String> {
        if !self.range.contains(ip) {
            return None;
        }
        let offset = u32::from(ip) - self.range.base;
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.by_offset.get(&offset).cloned()
    }
}

/// A name the stub hands an address for: what a URL's host can hold (letters, digits, `-`, `_`, dots;
/// labels of 1 to 63, at most 253 in all), lower-cased, without the trailing dot. Anything else is
/// NXDOMAIN, so a guest cannot smuggle URL syntax through a name.
fn canonical(name: &Name) -> Option<String> {
    let text = name.to_ascii().to_ascii_lowercase();
    let text = text.strip_suffix('.').unwrap_or(&text).to_string();
    let valid = !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    valid.then_some(text)
}

/// `localhost` and names under it are the guest itself (RFC 6761), never a synthetic address.
fn is_localhost(name: &str) -> bool {
    name == "localhost" || name.ends_with(".localhost")
}

/// The answer to one DNS message, or `None` to stay silent (an unreadable packet, or one that is not a
/// query: never answer an answer).
pub fn answer(names: &Names, packet: &[u8]) -> Option<Vec<u8>> {
    let query = match Message::from_vec(packet) {
        Ok(query) => query,
        Err(_) => {
            // A readable header gets FORMERR; less than a header gets nothing.
            let header = packet.get(..4)?;
            if header[2] & 0x80 != 0 {
                return None;
            }
            let id = u16::from_be_bytes([header[0], header[1]]);
            return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                .to_vec()
                .ok();
        }
    };
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    if query.edns.is_some() {
        // RFC 6891 §6.1.1: a query with OPT gets OPT back.
        response.set_edns(Edns::new());
    }
    let question = match (query.metadata.op_code, query.queries.as_slice()) {
        (OpCode::Query, [question]) => question.clone(),
        (OpCode::Query, _) => {
            response.metadata.response_code = ResponseCode::FormErr;
            return response.to_vec().ok();
        }
        _ => {
            response.metadata.response_code = ResponseCode::NotImp;
            return response.to_vec().ok();
        }
    };
    response.add_query(question.clone());
    if question.query_class() != DNSClass::IN {
        response.metadata.response_code = ResponseCode::Refused;
        return response.to_vec().ok();
    }
    let owner = question.name().clone();
    let Some(name) = canonical(&owner) else {
        response.metadata.response_code = ResponseCode::NXDomain;
        return response.to_vec().ok();
    };
    let record = |rdata: RData| Record::from_rdata(owner.clone(), TTL_SECONDS, rdata);
    match question.query_type() {
        RecordType::A if is_localhost(&name) => {
            response.add_answer(record(RData::A(A(Ipv4Addr::LOCALHOST))));
        }
        RecordType::AAAA if is_localhost(&name) => {
            response.add_answer(record(RData::AAAA(AAAA(Ipv6Addr::LOCALHOST))));
        }
        RecordType::A if name.ends_with(".arpa") => {}
        RecordType::A => {
            let address = names.address_for(&name);
            response.add_answer(record(RData::A(A(address))));
        }
        RecordType::PTR => match reverse(&name).and_then(|ip| names.name_of(ip)) {
            Some(target) => {
                if let Ok(target) = Name::from_ascii(format!("{target}.")) {
                    response.add_answer(record(RData::PTR(PTR(target))));
                }
            }
            None => response.metadata.response_code = ResponseCode::NXDomain,
        },
        // AAAA, MX, TXT, HTTPS...: the name exists (it has an A record) and has none of these. Empty
        // AAAA answers keep clients on IPv4, where the synthetic addresses are.
        _ => {}
    }
    response.to_vec().ok()
}

/// `4.3.2.1.in-addr.arpa` → 1.2.3.4.
fn reverse(name: &str) -> Option<Ipv4Addr> {
    let digits = name.strip_suffix(".in-addr.arpa")?;
    let mut octets = [0u8; 4];
    let mut parts = digits.split('.');
    for octet in octets.iter_mut().rev() {
        *octet = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

/// Serves DNS over UDP on `socket` until the process ends. Only loopback clients are answered (the guest
/// has nothing else; a test's namespace neither).
pub async fn serve_dns(socket: tokio::net::UdpSocket, names: Arc<Names>) {
    let mut buffer = vec![0u8; 4096];
    loop {
        let (length, from) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(err) => {
                tracing::warn!(%err, "DNS receive failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        if !from.ip().is_loopback() {
            continue;
        }
        if let Some(reply) = buffer
            .get(..length)
            .and_then(|packet| answer(&names, packet))
        {
            if let Err(err) = socket.send_to(&reply, from).await {
                tracing::debug!(%err, %from, "DNS reply not sent");
            }
        }
    }
}

/// What a capture listener does with a connection: the name its synthetic address stands for, or
/// nothing to do with it at all (an address outside the range: another local service's port).
pub fn destination(names: &Names, local: SocketAddr) -> Option<Option<String>> {
    match local.ip() {
        std::net::IpAddr::V4(ip) if names.range.contains(ip) => Some(names.name_of(ip)),
        std::net::IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(ip) if names.range.contains(ip) => Some(names.name_of(ip)),
            _ => None,
        },
        std::net::IpAddr::V4(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn range() -> Range {
        "127.77.0.0/16".parse().expect("range")
    }

    fn ask(names: &Names, name: &str, kind: RecordType) -> Message {
        let mut query = Message::query();
        query.add_query(Query::query(Name::from_ascii(name).expect("name"), kind));
        let reply = answer(names, &query.to_vec().expect("encode")).expect("an answer");
        let reply = Message::from_vec(&reply).expect("decode");
        assert_eq!(reply.metadata.id, query.metadata.id);
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        reply
    }

    fn a_record(reply: &Message) -> Option<Ipv4Addr> {
        reply.answers.iter().find_map(|r| match &r.data {
            RData::A(A(ip)) => Some(*ip),
            _ => None,
        })
    }

    #[test]
    fn ranges_are_checked() {
        assert_eq!(range().to_string(), "127.77.0.0/16");
        for bad in [
            "10.0.0.0/16",
            "127.0.0.0/16",
            "127.77.0.1/16",
            "127.77.0.0/8",
            "127.77.0.0/31",
            "127.77.0.0",
            "x/16",
        ] {
            assert!(bad.parse::<Range>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_name_gets_a_stable_synthetic_address_and_is_found_again() {
        let names = Names::new(range());
        let first = a_record(&ask(&names, "API.Example.TEST.", RecordType::A)).expect("A");
        assert!(range().contains(first));
        assert_eq!(
            a_record(&ask(&names, "api.example.test", RecordType::A)),
            Some(first),
            "same name, same address, whatever the case"
        );
        let other = a_record(&ask(&names, "other.test", RecordType::A)).expect("A");
        assert_ne!(first, other);
        assert_eq!(names.name_of(first).as_deref(), Some("api.example.test"));
        assert_eq!(
            destination(&names, SocketAddr::from((first, 443))),
            Some(Some("api.example.test".to_string()))
        );
        assert_eq!(
            destination(
                &names,
                SocketAddr::from((Ipv4Addr::new(127, 77, 9, 9), 443))
            ),
            Some(None),
            "an address in the range that was never handed out has no name"
        );
        assert_eq!(
            destination(&names, SocketAddr::from((Ipv4Addr::LOCALHOST, 443))),
            None
        );
        let reverse = ask(
            &names,
            &format!("{}.in-addr.arpa.", {
                let [a, b, c, d] = first.octets();
                format!("{d}.{c}.{b}.{a}")
            }),
            RecordType::PTR,
        );
        assert!(
            matches!(&reverse.answers[0].data, RData::PTR(PTR(n)) if n.to_ascii() == "api.example.test.")
        );
    }

    #[test]
    fn aaaa_is_empty_localhost_is_local_and_bad_names_do_not_exist() {
        let names = Names::new(range());
        let reply = ask(&names, "api.example.test", RecordType::AAAA);
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply.answers.is_empty());
        assert_eq!(
            a_record(&ask(&names, "localhost", RecordType::A)),
            Some(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            a_record(&ask(&names, "x.localhost", RecordType::A)),
            Some(Ipv4Addr::LOCALHOST)
        );
        for bad in ["a@b.test", "a/b.test", "a:443.test", "a b.test"] {
            let Ok(name) = Name::from_ascii(bad) else {
                continue;
            };
            let mut query = Message::query();
            query.add_query(Query::query(name, RecordType::A));
            let reply = Message::from_vec(
                &answer(&names, &query.to_vec().expect("encode")).expect("answer"),
            )
            .expect("decode");
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::NXDomain,
                "{bad}"
            );
            assert!(reply.answers.is_empty(), "{bad}");
        }
    }

    #[test]
    fn the_table_is_bounded_and_reuses_the_oldest_address() {
        let names = Names::new("127.77.0.0/29".parse().expect("range"));
        let given: Vec<Ipv4Addr> = (0..6)
            .map(|i| names.address_for(&format!("n{i}.test")))
            .collect();
        let distinct: std::collections::HashSet<_> = given.iter().collect();
        assert_eq!(distinct.len(), 6, "six usable addresses in a /29");
        assert!(given
            .iter()
            .all(|ip| *ip != Ipv4Addr::new(127, 77, 0, 0) && *ip != Ipv4Addr::new(127, 77, 0, 7)));
        let seventh = names.address_for("n6.test");
        assert_eq!(seventh, given[0], "the oldest address goes to the new name");
        assert_eq!(names.name_of(seventh).as_deref(), Some("n6.test"));
        assert_eq!(
            names.address_for("n1.test"),
            given[1],
            "the others keep theirs"
        );
        let table = names.table.lock().expect("lock");
        assert_eq!((table.by_name.len(), table.by_offset.len()), (6, 6));
    }

    #[test]
    fn garbage_gets_formerr_or_silence_and_answers_are_not_answered() {
        let names = Names::new(range());
        assert_eq!(answer(&names, &[1, 2]), None);
        let reply =
            answer(&names, &[0xab, 0xcd, 0x01, 0x00, 0, 5, 0, 0, 0, 0, 0, 0, 3]).expect("FORMERR");
        let reply = Message::from_vec(&reply).expect("decode");
        assert_eq!(reply.metadata.id, 0xabcd);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        let mut response = Message::response(7, OpCode::Query);
        response.add_query(Query::query(
            Name::from_ascii("a.test").expect("name"),
            RecordType::A,
        ));
        assert_eq!(answer(&names, &response.to_vec().expect("encode")), None);
        let mut two = Message::query();
        two.add_query(Query::query(
            Name::from_ascii("a.test").expect("name"),
            RecordType::A,
        ));
        two.add_query(Query::query(
            Name::from_ascii("b.test").expect("name"),
            RecordType::A,
        ));
        let reply =
            Message::from_vec(&answer(&names, &two.to_vec().expect("encode")).expect("answer"))
                .expect("decode");
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    }
}
