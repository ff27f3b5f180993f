//! The uploader thread: sends stored hard samples to the fleet server, oldest first.
//!
//! Each sample is one `POST {server}/api/samples` with the device secret as bearer
//! token, the sample's bytes as the body, its content type, and its
//! [`fleet_wire::sample::SampleMetadata`] as the query string. A sample is deleted only
//! after a 2xx or a 409 (stored already). A 400, 413, 415 or 422 means the server will
//! never take it, so it moves to `rejected/`. Anything else (network errors, 5xx, 401,
//! 403, 404, 429) keeps it and retries after a wait that doubles from 1 s to 30 s.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::spool::{Spool, SpoolError, SpooledSample};
use super::{HardSampleStats, UploadTarget};
use crate::forward::error_chain;

/// Wait before the first retry, doubled after each further failure up to
/// [`MAX_RETRY_WAIT`].
const FIRST_RETRY_WAIT: Duration = Duration::from_secs(1);
/// Maximum wait between two attempts, so a server back from an outage gets the samples
/// within half a minute.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole request, body included, taking longer than this counts as a network error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an idle uploader waits for a new sample before it checks `stop` again.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Characters of a rejection's response body kept for the log.
const MAX_BODY_CHARS: usize = 300;

/// Outcome of an upload, decided by the response status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Stored now or before: delete the local file.
    Stored,
    /// The server will never take this sample: set it aside.
    RejectedForGood,
    /// Keep the sample and send it again later.
    Retry,
}

/// Returns what a response status means for the sample.
pub fn classify(status: u16) -> Verdict {
    match status {
        200..=299 | 409 => Verdict::Stored,
        400 | 413 | 415 | 422 => Verdict::RejectedForGood,
        _ => Verdict::Retry,
    }
}

/// Failure of one upload attempt.
#[derive(Debug)]
enum Failure {
    RejectedForGood { status: u16, body: String },
    Retry(String),
}

/// Sends stored samples until `stop` is set.
#[derive(Debug)]
pub struct Uploader {
    agent: ureq::Agent,
    url: String,
    token: String,
    spool: Arc<Spool>,
    stats: Arc<HardSampleStats>,
    stop: Arc<AtomicBool>,
}

impl Uploader {
    pub fn new(
        target: UploadTarget,
        spool: Arc<Spool>,
        stats: Arc<HardSampleStats>,
        stop: Arc<AtomicBool>,
    ) -> Uploader {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build();
        Uploader {
            agent,
            url: format!("{}/api/samples", target.server.trim_end_matches('/')),
            token: target.token,
            spool,
            stats,
            stop,
        }
    }

    /// Uploads samples oldest first until `stop` is set.
    pub fn run(self) {
        let mut wait = FIRST_RETRY_WAIT;
        let mut failures = 0u32;
        while !self.stop.load(Ordering::Relaxed) {
            let Some(name) = self.spool.wait_oldest(IDLE_POLL) else {
                continue;
            };
            let sample = match self.spool.read(&name) {
                Ok(sample) => sample,
                Err(error) => {
                    self.handle_unreadable(&name, error);
                    continue;
                }
            };
            match self.send(&sample) {
                Ok(status) => {
                    self.delete(&name);
                    if failures > 0 {
                        tracing::info!(failures, "hard-sample uploads resumed");
                    }
                    tracing::debug!(sample = %name, status, "hard sample uploaded");
                    failures = 0;
                    wait = FIRST_RETRY_WAIT;
                }
                Err(Failure::RejectedForGood { status, body }) => {
                    self.set_aside(
                        &name,
                        &format!("the server rejected it with HTTP {status}: {body}"),
                    );
                }
                Err(Failure::Retry(reason)) => {
                    failures += 1;
                    let pause = with_jitter(wait);
                    tracing::warn!(
                        sample = %name,
                        reason,
                        failures,
                        retry_in_ms = pause.as_millis() as u64,
                        pending = self.spool.stats().pending_samples,
                        "hard-sample upload failed; the sample is kept"
                    );
                    self.sleep_unless_stopped(pause);
                    wait = (wait * 2).min(MAX_RETRY_WAIT);
                }
            }
        }
    }

    /// Sends one sample and returns the response status when the server stored it.
    fn send(&self, sample: &SpooledSample) -> Result<u16, Failure> {
        let mut request = self
            .agent
            .post(&self.url)
            .set("Authorization", &format!("Bearer {}", self.token))
            .set("Content-Type", &sample.content_type);
        for (name, value) in sample.metadata.query_pairs() {
            request = request.query(name, &value);
        }
        let (status, response) = match request.send_bytes(&sample.bytes) {
            Ok(response) => (response.status(), response),
            Err(ureq::Error::Status(status, response)) => (status, response),
            Err(ureq::Error::Transport(transport)) => {
                return Err(Failure::Retry(transport_reason(&transport)));
            }
        };
        // Reading the body to its end lets the agent reuse the connection.
        let body: String = response
            .into_string()
            .unwrap_or_default()
            .chars()
            .take(MAX_BODY_CHARS)
            .collect();
        match classify(status) {
            Verdict::Stored => Ok(status),
            Verdict::RejectedForGood => Err(Failure::RejectedForGood { status, body }),
            Verdict::Retry => Err(Failure::Retry(format!("HTTP {status}: {body}"))),
        }
    }

    fn delete(&self, name: &str) {
        match self.spool.remove(name) {
            Ok(()) => HardSampleStats::bump(&self.stats.uploaded),
            // The server has the sample, so the next attempt gets a 200 for content it
            // has and deletes the file then. The pause keeps a folder that refuses
            // deletion (a read-only remount) from turning into an upload loop.
            Err(error) => {
                tracing::error!(
                    sample = %name,
                    error = %error_chain(&error),
                    "uploaded hard sample not deleted"
                );
                self.sleep_unless_stopped(MAX_RETRY_WAIT);
            }
        }
    }

    /// Handles a sample whose file cannot be read: a damaged one is set aside, a missing
    /// one leaves the index, and an I/O error is retried after a pause.
    fn handle_unreadable(&self, name: &str, error: SpoolError) {
        match &error {
            SpoolError::Damaged { reason, .. } => self.set_aside(name, reason),
            SpoolError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(sample = %name, "hard sample deleted by someone else; skipped");
                let _ = self.spool.remove(name);
            }
            SpoolError::Io { .. } => {
                tracing::error!(sample = %name, error = %error_chain(&error), "failed to read hard sample; retrying");
                self.sleep_unless_stopped(MAX_RETRY_WAIT);
            }
        }
    }

    /// Moves a sample to `rejected/` and counts it.
    fn set_aside(&self, name: &str, reason: &str) {
        match self.spool.reject(name) {
            Ok(path) => {
                HardSampleStats::bump(&self.stats.rejected);
                tracing::error!(
                    sample = %name,
                    reason,
                    moved_to = %path.display(),
                    "hard sample set aside, not uploaded"
                );
            }
            Err(error) => {
                tracing::error!(
                    sample = %name,
                    reason,
                    error = %error_chain(&error),
                    "failed to set aside a hard sample; retrying"
                );
                self.sleep_unless_stopped(MAX_RETRY_WAIT);
            }
        }
    }

    fn sleep_unless_stopped(&self, duration: Duration) {
        let until = Instant::now() + duration;
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= until {
                return;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(100)));
        }
    }
}

/// Describes a network failure without the request URL, which ureq's own message
/// starts with and which repeats every metadata field.
fn transport_reason(transport: &ureq::Transport) -> String {
    let mut reason = transport.kind().to_string();
    if let Some(message) = transport.message() {
        reason.push_str(": ");
        reason.push_str(message);
    }
    if let Some(source) = std::error::Error::source(transport) {
        reason.push_str(": ");
        reason.push_str(&error_chain(source));
    }
    reason
}

/// Returns `wait` scaled by a factor from 0.75 to 1.25, so devices that lost the same
/// server do not all retry at the same moment. The clock's sub-second nanoseconds are
/// random enough for that.
fn with_jitter(wait: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    wait.mul_f64(0.75 + 0.5 * f64::from(nanos) / 1e9)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::Mutex;

    use super::super::spool::tests::sample;
    use super::*;

    #[test]
    fn statuses_map_to_verdicts() {
        for status in [200, 201, 204, 409] {
            assert_eq!(classify(status), Verdict::Stored, "{status}");
        }
        for status in [400, 413, 415, 422] {
            assert_eq!(classify(status), Verdict::RejectedForGood, "{status}");
        }
        for status in [401, 403, 404, 408, 429, 500, 502, 503] {
            assert_eq!(classify(status), Verdict::Retry, "{status}");
        }
    }

    #[test]
    fn network_failures_are_described_without_the_url() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/api/samples?sha256=abc");
        let Err(ureq::Error::Transport(transport)) = ureq::get(&url).call() else {
            panic!("a request to a closed port fails in transport");
        };
        let reason = transport_reason(&transport);
        assert!(!reason.contains("sha256=abc"), "{reason}");
        assert!(reason.contains("Connection Failed"), "{reason}");
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        let wait = Duration::from_secs(4);
        for _ in 0..100 {
            let pause = with_jitter(wait);
            assert!(
                pause >= Duration::from_secs(3) && pause <= Duration::from_secs(5),
                "{pause:?}"
            );
        }
    }

    /// The request line and body of one request.
    type Recorded = (String, Vec<u8>);

    /// A server on a free port that responds to each request with the next status of
    /// `statuses` and records the request lines and bodies.
    struct FakeServer {
        url: String,
        requests: Arc<Mutex<Vec<Recorded>>>,
    }

    impl FakeServer {
        fn start(statuses: Vec<u16>) -> FakeServer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let requests = Arc::new(Mutex::new(Vec::new()));
            let recorded = requests.clone();
            std::thread::spawn(move || {
                for (stream, status) in listener.incoming().zip(statuses) {
                    let mut stream = stream.unwrap();
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut request_line = String::new();
                    reader.read_line(&mut request_line).unwrap();
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        reader.read_line(&mut line).unwrap();
                        if line.trim().is_empty() {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    recorded
                        .lock()
                        .unwrap()
                        .push((request_line.trim().to_owned(), body));
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
                    );
                    stream.write_all(reply.as_bytes()).unwrap();
                }
            });
            FakeServer { url, requests }
        }
    }

    /// Stores samples 1..=count and runs an uploader against `server` until `done`
    /// returns true for the spool, or 10 seconds pass.
    fn upload_until(
        server_url: &str,
        count: u8,
        done: impl Fn(&Spool, &HardSampleStats) -> bool,
    ) -> (tempfile::TempDir, Arc<Spool>, Arc<HardSampleStats>) {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path(), 1 << 20).unwrap());
        for seed in 1..=count {
            let (metadata, bytes) = sample(seed, 200);
            spool.store(&metadata, "image/png", &bytes).unwrap();
        }
        let stats = Arc::new(HardSampleStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let target = UploadTarget {
            server: server_url.to_owned(),
            token: "secret".into(),
        };
        let uploader = Uploader::new(target, spool.clone(), stats.clone(), stop.clone());
        let thread = std::thread::spawn(move || uploader.run());
        let started = Instant::now();
        while !done(&spool, &stats) && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        thread.join().unwrap();
        (dir, spool, stats)
    }

    #[test]
    fn stored_samples_are_deleted_oldest_first() {
        let server = FakeServer::start(vec![201, 409]);
        let (_dir, spool, stats) = upload_until(&server.url, 2, |spool, _| {
            spool.stats().pending_samples == 0
        });
        assert_eq!(spool.stats().pending_samples, 0);
        assert_eq!(stats.uploaded.load(Ordering::Relaxed), 2);
        let requests = server.requests.lock().unwrap();
        assert_eq!(requests.len(), 2);
        let (first_line, first_body) = &requests[0];
        assert!(first_line.starts_with("POST /api/samples?"), "{first_line}");
        assert!(
            first_line.contains("source=t10k%231"),
            "oldest first: {first_line}"
        );
        assert!(first_line.contains("device_id=pi-1"), "{first_line}");
        assert_eq!(first_body, &sample(1, 200).1);
        assert!(
            requests[1].0.contains("source=t10k%232"),
            "{}",
            requests[1].0
        );
    }

    #[test]
    fn rejected_sample_is_set_aside() {
        let server = FakeServer::start(vec![400, 201]);
        let (dir, spool, stats) = upload_until(&server.url, 2, |spool, _| {
            spool.stats().pending_samples == 0
        });
        assert_eq!(stats.rejected.load(Ordering::Relaxed), 1);
        assert_eq!(stats.uploaded.load(Ordering::Relaxed), 1);
        assert_eq!(spool.stats().rejected_samples, 1);
        let rejected = std::fs::read_dir(dir.path().join("rejected"))
            .unwrap()
            .count();
        assert_eq!(rejected, 1);
    }

    #[test]
    fn server_errors_keep_the_sample_and_retry() {
        let server = FakeServer::start(vec![503, 201]);
        let (_dir, spool, stats) = upload_until(&server.url, 1, |_, stats| {
            stats.uploaded.load(Ordering::Relaxed) == 1
        });
        assert_eq!(stats.uploaded.load(Ordering::Relaxed), 1);
        assert_eq!(stats.rejected.load(Ordering::Relaxed), 0);
        assert_eq!(spool.stats().pending_samples, 0);
        let requests = server.requests.lock().unwrap();
        assert_eq!(requests.len(), 2, "the same sample was sent again");
        assert_eq!(requests[0].1, requests[1].1);
    }

    #[test]
    fn unreachable_server_keeps_every_sample() {
        // A port that was free a moment ago, so connections are refused.
        let url = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        let started = Instant::now();
        let (_dir, spool, stats) = upload_until(&url, 2, |_, _| {
            started.elapsed() > Duration::from_millis(1500)
        });
        assert_eq!(spool.stats().pending_samples, 2);
        assert_eq!(stats.uploaded.load(Ordering::Relaxed), 0);
        assert_eq!(stats.rejected.load(Ordering::Relaxed), 0);
    }
}
