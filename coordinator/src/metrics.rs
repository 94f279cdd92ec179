//! Prometheus metrics in the text exposition format, served over plain
//! HTTP on a local port (`/metrics`).
//!
//! The counters live in the coordinator's shared state and are updated
//! under its lock; rendering copies them into text. Label values are
//! escaped as the exposition format requires (`\\`, `\"`, `\n`), so that a
//! device-chosen cohort tag cannot end a line and inject a sample.
//!
//! The endpoint ([`serve`]) reads a request head within a deadline, serves
//! a bounded number of connections at once (more are closed at once) and
//! keeps accepting after an accept error (with a backoff), so slow or
//! hostile clients cannot stop scrapes for good.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::limits::Limits;

/// The coordinator's counters and gauges.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    /// Devices connected now.
    pub connected_devices: u64,
    /// Devices enrolled since start.
    pub enrollments: u64,
    /// Device certificates renewed since start.
    pub renewals: u64,
    /// Rounds closed.
    pub rounds_closed: u64,
    /// Round attempts abandoned.
    pub rounds_abandoned: u64,
    /// Updates accepted into rounds.
    pub updates_accepted: u64,
    /// Aggregated updates scaled down or weight-capped by the relative bound.
    pub updates_bounded: u64,
    /// Refused updates and requests, by reason.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Update bytes received.
    pub bytes_up: u64,
    /// Model bytes sent.
    pub bytes_down: u64,
    /// Sum and count of closed rounds' durations (seconds).
    pub round_seconds_sum: f64,
    /// Closed rounds timed.
    pub round_seconds_count: u64,
    /// Duration of the last closed round (seconds).
    pub last_round_seconds: f64,
    /// Drift summaries accepted.
    pub drift_summaries: u64,
    /// Drift summaries refused, by reason.
    pub drift_rejected: BTreeMap<&'static str, u64>,
    /// Drift scores of the last closed window, by (scope, signal); fleet and cohorts only.
    pub drift_scores: BTreeMap<(String, &'static str), f64>,
    /// Drift flags up after the last closed window, by (scope, signal).
    pub drift_raised: BTreeMap<(String, &'static str), bool>,
    /// Drift windows closed.
    pub drift_windows: u64,
    /// Live QUIC connections (filled in by the server when rendering).
    pub connections_open: u64,
    /// Live QUIC connections without a certificate (idem).
    pub anonymous_open: u64,
    /// Connections refused or closed by a limit, by reason (idem).
    pub connections_refused: BTreeMap<&'static str, u64>,
    /// Devices' requests relayed to the replica running the task.
    pub relayed_out: u64,
    /// Relayed requests answered here, as the task's owner.
    pub relayed_in: u64,
    /// On a shared store: this replica's name and role, and the task it
    /// runs (filled in when rendering).
    pub replica: Option<(String, &'static str, Option<u64>)>,
}

/// A label value as the text exposition format writes it: backslash,
/// double quote and line feed escaped.
pub fn label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

impl Metrics {
    /// Counts one refusal.
    pub fn reject(&mut self, reason: &'static str) {
        *self.rejected.entry(reason).or_default() += 1;
    }

    /// Records a closed drift window: scores and flags of the fleet and each
    /// cohort (devices are left out to bound the number of series).
    pub fn drift_window(&mut self, r: &crate::drift::WindowReport) {
        use crate::drift::Scope;
        use fleet_drift::Signal;
        self.drift_windows += 1;
        self.drift_scores.clear();
        self.drift_raised.clear();
        for s in r
            .scopes
            .iter()
            .filter(|s| !matches!(s.scope, Scope::Device(_)))
        {
            let scope = match &s.scope {
                Scope::Cohort(c) => c.clone(),
                _ => "fleet".to_string(),
            };
            for signal in Signal::ALL {
                if let Some(v) = s.scores.as_ref().and_then(|x| x.signal(signal)) {
                    self.drift_scores.insert((scope.clone(), signal.name()), v);
                }
                self.drift_raised
                    .insert((scope.clone(), signal.name()), s.raised.contains(&signal));
            }
        }
    }

    /// Records a closed round's duration.
    pub fn round_closed(&mut self, seconds: f64) {
        self.rounds_closed += 1;
        self.round_seconds_sum += seconds;
        self.round_seconds_count += 1;
        self.last_round_seconds = seconds;
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some((name, role, task)) = &self.replica {
            let name = label_value(name);
            let _ = writeln!(
                out,
                "# HELP fleet_replica This replica of a coordinator on a shared store: its name and role.\n\
                 # TYPE fleet_replica gauge\n\
                 fleet_replica{{replica=\"{name}\",role=\"{role}\"}} 1\n\
                 # HELP fleet_replica_owned_task The task this replica runs as its lease's holder (0: none).\n\
                 # TYPE fleet_replica_owned_task gauge\n\
                 fleet_replica_owned_task{{replica=\"{name}\"}} {}\n\
                 # HELP fleet_relayed_requests_total Devices' requests relayed to the replica running the task.\n\
                 # TYPE fleet_relayed_requests_total counter\n\
                 fleet_relayed_requests_total{{replica=\"{name}\"}} {}\n\
                 # HELP fleet_relayed_answered_total Relayed requests this replica answered as the task's owner.\n\
                 # TYPE fleet_relayed_answered_total counter\n\
                 fleet_relayed_answered_total{{replica=\"{name}\"}} {}",
                task.unwrap_or(0),
                self.relayed_out,
                self.relayed_in
            );
        }
        let mut one = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP fleet_{name} {help}");
            let _ = writeln!(out, "# TYPE fleet_{name} {kind}");
            let _ = writeln!(out, "fleet_{name} {value}");
        };
        one(
            "connected_devices",
            "gauge",
            "Devices connected now.",
            self.connected_devices.to_string(),
        );
        one(
            "connections_open",
            "gauge",
            "Live QUIC connections, handshakes included.",
            self.connections_open.to_string(),
        );
        one(
            "anonymous_connections_open",
            "gauge",
            "Live QUIC connections without a client certificate.",
            self.anonymous_open.to_string(),
        );
        one(
            "enrollments_total",
            "counter",
            "Devices enrolled.",
            self.enrollments.to_string(),
        );
        one(
            "certificate_renewals_total",
            "counter",
            "Device certificates renewed.",
            self.renewals.to_string(),
        );
        one(
            "rounds_closed_total",
            "counter",
            "Rounds closed.",
            self.rounds_closed.to_string(),
        );
        one(
            "rounds_abandoned_total",
            "counter",
            "Round attempts abandoned.",
            self.rounds_abandoned.to_string(),
        );
        one(
            "updates_accepted_total",
            "counter",
            "Updates accepted into rounds.",
            self.updates_accepted.to_string(),
        );
        one(
            "updates_bounded_total",
            "counter",
            "Aggregated updates scaled down or weight-capped by the relative bound.",
            self.updates_bounded.to_string(),
        );
        one(
            "bytes_up_total",
            "counter",
            "Update bytes received.",
            self.bytes_up.to_string(),
        );
        one(
            "bytes_down_total",
            "counter",
            "Model bytes sent.",
            self.bytes_down.to_string(),
        );
        one(
            "last_round_duration_seconds",
            "gauge",
            "Duration of the last closed round.",
            format!("{:.3}", self.last_round_seconds),
        );
        let _ = writeln!(
            out,
            "# HELP fleet_round_duration_seconds Duration of closed rounds."
        );
        let _ = writeln!(out, "# TYPE fleet_round_duration_seconds summary");
        let _ = writeln!(
            out,
            "fleet_round_duration_seconds_sum {:.3}",
            self.round_seconds_sum
        );
        let _ = writeln!(
            out,
            "fleet_round_duration_seconds_count {}",
            self.round_seconds_count
        );
        let _ = writeln!(
            out,
            "# HELP fleet_rejected_total Refused updates and requests, by reason."
        );
        let _ = writeln!(out, "# TYPE fleet_rejected_total counter");
        for (reason, n) in &self.rejected {
            let _ = writeln!(out, "fleet_rejected_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP fleet_connections_refused_total Connections refused or closed by a limit, by reason."
        );
        let _ = writeln!(out, "# TYPE fleet_connections_refused_total counter");
        for (reason, n) in &self.connections_refused {
            let _ = writeln!(
                out,
                "fleet_connections_refused_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP fleet_drift_summaries_total Drift summaries accepted."
        );
        let _ = writeln!(out, "# TYPE fleet_drift_summaries_total counter");
        let _ = writeln!(out, "fleet_drift_summaries_total {}", self.drift_summaries);
        let _ = writeln!(
            out,
            "# HELP fleet_drift_windows_total Drift windows closed."
        );
        let _ = writeln!(out, "# TYPE fleet_drift_windows_total counter");
        let _ = writeln!(out, "fleet_drift_windows_total {}", self.drift_windows);
        let _ = writeln!(
            out,
            "# HELP fleet_drift_rejected_total Refused drift summaries, by reason."
        );
        let _ = writeln!(out, "# TYPE fleet_drift_rejected_total counter");
        for (reason, n) in &self.drift_rejected {
            let _ = writeln!(out, "fleet_drift_rejected_total{{reason=\"{reason}\"}} {n}");
        }
        let label = label_value;
        let _ = writeln!(
            out,
            "# HELP fleet_drift_score Drift score of the last closed window, by scope (fleet or cohort) and signal."
        );
        let _ = writeln!(out, "# TYPE fleet_drift_score gauge");
        for ((scope, signal), v) in &self.drift_scores {
            let _ = writeln!(
                out,
                "fleet_drift_score{{scope=\"{}\",signal=\"{signal}\"}} {v:.6}",
                label(scope)
            );
        }
        let _ = writeln!(
            out,
            "# HELP fleet_drift_flag Whether a drift flag is up after the last closed window (1) or not (0)."
        );
        let _ = writeln!(out, "# TYPE fleet_drift_flag gauge");
        for ((scope, signal), up) in &self.drift_raised {
            let _ = writeln!(
                out,
                "fleet_drift_flag{{scope=\"{}\",signal=\"{signal}\"}} {}",
                label(scope),
                u8::from(*up)
            );
        }
        out
    }
}

/// Serves the metrics endpoint on `listener` for good: each connection
/// gets [`answer`] with the text `render` makes, within the limits'
/// read timeout; at most `metrics_connections` at once (more are closed
/// without an answer); an accept error (out of descriptors, say) is logged
/// and retried after a backoff of up to a second.
pub async fn serve<F, Fut>(
    listener: tokio::net::TcpListener,
    limits: &Limits,
    render: F,
) -> std::convert::Infallible
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let render = Arc::new(render);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.metrics_connections));
    let read = limits.metrics_read();
    let mut backoff = Duration::from_millis(10);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(10);
                stream
            }
            Err(e) => {
                tracing::warn!("metrics listener: accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed at once: a scraper retries at its next interval.
            drop(stream);
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = answer(stream, read, || render()).await;
        });
    }
}

/// Answers one HTTP request on `stream` with the body `body` makes (for
/// `GET /metrics`) or 404. The request head must arrive within `read`.
pub async fn answer<S, F, Fut>(mut stream: S, read: Duration, body: F) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    F: FnOnce() -> Fut,
    Fut: Future<Output = String>,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    // Read the request head (bounded in size and time); the body of a GET is empty.
    let head = async {
        while n < buf.len() {
            let k = stream.read(&mut buf[n..]).await?;
            if k == 0 {
                break;
            }
            n += k;
            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(read, head).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request head not received in time",
            ));
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let response = if head.starts_with("GET /metrics ") {
        let body = body().await;
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 404 Not Found\r\ncontent-length: 24\r\nconnection: close\r\n\r\nonly /metrics is served\n"
            .to_string()
    };
    // The write is bounded too: a client that does not read is dropped.
    tokio::time::timeout(read, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "response not taken in time",
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_labelled_rejections() {
        let mut m = Metrics::default();
        m.reject("non_finite");
        m.reject("non_finite");
        m.reject("layout");
        m.round_closed(1.5);
        let text = m.render();
        assert!(text.contains("fleet_rejected_total{reason=\"non_finite\"} 2"));
        assert!(text.contains("fleet_rejected_total{reason=\"layout\"} 1"));
        assert!(text.contains("fleet_rounds_closed_total 1"));
        assert!(text.contains("fleet_round_duration_seconds_sum 1.500"));
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_other_paths() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (path, status) in [("/metrics", "200 OK"), ("/other", "404 Not Found")] {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let serve = tokio::spawn(answer(server, Duration::from_secs(60), || async {
                "fleet_x 1\n".to_string()
            }));
            client
                .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut reply = String::new();
            client.read_to_string(&mut reply).await.unwrap();
            serve.await.unwrap().unwrap();
            assert!(reply.starts_with(&format!("HTTP/1.1 {status}")), "{reply}");
            assert_eq!(reply.ends_with("fleet_x 1\n"), status == "200 OK");
        }
    }

    #[test]
    fn a_newline_in_a_cohort_tag_cannot_inject_a_sample() {
        let mut m = Metrics::default();
        let evil = "eu\"} 1\nfleet_rounds_closed_total 1000000\n#\\".to_string();
        m.drift_scores.insert((evil.clone(), "covariate"), 0.5);
        m.drift_raised.insert((evil, "covariate"), true);
        let text = m.render();
        // Every line is a comment or one sample of a known family, and the
        // only `fleet_rounds_closed_total` sample is the real one.
        for line in text.lines() {
            assert!(
                line.starts_with('#') || line.starts_with("fleet_"),
                "stray line {line:?} in\n{text}"
            );
        }
        let closed: Vec<_> = text
            .lines()
            .filter(|l| l.starts_with("fleet_rounds_closed_total"))
            .collect();
        assert_eq!(closed, ["fleet_rounds_closed_total 0"], "{text}");
        assert!(
            text.contains(
                r#"fleet_drift_score{scope="eu\"} 1\nfleet_rounds_closed_total 1000000\n#\\",signal="covariate"} 0.500000"#
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn slow_clients_do_not_block_scrapes_and_are_dropped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            metrics_connections: 8,
            metrics_read_ms: 500,
            ..Limits::default()
        };
        tokio::spawn(async move {
            serve(listener, &limits, || async { "fleet_x 1\n".to_string() }).await
        });
        // Slow clients hold connections (one sends half a head, others nothing).
        let mut slow = Vec::new();
        for k in 0..4 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            if k == 0 {
                s.write_all(b"GET /metr").await.unwrap();
            }
            slow.push(s);
        }
        // A scrape is still answered (generous deadline: a loaded machine).
        let scrape = async {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).await.unwrap();
            reply
        };
        let reply = tokio::time::timeout(Duration::from_secs(60), scrape)
            .await
            .expect("a scrape was blocked by slow clients");
        assert!(reply.ends_with("fleet_x 1\n"), "{reply}");
        // And the slow ones are closed by the server once their head is late.
        for mut s in slow {
            let mut rest = Vec::new();
            let closed = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut rest))
                .await
                .expect("a slow client was never dropped");
            assert!(closed.is_err() || rest.is_empty(), "answered: {rest:?}");
        }
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_at_once() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            metrics_connections: 2,
            metrics_read_ms: 600_000,
            ..Limits::default()
        };
        tokio::spawn(async move { serve(listener, &limits, || async { String::new() }).await });
        let _held: Vec<_> = connect_n(addr, 2).await;
        // The third is closed without an answer, long before the read timeout.
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(60), third.read_to_end(&mut rest))
            .await
            .expect("a connection beyond the cap was held");
        assert!(n.is_err() || rest.is_empty());
    }

    async fn connect_n(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        v
    }
}
