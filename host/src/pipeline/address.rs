//! Step 5: the address guard. Every address a hop would connect to, whether resolved or written in the URL,
//! is checked here; addresses in refused classes are dropped unless a configured CIDR allows them, and a hop
//! with no address left fails with `blocked_address`. Addresses that embed an IPv4 address (IPv4-mapped,
//! NAT64, 6to4, IPv4-compatible) are judged by the IPv4 address they lead to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{PoisonError, RwLock};

use ipnet::IpNet;

pub struct AddressGuard {
    allowed: Vec<IpNet>,
    /// The PEP's own surfaces for people (the dashboard, later the metrics endpoint): never a
    /// destination, whatever the configuration allows. Filled as they start listening.
    own: RwLock<Vec<SocketAddr>>,
}

/// Why an address is refused: the class it falls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused(pub &'static str);

const OWN_SURFACE: Refused = Refused("the PEP's own surface (dashboard)");

impl AddressGuard {
    pub fn new(allowed: Vec<IpNet>) -> Self {
        AddressGuard {
            allowed,
            own: RwLock::new(Vec::new()),
        }
    }

    /// Refuses `addr` from now on, and its port on every address that reaches this host's loopback.
    pub fn add_own(&self, addr: SocketAddr) {
        self.own
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(addr);
    }

    /// A connection to `ip` port `port`: the PEP's own surfaces first, then the address classes.
    pub fn check_to(&self, ip: IpAddr, port: u16) -> Result<(), Refused> {
        let own = self.own.read().unwrap_or_else(PoisonError::into_inner);
        // A surface bound to one loopback address is reached through others as well where the system
        // routes them there (0.0.0.0, ::, an IPv4 address inside an IPv6 one): its port is refused on
        // all of them.
        if own
            .iter()
            .any(|surface| surface.port() == port && (surface.ip() == ip || reaches_host(ip)))
        {
            return Err(OWN_SURFACE);
        }
        drop(own);
        self.check(ip)
    }

    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        if self.allowed.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        match ip {
            IpAddr::V4(v4) => check_v4(v4),
            IpAddr::V6(v6) => match embedded_v4(v6) {
                Some(v4) => self.check(IpAddr::V4(v4)),
                None => check_v6(v6),
            },
        }
    }
}

/// Whether a connection to `ip` may end on this host: loopback, unspecified, or either inside IPv6.
fn reaches_host(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_unspecified(),
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || embedded_v4(v6).is_some_and(|v4| reaches_host(IpAddr::V4(v4)))
        }
    }
}

const V4_REFUSED: &[(Ipv4Addr, u8, &str)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, "this network (0.0.0.0/8)"),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "private (10.0.0.0/8)"),
    (
        Ipv4Addr::new(100, 64, 0, 0),
        10,
        "shared address space / CGNAT (100.64.0.0/10)",
    ),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback (127.0.0.0/8)"),
    (
        Ipv4Addr::new(169, 254, 0, 0),
        16,
        "link-local and cloud metadata (169.254.0.0/16)",
    ),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "private (172.16.0.0/12)"),
    (
        Ipv4Addr::new(192, 0, 0, 0),
        24,
        "IETF protocol assignments (192.0.0.0/24)",
    ),
    (
        Ipv4Addr::new(192, 0, 2, 0),
        24,
        "documentation (192.0.2.0/24)",
    ),
    (
        Ipv4Addr::new(192, 88, 99, 0),
        24,
        "6to4 relay anycast (192.88.99.0/24)",
    ),
    (
        Ipv4Addr::new(192, 168, 0, 0),
        16,
        "private (192.168.0.0/16)",
    ),
    (
        Ipv4Addr::new(198, 18, 0, 0),
        15,
        "benchmarking (198.18.0.0/15)",
    ),
    (
        Ipv4Addr::new(198, 51, 100, 0),
        24,
        "documentation (198.51.100.0/24)",
    ),
    (
        Ipv4Addr::new(203, 0, 113, 0),
        24,
        "documentation (203.0.113.0/24)",
    ),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast (224.0.0.0/4)"),
    (
        Ipv4Addr::new(240, 0, 0, 0),
        4,
        "reserved and broadcast (240.0.0.0/4)",
    ),
    // Metadata services that live in otherwise public space.
    (
        Ipv4Addr::new(168, 63, 129, 16),
        32,
        "cloud metadata (168.63.129.16)",
    ),
];

fn check_v4(ip: Ipv4Addr) -> Result<(), Refused> {
    let bits = u32::from(ip);
    for (net, len, class) in V4_REFUSED {
        let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
        if bits & mask == u32::from(*net) & mask {
            return Err(Refused(class));
        }
    }
    Ok(())
}

const V6_REFUSED: &[(Ipv6Addr, u8, &str)] = &[
    (
        Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0),
        128,
        "unspecified (::)",
    ),
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 1), 128, "loopback (::1)"),
    // Deprecated (RFC 4291 §2.5.5.1) and still routed over `sit` tunnels: refused as a class, whatever
    // IPv4 address it carries (judging that address would let ::8.8.8.8 through to a tunnel endpoint).
    (
        Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0),
        96,
        "IPv4-compatible, deprecated (::/96)",
    ),
    (
        Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0),
        48,
        "local-use NAT64 (64:ff9b:1::/48)",
    ),
    (
        Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0),
        64,
        "discard-only (100::/64)",
    ),
    (
        Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0),
        32,
        "Teredo (2001::/32)",
    ),
    (
        Ipv6Addr::new(0x2001, 0x10, 0, 0, 0, 0, 0, 0),
        28,
        "ORCHID (2001:10::/28)",
    ),
    (
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
        32,
        "documentation (2001:db8::/32)",
    ),
    (
        Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0),
        7,
        "unique local, incl. fd00:ec2::254 metadata (fc00::/7)",
    ),
    (
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
        "link-local (fe80::/10)",
    ),
    (
        Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0),
        10,
        "site-local, deprecated (fec0::/10)",
    ),
    (
        Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
        "multicast (ff00::/8)",
    ),
];

fn check_v6(ip: Ipv6Addr) -> Result<(), Refused> {
    let bits = u128::from(ip);
    for (net, len, class) in V6_REFUSED {
        let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
        if bits & mask == u128::from(*net) & mask {
            return Err(Refused(class));
        }
    }
    Ok(())
}

/// The IPv4 address an IPv6 address leads to, for the forms that carry one.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from((bits & 0xffff_ffff) as u32);
    let seg = ip.segments();
    // ::ffff:a.b.c.d (mapped). The deprecated IPv4-compatible ::a.b.c.d is refused as a class (V6_REFUSED).
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    // 64:ff9b::/96, the well-known NAT64 prefix.
    if bits >> 32 == u128::from(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0)) >> 32 {
        return Some(low32);
    }
    // 2002:AABB:CCDD::/48, 6to4 of AA.BB.CC.DD.
    if seg[0] == 0x2002 {
        return Some(Ipv4Addr::from(
            (u32::from(seg[1]) << 16) | u32::from(seg[2]),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(allowed: &[&str]) -> AddressGuard {
        AddressGuard::new(allowed.iter().map(|c| c.parse().expect("cidr")).collect())
    }

    /// 72 addresses every egress guard must refuse by default.
    const REFUSED: &[&str] = &[
        "0.0.0.0",
        "0.1.2.3",
        "10.0.0.1",
        "10.255.255.255",
        "100.64.0.1",
        "100.100.100.200",
        "100.127.255.254",
        "127.0.0.1",
        "127.0.0.2",
        "127.255.255.255",
        "169.254.0.1",
        "169.254.169.254",
        "169.254.170.2",
        "172.16.0.1",
        "172.31.255.255",
        "192.0.0.1",
        "192.0.0.192",
        "192.0.2.1",
        "192.88.99.1",
        "192.168.0.1",
        "192.168.255.255",
        "198.18.0.1",
        "198.19.255.255",
        "198.51.100.7",
        "203.0.113.9",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "168.63.129.16",
        "::",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:192.168.1.1",
        "::ffff:0.0.0.0",
        "::127.0.0.1",
        "::10.0.0.1",
        "::169.254.169.254",
        "::8.8.8.8",
        "::1.1.1.1",
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b::a00:1",
        "64:ff9b:1::1",
        "64:ff9b:1:ffff::7f00:1",
        "2002:7f00:1::",
        "2002:a9fe:a9fe::1",
        "2002:c0a8:101::",
        "2002:0a00:0001:ffff::1",
        "2001::1",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "2001:db8::1",
        "2001:db8:ffff::",
        "2001:10::1",
        "fc00::1",
        "fd00::1",
        "fd00:ec2::254",
        "fdff:ffff::1",
        "fe80::1",
        "fe80::1ff:fe23:4567:890a",
        "febf::1",
        "fec0::1",
        "ff02::1",
        "ff05::1:3",
        "ffff::",
        "100::1",
        "100::ffff:ffff",
        "::ffff:224.0.0.1",
        "::ffff:255.255.255.255",
        "::ffff:100.64.0.1",
    ];

    const ALLOWED: &[&str] = &[
        "1.1.1.1",
        "8.8.8.8",
        "93.184.216.34",
        "172.15.255.255",
        "172.32.0.0",
        "192.167.255.255",
        "100.63.255.255",
        "100.128.0.0",
        "198.17.255.255",
        "223.255.255.255",
        "168.63.129.17",
        "2606:4700:4700::1111",
        "2a00:1450:4001::200e",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ];

    #[test]
    fn refused_classes_are_refused() {
        assert!(REFUSED.len() >= 60);
        let g = guard(&[]);
        for addr in REFUSED {
            let ip: IpAddr = addr.parse().expect("address");
            assert!(g.check(ip).is_err(), "{addr} was allowed");
        }
    }

    #[test]
    fn public_addresses_pass() {
        let g = guard(&[]);
        for addr in ALLOWED {
            let ip: IpAddr = addr.parse().expect("address");
            assert_eq!(g.check(ip), Ok(()), "{addr}");
        }
    }

    #[test]
    fn a_configured_cidr_allows_exactly_its_range() {
        let g = guard(&["127.0.0.0/8", "fd00:1::/64"]);
        assert_eq!(g.check("127.0.0.2".parse().expect("ip")), Ok(()));
        assert_eq!(
            g.check("::ffff:127.0.0.1".parse().expect("ip")),
            Ok(()),
            "mapped form of an allowed address"
        );
        assert_eq!(g.check("fd00:1::5".parse().expect("ip")), Ok(()));
        assert!(g.check("fd00:2::5".parse().expect("ip")).is_err());
        assert!(g.check("10.0.0.1".parse().expect("ip")).is_err());
        assert!(g.check("169.254.169.254".parse().expect("ip")).is_err());
        assert!(
            g.check("::1".parse().expect("ip")).is_err(),
            "::1 is not in 127.0.0.0/8"
        );
    }

    #[test]
    fn the_peps_own_surfaces_are_never_a_destination() {
        let g = AddressGuard::new(vec![
            "127.0.0.0/8".parse().expect("cidr"),
            "::/0".parse().expect("cidr"),
            "0.0.0.0/8".parse().expect("cidr"),
        ]);
        g.add_own("127.0.0.1:4321".parse().expect("addr"));
        for ip in [
            "127.0.0.1",
            "127.0.0.2",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:0.0.0.0",
            "2002:7f00:1::",
            "64:ff9b::7f00:1",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(g.check_to(ip, 4321), Err(OWN_SURFACE), "{ip}");
        }
        // Other ports of loopback stay as allowed_cidrs says; the same port elsewhere is not ours.
        assert_eq!(g.check_to("127.0.0.1".parse().expect("ip"), 4322), Ok(()));
        let public: IpAddr = "8.8.8.8".parse().expect("ip");
        assert_eq!(g.check_to(public, 4321), Ok(()));
    }

    #[test]
    fn refusals_name_their_class() {
        let g = guard(&[]);
        assert_eq!(
            g.check("169.254.169.254".parse().expect("ip")),
            Err(Refused("link-local and cloud metadata (169.254.0.0/16)"))
        );
        assert_eq!(
            g.check("2002:7f00:1::".parse().expect("ip")),
            Err(Refused("loopback (127.0.0.0/8)"))
        );
        assert_eq!(
            g.check("::8.8.8.8".parse().expect("ip")),
            Err(Refused("IPv4-compatible, deprecated (::/96)"))
        );
    }
}
