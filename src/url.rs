//! Webhook URLs: just enough of RFC 3986 to split scheme, authority and path, and to tell
//! literal private, loopback, link-local and unspecified addresses apart (the SSRF guard).

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
        let host = self.host.to_ascii_lowercase();
        if host == "localhost" || host.ends_with(".localhost") {
            return Some("loopback");
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return classify_ip(ip);
        }
        None
    }
}

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
pub fn classify_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return classify_v4(v4);
            }
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if first & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if first & 0xff00 == 0xff00 {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

fn classify_v4(v4: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = v4.octets();
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
    } else if v4.is_broadcast() || v4.is_multicast() {
        Some("broadcast or multicast")
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
}
