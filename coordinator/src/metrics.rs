//! Prometheus metrics in the text exposition format, served over plain
//! HTTP on a local port (`/metrics`).
//!
//! The counters live in the coordinator's shared state and are updated
//! under its lock; rendering copies them into text.

use std::collections::BTreeMap;
use std::fmt::Write;

/// The coordinator's counters and gauges.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    /// Devices connected now.
    pub connected_devices: u64,
    /// Devices enrolled since start.
    pub enrollments: u64,
    /// Rounds closed.
    pub rounds_closed: u64,
    /// Round attempts abandoned.
    pub rounds_abandoned: u64,
    /// Updates accepted into rounds.
    pub updates_accepted: u64,
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
            "enrollments_total",
            "counter",
            "Devices enrolled.",
            self.enrollments.to_string(),
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
        let label = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
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

/// Answers one HTTP request on `stream` with `body` (for `GET /metrics`) or 404.
pub async fn answer<S>(mut stream: S, body: impl FnOnce() -> String) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    // Read the request head (bounded); the body of a GET is empty.
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
    let head = String::from_utf8_lossy(&buf[..n]);
    let response = if head.starts_with("GET /metrics ") {
        let body = body();
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 404 Not Found\r\ncontent-length: 24\r\nconnection: close\r\n\r\nonly /metrics is served\n"
            .to_string()
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
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
            let serve = tokio::spawn(answer(server, || "fleet_x 1\n".to_string()));
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
}
