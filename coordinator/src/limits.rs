//! The coordinator's limits against hostile peers, faults and load
//! (`limits` in the settings file; every field has a default). What each
//! protects and why its default was chosen is in `docs/security.md`.
//!
//! Transport limits that do not depend on the deployment (one stream per
//! connection, flow-control windows of one frame, the idle timeout) are
//! fixed in `fleet_protocol::tls::server_transport`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Longest enrollment token accepted, in bytes, checked before it is
/// hashed. Tokens the coordinator issues are 64 hex digits.
pub const MAX_TOKEN_LEN: usize = 128;

/// Largest certificate signing request accepted, in bytes (a P-256 request
/// is about 250 bytes; 4 KiB leaves room for an RSA-4096 one).
pub const MAX_CSR_LEN: usize = 4096;

/// Largest frame a connection without a certificate may send: enrollment
/// needs a `Hello` and an `Enroll` (token and signing request).
pub const ANONYMOUS_FRAME: usize = 16 * 1024;

/// `Enroll` attempts one connection without a certificate may make.
pub const ENROLL_ATTEMPTS: u32 = 3;

/// Connection and request limits (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Live QUIC connections in all (handshakes included); beyond it new
    /// connections are refused before any cryptography.
    pub max_connections: usize,
    /// Live connections without a client certificate (enrolling
    /// newcomers); beyond it they are closed right after the handshake.
    pub max_anonymous: usize,
    /// Live connections without a certificate from one address (IPv4) or
    /// one /64 (IPv6), so that one source cannot hold every anonymous slot
    /// while honest newcomers elsewhere wait.
    pub anonymous_per_address: usize,
    /// With this many live connections or more, a new connection must first
    /// prove its address (a QUIC retry) before the server does any
    /// cryptography for it.
    pub retry_above: usize,
    /// Live connections of one device.
    pub per_device: usize,
    /// A connection without a certificate is closed this long after its
    /// handshake, enrolled or not (ms).
    pub enroll_ms: u64,
    /// Longest wait for the peer to take one answer (or one chunk of a
    /// fetched object) before its connection is closed (ms).
    pub send_timeout_ms: u64,
    /// Requests a connection may make per second, sustained; beyond it the
    /// server waits before reading its next request.
    pub requests_per_sec: u32,
    /// Requests a connection may make at once before pacing starts.
    pub request_burst: u32,
    /// Metrics (HTTP) connections served at once; more are closed at once.
    pub metrics_connections: usize,
    /// Longest wait for a metrics request's head (ms).
    pub metrics_read_ms: u64,
    /// Days a device certificate is valid, at enrollment and at each
    /// renewal (1 to [`MAX_DEVICE_CERT_DAYS`]). Agents renew theirs over
    /// their own connection once half of it has passed; one offline for
    /// longer than this must enroll again.
    pub device_cert_days: u64,
}

/// Longest device certificate lifetime `limits.device_cert_days` allows
/// (398 days, the longest the Web PKI allows a certificate).
pub const MAX_DEVICE_CERT_DAYS: u64 = 398;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_anonymous: 64,
            anonymous_per_address: 8,
            retry_above: 512,
            per_device: 4,
            enroll_ms: 10_000,
            send_timeout_ms: 30_000,
            requests_per_sec: 50,
            request_burst: 100,
            metrics_connections: 16,
            metrics_read_ms: 5_000,
            device_cert_days: 90,
        }
    }
}

impl Limits {
    /// Checks that the limits make sense together; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max_connections", self.max_connections as u64),
            ("max_anonymous", self.max_anonymous as u64),
            ("anonymous_per_address", self.anonymous_per_address as u64),
            ("per_device", self.per_device as u64),
            ("enroll_ms", self.enroll_ms),
            ("send_timeout_ms", self.send_timeout_ms),
            ("requests_per_sec", u64::from(self.requests_per_sec)),
            ("request_burst", u64::from(self.request_burst)),
            ("metrics_connections", self.metrics_connections as u64),
            ("metrics_read_ms", self.metrics_read_ms),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("limits.{name} must be > 0"));
        }
        if self.max_anonymous >= self.max_connections {
            return Err(
                "limits.max_anonymous must be below limits.max_connections, so that enrolled \
                 devices always find room"
                    .into(),
            );
        }
        if self.anonymous_per_address > self.max_anonymous {
            return Err("limits.anonymous_per_address must be at most limits.max_anonymous".into());
        }
        if !(1..=MAX_DEVICE_CERT_DAYS).contains(&self.device_cert_days) {
            return Err(format!(
                "limits.device_cert_days must be 1 to {MAX_DEVICE_CERT_DAYS}"
            ));
        }
        if self.retry_above > self.max_connections {
            return Err("limits.retry_above must be at most limits.max_connections".into());
        }
        Ok(())
    }

    /// The enrollment deadline.
    pub fn enroll(&self) -> Duration {
        Duration::from_millis(self.enroll_ms)
    }

    /// The send timeout.
    pub fn send_timeout(&self) -> Duration {
        Duration::from_millis(self.send_timeout_ms)
    }

    /// The metrics read timeout.
    pub fn metrics_read(&self) -> Duration {
        Duration::from_millis(self.metrics_read_ms)
    }
}

/// A count of live things with a cap; a [`Slot`] holds one until dropped.
#[derive(Debug, Default)]
pub struct Gauge(AtomicUsize);

impl Gauge {
    /// Takes a slot if fewer than `cap` are held.
    pub fn try_take(self: &Arc<Self>, cap: usize) -> Option<Slot> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }

    /// Slots held now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// One held slot of a [`Gauge`], given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<Gauge>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Live connections per source address with a cap each; an
/// [`AddressSlot`] holds one until dropped. Only addresses with a live
/// connection have an entry, so its memory is bounded by the connections.
#[derive(Debug, Default)]
pub struct PerAddress(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

impl PerAddress {
    /// The key an address is counted under: the address itself for IPv4,
    /// its /64 for IPv6 (what one subscriber usually holds).
    pub fn key(addr: std::net::IpAddr) -> std::net::IpAddr {
        match addr {
            std::net::IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                std::net::IpAddr::V6(bits.into())
            }
            v4 => v4,
        }
    }

    /// Takes a slot for `addr` if fewer than `cap` are held for its key.
    pub fn try_take(self: &Arc<Self>, addr: std::net::IpAddr, cap: usize) -> Option<AddressSlot> {
        let key = Self::key(addr);
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key).or_default();
        if *n >= cap {
            if *n == 0 {
                map.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(AddressSlot(self.clone(), key))
    }

    /// Addresses with a live slot.
    pub fn addresses(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// One held slot of a [`PerAddress`], given back when dropped.
#[derive(Debug)]
pub struct AddressSlot(Arc<PerAddress>, std::net::IpAddr);

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// A token bucket pacing one connection's requests: `burst` at once, then
/// `rate` a second. A request over the budget waits; it is not refused.
#[derive(Debug)]
pub struct Pace {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl Pace {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            tokens: f64::from(burst),
            rate: f64::from(rate),
            burst: f64::from(burst),
            last: Instant::now(),
        }
    }

    /// How long the next request must wait at `now` (zero: go on); takes its token.
    pub fn delay(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Waits until the next request may be read.
    pub async fn take(&mut self) {
        let wait = self.delay(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_bad_limits_are_named() {
        Limits::default().validate().unwrap();
        let bad = Limits {
            max_anonymous: 2000,
            ..Limits::default()
        };
        assert!(bad.validate().unwrap_err().contains("max_anonymous"));
        let zero = Limits {
            per_device: 0,
            ..Limits::default()
        };
        assert!(zero.validate().unwrap_err().contains("per_device"));
        for days in [0, MAX_DEVICE_CERT_DAYS + 1] {
            let long = Limits {
                device_cert_days: days,
                ..Limits::default()
            };
            assert!(long.validate().unwrap_err().contains("device_cert_days"));
        }
    }

    #[test]
    fn a_gauge_holds_at_most_its_cap_and_slots_give_back() {
        let g = Arc::new(Gauge::default());
        let a = g.try_take(2).unwrap();
        let _b = g.try_take(2).unwrap();
        assert!(g.try_take(2).is_none());
        drop(a);
        assert_eq!(g.get(), 1);
        assert!(g.try_take(2).is_some());
    }

    #[test]
    fn each_address_holds_at_most_its_cap_and_empty_entries_go() {
        use std::net::IpAddr;
        let p = Arc::new(PerAddress::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = p.try_take(a, 2).unwrap();
        let _second = p.try_take(a, 2).unwrap();
        assert!(p.try_take(a, 2).is_none(), "a third from one address");
        let other = p.try_take(b, 2).unwrap();
        assert_eq!(p.addresses(), 2);
        drop(first);
        assert!(p.try_take(a, 2).is_some(), "a slot came back");
        drop(other);
        assert_eq!(p.addresses(), 1, "an address with no slot has no entry");
        // IPv6 addresses of one /64 share their count; another /64 does not.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let _x = p.try_take(v6("2001:db8:1:2::1"), 1).unwrap();
        assert!(p.try_take(v6("2001:db8:1:2:ffff::9"), 1).is_none());
        assert!(p.try_take(v6("2001:db8:1:3::1"), 1).is_some());
        // A refusal leaves no entry behind.
        let q = Arc::new(PerAddress::default());
        assert!(q.try_take(a, 0).is_none());
        assert_eq!(q.addresses(), 0);
        let bad = Limits {
            anonymous_per_address: 65,
            ..Limits::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("anonymous_per_address")
        );
    }

    #[test]
    fn pace_lets_a_burst_through_then_spaces_requests() {
        let mut p = Pace::new(10, 3);
        let t = Instant::now();
        p.last = t;
        for _ in 0..3 {
            assert_eq!(p.delay(t), Duration::ZERO);
        }
        let wait = p.delay(t);
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // A second later the bucket has refilled (up to the burst).
        let later = t + Duration::from_secs(10);
        assert_eq!(p.delay(later), Duration::ZERO);
    }
}
