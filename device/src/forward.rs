//! The forwarder: sends outbox records to the broker in order, at a bounded rate, and
//! acknowledges them in the outbox once the broker has.
//!
//! It keeps at most a window of records in flight. After every reconnect it starts again
//! from the first unacknowledged record. A record is therefore sent at least once, and
//! the server drops duplicates by (device, seq).
//!
//! Update events share the outbox, so they survive crashes and keep their order with the
//! telemetry around them. Their records start with [`EVENT_RECORD`] and go to the events
//! topic without that byte.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use crate::mqtt::{PublishKind, Publisher, SessionEvent};
use crate::outbox::{Outbox, OutboxStats};
use crate::settings::LiveSettings;

/// The outbox, shared by the reporter that appends and the forwarder that reads.
pub type SharedOutbox = Arc<Mutex<Outbox>>;

/// First byte of an outbox record that contains an event rather than telemetry. Telemetry
/// records start with a payload's schema byte, 0x01 or `{`, never with this one.
pub const EVENT_RECORD: u8 = 0xE5;

/// Interval of the forwarder's calls to `Outbox::sync_if_due`.
const SYNC_TICK: Duration = Duration::from_millis(250);
/// Wait before retrying after the client's queue was full or the outbox failed a read.
const RETRY_DELAY: Duration = Duration::from_millis(200);
/// How long a clean shutdown waits for records in flight to be acknowledged.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs `operation` on the outbox on tokio's blocking pool, since file I/O and fsync
/// must not stall the async runtime.
pub async fn with_outbox<T, F>(outbox: &SharedOutbox, operation: F) -> T
where
    T: Send + 'static,
    F: FnOnce(&mut Outbox) -> T + Send + 'static,
{
    let outbox = outbox.clone();
    tokio::task::spawn_blocking(move || {
        // A panic inside an operation leaves the queue's files consistent, because every
        // change on disk is a whole record, rename or deletion, so a poisoned lock is used
        // as is.
        let mut outbox = outbox.lock().unwrap_or_else(PoisonError::into_inner);
        operation(&mut outbox)
    })
    .await
    .expect("outbox operation panicked or was cancelled")
}

/// Settings of the forwarder.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// MQTT topic telemetry records go to.
    pub topic: String,
    /// MQTT topic event records go to.
    pub events_topic: String,
    /// The drain rate in use: records sent per second at most, so a backlog after an
    /// outage drains without flooding the broker. Remote configuration may change it.
    pub settings: watch::Receiver<LiveSettings>,
    /// Records sent and not yet acknowledged at most.
    pub window: usize,
}

/// One record sent and not yet known to be acknowledged in order.
#[derive(Debug)]
struct InFlight {
    position: u64,
    acked: bool,
}

/// A backlog being sent after a reconnect, for the log line when it is done.
#[derive(Debug)]
struct Drain {
    started: Instant,
    records: u64,
}

/// Moves records from the outbox to the MQTT session.
#[derive(Debug)]
pub struct Forwarder {
    outbox: SharedOutbox,
    publisher: Publisher,
    config: ForwarderConfig,
    events: mpsc::UnboundedReceiver<SessionEvent>,
    appended: Arc<Notify>,
    connected: bool,
    /// Position of the last record handed to the client.
    cursor: u64,
    in_flight: VecDeque<InFlight>,
    next_send: Instant,
    /// Whether the last read found no record after the cursor.
    caught_up: bool,
    drain: Option<Drain>,
    read_failures: u64,
    /// Records dropped because they exceed the maximum packet size.
    oversized: u64,
}

impl Forwarder {
    /// Creates a forwarder. `appended` must be notified after every append to the outbox.
    pub fn new(
        outbox: SharedOutbox,
        publisher: Publisher,
        config: ForwarderConfig,
        events: mpsc::UnboundedReceiver<SessionEvent>,
        appended: Arc<Notify>,
    ) -> Forwarder {
        Forwarder {
            outbox,
            publisher,
            config,
            events,
            appended,
            connected: false,
            cursor: 0,
            in_flight: VecDeque::new(),
            next_send: Instant::now(),
            caught_up: false,
            drain: None,
            read_failures: 0,
            oversized: 0,
        }
    }

    /// Runs until `shutdown` turns true, then waits up to a few seconds for records in
    /// flight and signals the session to disconnect through `session_stop`. After the
    /// last acknowledgements it flushes the outbox and returns the outbox counters.
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        session_stop: watch::Sender<bool>,
    ) -> OutboxStats {
        let mut sync_timer = tokio::time::interval(SYNC_TICK);
        sync_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let wake = self.send_ready().await;
            tokio::select! {
                event = self.events.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => break,
                },
                () = self.appended.notified() => {}
                () = sleep_until(wake), if wake.is_some() => {}
                _ = sync_timer.tick() => self.sync_if_due().await,
                _ = shutdown.changed() => break,
            }
        }

        self.flush_in_flight().await;
        session_stop.send_replace(true);
        while let Some(event) = self.events.recv().await {
            self.handle(event).await;
        }
        if self.oversized > 0 {
            tracing::warn!(
                records = self.oversized,
                "records dropped since start for exceeding the maximum packet size"
            );
        }
        let (closed, stats) =
            with_outbox(&self.outbox, |outbox| (outbox.sync(), outbox.stats())).await;
        if let Err(error) = closed {
            tracing::error!(error = %error_chain(&error), "outbox not flushed at shutdown");
        }
        stats
    }

    /// Sends records while connected, within the window and the rate. Returns when the
    /// next record may go under the rate limit, or `None` when nothing is waiting on the
    /// clock.
    async fn send_ready(&mut self) -> Option<Instant> {
        self.caught_up = false;
        let period = Duration::from_secs_f64(1.0 / self.config.settings.borrow().drain_rate);
        while self.connected && self.in_flight.len() < self.config.window {
            let now = Instant::now();
            if self.next_send > now {
                return Some(self.next_send);
            }
            let cursor = self.cursor;
            let read = with_outbox(&self.outbox, move |outbox| outbox.read_after(cursor, 1)).await;
            let record = match read {
                Ok(mut records) if !records.is_empty() => records.remove(0),
                Ok(_) => {
                    self.caught_up = true;
                    self.finish_drain_if_done();
                    return None;
                }
                Err(error) => {
                    self.read_failures += 1;
                    if self.read_failures <= 3 || self.read_failures.is_multiple_of(100) {
                        tracing::error!(error = %error_chain(&error), failures = self.read_failures, "outbox read failed, retrying");
                    }
                    return Some(now + RETRY_DELAY);
                }
            };
            let kind = PublishKind::Telemetry {
                position: record.position,
            };
            let (topic, payload) = match record.payload.split_first() {
                Some((&EVENT_RECORD, event)) => (&self.config.events_topic, event.to_vec()),
                _ => (&self.config.topic, record.payload),
            };
            let packet_bytes = self.publisher.packet_size(topic, &payload);
            let max_packet_bytes = self.publisher.max_packet_bytes();
            if packet_bytes > max_packet_bytes {
                // A broker closes the connection on an oversized packet, so sending this
                // record would block every record behind it on each reconnect.
                let hint = if self.publisher.limit_from_broker() {
                    "the limit is the broker's own, from its CONNACK; raise it on the broker"
                } else {
                    "raise --max-packet-bytes if the broker takes larger packets"
                };
                tracing::error!(
                    position = record.position,
                    packet_bytes,
                    max_packet_bytes,
                    topic = %topic,
                    hint,
                    "record larger than the maximum packet size dropped from the outbox"
                );
                self.oversized += 1;
                self.cursor = record.position;
                self.in_flight.push_back(InFlight {
                    position: record.position,
                    acked: false,
                });
                self.acked(record.position).await;
                continue;
            }
            if self.publisher.publish(topic, kind, false, payload).is_err() {
                return Some(now + RETRY_DELAY);
            }
            self.cursor = record.position;
            self.in_flight.push_back(InFlight {
                position: record.position,
                acked: false,
            });
            // Keep to the schedule when a wake-up came a little late, so timer granularity
            // does not lower the rate, but start afresh after an idle spell instead of
            // bursting to catch up.
            self.next_send = if now > self.next_send + period {
                now + period
            } else {
                self.next_send + period
            };
        }
        None
    }

    async fn handle(&mut self, event: SessionEvent) {
        match event {
            SessionEvent::Connected => {
                self.connected = true;
                self.in_flight.clear();
                self.next_send = Instant::now();
                let stats = with_outbox(&self.outbox, |outbox| outbox.stats()).await;
                self.cursor = stats.acked_through;
                if stats.pending_records > 0 {
                    tracing::info!(
                        pending_records = stats.pending_records,
                        drain_rate = self.config.settings.borrow().drain_rate,
                        "sending telemetry backlog"
                    );
                    self.drain = Some(Drain {
                        started: Instant::now(),
                        records: stats.pending_records,
                    });
                }
            }
            SessionEvent::Disconnected => {
                self.connected = false;
                self.in_flight.clear();
            }
            SessionEvent::Acked { position } => self.acked(position).await,
        }
    }

    /// Marks a record acknowledged and moves the outbox's acknowledged position over
    /// every leading record that is.
    async fn acked(&mut self, position: u64) {
        // An acknowledgement for a record no longer tracked comes from a publish that
        // raced a reconnect; that record is sent again anyway.
        let Some(entry) = self.in_flight.iter_mut().find(|e| e.position == position) else {
            tracing::debug!(position, "acknowledgement for a record not in flight");
            return;
        };
        entry.acked = true;
        let mut through = None;
        while self.in_flight.front().is_some_and(|entry| entry.acked) {
            through = self.in_flight.pop_front().map(|entry| entry.position);
        }
        let Some(through) = through else {
            return;
        };
        let result = with_outbox(&self.outbox, move |outbox| outbox.ack_through(through)).await;
        if let Err(error) = result {
            tracing::error!(error = %error_chain(&error), position = through, "outbox acknowledgement not stored");
        }
        self.finish_drain_if_done();
    }

    fn finish_drain_if_done(&mut self) {
        if !(self.caught_up && self.in_flight.is_empty()) {
            return;
        }
        if let Some(drain) = self.drain.take() {
            tracing::info!(
                records = drain.records,
                seconds = drain.started.elapsed().as_secs_f64(),
                "telemetry backlog sent"
            );
        }
    }

    async fn sync_if_due(&mut self) {
        let result = with_outbox(&self.outbox, |outbox| outbox.sync_if_due()).await;
        if let Err(error) = result {
            tracing::error!(error = %error_chain(&error), "outbox flush failed");
        }
    }

    /// Sends what is left and waits for acknowledgements, for at most [`FLUSH_TIMEOUT`].
    async fn flush_in_flight(&mut self) {
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        loop {
            let wake = self.send_ready().await;
            if !self.connected || (self.caught_up && self.in_flight.is_empty()) {
                return;
            }
            tokio::select! {
                event = self.events.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => return,
                },
                () = sleep_until(wake), if wake.is_some() => {}
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(in_flight = self.in_flight.len(), "telemetry not acknowledged before shutdown; it stays in the outbox");
                    return;
                }
            }
        }
    }
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(wake) => tokio::time::sleep_until(wake).await,
        None => std::future::pending().await,
    }
}

/// Formats an error with its sources, as "what: cause".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
