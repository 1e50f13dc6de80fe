//! Webhook URLs: just enough of RFC 3986 to split scheme, authority and path, and to tell
//! literal private, loopback, link-local, reserved and unspecified addresses apart (the SSRF guard).
//! Names that only a DNS lookup can judge are left to the egress cluster's `resolved_address_filter`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    pub https: bool,
    /// The host as written, without brackets for IPv6.
    pub host: String,
    pub port: Option<u16>,
    /// The `:authority` of the delivery: host and port as written in the URL.
    pub authority: String,
    /// The `:path` of the delivery: path and query, at least `/`.
    pub path_and_query: String,
}

impl WebhookUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("must not contain spaces or control characters".into());
        }
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| "must be an absolute URL such as https://host/path".to_string())?;
        let https = if scheme.eq_ignore_ascii_case("https") {
            true
        } else if scheme.eq_ignore_ascii_case("http") {
            false
        } else {
            return Err(format!("must be an https URL (the scheme is {scheme:?})"));
        };
        if rest.contains('#') {
            return Err("must not contain a fragment".into());
        }
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.contains('@') {
            return Err("must not contain credentials (user@host)".into());
        }
        let (host, port) = split_host_port(authority)?;
        let path_and_query = match path {
            "" => "/".to_string(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_string(),
        };
        Ok(WebhookUrl {
            https,
            host,
            port,
            authority: authority.to_string(),
            path_and_query,
        })
    }

    /// Why this URL's host is not a public destination, if it is not.
    pub fn private_host_reason(&self) -> Option<&'static str> {
        // A name and the same name with its root dot ("localhost.") are one name to a resolver.
        let lower = self.host.to_ascii_lowercase();
        let host = lower.strip_suffix('.').unwrap_or(&lower);
        if host == "localhost"
            || host.ends_with(".localhost")
            || LOOPBACK_HOST_NAMES.contains(&host)
        {
            return Some("loopback");
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return classify_ip(ip);
        }
        None
    }
}

/// Loopback names that Debian's and most distributions' /etc/hosts define, which Envoy's resolver reads.
const LOOPBACK_HOST_NAMES: [&str; 4] = [
    "localhost.localdomain",
    "ip6-localhost",
    "ip6-loopback",
    "localhost6",
];

fn split_host_port(authority: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| "has an IPv6 host without its closing ']'".to_string())?;
        if v6.parse::<Ipv6Addr>().is_err() {
            return Err(format!("has an invalid IPv6 host [{v6}]"));
        }
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| "has junk after the IPv6 host".to_string())?,
            ),
        };
        (v6.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err("must have a host".into());
    }
    if !authority.starts_with('[') {
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(format!("has an invalid host {host:?}"));
        }
        // Only the root label may be empty ("example.com."): "a..b", ".a" or "a.." are no DNS names.
        if host
            .strip_suffix('.')
            .unwrap_or(&host)
            .split('.')
            .any(str::is_empty)
        {
            return Err(format!("has an invalid host {host:?} (an empty label)"));
        }
        // Resolvers read "127.1", "0x7f.1" or "2130706433" as IPv4 addresses: only a canonical
        // dotted quad may look numeric, so the SSRF guard sees every literal address.
        let last = host
            .trim_end_matches('.')
            .rsplit('.')
            .next()
            .unwrap_or_default();
        let numeric =
            last.chars().all(|c| c.is_ascii_digit()) || last.to_ascii_lowercase().starts_with("0x");
        if numeric && host.parse::<Ipv4Addr>().is_err() {
            return Err(format!(
                "has a numeric host {host:?} that is not a dotted-quad IPv4 address"
            ));
        }
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && !p.starts_with('+') => Some(n),
            _ => return Err(format!("has an invalid port {p:?}")),
        },
    };
    Ok((host, port))
}

/// The class of a literal address that must not be a webhook destination, or None if public.
///
/// IPv6 forms that carry an IPv4 address (mapped, compatible, translated, NAT64, 6to4) are judged by
/// that IPv4 address, since that is where the packets end up.
pub fn classify_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v6(v6: Ipv6Addr) -> Option<&'static str> {
    let s = v6.segments();
    let low_v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if v6.is_loopback() {
        Some("loopback")
    } else if v6.is_unspecified() {
        Some("unspecified")
    } else if s[..6] == [0, 0, 0, 0, 0, 0xffff] {
        // ::ffff:a.b.c.d, IPv4-mapped.
        classify_v4(low_v4)
    } else if s[..6] == [0; 6] {
        // ::a.b.c.d, IPv4-compatible (deprecated by RFC 4291; stacks may still route it as IPv4).
        classify_v4(low_v4).or(Some("reserved (IPv4-compatible IPv6)"))
    } else if s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        // ::ffff:0:a.b.c.d, IPv4-translated (RFC 2765).
        classify_v4(low_v4).or(Some("reserved (IPv4-translated IPv6)"))
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // 64:ff9b::a.b.c.d, the well-known NAT64 prefix (RFC 6052): a NAT64 gateway forwards to a.b.c.d.
        classify_v4(low_v4)
    } else if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        Some("private (local-use NAT64)")
    } else if s[0] == 0x2002 {
        // 2002:AABB:CCDD::/48, 6to4 (RFC 3056): relays tunnel it to the IPv4 address AA.BB.CC.DD.
        let [a, b] = s[1].to_be_bytes();
        let [c, d] = s[2].to_be_bytes();
        classify_v4(Ipv4Addr::new(a, b, c, d)).or(Some("reserved (6to4, deprecated)"))
    } else if s[0] == 0x2001 && s[1] == 0 {
        // 2001::/32, Teredo: the server and the (obfuscated) client are IPv4 addresses.
        Some("reserved (Teredo)")
    } else if s[..4] == [0x100, 0, 0, 0] {
        Some("reserved (discard-only)")
    } else if s[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if s[0] & 0xffc0 == 0xfec0 {
        Some("private (site-local)")
    } else if s[0] & 0xfe00 == 0xfc00 {
        Some("private (unique local)")
    } else if s[0] & 0xff00 == 0xff00 {
        Some("multicast")
    } else {
        None
    }
}

fn classify_v4(v4: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = v4.octets();
    if v4.is_loopback() {
        Some("loopback")
    } else if v4.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if v4.is_private() {
        Some("private")
    } else if v4.is_link_local() {
        Some("link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("private (carrier-grade NAT)")
    } else if a == 192 && b == 0 && c == 0 {
        Some("reserved (IETF protocol assignments)")
    } else if a == 198 && (b == 18 || b == 19) {
        Some("reserved (benchmarking)")
    } else if a == 192 && b == 88 && c == 99 {
        Some("reserved (6to4 relay anycast)")
    } else if v4.is_multicast() {
        Some("broadcast or multicast")
    } else if a >= 240 {
        // 240.0.0.0/4 is reserved for future use; its last address is the limited broadcast.
        if v4.is_broadcast() {
            Some("broadcast or multicast")
        } else {
            Some("reserved (240.0.0.0/4)")
        }
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_urls() {
        let u = WebhookUrl::parse("https://billing.example.com/hooks/rapidlogix?x=1").unwrap();
        assert!(u.https);
        assert_eq!(u.host, "billing.example.com");
        assert_eq!(u.authority, "billing.example.com");
        assert_eq!(u.path_and_query, "/hooks/rapidlogix?x=1");
        let u = WebhookUrl::parse("http://127.0.0.1:8080").unwrap();
        assert!(!u.https);
        assert_eq!(
            (u.host.as_str(), u.port, u.path_and_query.as_str()),
            ("127.0.0.1", Some(8080), "/")
        );
        let u = WebhookUrl::parse("HTTPS://[::1]:9/a?b").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.authority.as_str()),
            ("::1", Some(9), "[::1]:9")
        );
        assert_eq!(
            WebhookUrl::parse("https://h?q=1").unwrap().path_and_query,
            "/?q=1"
        );
    }

    #[test]
    fn rejects_malformed_urls() {
        for bad in [
            "ftp://h/",
            "billing.example.com/x",
            "https:///x",
            "https://u:p@h/",
            "https://h:0/",
            "https://h:99999/",
            "https://h:x/",
            "https://h/a b",
            "https://h/#frag",
            "https://[::1/",
            "https://[zz]/",
            "https://h_h/",
            "https://127.1/",
            "https://0x7f000001/",
            "https://2130706433/",
            "https://127.0.0.1./",
            "https://0177.0.0.1/",
            "https://127.000.0.1/",
            "https://a..b/",
            "https://.localhost/",
            "https://localhost../",
            "https://[fe80::1%25eth0]/",
        ] {
            assert!(WebhookUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn classifies_address_classes() {
        let class = |u: &str| WebhookUrl::parse(u).unwrap().private_host_reason();
        assert_eq!(class("https://127.0.0.1/"), Some("loopback"));
        assert_eq!(class("https://127.255.1.2/"), Some("loopback"));
        assert_eq!(class("https://localhost/"), Some("loopback"));
        assert_eq!(class("https://a.localhost/"), Some("loopback"));
        assert_eq!(class("https://[::1]/"), Some("loopback"));
        assert_eq!(class("https://[::ffff:127.0.0.1]/"), Some("loopback"));
        assert_eq!(class("https://10.1.2.3/"), Some("private"));
        assert_eq!(class("https://172.16.0.1/"), Some("private"));
        assert_eq!(class("https://172.31.255.255/"), Some("private"));
        assert_eq!(class("https://192.168.0.1/"), Some("private"));
        assert_eq!(class("https://[fd00::1]/"), Some("private (unique local)"));
        assert_eq!(
            class("https://100.64.0.1/"),
            Some("private (carrier-grade NAT)")
        );
        assert_eq!(class("https://169.254.169.254/"), Some("link-local"));
        assert_eq!(class("https://[fe80::1]/"), Some("link-local"));
        assert_eq!(class("https://0.0.0.0/"), Some("unspecified"));
        assert_eq!(class("https://[::]/"), Some("unspecified"));
        assert_eq!(
            class("https://255.255.255.255/"),
            Some("broadcast or multicast")
        );
        assert_eq!(class("https://172.32.0.1/"), None);
        assert_eq!(class("https://8.8.8.8/"), None);
        assert_eq!(class("https://[2001:db8::1]/"), None);
        assert_eq!(class("https://hooks.example.com/"), None);
    }

    #[test]
    fn a_root_dot_or_capitals_do_not_hide_localhost() {
        let class = |u: &str| WebhookUrl::parse(u).unwrap().private_host_reason();
        for url in [
            "https://localhost./",
            "https://LOCALHOST./",
            "https://foo.localhost./",
            "https://Foo.LocalHost/",
            "https://localhost.:8443/x",
            "https://localhost.localdomain/",
            "https://ip6-localhost./",
            "https://ip6-loopback/",
            "https://localhost6/",
        ] {
            assert_eq!(class(url), Some("loopback"), "{url}");
        }
        assert_eq!(class("https://hooks.example.com./"), None);
        assert_eq!(class("https://localhost.example.com/"), None);
        assert_eq!(class("https://notlocalhost/"), None);
    }

    #[test]
    fn ipv6_forms_that_carry_an_ipv4_address_are_judged_by_it() {
        let class = |u: &str| WebhookUrl::parse(u).unwrap().private_host_reason();
        // IPv4-compatible ::a.b.c.d
        assert_eq!(class("https://[::127.0.0.1]/"), Some("loopback"));
        assert_eq!(class("https://[::a9fe:a9fe]/"), Some("link-local"));
        assert_eq!(class("https://[::10.0.0.1]/"), Some("private"));
        assert_eq!(
            class("https://[::8.8.8.8]/"),
            Some("reserved (IPv4-compatible IPv6)")
        );
        // IPv4-mapped, also spelled in hex and in capitals
        assert_eq!(class("https://[::ffff:7f00:1]/"), Some("loopback"));
        assert_eq!(
            class("https://[::FFFF:169.254.169.254]/"),
            Some("link-local")
        );
        // IPv4-translated ::ffff:0:a.b.c.d
        assert_eq!(class("https://[::ffff:0:127.0.0.1]/"), Some("loopback"));
        assert_eq!(class("https://[::ffff:0:a9fe:a9fe]/"), Some("link-local"));
        assert_eq!(
            class("https://[::ffff:0:8.8.8.8]/"),
            Some("reserved (IPv4-translated IPv6)")
        );
        // NAT64: the well-known prefix forwards to the embedded address; the local-use one is private
        assert_eq!(class("https://[64:ff9b::a9fe:a9fe]/"), Some("link-local"));
        assert_eq!(
            class("https://[64:ff9b::169.254.169.254]/"),
            Some("link-local")
        );
        assert_eq!(class("https://[64:ff9b::127.0.0.1]/"), Some("loopback"));
        assert_eq!(class("https://[64:ff9b::10.1.1.1]/"), Some("private"));
        assert_eq!(class("https://[64:ff9b::808:808]/"), None);
        assert_eq!(
            class("https://[64:ff9b:1::a9fe:a9fe]/"),
            Some("private (local-use NAT64)")
        );
        // 6to4 2002:AABB:CCDD::/48
        assert_eq!(class("https://[2002:a9fe:a9fe::]/"), Some("link-local"));
        assert_eq!(class("https://[2002:7f00:1::1]/"), Some("loopback"));
        assert_eq!(class("https://[2002:c0a8:101::]/"), Some("private"));
        assert_eq!(
            class("https://[2002:808:808::]/"),
            Some("reserved (6to4, deprecated)")
        );
        // Teredo
        assert_eq!(
            class("https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/"),
            Some("reserved (Teredo)")
        );
    }

    #[test]
    fn reserved_ipv6_ranges_are_refused() {
        let class = |u: &str| WebhookUrl::parse(u).unwrap().private_host_reason();
        assert_eq!(class("https://[fec0::1]/"), Some("private (site-local)"));
        assert_eq!(class("https://[FEFF::1]/"), Some("private (site-local)"));
        assert_eq!(class("https://[100::1]/"), Some("reserved (discard-only)"));
        assert_eq!(class("https://[2001:4860:4860::8888]/"), None);
        assert_eq!(class("https://[2001:1::1]/"), None);
    }

    #[test]
    fn reserved_ipv4_ranges_are_refused() {
        let class = |u: &str| WebhookUrl::parse(u).unwrap().private_host_reason();
        for (url, reason) in [
            ("https://192.0.0.1/", "reserved (IETF protocol assignments)"),
            (
                "https://192.0.0.170/",
                "reserved (IETF protocol assignments)",
            ),
            (
                "https://192.0.0.255/",
                "reserved (IETF protocol assignments)",
            ),
            ("https://198.18.0.1/", "reserved (benchmarking)"),
            ("https://198.19.255.255/", "reserved (benchmarking)"),
            ("https://192.88.99.1/", "reserved (6to4 relay anycast)"),
            ("https://240.0.0.1/", "reserved (240.0.0.0/4)"),
            ("https://255.255.255.254/", "reserved (240.0.0.0/4)"),
            ("https://224.0.0.1/", "broadcast or multicast"),
        ] {
            assert_eq!(class(url), Some(reason), "{url}");
        }
        // Their neighbours are public.
        assert_eq!(class("https://192.0.1.1/"), None);
        assert_eq!(class("https://198.17.255.255/"), None);
        assert_eq!(class("https://198.20.0.1/"), None);
        assert_eq!(class("https://192.88.98.1/"), None);
    }
}
