//! Who may take a turn at authenticating with `capsa serve`, and how often.
//!
//! A connection that has not authenticated yet holds a *pending* slot, not
//! one of the served slots (`--max-connections`): an unauthenticated peer
//! can never keep an authenticated client out. Pending slots are bounded
//! overall and per source address; when either bound is reached, the
//! oldest pending handshake of a source whose handshake failed, timed out
//! or was dropped in the last minute goes first, then the oldest whose
//! peer has sent nothing yet (of that address, or overall), else the
//! oldest, never the newcomer, who may be the legitimate client (sshd's
//! `MaxStartups` drops at random; a client that means to authenticate
//! speaks at once and succeeds, so a flood only ever pushes out itself).
//! Every pending slot is also bounded in time by the handshake deadline.
//!
//! Failed tokens (and garbage where a token belongs) slow their address
//! down: after each failure that address's next token is checked no
//! earlier than a backoff that doubles with each failure, and tokens from
//! it are checked one at a time, so guessing in parallel gains nothing.
//! A token that would have to wait past the handshake deadline is refused
//! unchecked. IPv6 addresses count by their /64, which one host usually
//! holds whole.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// Handshakes pending at once, all addresses together.
pub const MAX_PENDING: usize = 128;
/// Handshakes pending at once from one address (not the local Unix
/// socket's, whose peers are all this user).
pub const MAX_PENDING_PER_ADDRESS: usize = 16;
/// The wait after an address's first failed token; doubled per failure.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between two tokens from one address.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An address with no failure for this long starts over.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Addresses remembered for their failures; past this the one whose last
/// failure is oldest is forgotten.
pub const MAX_REMEMBERED: usize = 4096;

/// Where a connection comes from, as admission counts it: an IPv4 address,
/// an IPv6 /64, or the local (Unix socket) peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Local,
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let mut prefix = [0; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    Source::V6Prefix(prefix)
                }
            },
        }
    }
}

/// The pending handshakes: bounded, the least advanced and then oldest
/// dropped to make room.
#[derive(Default)]
pub struct Pending {
    /// By arrival: each entry's source, whether its peer has sent anything
    /// yet, and the way to drop it.
    queue: BTreeMap<u64, Entry>,
    per_source: HashMap<Source, usize>,
    next: u64,
    /// Sources whose handshakes failed or were dropped lately, and when:
    /// theirs go first when room is needed, so a flood's own addresses
    /// make room for each other, not for a client that authenticates.
    flagged: HashMap<Source, Instant>,
}

/// How long a failed or dropped handshake puts its source first in line
/// to be dropped.
pub const FLAGGED_FOR: Duration = Duration::from_secs(60);

struct Entry {
    source: Source,
    /// The peer has sent its first bytes (a TLS ClientHello, a token).
    /// A silent peer goes first when room is needed: a client that
    /// means to authenticate speaks at once, an idle flood never does.
    spoke: bool,
    /// The connection's socket (a duplicate descriptor), to see bytes
    /// that arrived before its handshake task ran: under a flood the
    /// accept loop admits many connections between two turns of it.
    socket: Option<OwnedFd>,
    drop: oneshot::Sender<()>,
}

impl Entry {
    fn has_spoken(&self) -> bool {
        self.spoke
            || self
                .socket
                .as_ref()
                .is_some_and(|fd| rustix::io::ioctl_fionread(fd).is_ok_and(|n| n > 0))
    }
}

/// A pending slot. Resolves [`Ticket::dropped`] when admission drops it
/// to make room; gives the slot back when dropped itself.
pub struct Ticket {
    id: u64,
    pending: std::rc::Weak<std::cell::RefCell<Pending>>,
    dropped: Option<oneshot::Receiver<()>>,
}

impl Pending {
    /// A slot for a connection from `source`, dropping the oldest pending
    /// handshake of `source`, or else the oldest of all, if a bound is
    /// reached.
    pub fn admit(
        this: &std::rc::Rc<std::cell::RefCell<Pending>>,
        source: Source,
        socket: Option<OwnedFd>,
    ) -> Ticket {
        let mut pending = this.borrow_mut();
        let from_source = pending.per_source.get(&source).copied().unwrap_or(0);
        if source != Source::Local && from_source >= MAX_PENDING_PER_ADDRESS {
            if let Some(id) = pending.first_to_go(|e| e.source == source) {
                pending.drop_entry(id);
            }
        }
        if pending.queue.len() >= MAX_PENDING {
            if let Some(id) = pending.first_to_go(|_| true) {
                pending.drop_entry(id);
            }
        }
        let id = pending.next;
        pending.next += 1;
        let (tx, rx) = oneshot::channel();
        pending.queue.insert(
            id,
            Entry {
                source,
                spoke: false,
                socket,
                drop: tx,
            },
        );
        *pending.per_source.entry(source).or_default() += 1;
        Ticket {
            id,
            pending: std::rc::Rc::downgrade(this),
            dropped: Some(rx),
        }
    }

    /// Handshakes pending now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Which of the entries `among` to drop for room, oldest first within
    /// each rank: a flagged source's silent peer, then a flagged source's
    /// peer that spoke, then a silent peer, then any. A client whose
    /// address was flagged once (one of its handshakes dropped at the
    /// start of a flood) and that has sent its hello still goes after
    /// every idle peer of the flood, which are flagged and silent.
    fn first_to_go(&self, among: impl Fn(&Entry) -> bool) -> Option<u64> {
        let now = Instant::now();
        let flagged = |source: &Source| {
            self.flagged
                .get(source)
                .is_some_and(|at| now.saturating_duration_since(*at) < FLAGGED_FOR)
        };
        // The first entry of each rank, by arrival.
        let mut ranks: [Option<u64>; 4] = [None; 4];
        for (id, entry) in self.queue.iter().filter(|(_, e)| among(e)) {
            let rank = match (flagged(&entry.source), entry.has_spoken()) {
                (true, false) => 0,
                (true, true) => 1,
                (false, false) => 2,
                (false, true) => 3,
            };
            ranks[rank].get_or_insert(*id);
            if rank == 0 {
                break;
            }
        }
        ranks.into_iter().flatten().next()
    }

    /// Takes `source` off the flagged list: a handshake from it has just
    /// authenticated, so it is a client, not a flood.
    pub fn unflag(&mut self, source: Source) {
        self.flagged.remove(&source);
    }

    /// Puts `source` first in line to be dropped for a while: one of its
    /// handshakes failed, timed out or was dropped for room. The local
    /// socket's peers are all this user, and never flagged.
    pub fn flag(&mut self, source: Source) {
        if source == Source::Local {
            return;
        }
        if !self.flagged.contains_key(&source) && self.flagged.len() >= MAX_REMEMBERED {
            let forget = self
                .flagged
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(source, _)| *source);
            if let Some(forget) = forget {
                self.flagged.remove(&forget);
            }
        }
        self.flagged.insert(source, Instant::now());
    }

    /// Removes `id`, telling its holder if it is being dropped for room.
    fn drop_entry(&mut self, id: u64) {
        if let Some(entry) = self.remove(id) {
            tracing::debug!(
                "pending handshake from {:?} dropped to make room",
                entry.source
            );
            self.flag(entry.source);
            let _ = entry.drop.send(());
        }
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.queue.remove(&id)?;
        if let Some(n) = self.per_source.get_mut(&entry.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&entry.source);
            }
        }
        Some(entry)
    }
}

/// Tells admission that a pending handshake's peer has spoken.
#[derive(Clone)]
pub struct Spoke {
    id: u64,
    pending: std::rc::Weak<std::cell::RefCell<Pending>>,
}

impl Spoke {
    pub fn now(&self) {
        if let Some(pending) = self.pending.upgrade() {
            if let Some(entry) = pending.borrow_mut().queue.get_mut(&self.id) {
                entry.spoke = true;
            }
        }
    }
}

impl Ticket {
    /// The handle that marks this handshake's peer as having spoken.
    pub fn spoke(&self) -> Spoke {
        Spoke {
            id: self.id,
            pending: self.pending.clone(),
        }
    }

    /// [`Ticket::dropped`] of `ticket`, or never without one.
    pub async fn dropped_if_any(ticket: Option<&mut Ticket>) {
        match ticket {
            Some(ticket) => ticket.dropped().await,
            None => std::future::pending().await,
        }
    }

    /// Resolves when admission drops this handshake to make room.
    pub async fn dropped(&mut self) {
        match self.dropped.as_mut() {
            // A closed channel means the slot is gone too.
            Some(rx) => {
                let _ = rx.await;
            }
            None => std::future::pending().await,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(pending) = self.pending.upgrade() {
            pending.borrow_mut().remove(self.id);
        }
    }
}

/// Failed tokens per source, and when each source's next token may be
/// checked.
#[derive(Default)]
pub struct Penalties {
    by_source: HashMap<Source, Strikes>,
}

#[derive(Clone, Copy)]
struct Strikes {
    failures: u32,
    last_failure: Instant,
    /// No token from this source is checked before this.
    next_check: Instant,
}

/// The wait after `failures` failed tokens.
pub fn backoff(failures: u32) -> Duration {
    match failures {
        0 => Duration::ZERO,
        n => FIRST_BACKOFF
            .saturating_mul(1u32.checked_shl(n - 1).unwrap_or(u32::MAX))
            .min(MAX_BACKOFF),
    }
}

impl Penalties {
    /// Books a check of a token from `source` at `now`: how long it must
    /// wait first. Checks from a source with failures are spaced by its
    /// backoff, so parallel connections queue behind each other.
    pub fn reserve(&mut self, source: Source, now: Instant) -> Duration {
        let Some(strikes) = self.by_source.get_mut(&source) else {
            return Duration::ZERO;
        };
        if now.saturating_duration_since(strikes.last_failure) >= FORGET_AFTER {
            self.by_source.remove(&source);
            return Duration::ZERO;
        }
        let at = strikes.next_check.max(now);
        strikes.next_check = at + backoff(strikes.failures);
        at - now
    }

    /// Gives back a booking that was not used (the token was refused
    /// unchecked), so the source's queue does not grow with refusals.
    pub fn unreserve(&mut self, source: Source, now: Instant) {
        if let Some(strikes) = self.by_source.get_mut(&source) {
            let step = backoff(strikes.failures);
            strikes.next_check = strikes.next_check.checked_sub(step).unwrap_or(now).max(now);
        }
    }

    /// A token from `source` was wrong (or no token at all).
    pub fn failed(&mut self, source: Source, now: Instant) {
        if !self.by_source.contains_key(&source) && self.by_source.len() >= MAX_REMEMBERED {
            let forget = self
                .by_source
                .iter()
                .min_by_key(|(_, s)| s.last_failure)
                .map(|(source, _)| *source);
            if let Some(forget) = forget {
                self.by_source.remove(&forget);
            }
        }
        let strikes = self.by_source.entry(source).or_insert(Strikes {
            failures: 0,
            last_failure: now,
            next_check: now,
        });
        if now.saturating_duration_since(strikes.last_failure) >= FORGET_AFTER {
            strikes.failures = 0;
        }
        strikes.failures = strikes.failures.saturating_add(1);
        strikes.last_failure = now;
        strikes.next_check = strikes.next_check.max(now + backoff(strikes.failures));
    }

    /// Sources remembered for their failures.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_source.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.by_source.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::rc::Rc;

    fn v4(last: u8) -> Source {
        Source::of(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)))
    }

    fn dropped(ticket: &mut Ticket) -> bool {
        matches!(
            ticket.dropped.as_mut().map(|rx| rx.try_recv()),
            Some(Ok(()))
        )
    }

    #[test]
    fn sources_count_v6_by_its_64() {
        let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(a.into()), Source::of(b.into()));
        assert_ne!(Source::of(a.into()), Source::of(c.into()));
        let mapped: Ipv6Addr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(Source::of(mapped.into()), v4(1));
    }

    #[test]
    fn one_address_full_drops_its_own_oldest() {
        let pending = Rc::new(RefCell::new(Pending::default()));
        let mut theirs: Vec<Ticket> = (0..MAX_PENDING_PER_ADDRESS)
            .map(|_| Pending::admit(&pending, v4(1), None))
            .collect();
        let mut other = Pending::admit(&pending, v4(2), None);
        let mut newest = Pending::admit(&pending, v4(1), None);
        assert!(dropped(&mut theirs[0]), "the address's oldest goes");
        assert!(theirs[1..].iter_mut().all(|t| !dropped(t)));
        assert!(!dropped(&mut other) && !dropped(&mut newest));
        assert_eq!(pending.borrow().len(), MAX_PENDING_PER_ADDRESS + 1);
    }

    #[test]
    fn silent_peers_go_before_those_that_spoke() {
        let pending = Rc::new(RefCell::new(Pending::default()));
        let mut client = Pending::admit(&pending, v4(200), None);
        client.spoke().now();
        let mut idle: Vec<Ticket> = (1..MAX_PENDING)
            .map(|i| Pending::admit(&pending, v4((i % 199) as u8), None))
            .collect();
        // Full: each newcomer pushes out the oldest silent peer, never
        // the older client that has spoken.
        let mut newcomers = Vec::new();
        for (i, older) in idle.iter_mut().enumerate().take(10) {
            newcomers.push(Pending::admit(
                &pending,
                Source::V4([10, 0, 1, i as u8]),
                None,
            ));
            assert!(dropped(older), "{i}");
        }
        assert!(newcomers.iter_mut().all(|t| !dropped(t)));
        assert!(!dropped(&mut client));
    }

    #[test]
    fn a_flagged_client_that_spoke_goes_after_the_silent_flood() {
        let pending = Rc::new(RefCell::new(Pending::default()));
        // A client whose address was flagged (a handshake of its dropped
        // when the flood began) and that has sent its hello.
        let mut client = Pending::admit(&pending, v4(200), None);
        client.spoke().now();
        pending.borrow_mut().flag(v4(200));
        let mut idle: Vec<Ticket> = (1..MAX_PENDING)
            .map(|i| Pending::admit(&pending, v4((i % 199) as u8), None))
            .collect();
        for i in 1..199 {
            pending.borrow_mut().flag(v4(i));
        }
        let mut newcomers = Vec::new();
        for (i, older) in idle.iter_mut().enumerate().take(20) {
            newcomers.push(Pending::admit(
                &pending,
                Source::V4([10, 0, 1, i as u8]),
                None,
            ));
            assert!(dropped(older), "{i}");
            assert!(!dropped(&mut client), "{i}");
        }
    }

    #[test]
    fn a_source_that_authenticates_is_no_longer_flagged() {
        let pending = Rc::new(RefCell::new(Pending::default()));
        let mut others: Vec<Ticket> = (1..MAX_PENDING)
            .map(|i| Pending::admit(&pending, Source::V4([10, 0, 2, i as u8]), None))
            .collect();
        pending.borrow_mut().flag(v4(7));
        pending.borrow_mut().unflag(v4(7));
        let mut client = Pending::admit(&pending, v4(7), None);
        for t in others.iter().chain([&client]) {
            t.spoke().now();
        }
        // Everyone spoke and nobody is flagged: the oldest goes, not the
        // client (which would go first if it were still flagged).
        let _newcomer = Pending::admit(&pending, v4(9), None);
        assert!(dropped(&mut others[0]));
        assert!(!dropped(&mut client));
    }

    #[test]
    fn flagged_sources_go_first_even_when_they_spoke() {
        let pending = Rc::new(RefCell::new(Pending::default()));
        let mut client = Pending::admit(&pending, v4(200), None);
        let mut flood: Vec<Ticket> = (1..MAX_PENDING)
            .map(|i| Pending::admit(&pending, v4((i % 199) as u8), None))
            .collect();
        for ticket in &flood {
            ticket.spoke().now();
        }
        for i in 1..199 {
            pending.borrow_mut().flag(v4(i));
        }
        // The client is the oldest and silent, yet the flood's flagged
        // sources make room first.
        let _newcomer = Pending::admit(&pending, v4(201), None);
        assert!(dropped(&mut flood[0]));
        assert!(!dropped(&mut client));
        // The local socket is never flagged.
        pending.borrow_mut().flag(Source::Local);
        assert!(!pending.borrow().flagged.contains_key(&Source::Local));
    }

    #[test]
    fn the_local_socket_has_no_per_address_bound() {
        let pending = Rc::new(RefCell::new(Pending::default()));
        let mut local: Vec<Ticket> = (0..MAX_PENDING_PER_ADDRESS * 2)
            .map(|_| Pending::admit(&pending, Source::Local, None))
            .collect();
        assert!(local.iter_mut().all(|t| !dropped(t)));
    }

    #[test]
    fn all_full_drops_the_oldest_not_the_newcomer() {
        let pending = Rc::new(RefCell::new(Pending::default()));
        let mut tickets: Vec<Ticket> = (0..MAX_PENDING)
            .map(|i| Pending::admit(&pending, v4((i % 250) as u8), None))
            .collect();
        assert_eq!(pending.borrow().len(), MAX_PENDING);
        let mut newcomer = Pending::admit(&pending, v4(251), None);
        assert!(dropped(&mut tickets[0]));
        assert!(!dropped(&mut newcomer));
        assert_eq!(pending.borrow().len(), MAX_PENDING);
        // Slots come back when their handshakes end.
        drop(tickets);
        assert_eq!(pending.borrow().len(), 1);
        drop(newcomer);
        assert!(pending.borrow().is_empty());
        assert!(pending.borrow().per_source.is_empty());
    }

    #[test]
    fn backoff_doubles_and_saturates() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), FIRST_BACKOFF);
        assert_eq!(backoff(3), FIRST_BACKOFF * 4);
        assert_eq!(backoff(40), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn failures_slow_their_source_and_no_other() {
        let mut penalties = Penalties::default();
        let t0 = Instant::now();
        assert_eq!(penalties.reserve(v4(1), t0), Duration::ZERO);
        penalties.failed(v4(1), t0);
        penalties.failed(v4(1), t0);
        // Two failures: the next check waits 500 ms, and the one after
        // that queues behind it.
        assert_eq!(penalties.reserve(v4(1), t0), FIRST_BACKOFF * 2);
        assert_eq!(penalties.reserve(v4(1), t0), FIRST_BACKOFF * 4);
        penalties.unreserve(v4(1), t0);
        assert_eq!(penalties.reserve(v4(1), t0), FIRST_BACKOFF * 4);
        assert_eq!(penalties.reserve(v4(2), t0), Duration::ZERO);
        // Forgotten after a quiet while.
        let later = t0 + FORGET_AFTER + Duration::from_secs(1);
        assert_eq!(penalties.reserve(v4(1), later), Duration::ZERO);
        assert!(penalties.is_empty());
    }

    #[test]
    fn remembered_sources_are_bounded() {
        let mut penalties = Penalties::default();
        let t0 = Instant::now();
        for i in 0..MAX_REMEMBERED as u32 + 10 {
            let source = Source::V4(i.to_be_bytes());
            penalties.failed(source, t0 + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(penalties.len(), MAX_REMEMBERED);
        // The earliest were forgotten, the latest are kept.
        assert_eq!(
            penalties.reserve(Source::V4(0u32.to_be_bytes()), t0),
            Duration::ZERO
        );
    }
}
