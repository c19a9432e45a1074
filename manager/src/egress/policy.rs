//! What a session's guest may reach: an allow-list of hosts and ports, and the budget of
//! requests and bytes it may spend, checked at create against the manager's ceiling.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{Error, Result};

/// The `network` of a create request: every field optional but `allow`.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct NetworkRequest {
    /// Hosts the guest may reach: `api.github.com` (that name), `*.pypi.org` (its
    /// subdomains), `127.0.0.1` or `[::1]` (that address, private ranges included); each with
    /// an optional `:port`, else ports 80 and 443.
    #[schema(example = json!(["api.github.com", "*.pypi.org", "127.0.0.1:9000"]))]
    pub allow: Vec<String>,
    /// Bytes of request and response bodies the session may move in all; the manager's
    /// default (and most) when absent.
    #[serde(default, deserialize_with = "crate::registry::request::whole_number")]
    pub max_bytes: Option<u64>,
    /// Requests the session may make in all; the manager's default (and most) when absent.
    #[serde(default, deserialize_with = "crate::registry::request::whole_number")]
    pub max_requests: Option<u64>,
}

/// Rules a session's allow-list may have.
pub const MAX_RULES: usize = 256;

/// The host part of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// Exactly this name.
    Name(String),
    /// Any name below this one (`*.pypi.org`: `files.pypi.org`, not `pypi.org`).
    Below(String),
    /// Exactly this address, which may be private: naming it is the explicit consent.
    Ip(IpAddr),
}

/// One entry of an allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    host: HostPattern,
    /// `None`: 80 and 443, the ports of `http://` and `https://`.
    port: Option<u16>,
    /// As the client wrote it, for the messages that name the rule.
    text: String,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// The host of a URL a guest asks for, as the `url` crate parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

impl Host {
    pub fn of(url: &url::Url) -> Option<Host> {
        Some(match url.host()? {
            url::Host::Domain(name) => Host::Name(name.trim_end_matches('.').to_ascii_lowercase()),
            url::Host::Ipv4(ip) => Host::Ip(IpAddr::V4(ip)),
            url::Host::Ipv6(ip) => Host::Ip(IpAddr::V6(ip)),
        })
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl Rule {
    /// Parses one entry; the error says what is wrong with it.
    pub fn parse(text: &str) -> std::result::Result<Rule, String> {
        let raw = text.trim().to_ascii_lowercase();
        if raw.is_empty() {
            return Err("is empty".into());
        }
        if raw.contains("://") {
            return Err("must be a host with an optional port, not a URL".into());
        }
        if raw.contains('/') {
            return Err(
                "names a range or a path: a rule is a host or one address, with an optional port"
                    .into(),
            );
        }
        let (host, port) = split_port(&raw)?;
        let host = if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            HostPattern::Ip(ip)
        } else if let Some(below) = host.strip_prefix("*.") {
            check_name(below)?;
            if !below.contains('.') {
                return Err(format!(
                    "`*.{below}` would allow every name under a top-level domain; name a domain \
                     below it (`*.example.{below}`)"
                ));
            }
            HostPattern::Below(below.to_owned())
        } else if host.contains('*') {
            return Err("a wildcard may only be the first label (`*.example.com`)".into());
        } else {
            check_name(host)?;
            HostPattern::Name(host.to_owned())
        };
        Ok(Rule {
            host,
            port,
            text: text.trim().to_owned(),
        })
    }

    /// Whether a request to `host:port` falls under this rule.
    pub fn allows(&self, host: &Host, port: u16) -> bool {
        let port_ok = match self.port {
            Some(p) => p == port,
            None => port == 80 || port == 443,
        };
        port_ok
            && match (&self.host, host) {
                (HostPattern::Name(n), Host::Name(h)) => n == h,
                (HostPattern::Below(d), Host::Name(h)) => is_below(h, d),
                (HostPattern::Ip(ip), Host::Ip(h)) => ip == h,
                _ => false,
            }
    }

    /// Whether everything this rule allows, `ceiling` allows too.
    fn within(&self, ceiling: &Rule) -> bool {
        let ports = match (self.port, ceiling.port) {
            (_, None) => self.port.is_none_or(|p| p == 80 || p == 443),
            (Some(p), Some(c)) => p == c,
            (None, Some(_)) => false,
        };
        ports
            && match (&self.host, &ceiling.host) {
                (HostPattern::Name(n), HostPattern::Name(c)) => n == c,
                (HostPattern::Name(n), HostPattern::Below(c)) => is_below(n, c),
                (HostPattern::Below(d), HostPattern::Below(c)) => d == c || is_below(d, c),
                (HostPattern::Ip(ip), HostPattern::Ip(c)) => ip == c,
                _ => false,
            }
    }

    /// Whether the rule names an address, so that a private one is allowed.
    pub fn names_address(&self) -> bool {
        matches!(self.host, HostPattern::Ip(_))
    }
}

fn is_below(name: &str, domain: &str) -> bool {
    name.len() > domain.len() + 1
        && name.ends_with(domain)
        && name.as_bytes()[name.len() - domain.len() - 1] == b'.'
}

fn split_port(raw: &str) -> std::result::Result<(&str, Option<u16>), String> {
    let (host, port) = if let Some(rest) = raw.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, "")) => return Ok((ip, None)),
            Some((ip, tail)) => match tail.strip_prefix(':') {
                Some(port) => (ip, Some(port)),
                None => return Err("has text after `]` that is not `:port`".into()),
            },
            None => return Err("opens `[` without closing it".into()),
        }
    } else if raw.matches(':').count() > 1 {
        return Ok((raw, None)); // a bare IPv6 address: checked as one by the caller
    } else {
        match raw.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (raw, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u32>() {
            Ok(n @ 1..=65535) => Some(n as u16),
            _ => return Err(format!("port `{p}` is not between 1 and 65535")),
        },
    };
    Ok((host, port))
}

fn check_name(name: &str) -> std::result::Result<(), String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!("`{name}` is not a host name"));
    }
    Ok(())
}

/// A session's network: what it may reach and how much it may spend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub rules: Vec<Rule>,
    pub max_bytes: u64,
    pub max_requests: u64,
}

impl Policy {
    /// The rule that allows `host:port`, if one does.
    pub fn find(&self, host: &Host, port: u16) -> Option<&Rule> {
        self.rules.iter().find(|r| r.allows(host, port))
    }

    /// The rules, as the client wrote them.
    pub fn allow_list(&self) -> Vec<String> {
        self.rules.iter().map(ToString::to_string).collect()
    }

    /// The request as the session's policy: its rules parsed and each within `ceiling`'s,
    /// its budgets within the manager's. Errors name the field.
    pub fn from_request(request: &NetworkRequest, limits: &NetworkLimits) -> Result<Policy> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        if request.allow.len() > MAX_RULES {
            return bad(format!(
                "network.allow may have at most {MAX_RULES} entries"
            ));
        }
        let mut rules = Vec::with_capacity(request.allow.len());
        for (i, text) in request.allow.iter().enumerate() {
            let rule = match Rule::parse(text) {
                Ok(rule) => rule,
                Err(why) => return bad(format!("network.allow[{i}] ({text:?}) {why}")),
            };
            if let Some(ceiling) = &limits.ceiling
                && !ceiling.iter().any(|c| rule.within(c))
            {
                return bad(format!(
                    "network.allow[{i}] ({text:?}) is outside what this manager allows \
                     (--network-allow {})",
                    ceiling
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                ));
            }
            rules.push(rule);
        }
        let budget = |name: &str, asked: Option<u64>, most: u64| match asked {
            None => Ok(most),
            Some(n) if n <= most => Ok(n),
            Some(_) => Err(Error::InvalidRequest(format!(
                "network.{name} must be at most {most} (this manager's bound)"
            ))),
        };
        Ok(Policy {
            rules,
            max_bytes: budget("max_bytes", request.max_bytes, limits.max_bytes)?,
            max_requests: budget("max_requests", request.max_requests, limits.max_requests)?,
        })
    }
}

/// The manager's bounds on every session's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkLimits {
    /// `--network-allow`: what a session gets when it asks for nothing, and the most any
    /// session may ask for. `None`: no network by default, any rule on request.
    pub ceiling: Option<Vec<Rule>>,
    pub max_bytes: u64,
    pub max_requests: u64,
}

impl Default for NetworkLimits {
    fn default() -> Self {
        Self {
            ceiling: None,
            max_bytes: 64 << 20,
            max_requests: 1000,
        }
    }
}

impl NetworkLimits {
    /// Parses `--network-allow`'s comma-separated rules (`none`: no rule at all, so sessions
    /// have no network whatever they ask).
    pub fn parse_ceiling(list: &str) -> Result<Vec<Rule>> {
        if list.trim() == "none" {
            return Ok(Vec::new());
        }
        list.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                Rule::parse(s)
                    .map_err(|why| Error::InvalidRequest(format!("--network-allow {s:?} {why}")))
            })
            .collect()
    }

    /// The policy of a session that asked for none: the ceiling's rules, or no network.
    pub fn default_policy(&self) -> Policy {
        Policy {
            rules: self.ceiling.clone().unwrap_or_default(),
            max_bytes: self.max_bytes,
            max_requests: self.max_requests,
        }
    }
}

/// Whether `ip` is an address anyone on the internet could have: not loopback, private,
/// link-local (cloud metadata's 169.254.169.254 among them), shared, multicast, reserved or
/// unspecified. A name must resolve to such addresses only; a private one is reached only
/// where a rule names it.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local (fd00:ec2::254 is EC2's metadata)
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first == 0x64 && v6.segments()[1] == 0xff9b) // NAT64 of any v4
                || (first == 0x2001 && v6.segments()[1] == 0x0db8)) // documentation
                && v6 != Ipv6Addr::from(1u128)
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        || (a == 198 && (b == 18 || b == 19)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Host {
        match s.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(s.into()),
        }
    }

    #[test]
    fn rules_match_names_subdomains_addresses_and_ports() {
        let exact = Rule::parse("api.github.com").unwrap_or_else(|e| panic!("{e}"));
        assert!(exact.allows(&host("api.github.com"), 443));
        assert!(exact.allows(&host("api.github.com"), 80));
        assert!(!exact.allows(&host("api.github.com"), 8080));
        assert!(!exact.allows(&host("github.com"), 443));
        let below = Rule::parse("*.pypi.org").unwrap_or_else(|e| panic!("{e}"));
        assert!(below.allows(&host("files.pypi.org"), 443));
        assert!(!below.allows(&host("pypi.org"), 443));
        assert!(!below.allows(&host("evilpypi.org"), 443));
        let ip = Rule::parse("127.0.0.1:9000").unwrap_or_else(|e| panic!("{e}"));
        assert!(ip.allows(&host("127.0.0.1"), 9000));
        assert!(!ip.allows(&host("127.0.0.1"), 9001));
        assert!(!ip.allows(&host("localhost"), 9000));
        let v6 = Rule::parse("[::1]:8080").unwrap_or_else(|e| panic!("{e}"));
        assert!(v6.allows(&host("::1"), 8080));
        assert!(v6.names_address() && !below.names_address());
    }

    #[test]
    fn bad_rules_say_why() {
        for (bad, says) in [
            ("", "empty"),
            ("*.com", "top-level"),
            ("*", "wildcard"),
            ("a.*.com", "first label"),
            ("example.com:0", "port"),
            ("example.com:70000", "port"),
            ("https://example.com", "not a URL"),
            ("10.0.0.0/8", "range"),
            ("exa mple.com", "host name"),
            ("[::1", "without closing"),
        ] {
            match Rule::parse(bad) {
                Ok(rule) => panic!("{bad:?} parsed as {rule:?}"),
                Err(why) => assert!(why.contains(says), "{bad:?}: {why}"),
            }
        }
    }

    #[test]
    fn a_ceiling_bounds_what_sessions_ask() {
        let limits = NetworkLimits {
            ceiling: Some(
                NetworkLimits::parse_ceiling("*.example.com,10.0.0.1:9000")
                    .unwrap_or_else(|e| panic!("{e}")),
            ),
            ..NetworkLimits::default()
        };
        let ask = |allow: &[&str]| NetworkRequest {
            allow: allow.iter().map(|s| (*s).to_owned()).collect(),
            ..NetworkRequest::default()
        };
        for ok in [
            &["api.example.com"][..],
            &["*.a.example.com"],
            &["10.0.0.1:9000"],
        ] {
            assert!(Policy::from_request(&ask(ok), &limits).is_ok(), "{ok:?}");
        }
        for refused in [
            &["example.com"][..],
            &["api.example.com:8443"],
            &["10.0.0.1"],
            &["other.org"],
        ] {
            let err = Policy::from_request(&ask(refused), &limits)
                .err()
                .map(|e| e.to_string());
            assert!(
                err.as_deref()
                    .is_some_and(|e| e.contains("network.allow[0]")),
                "{refused:?}: {err:?}"
            );
        }
        let greedy = NetworkRequest {
            max_requests: Some(limits.max_requests + 1),
            ..ask(&[])
        };
        let err = Policy::from_request(&greedy, &limits)
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("network.max_requests")));
        assert_eq!(limits.default_policy().rules.len(), 2);
    }

    #[test]
    fn only_addresses_anyone_could_have_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
        ] {
            let ip: IpAddr = private.parse().unwrap_or_else(|e| panic!("{private}: {e}"));
            assert!(!is_public(ip), "{private}");
        }
        for public in ["1.1.1.1", "151.101.0.223", "2606:4700:4700::1111"] {
            let ip: IpAddr = public.parse().unwrap_or_else(|e| panic!("{public}: {e}"));
            assert!(is_public(ip), "{public}");
        }
    }
}
