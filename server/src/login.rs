//! The server's Login/Password, as HTTP basic authorization: one parser and
//! one check for the management port and the REST views, with a throttle per
//! peer address so the password cannot be guessed at network speed. Every
//! failure is logged with the peer and the login given, never the password.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

/// Failures a peer may make before its attempts are refused for a while.
pub const FREE_FAILURES: u32 = 5;
/// The first refusal window; each further failure doubles it.
pub const FIRST_BLOCK: Duration = Duration::from_secs(1);
/// The longest refusal window: at most one guess per peer in this time.
pub const MAX_BLOCK: Duration = Duration::from_secs(300);
/// A peer with no failure for this long starts afresh.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Peers remembered at most; beyond, new peers share one entry (so an
/// attacker with many addresses cannot grow the table or escape the limit).
const MAX_PEERS: usize = 10_000;
/// Logged logins are cut to this many characters.
const LOGGED_LOGIN_CHARS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("this server has no Login/Password configured")]
    NotConfigured,
    #[error("no credentials given")]
    Missing,
    #[error("malformed authorization header")]
    Malformed,
    #[error("wrong login or password")]
    Wrong,
    #[error("too many failed logins from this address; try again in {} s", retry_after.as_secs().max(1))]
    Throttled { retry_after: Duration },
}

/// Login and password of an `Authorization: Basic …` header value.
pub fn parse_basic(header: &str) -> Result<(String, String), LoginError> {
    use headers::Header;
    use headers::authorization::{Authorization, Basic};
    let value = headers::HeaderValue::from_str(header).map_err(|_| LoginError::Malformed)?;
    let basic =
        Authorization::<Basic>::decode(&mut std::iter::once(&value)).map_err(|_| LoginError::Malformed)?;
    Ok((basic.username().to_string(), basic.password().to_string()))
}

/// Compares secrets without leaking through timing where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    // Compare digests, so neither length nor content leaks through timing.
    blake3::hash(a.as_bytes()) == blake3::hash(b.as_bytes())
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    blocked_until: Option<Instant>,
}

/// Failed logins per peer.
#[derive(Debug, Default)]
pub struct Throttle {
    peers: Mutex<HashMap<IpAddr, Failures>>,
}

/// The bucket a peer's failures count in: its address, or for IPv6 its /64
/// (one host usually holds a whole /64 and could rotate through it).
fn bucket(peer: Option<SocketAddr>) -> IpAddr {
    match peer.map(|p| p.ip()) {
        Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        Some(IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        Some(ip) => ip,
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    }
}

impl Throttle {
    fn peers(&self) -> MutexGuard<'_, HashMap<IpAddr, Failures>> {
        self.peers.lock()
    }

    /// `Some(time left)` while `peer`'s attempts are refused.
    pub fn blocked(&self, peer: IpAddr, now: Instant) -> Option<Duration> {
        let peers = self.peers();
        let until = peers.get(&peer)?.blocked_until?;
        (until > now).then(|| until - now)
    }

    /// Counts a failure; the refusal window it opens, if any.
    pub fn fail(&self, peer: IpAddr, now: Instant) -> Option<Duration> {
        let mut peers = self.peers();
        if peers.len() >= MAX_PEERS && !peers.contains_key(&peer) {
            peers.retain(|_, f| now.saturating_duration_since(f.last) < FORGET_AFTER);
        }
        let key = if peers.len() >= MAX_PEERS && !peers.contains_key(&peer) {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            peer
        };
        let f = peers.entry(key).or_insert(Failures {
            count: 0,
            last: now,
            blocked_until: None,
        });
        if now.saturating_duration_since(f.last) >= FORGET_AFTER {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        let over = f.count.checked_sub(FREE_FAILURES + 1)?;
        // 1 s, 2 s, 4 s … up to MAX_BLOCK.
        let window = FIRST_BLOCK
            .checked_mul(1u32.checked_shl(over).unwrap_or(u32::MAX))
            .unwrap_or(MAX_BLOCK)
            .min(MAX_BLOCK);
        f.blocked_until = Some(now + window);
        Some(window)
    }

    /// A good login: the peer starts afresh.
    pub fn succeed(&self, peer: IpAddr) {
        self.peers().remove(&peer);
    }
}

/// Checks an `Authorization` header against the configured Login/Password
/// (`None` when none is configured) for a caller at `peer`, reached through
/// `port` (for the log). The login on success.
pub fn check(
    throttle: &Throttle,
    configured: Option<&(String, String)>,
    peer: Option<SocketAddr>,
    header: Option<&str>,
    port: &'static str,
) -> Result<String, LoginError> {
    let Some((login, password)) = configured else {
        return Err(LoginError::NotConfigured);
    };
    let header = header.ok_or(LoginError::Missing)?;
    let key = bucket(peer);
    let shown_peer = peer.map_or_else(|| "unknown".to_string(), |p| p.ip().to_string());
    let now = Instant::now();
    // Refused unchecked while blocked, so even the right password tells the
    // guesser nothing until the window ends.
    if let Some(retry_after) = throttle.blocked(key, now) {
        tracing::debug!(peer = %shown_peer, port, "login refused: too many failures");
        return Err(LoginError::Throttled { retry_after });
    }
    let (given, error) = match parse_basic(header) {
        // Both compared, so timing does not tell which one was wrong.
        Ok((l, p)) if same_secret(&l, login) & same_secret(&p, password) => {
            throttle.succeed(key);
            return Ok(l);
        }
        Ok((l, _)) => (l, LoginError::Wrong),
        Err(e) => (String::new(), e),
    };
    let shown: String = given.chars().take(LOGGED_LOGIN_CHARS).collect();
    tracing::warn!(peer = %shown_peer, login = ?shown, port, "failed login: {error}");
    if let Some(window) = throttle.fail(key, now) {
        tracing::warn!(
            peer = %shown_peer,
            port,
            "too many failed logins: this address is refused for {} s",
            window.as_secs()
        );
    }
    Err(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn header(login: &str, password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{login}:{password}"))
        )
    }

    #[test]
    fn basic_headers_parse_or_are_malformed() {
        assert_eq!(
            parse_basic(&header("admin", "a:b")),
            Ok(("admin".into(), "a:b".into()))
        );
        assert_eq!(parse_basic("Bearer x"), Err(LoginError::Malformed));
        assert_eq!(parse_basic("Basic !!!"), Err(LoginError::Malformed));
        let no_colon = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("admin")
        );
        assert_eq!(parse_basic(&no_colon), Err(LoginError::Malformed));
    }

    #[test]
    fn failures_open_a_growing_window_and_success_resets() {
        let t = Throttle::default();
        let peer: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        let now = Instant::now();
        for _ in 0..FREE_FAILURES {
            assert_eq!(t.fail(peer, now), None);
        }
        assert_eq!(t.fail(peer, now), Some(FIRST_BLOCK));
        assert!(t.blocked(peer, now).is_some());
        assert_eq!(t.blocked(other, now), None, "per peer");
        let later = now + FIRST_BLOCK;
        assert_eq!(t.blocked(peer, later), None, "the window ends");
        assert_eq!(t.fail(peer, later), Some(FIRST_BLOCK * 2));
        assert_eq!(t.fail(peer, later), Some(FIRST_BLOCK * 4));
        for _ in 0..40 {
            t.fail(peer, later);
        }
        assert_eq!(t.fail(peer, later), Some(MAX_BLOCK), "capped");
        t.succeed(peer);
        assert_eq!(t.blocked(peer, later), None);
        assert_eq!(t.fail(peer, later), None, "a good login starts afresh");
        // Long quiet: forgotten.
        for _ in 0..FREE_FAILURES {
            t.fail(other, now);
        }
        assert_eq!(t.fail(other, now + FORGET_AFTER), None);
    }

    #[test]
    fn ipv6_peers_count_per_64() {
        let a: SocketAddr = "[2001:db8:1:2:aaaa::1]:5000".parse().unwrap();
        let b: SocketAddr = "[2001:db8:1:2:bbbb::2]:6000".parse().unwrap();
        let c: SocketAddr = "[2001:db8:1:3::1]:6000".parse().unwrap();
        assert_eq!(bucket(Some(a)), bucket(Some(b)));
        assert_ne!(bucket(Some(a)), bucket(Some(c)));
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:1".parse().unwrap();
        assert_eq!(bucket(Some(mapped)), IpAddr::from([10, 0, 0, 1]));
    }

    #[test]
    fn the_check_throttles_and_names_each_outcome() {
        let t = Throttle::default();
        let creds = ("admin".to_string(), "s3cret".to_string());
        let peer: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let elsewhere: SocketAddr = "192.0.2.8:4000".parse().unwrap();
        let good = header("admin", "s3cret");
        let bad = header("admin", "guess");
        assert_eq!(
            check(&t, None, Some(peer), Some(&good), "test"),
            Err(LoginError::NotConfigured)
        );
        assert_eq!(
            check(&t, Some(&creds), Some(peer), None, "test"),
            Err(LoginError::Missing)
        );
        assert_eq!(
            check(&t, Some(&creds), Some(peer), Some(&good), "test"),
            Ok("admin".into())
        );
        for _ in 0..=FREE_FAILURES {
            assert_eq!(
                check(&t, Some(&creds), Some(peer), Some(&bad), "test"),
                Err(LoginError::Wrong)
            );
        }
        assert!(matches!(
            check(&t, Some(&creds), Some(peer), Some(&good), "test"),
            Err(LoginError::Throttled { .. })
        ));
        assert_eq!(
            check(&t, Some(&creds), Some(elsewhere), Some(&good), "test"),
            Ok("admin".into())
        );
    }
}
