//! What a `Network` view allows: its rules, the chain of views from the
//! one granted at the top down to the one used, and the checks every
//! connection passes before and after its name is resolved.
//!
//! A view only narrows: a destination is allowed when every view of the
//! chain allows it. Names are checked against `hosts`, addresses given as
//! such against `ranges`, and every address a connection would go to,
//! however it was found (a pin, DNS, or the caller), against the address
//! classes: private, loopback and link-local addresses only where every
//! view allows them, unspecified, multicast and broadcast never. That last
//! check is what keeps a permitted name that resolves to 127.0.0.1 (DNS
//! rebinding) from reaching the host's own services.
//!
//! The capability that serves a view is `network.rs`; this module does no
//! I/O but DNS in [`View::resolve`].

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use ipnet::IpNet;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Most entries a rule list may have: rules come from guests.
pub const MAX_RULES: usize = 256;
/// Most addresses one name may be pinned to.
pub const MAX_PIN_ADDRESSES: usize = 16;
/// Longest host name (RFC 1035's 253 characters).
const MAX_NAME: usize = 253;

/// A name a view allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: every name.
    Any,
    /// One name.
    Exact(String),
    /// `*.DOMAIN`: every name below the domain, not the domain itself.
    Below(String),
}

impl HostPattern {
    fn matches(&self, name: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(n) => n == name,
            HostPattern::Below(domain) => name
                .strip_suffix(domain.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(n) => f.write_str(n),
            HostPattern::Below(d) => write!(f, "*.{d}"),
        }
    }
}

/// What a view allows (`NetRules` in the schema).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// Names a connection may be asked for.
    pub hosts: Vec<HostPattern>,
    /// Addresses a connection may be asked for.
    pub ranges: Vec<IpNet>,
    /// Ports, inclusive ranges; empty: every port.
    pub ports: Vec<(u16, u16)>,
    /// Private addresses may be reached.
    pub allow_private: bool,
    /// Loopback addresses may be reached.
    pub allow_loopback: bool,
    /// Link-local addresses may be reached.
    pub allow_link_local: bool,
    /// Connections open at once through this view; 0: no limit of its own.
    pub max_connections: u32,
    /// Names resolved without DNS.
    pub pins: Vec<(String, Vec<IpAddr>)>,
}

/// A rule that cannot be read.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum RuleError {
    /// A host pattern that is no name.
    #[error("{0:?} is not a host name or pattern (NAME, *.DOMAIN or *)")]
    BadHost(String),
    /// A range that is no CIDR or address.
    #[error("{0:?} is not an IP address or CIDR range")]
    BadRange(String),
    /// An address that is no IP address.
    #[error("{0:?} is not an IP address")]
    BadAddress(String),
    /// A port or port range that cannot be read.
    #[error("{0:?} is not a port or port range (N or N-M)")]
    BadPort(String),
    /// A term of `--net` that is none of the known ones.
    #[error("{0:?} is not a network rule (see `capsa run --help`)")]
    BadTerm(String),
    /// A number that cannot be read.
    #[error("{0:?} is not a number")]
    BadNumber(String),
    /// More entries than [`MAX_RULES`], or pin addresses than
    /// [`MAX_PIN_ADDRESSES`].
    #[error("too many {what}: {count} (at most {max})")]
    TooMany {
        /// What there are too many of.
        what: &'static str,
        /// How many were given.
        count: usize,
        /// The bound.
        max: usize,
    },
}

/// A name as views compare it: lower case, without a final dot; `None`
/// for text that is no host name (empty, too long, a label that is empty
/// or longer than 63, a character outside letters, digits, `-` and `_`).
pub fn normalize_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then_some(name)
}

impl HostPattern {
    /// Reads `NAME`, `*.DOMAIN` or `*`.
    pub fn parse(text: &str) -> Result<HostPattern, RuleError> {
        let bad = || RuleError::BadHost(text.to_string());
        if text == "*" {
            return Ok(HostPattern::Any);
        }
        match text.strip_prefix("*.") {
            Some(domain) => normalize_name(domain)
                .map(HostPattern::Below)
                .ok_or_else(bad),
            None if text.parse::<IpAddr>().is_ok() => Err(bad()),
            None => normalize_name(text).map(HostPattern::Exact).ok_or_else(bad),
        }
    }
}

/// Reads a CIDR range or a single address (a range of one).
pub fn parse_range(text: &str) -> Result<IpNet, RuleError> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| RuleError::BadRange(text.to_string()))
}

/// Reads `N` or `N-M`.
pub fn parse_ports(text: &str) -> Result<(u16, u16), RuleError> {
    let bad = || RuleError::BadPort(text.to_string());
    let port = |t: &str| t.trim().parse::<u16>().map_err(|_| bad());
    match text.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (port(a)?, port(b)?);
            if b < a {
                return Err(bad());
            }
            Ok((a, b))
        }
        None => port(text).map(|p| (p, p)),
    }
}

impl Rules {
    /// Everything but private, loopback and link-local addresses: every
    /// name, every address, every port.
    pub fn public_internet() -> Rules {
        Rules {
            hosts: vec![HostPattern::Any],
            ranges: vec![
                "0.0.0.0/0".parse().expect("a valid range"),
                "::/0".parse().expect("a valid range"),
            ],
            ..Rules::default()
        }
    }

    /// Reads the text of `--net`: terms separated by commas or spaces,
    /// each one of `NAME`, `*.DOMAIN` or `*` (hosts), an address or CIDR
    /// range, `port=N` or `port=N-M`, `loopback`, `private`,
    /// `link-local`, `max=N` (connections), `pin:NAME=IP[+IP...]`, and
    /// `any` (every name and public address). Repeated `--net` flags add
    /// up.
    pub fn parse_cli(text: &str) -> Result<Rules, RuleError> {
        let mut rules = Rules::default();
        for term in text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|t| !t.is_empty())
        {
            rules.add_cli_term(term)?;
        }
        rules.check_sizes()?;
        Ok(rules)
    }

    fn add_cli_term(&mut self, term: &str) -> Result<(), RuleError> {
        match term {
            "any" => {
                let any = Rules::public_internet();
                self.hosts.extend(any.hosts);
                self.ranges.extend(any.ranges);
            }
            "loopback" => self.allow_loopback = true,
            "private" => self.allow_private = true,
            "link-local" => self.allow_link_local = true,
            _ => {
                if let Some(ports) = term.strip_prefix("port=") {
                    self.ports.push(parse_ports(ports)?);
                } else if let Some(n) = term.strip_prefix("max=") {
                    self.max_connections =
                        n.parse().map_err(|_| RuleError::BadNumber(n.to_string()))?;
                } else if let Some(pin) = term.strip_prefix("pin:") {
                    let (name, addresses) = pin
                        .split_once('=')
                        .ok_or_else(|| RuleError::BadTerm(term.to_string()))?;
                    let addresses = addresses
                        .split('+')
                        .map(|a| a.parse().map_err(|_| RuleError::BadAddress(a.to_string())))
                        .collect::<Result<Vec<IpAddr>, _>>()?;
                    self.add_pin(name, addresses)?;
                } else if term.contains('/') || term.parse::<IpAddr>().is_ok() {
                    self.ranges.push(parse_range(term)?);
                } else if term.contains('=') || term.contains(':') {
                    return Err(RuleError::BadTerm(term.to_string()));
                } else {
                    self.hosts.push(HostPattern::parse(term)?);
                }
            }
        }
        Ok(())
    }

    /// Adds a pin of `name` to `addresses`.
    pub fn add_pin(&mut self, name: &str, addresses: Vec<IpAddr>) -> Result<(), RuleError> {
        let name = normalize_name(name).ok_or_else(|| RuleError::BadHost(name.to_string()))?;
        if addresses.is_empty() || addresses.len() > MAX_PIN_ADDRESSES {
            return Err(RuleError::TooMany {
                what: "addresses for one pinned name",
                count: addresses.len(),
                max: MAX_PIN_ADDRESSES,
            });
        }
        let addresses = addresses.into_iter().map(canonical).collect();
        self.pins.retain(|(n, _)| *n != name);
        self.pins.push((name, addresses));
        Ok(())
    }

    /// Refuses lists longer than [`MAX_RULES`].
    pub fn check_sizes(&self) -> Result<(), RuleError> {
        for (what, count) in [
            ("hosts", self.hosts.len()),
            ("ranges", self.ranges.len()),
            ("port ranges", self.ports.len()),
            ("pins", self.pins.len()),
        ] {
            if count > MAX_RULES {
                return Err(RuleError::TooMany {
                    what,
                    count,
                    max: MAX_RULES,
                });
            }
        }
        Ok(())
    }

    fn port_allowed(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|&(a, b)| (a..=b).contains(&port))
    }

    fn class_allowed(&self, class: AddressClass) -> bool {
        match class {
            AddressClass::Public => true,
            AddressClass::Private => self.allow_private,
            AddressClass::Loopback => self.allow_loopback,
            AddressClass::LinkLocal => self.allow_link_local,
            AddressClass::Never(_) => false,
        }
    }

    fn pin(&self, name: &str) -> Option<&[IpAddr]> {
        self.pins
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a.as_slice())
    }

    fn list<T: fmt::Display>(items: &[T]) -> String {
        if items.is_empty() {
            return "none".to_string();
        }
        let shown: Vec<String> = items.iter().take(8).map(|i| i.to_string()).collect();
        let more = items.len().saturating_sub(shown.len());
        match more {
            0 => shown.join(", "),
            n => format!("{} and {n} more", shown.join(", ")),
        }
    }

    fn ports_text(&self) -> String {
        let ranges: Vec<String> = self
            .ports
            .iter()
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        Self::list(&ranges)
    }
}

/// What kind of address an address is, for the checks every connection
/// passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressClass {
    /// Anything below.
    Public,
    /// 10/8, 172.16/12, 192.168/16, 100.64/10 (shared address space),
    /// fc00::/7.
    Private,
    /// 127/8, ::1.
    Loopback,
    /// 169.254/16, fe80::/10.
    LinkLocal,
    /// Never reachable: unspecified, multicast, broadcast, and 0/8.
    Never(&'static str),
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressClass::Public => "a public address",
            AddressClass::Private => "a private address",
            AddressClass::Loopback => "a loopback address",
            AddressClass::LinkLocal => "a link-local address",
            AddressClass::Never(what) => what,
        })
    }
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) as the IPv4 address
/// it is: checks see what the kernel connects to.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The class of `ip`.
pub fn classify(ip: IpAddr) -> AddressClass {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_unspecified() || o[0] == 0 {
                AddressClass::Never("an unspecified address")
            } else if v4.is_broadcast() {
                AddressClass::Never("the broadcast address")
            } else if v4.is_multicast() || o[0] >= 240 {
                AddressClass::Never("a multicast or reserved address")
            } else if v4.is_loopback() {
                AddressClass::Loopback
            } else if v4.is_link_local() {
                AddressClass::LinkLocal
            } else if v4.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
                AddressClass::Private
            } else {
                AddressClass::Public
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if v6.is_unspecified() {
                AddressClass::Never("an unspecified address")
            } else if v6.is_multicast() {
                AddressClass::Never("a multicast address")
            } else if v6.is_loopback() {
                AddressClass::Loopback
            } else if first & 0xffc0 == 0xfe80 {
                AddressClass::LinkLocal
            } else if first & 0xfe00 == 0xfc00 {
                AddressClass::Private
            } else {
                AddressClass::Public
            }
        }
    }
}

/// Why a view refused: the rule, and which view of the chain.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{rule} ({view})")]
pub struct Denial {
    /// The rule that refused, for people.
    pub rule: String,
    /// Which view: "the granted view", or "a view narrowed N times".
    pub view: String,
}

/// A view of the network, and the views it was narrowed from.
#[derive(Debug)]
pub struct View {
    rules: Rules,
    parent: Option<Arc<View>>,
    /// How many times the granted view was narrowed to make this one.
    depth: usize,
    /// Connections open through this view and the views made from it.
    open: AtomicU32,
    /// Cancelled when the view is revoked (its last holder let it go), and
    /// with it every view made from it: connections through them close.
    revoked: CancellationToken,
}

/// A connection's place in the limits of its views: holds one count in
/// each view of the chain until dropped.
#[derive(Debug)]
pub struct Seat {
    view: Arc<View>,
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut v = Some(&self.view);
        while let Some(view) = v {
            view.open.fetch_sub(1, Ordering::AcqRel);
            v = view.parent.as_ref();
        }
    }
}

impl View {
    /// The view granted at the top (from the command line or an
    /// embedder's config).
    pub fn root(rules: Rules) -> Arc<View> {
        Arc::new(View {
            rules,
            parent: None,
            depth: 0,
            open: AtomicU32::new(0),
            revoked: CancellationToken::new(),
        })
    }

    /// Its rules.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    fn chain(&self) -> impl Iterator<Item = &View> {
        std::iter::successors(Some(self), |v| v.parent.as_deref())
    }

    fn deny(&self, rule: String) -> Denial {
        let view = match self.depth {
            0 => "the granted view".to_string(),
            1 => "a view narrowed once".to_string(),
            n => format!("a view narrowed {n} times"),
        };
        Denial { rule, view }
    }

    /// A view of what this one and `rules` both allow. Each pin of `rules`
    /// must name a host this chain allows and give addresses each view
    /// above allows as addresses (its own pin of that name, or its ranges
    /// and classes): a pin never widens what a name reaches.
    pub fn restrict(self: &Arc<Self>, rules: Rules) -> Result<Arc<View>, Denial> {
        let child = View {
            rules,
            parent: Some(self.clone()),
            depth: self.depth + 1,
            open: AtomicU32::new(0),
            revoked: self.revoked.child_token(),
        };
        for (name, addresses) in &child.rules.pins {
            child.check_name(name)?;
            for view in child.chain().skip(1) {
                let pinned = view.rules.pin(name);
                for &ip in addresses {
                    if !pinned.is_some_and(|p| p.contains(&ip)) {
                        view.check_literal(ip)?;
                    }
                }
            }
        }
        Ok(Arc::new(child))
    }

    /// The token cancelled when this view, or one it was made from, is
    /// revoked.
    pub fn revoked(&self) -> &CancellationToken {
        &self.revoked
    }

    /// Revokes the view: the views made from it, and every connection
    /// through them, end.
    pub fn revoke(&self) {
        self.revoked.cancel();
    }

    /// Refuses a name a view of the chain does not list.
    pub fn check_name(&self, name: &str) -> Result<(), Denial> {
        for view in self.chain() {
            if !view.rules.hosts.iter().any(|h| h.matches(name)) {
                return Err(view.deny(format!(
                    "host {name:?} matches none of the allowed hosts ({})",
                    Rules::list(&view.rules.hosts)
                )));
            }
        }
        Ok(())
    }

    /// Refuses a port a view of the chain does not list.
    pub fn check_port(&self, port: u16) -> Result<(), Denial> {
        for view in self.chain() {
            if !view.rules.port_allowed(port) {
                return Err(view.deny(format!(
                    "port {port} is outside the allowed ports ({})",
                    view.rules.ports_text()
                )));
            }
        }
        Ok(())
    }

    /// Refuses an address a view of the chain does not allow as an
    /// address: outside its ranges, or of a class it does not allow.
    fn check_literal(&self, ip: IpAddr) -> Result<(), Denial> {
        let ip = canonical(ip);
        for view in self.chain() {
            if !view.rules.ranges.iter().any(|r| r.contains(&ip)) {
                return Err(view.deny(format!(
                    "address {ip} is in none of the allowed ranges ({})",
                    Rules::list(&view.rules.ranges)
                )));
            }
        }
        self.check_class(ip, None)
    }

    /// Refuses an address of a class a view of the chain does not allow;
    /// `name` is the name it was found for, for the message.
    pub fn check_class(&self, ip: IpAddr, name: Option<&str>) -> Result<(), Denial> {
        let ip = canonical(ip);
        let class = classify(ip);
        for view in self.chain() {
            if !view.rules.class_allowed(class) {
                let from = name.map(|n| format!(" (from {n:?})")).unwrap_or_default();
                let how = match class {
                    AddressClass::Never(_) => "never reachable".to_string(),
                    AddressClass::Private => "not allowed (allowPrivate)".to_string(),
                    AddressClass::Loopback => "not allowed (allowLoopback)".to_string(),
                    AddressClass::LinkLocal => "not allowed (allowLinkLocal)".to_string(),
                    AddressClass::Public => "not allowed".to_string(),
                };
                return Err(view.deny(format!("{ip}{from} is {class}: {how}")));
            }
        }
        Ok(())
    }

    /// What a connection to `host` may be made to before any lookup: an
    /// address allowed as such, or a name the chain allows (normalized).
    pub fn destination(&self, host: &str, port: u16) -> Result<Destination, DestinationError> {
        self.check_port(port)?;
        let literal = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = literal.parse::<IpAddr>() {
            self.check_literal(ip)?;
            return Ok(Destination::Address(canonical(ip)));
        }
        let name =
            normalize_name(host).ok_or_else(|| DestinationError::BadHost(host.to_string()))?;
        self.check_name(&name)?;
        Ok(Destination::Name(name))
    }

    /// The pin of `name` nearest this view, if any view of the chain pins
    /// it.
    pub fn pin(&self, name: &str) -> Option<Vec<IpAddr>> {
        self.chain()
            .find_map(|v| v.rules.pin(name))
            .map(<[_]>::to_vec)
    }

    /// The addresses to try for an allowed name: its pin, else DNS's
    /// answer, keeping only the addresses every view's classes allow.
    /// `Err` when none is left, with the denial of the first.
    pub async fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let found = match self.pin(name) {
            Some(pinned) => pinned,
            None => tokio::net::lookup_host((name, 0))
                .await
                .map_err(|e| ResolveError::Lookup(e.to_string()))?
                .map(|a| canonical(a.ip()))
                .collect(),
        };
        let mut allowed = Vec::new();
        let mut first_denial = None;
        for ip in found {
            match self.check_class(ip, Some(name)) {
                Ok(()) if !allowed.contains(&ip) => allowed.push(ip),
                Ok(()) => {}
                Err(d) => {
                    first_denial.get_or_insert(d);
                }
            }
        }
        match (allowed.is_empty(), first_denial) {
            (false, _) => Ok(allowed),
            (true, Some(d)) => Err(ResolveError::Denied(d)),
            (true, None) => Err(ResolveError::Lookup(format!("{name:?} has no address"))),
        }
    }

    /// A seat for one more connection, if no view of the chain is at its
    /// limit.
    pub fn seat(self: &Arc<Self>) -> Result<Seat, Denial> {
        let mut taken: Vec<&View> = Vec::new();
        for view in self.chain() {
            let max = view.rules.max_connections;
            let now = view.open.fetch_add(1, Ordering::AcqRel);
            taken.push(view);
            if max != 0 && now >= max {
                for v in taken {
                    v.open.fetch_sub(1, Ordering::AcqRel);
                }
                return Err(view.deny(format!("the limit of {max} open connections is reached")));
            }
        }
        Ok(Seat { view: self.clone() })
    }

    /// Connections open through this view and those made from it.
    pub fn open_connections(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }
}

/// Where a connection goes before lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// An address, allowed as such.
    Address(IpAddr),
    /// A name the chain allows, normalized.
    Name(String),
}

/// A destination refused before lookup.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DestinationError {
    /// No view rule allows it.
    #[error(transparent)]
    Denied(#[from] Denial),
    /// The host is neither an address nor a name.
    #[error("{0:?} is neither an IP address nor a host name")]
    BadHost(String),
}

/// A name that yields nothing to connect to.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ResolveError {
    /// Every address it has is refused by a view.
    #[error(transparent)]
    Denied(Denial),
    /// DNS failed or had no address.
    #[error("looking up {0}")]
    Lookup(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rules(text: &str) -> Rules {
        Rules::parse_cli(text).unwrap()
    }

    #[test]
    fn host_patterns_match_names_and_only_names_below_a_domain() {
        let below = HostPattern::parse("*.Example.COM.").unwrap();
        assert_eq!(below, HostPattern::Below("example.com".into()));
        assert!(below.matches("api.example.com"));
        assert!(below.matches("a.b.example.com"));
        assert!(!below.matches("example.com"));
        assert!(!below.matches("badexample.com"));
        assert!(HostPattern::parse("*").unwrap().matches("anything.test"));
        assert!(HostPattern::parse("api.test").unwrap().matches("api.test"));
        assert!(!HostPattern::parse("api.test")
            .unwrap()
            .matches("x.api.test"));
        for bad in [
            "",
            "*.",
            "a..b",
            "127.0.0.1",
            "::1",
            "a b",
            "x/y",
            &"a".repeat(64),
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn addresses_are_classified_as_the_kernel_would_route_them() {
        for (a, class) in [
            ("8.8.8.8", AddressClass::Public),
            ("10.1.2.3", AddressClass::Private),
            ("172.31.0.1", AddressClass::Private),
            ("192.168.1.1", AddressClass::Private),
            ("100.64.0.1", AddressClass::Private),
            ("100.128.0.1", AddressClass::Public),
            ("127.0.0.1", AddressClass::Loopback),
            ("127.8.9.10", AddressClass::Loopback),
            ("169.254.169.254", AddressClass::LinkLocal),
            ("::1", AddressClass::Loopback),
            ("::ffff:127.0.0.1", AddressClass::Loopback),
            ("::ffff:10.0.0.1", AddressClass::Private),
            ("fe80::1", AddressClass::LinkLocal),
            ("fd00::1", AddressClass::Private),
            ("2001:db8::1", AddressClass::Public),
        ] {
            assert_eq!(classify(ip(a)), class, "{a}");
        }
        for never in [
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "::",
            "ff02::1",
        ] {
            assert!(
                matches!(classify(ip(never)), AddressClass::Never(_)),
                "{never}"
            );
        }
    }

    #[test]
    fn the_command_line_form_reads_every_term() {
        let r = rules("api.test,*.example.com 10.0.0.0/8 192.0.2.7 port=80 port=8000-8100,loopback,private,link-local,max=3,pin:api.test=127.0.0.1+::1");
        assert_eq!(
            r.hosts,
            [
                HostPattern::Exact("api.test".into()),
                HostPattern::Below("example.com".into())
            ]
        );
        assert_eq!(
            r.ranges,
            [
                parse_range("10.0.0.0/8").unwrap(),
                parse_range("192.0.2.7/32").unwrap()
            ]
        );
        assert_eq!(r.ports, [(80, 80), (8000, 8100)]);
        assert!(r.allow_loopback && r.allow_private && r.allow_link_local);
        assert_eq!(r.max_connections, 3);
        assert_eq!(
            r.pins,
            [("api.test".to_string(), vec![ip("127.0.0.1"), ip("::1")])]
        );
        assert_eq!(rules("any").hosts, [HostPattern::Any]);
        for bad in [
            "port=99999",
            "port=9-3",
            "max=x",
            "pin:a.test",
            "pin:a.test=nope",
            "10.0.0.0/99",
            "what=ever",
            "a:b",
        ] {
            assert!(Rules::parse_cli(bad).is_err(), "{bad:?}");
        }
        assert!(Rules::parse_cli(&"a.test,".repeat(MAX_RULES + 1)).is_err());
    }

    #[test]
    fn names_ports_and_addresses_are_checked_in_every_view() {
        let root = View::root(rules("*.test,10.0.0.0/8,port=80-90,private"));
        assert!(root.destination("api.test", 80).is_ok());
        assert!(root.destination("10.1.1.1", 85).is_ok());
        let e = root.destination("api.test", 91).unwrap_err().to_string();
        assert!(
            e.contains("port 91") && e.contains("80-90") && e.contains("granted view"),
            "{e}"
        );
        let e = root
            .destination("evil.example", 80)
            .unwrap_err()
            .to_string();
        assert!(e.contains("evil.example") && e.contains("*.test"), "{e}");
        let e = root.destination("11.0.0.1", 80).unwrap_err().to_string();
        assert!(e.contains("11.0.0.1") && e.contains("10.0.0.0/8"), "{e}");

        let child = root.restrict(rules("api.test,port=80")).unwrap();
        assert!(child.destination("api.test", 80).is_ok());
        let e = child.destination("web.test", 80).unwrap_err().to_string();
        assert!(e.contains("narrowed once"), "{e}");
        let e = child.destination("api.test", 85).unwrap_err().to_string();
        assert!(e.contains("narrowed once"), "{e}");
        // A child cannot widen: a port or name its parent refuses stays
        // refused.
        let wide = root
            .restrict(rules("*,port=1-65535,0.0.0.0/0,loopback"))
            .unwrap();
        assert!(wide.destination("evil.example", 80).is_err());
        assert!(wide.destination("api.test", 22).is_err());
        let e = wide.destination("127.0.0.1", 80).unwrap_err().to_string();
        assert!(e.contains("granted view"), "{e}");
        assert!(matches!(
            root.destination("not a name", 80),
            Err(DestinationError::BadHost(_))
        ));
    }

    #[test]
    fn an_address_class_refused_anywhere_is_refused_even_through_a_name() {
        let root = View::root(rules(
            "*,0.0.0.0/0,pin:local.test=127.0.0.1,pin:mixed.test=127.0.0.1+192.0.2.1",
        ));
        let e = root
            .check_class(ip("127.0.0.1"), Some("local.test"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("loopback") && e.contains("local.test"), "{e}");
        assert!(root.check_class(ip("::ffff:127.0.0.1"), None).is_err());
        assert!(root.destination("127.0.0.1", 80).is_err());
        assert!(root.destination("[::1]", 80).is_err());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(matches!(
            rt.block_on(root.resolve("local.test")),
            Err(ResolveError::Denied(_))
        ));
        // What is left of a name after the refused addresses go.
        assert_eq!(
            rt.block_on(root.resolve("mixed.test")).unwrap(),
            [ip("192.0.2.1")]
        );
        let open = View::root(rules("*,loopback,pin:local.test=127.0.0.1"));
        assert_eq!(
            rt.block_on(open.resolve("local.test")).unwrap(),
            [ip("127.0.0.1")]
        );
    }

    #[test]
    fn a_pin_never_widens_what_a_name_reaches() {
        let root = View::root(rules("*.test,192.0.2.0/24,pin:api.test=192.0.2.1"));
        // To an address the root allows as an address: fine.
        let child = root
            .restrict(rules("api.test,pin:api.test=192.0.2.9"))
            .unwrap();
        assert_eq!(child.pin("api.test").unwrap(), [ip("192.0.2.9")]);
        // To one it pinned: fine.
        assert!(root
            .restrict(rules("*.test,pin:api.test=192.0.2.1"))
            .is_ok());
        // Elsewhere: refused.
        let e = root
            .restrict(rules("*.test,pin:api.test=198.51.100.1"))
            .unwrap_err();
        assert!(e.rule.contains("198.51.100.1"), "{e}");
        // A name the chain does not allow cannot be pinned.
        assert!(root
            .restrict(rules("*.test,pin:api.other=192.0.2.1"))
            .is_err());
        // The root's pin holds below it.
        let grandchild = root
            .restrict(rules("*.test"))
            .unwrap()
            .restrict(rules("api.test"))
            .unwrap();
        assert_eq!(grandchild.pin("api.test").unwrap(), [ip("192.0.2.1")]);
    }

    #[test]
    fn connection_limits_hold_in_every_view_and_free_on_drop() {
        let root = View::root(rules("*,max=3"));
        let child = root.restrict(rules("*,max=2")).unwrap();
        let a = child.seat().unwrap();
        let b = child.seat().unwrap();
        let e = child.seat().unwrap_err();
        assert!(
            e.rule.contains("limit of 2") && e.view.contains("narrowed once"),
            "{e}"
        );
        let c = root.seat().unwrap();
        assert!(root.seat().unwrap_err().rule.contains("limit of 3"));
        // A refused seat took nothing.
        assert_eq!((root.open_connections(), child.open_connections()), (3, 2));
        drop(a);
        assert_eq!((root.open_connections(), child.open_connections()), (2, 1));
        let d = child.seat().unwrap();
        drop((b, c, d));
        assert_eq!((root.open_connections(), child.open_connections()), (0, 0));
    }

    #[test]
    fn revoking_a_view_revokes_the_views_made_from_it() {
        let root = View::root(rules("*"));
        let child = root.restrict(rules("*")).unwrap();
        let grandchild = child.restrict(rules("*")).unwrap();
        child.revoke();
        assert!(grandchild.revoked().is_cancelled());
        assert!(!root.revoked().is_cancelled());
    }
}
