//! The leaf matchers: strings with Istio's `*` forms, CIDRs and ports. Parsing never panics and
//! reports a [`Problem`]; matching never allocates.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::error::Problem;

/// Istio's string match: `abc` exact, `abc*` prefix, `*abc` suffix, `*` "present, non-empty".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    pub(crate) fn parse(value: &str) -> Result<Self, Problem> {
        if value.is_empty() {
            return Err(Problem::EmptyValue);
        }
        if value == "*" {
            return Ok(StringMatch::Presence);
        }
        let (matcher, rest) = if let Some(rest) = value.strip_prefix('*') {
            (StringMatch::Suffix(rest.to_owned()), rest)
        } else if let Some(rest) = value.strip_suffix('*') {
            (StringMatch::Prefix(rest.to_owned()), rest)
        } else {
            (StringMatch::Exact(value.to_owned()), value)
        };
        if rest.contains('*') {
            return Err(Problem::BadWildcard {
                value: value.to_owned(),
            });
        }
        Ok(matcher)
    }

    /// `None` is an absent attribute (no verified peer identity): no matcher matches it, so a
    /// positive field fails and a `not*` field passes.
    pub(crate) fn matches(&self, value: Option<&str>) -> bool {
        let Some(value) = value else {
            return false;
        };
        match self {
            StringMatch::Exact(exact) => value == exact,
            StringMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
            StringMatch::Suffix(suffix) => value.ends_with(suffix.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

/// An IPv4 or IPv6 block; a bare address is a /32 or /128. Host bits are masked off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub(crate) fn parse(value: &str) -> Result<Self, Problem> {
        let bad = |why| Problem::BadCidr {
            value: value.to_owned(),
            why,
        };
        if value.is_empty() {
            return Err(Problem::EmptyValue);
        }
        let (addr, prefix) = match value.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (value, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad("bad address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                let p: u8 = p.parse().map_err(|_| bad("bad prefix length"))?;
                if p > max {
                    return Err(bad(if max == 32 {
                        "an IPv4 prefix length is at most 32"
                    } else {
                        "an IPv6 prefix length is at most 128"
                    }));
                }
                p
            }
            Some(_) => return Err(bad("bad prefix length")),
        };
        Ok(Cidr {
            network: mask(addr, prefix),
            prefix,
        })
    }

    /// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) is compared as the IPv4 address it is.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.prefix) == self.network
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// A destination port, `1..=65535`, written as a decimal string as in Istio.
pub(crate) fn parse_port(value: &str) -> Result<u16, Problem> {
    let bad = || Problem::BadPort {
        value: value.to_owned(),
    };
    if value.is_empty() || value.len() > 5 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match value.parse::<u32>() {
        Ok(p @ 1..=65535) => u16::try_from(p).map_err(|_| bad()),
        _ => Err(bad()),
    }
}
