//! A heartbeat for dead man's switch monitors (healthchecks.io, Uptime Kuma push monitors
//! and the like): an HTTP GET to a URL at most once per interval, and only while every
//! watched database's lag (the age of its oldest commit not yet stored, see
//! [`DbMetrics::lag_seconds`]) is under a bound. A busy database that keeps up still gets
//! its heartbeats; when replication falls behind, whatever the reason (storage down, the
//! sidecar's disk full), the GETs stop and the monitor raises the alarm.
//!
//! The GET runs on its own thread with a short timeout; a failure is a warning and never
//! touches replication. Such URLs often carry a secret token in their path or query, so
//! messages name only the scheme and host.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use walsync::{Error, MetricsSource, Result};

/// The default bound on lag for a heartbeat: this many `--min-interval`s ...
pub const MAX_LAG_INTERVALS: u32 = 5;

/// ... but never less than this.
pub const MIN_MAX_LAG: Duration = Duration::from_secs(5);

/// The default `--heartbeat-max-lag` for a given `--min-interval`: a few intervals (a
/// commit waits up to one before it is read), at least [`MIN_MAX_LAG`].
pub fn default_max_lag(min_interval: Duration) -> Duration {
    (min_interval * MAX_LAG_INTERVALS).max(MIN_MAX_LAG)
}

/// How long one heartbeat request may take, all included.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// How often the thread looks whether every database is caught up.
const CHECK: Duration = Duration::from_millis(250);

/// A running heartbeat thread. Dropping it tells the thread to end (it does, within
/// [`TIMEOUT`]) without waiting for it, so that a shutdown never waits for a slow
/// monitoring server.
pub struct Heartbeat {
    stop: Arc<(Mutex<bool>, Condvar)>,
}

/// A URL as it may be logged: scheme and host only.
pub fn redacted(url: &url::Url) -> String {
    format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""))
}

/// Parse a heartbeat URL (http or https); the error never quotes it.
pub fn parse_url(text: &str, from: &str) -> Result<url::Url> {
    url::Url::parse(text)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
        .ok_or_else(|| Error::invalid(format!("{from} must be an http:// or https:// URL")))
}

/// `message` with every secret-bearing part of `url` (the whole URL, its path, query and
/// credentials) replaced by `...`.
fn scrub(message: &str, url: &url::Url) -> String {
    let mut out = message.replace(url.as_str(), "...");
    let secrets = [
        url.query().unwrap_or(""),
        url.password().unwrap_or(""),
        url.username(),
        url.path(),
    ];
    for secret in secrets {
        if secret.len() > 1 {
            out = out.replace(secret, "...");
        }
    }
    out
}

impl Heartbeat {
    /// Start the thread: GET `url` at most once per `interval`, while the lag of every one
    /// of the databases `databases` returns (at each check) is under `max_lag`.
    pub fn start(
        url: url::Url,
        interval: Duration,
        max_lag: Duration,
        databases: MetricsSource,
    ) -> Result<Heartbeat> {
        let max_lag = max_lag.as_secs_f64();
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stopped = Arc::clone(&stop);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            .user_agent(concat!("walsync/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        std::thread::Builder::new()
            .name("walsync-heartbeat".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let mut last: Option<Instant> = None;
                loop {
                    let due = last.is_none_or(|t| t.elapsed() >= interval);
                    if due && databases().iter().all(|d| d.lag_seconds() < max_lag) {
                        last = Some(Instant::now());
                        beat(&agent, &url);
                    }
                    let Ok(guard) = stopped.0.lock() else { return };
                    if *guard {
                        return;
                    }
                    match stopped.1.wait_timeout(guard, CHECK) {
                        Ok((guard, _)) if !*guard => {}
                        _ => return,
                    }
                }
            })
            .map_err(|e| Error::from(e).with_context("starting the heartbeat thread"))?;
        Ok(Heartbeat { stop })
    }

    fn tell_to_stop(&self) {
        if let Ok(mut stopped) = self.stop.0.lock() {
            *stopped = true;
        }
        self.stop.1.notify_all();
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.tell_to_stop();
    }
}

/// One GET; failures are warnings.
fn beat(agent: &ureq::Agent, url: &url::Url) {
    match agent.get(url.as_str()).call() {
        Ok(response) => {
            // Read (a little of) the body so the connection can be reused.
            let _ = response
                .into_body()
                .with_config()
                .limit(64 * 1024)
                .read_to_vec();
            log::debug!("heartbeat sent to {}", redacted(url));
        }
        Err(e) => log::warn!(
            "heartbeat to {} failed: {}",
            redacted(url),
            scrub(&e.to_string(), url)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_never_carry_the_path_query_or_credentials() {
        let url = parse_url("https://user:pw@hc.example/ping/abc123?k=tok", "x").unwrap();
        assert_eq!(redacted(&url), "https://hc.example");
        let message = format!("failed {} /ping/abc123 k=tok pw", url.as_str());
        let scrubbed = scrub(&message, &url);
        for secret in ["abc123", "tok", "pw"] {
            assert!(!scrubbed.contains(secret), "{scrubbed}");
        }
        assert!(parse_url("ftp://x/y", "--heartbeat-url").is_err());
        let err = parse_url("not a url with secret", "--heartbeat-url").unwrap_err();
        assert!(!err.to_string().contains("secret"));
    }
}
