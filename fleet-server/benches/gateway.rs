//! Load benchmark of the inference gateway on loopback with the digit CNN.
//!
//! 1. Overhead: the same fixed request rates (100 and 1,000 per second) sent straight to
//!    a replica and through a gateway with that one replica, in alternating slices, with
//!    latency percentiles side by side. A third row sends binary tensors through the
//!    gateway, which re-encodes them as JSON for the replica and the response back.
//!    The gateway's own time per request, read from its `Server-Timing` header, is
//!    listed apart: it does not depend on how the replica's latency swings.
//! 2. Steps: an open-loop load of 10, then 500 (or `GATEWAY_BENCH_STEP_RATE`), then 10
//!    requests per second through an autoscaled gateway. It reports throughput, latency
//!    percentiles, the replica count and the time until the p95 over the last second is
//!    back under the SLO.
//!
//! Run with `cargo bench -p fleet-server --bench gateway`; `GATEWAY_BENCH_SCALE=0.3`
//! shortens every phase to 30 %, and `GATEWAY_BENCH_MAX_REPLICAS` bounds the steps'
//! replicas (default: this machine's cores). `GATEWAY_BENCH_PART=overhead` or `steps`
//! runs one part only.

#[path = "../tests/gateway_support/mod.rs"]
mod gateway_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_support::{Reference, ReplicaProcess, TestBundle, TestGateway};

/// Slices each path of the overhead comparison is split into. Short slices spread the
/// slow spells of a shared machine over all three paths.
const ROUNDS: usize = 20;

/// The latency objective configured for the step benchmark, in milliseconds.
const SLO_MS: f64 = 50.0;

/// One finished request: when it was sent (since the phase start), its latency,
/// whether it succeeded, and the gateway's own share of the latency from its
/// `Server-Timing` header (absent on direct calls).
#[derive(Debug, Clone, Copy)]
struct Sample {
    sent: Duration,
    latency: Duration,
    ok: bool,
    /// The response's status, or `None` when no response came.
    status: Option<u16>,
    /// The parts of `Server-Timing`, absent on responses the gateway made itself.
    timing: Option<Timing>,
}

/// The `Server-Timing` parts of one response, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Timing {
    gateway: f64,
    queue: f64,
    backend: f64,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let scale = positive_env("GATEWAY_BENCH_SCALE", 1.0);
    let part = std::env::var("GATEWAY_BENCH_PART").unwrap_or_default();
    let bundle = TestBundle::new();
    let reference = Arc::new(Reference::load());
    match part.as_str() {
        "" => {
            overhead(&bundle, &reference, scale).await;
            steps(&bundle, &reference, scale).await;
        }
        "overhead" => overhead(&bundle, &reference, scale).await,
        "steps" => steps(&bundle, &reference, scale).await,
        other => panic!("GATEWAY_BENCH_PART is {other:?}; expected overhead or steps"),
    }
}

/// Returns the environment variable `name` as a positive number, or `default` when it
/// is unset. Any other value panics with a message naming the variable.
fn positive_env(name: &str, default: f64) -> f64 {
    let Ok(value) = std::env::var(name) else {
        return default;
    };
    match value.parse::<f64>() {
        Ok(number) if number.is_finite() && number > 0.0 => number,
        _ => panic!("{name} is {value:?}; expected a positive number"),
    }
}

/// Compares a replica called directly with the same replica behind the gateway.
async fn overhead(bundle: &TestBundle, reference: &Arc<Reference>, scale: f64) {
    let duration = Duration::from_secs_f64(10.0 * scale);
    let replica = ReplicaProcess::start(bundle, &[]).await;
    let limits = "[limits]\nrate_per_second = 100000\nburst = 100000\n";
    let extra = format!(
        "external = [{:?}]\n[models.replicas]\nmin = 0\nmax = 0\n",
        replica.url
    );
    let gateway = Arc::new(TestGateway::start(&bundle.config(limits, &extra)).await);
    gateway
        .wait_ready_backends(1, Duration::from_secs(60))
        .await;

    let direct_url = format!("{}/v2/models/digit-cnn/infer", replica.url);
    let gateway_url = format!("{}/v2/models/digit-cnn/infer", gateway.base);
    let json = Bodies::json(reference);
    let binary = Bodies::binary(reference);
    // Warm up connections and the model.
    for (url, bodies) in [
        (&direct_url, &json),
        (&gateway_url, &json),
        (&gateway_url, &binary),
    ] {
        run_load(&gateway, bodies, url, &[(20.0, Duration::from_secs(1))]).await;
    }
    for rate in [100.0, 1000.0] {
        // The three paths take turns in short slices, so a slow spell of the shared
        // machine falls on all of them alike instead of on whichever ran then.
        let slice = [(rate, duration / ROUNDS as u32)];
        let (mut direct, mut through, mut through_binary) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            direct.extend(run_load(&gateway, &json, &direct_url, &slice).await);
            through.extend(run_load(&gateway, &json, &gateway_url, &slice).await);
            through_binary.extend(run_load(&gateway, &binary, &gateway_url, &slice).await);
        }
        let own = [
            ("JSON", gateway_percentiles(&through)),
            ("binary", gateway_percentiles(&through_binary)),
        ];
        let (direct, through, through_binary) = (
            summarize(&direct),
            summarize(&through),
            summarize(&through_binary),
        );

        println!(
            "\n## Gateway overhead at {rate} requests/s for {:.0} s per path in {ROUNDS} alternating slices, one replica, one sample per request\n",
            duration.as_secs_f64()
        );
        println!("| path | requests | errors | p50 ms | p95 ms | p99 ms |");
        println!("|---|---|---|---|---|---|");
        print_row("replica directly, JSON", &direct);
        print_row("through the gateway, JSON", &through);
        print_row("through the gateway, binary tensors", &through_binary);
        for (name, stats) in [("JSON", &through), ("binary", &through_binary)] {
            println!(
                "| gateway overhead, {name} | | | {:+.2} | {:+.2} | {:+.2} |",
                stats.p50 - direct.p50,
                stats.p95 - direct.p95,
                stats.p99 - direct.p99
            );
        }
        for (name, (p50, p95, p99)) in own {
            println!(
                "| gateway's own time, {name} (`Server-Timing`) | | | {p50:.3} | {p95:.3} | {p99:.3} |"
            );
        }
    }
    Arc::into_inner(gateway).unwrap().server.shutdown().await;
}

/// Request bodies for the 16 reference samples, encoded once so that the load loop
/// spends its time sending, not serialising.
#[derive(Debug)]
struct Bodies {
    bodies: Vec<bytes::Bytes>,
    /// `Inference-Header-Content-Length` of each body, for binary tensors.
    json_lengths: Option<Vec<usize>>,
}

impl Bodies {
    fn json(reference: &Reference) -> Bodies {
        let bodies = (0..16)
            .map(|i| serde_json::to_vec(&reference.body(&[i])).unwrap().into())
            .collect();
        Bodies {
            bodies,
            json_lengths: None,
        }
    }

    /// Bodies as Triton's client sends them by default: the input and the output as
    /// binary data.
    fn binary(reference: &Reference) -> Bodies {
        let mut bodies = Vec::new();
        let mut json_lengths = Vec::new();
        for i in 0..16 {
            let section = fleet_oip::encode_f32(reference.sample(i));
            let json = serde_json::json!({
                "inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                            "parameters": {"binary_data_size": section.len()}}],
                "outputs": [{"name": "logits", "parameters": {"binary_data": true}}],
            });
            let (body, json_length) =
                fleet_oip::join_body(serde_json::to_vec(&json).unwrap(), [section]);
            bodies.push(body.into());
            json_lengths.push(json_length);
        }
        Bodies {
            bodies,
            json_lengths: Some(json_lengths),
        }
    }

    fn request(&self, http: &reqwest::Client, url: &str, index: usize) -> reqwest::RequestBuilder {
        let index = index % self.bodies.len();
        let request = http.post(url).body(self.bodies[index].clone());
        match &self.json_lengths {
            None => request.header("content-type", "application/json"),
            Some(lengths) => request
                .header("content-type", "application/octet-stream")
                .header(fleet_oip::JSON_LENGTH_HEADER, lengths[index]),
        }
    }
}

/// Drives 10, 500 (or `GATEWAY_BENCH_STEP_RATE`) and 10 requests per second through an
/// autoscaled gateway.
///
/// The replica bound is the gateway's default, this machine's cores, unless
/// `GATEWAY_BENCH_MAX_REPLICAS` sets another. A replica runs its model on one core, so
/// replicas beyond the cores only take CPU from the others, while they start and while
/// they serve.
async fn steps(bundle: &TestBundle, reference: &Arc<Reference>, scale: f64) {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let max_replicas = positive_env("GATEWAY_BENCH_MAX_REPLICAS", cores as f64) as usize;
    let step_rate = positive_env("GATEWAY_BENCH_STEP_RATE", 500.0);
    let limits = "[limits]\nrate_per_second = 100000\nburst = 100000\n";
    let extra = format!(
        "[models.replicas]\nmin = 1\nmax = {max_replicas}\n\
         [models.slo]\np95_ms = {SLO_MS}\n\
         [models.autoscaler]\ninterval_ms = 250\ntarget_in_flight = 4\n\
         stable_window_secs = 6\npanic_window_secs = 1\nscale_down_cooldown_secs = 5\n"
    );
    let gateway = Arc::new(TestGateway::start(&bundle.config(limits, &extra)).await);
    gateway
        .wait_ready_backends(1, Duration::from_secs(60))
        .await;
    let model = gateway
        .server
        .gateway()
        .unwrap()
        .model("digit-cnn")
        .unwrap()
        .clone();
    let url = format!("{}/v2/models/digit-cnn/infer", gateway.base);

    let phases = [
        (10.0, Duration::from_secs_f64(15.0 * scale)),
        (step_rate, Duration::from_secs_f64(20.0 * scale)),
        (10.0, Duration::from_secs_f64(25.0 * scale)),
    ];
    let replicas = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let replicas = replicas.clone();
        let model = model.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                let count = model.local_replicas();
                replicas.lock().unwrap().push((started.elapsed(), count));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let samples = run_load(&gateway, &Bodies::json(reference), &url, &phases).await;
    sampler.abort();
    let replicas = replicas.lock().unwrap().clone();

    println!(
        "\n## Steps through the autoscaled gateway (SLO p95 {SLO_MS} ms, 1 to {max_replicas} replicas)\n"
    );
    println!(
        "| phase | offered/s | achieved/s | errors | p50 ms | p95 ms | p99 ms | replicas (min-max) | p95 back under SLO after |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut start = Duration::ZERO;
    for (rate, duration) in phases {
        let end = start + duration;
        let phase = sent_between(&samples, start, end);
        let stats = summarize(&phase);
        let counts: Vec<usize> = replicas
            .iter()
            .filter(|(at, _)| *at >= start && *at < end)
            .map(|(_, count)| *count)
            .collect();
        let (low, high) = (
            counts.iter().min().copied().unwrap_or(0),
            counts.iter().max().copied().unwrap_or(0),
        );
        let recovery = recovery_time(&phase, start, end)
            .map_or("not within the phase".to_owned(), |d| {
                format!("{:.1} s", d.as_secs_f64())
            });
        println!(
            "| {rate}/s for {:.0} s | {rate} | {:.1} | {} | {:.2} | {:.2} | {:.2} | {low}-{high} | {recovery} |",
            duration.as_secs_f64(),
            stats.ok as f64 / duration.as_secs_f64(),
            stats.errors,
            stats.p50,
            stats.p95,
            stats.p99,
        );
        start = end;
    }
    print_step_seconds(&samples, &replicas, phases[0].1, phases[1].1);
    print_errors(&samples);
    println!(
        "\nReplica count over time (s: replicas): {}",
        timeline(&replicas)
    );
    println!("\nScale decisions by direction and reason:");
    for line in gateway.metrics().await.lines() {
        if line.starts_with("fleet_gateway_scale_decisions_total") {
            println!("    {line}");
        }
    }
    Arc::into_inner(gateway).unwrap().server.shutdown().await;
}

/// Sends requests open-loop at each phase's rate for its duration and returns every
/// finished request.
async fn run_load(
    gateway: &Arc<TestGateway>,
    bodies: &Bodies,
    url: &str,
    phases: &[(f64, Duration)],
) -> Vec<Sample> {
    let started = Instant::now();
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    let mut phase_start = Duration::ZERO;
    let mut sent = 0usize;
    for &(rate, duration) in phases {
        let interval = Duration::from_secs_f64(1.0 / rate);
        let mut next = phase_start;
        while next < phase_start + duration {
            tokio::time::sleep_until(tokio::time::Instant::from_std(started + next)).await;
            let request = bodies
                .request(&gateway.http, url, sent)
                .bearer_auth(&gateway.token);
            let results = results.clone();
            let offset = started.elapsed();
            tasks.spawn(async move {
                let begin = Instant::now();
                let (ok, status, timing) = match request.send().await {
                    Ok(response) => {
                        let status = response.status();
                        let timing = server_timing(response.headers());
                        let ok = status.is_success() && response.bytes().await.is_ok();
                        (ok, Some(status.as_u16()), timing)
                    }
                    Err(_) => (false, None, None),
                };
                let sample = Sample {
                    sent: offset,
                    latency: begin.elapsed(),
                    ok,
                    status,
                    timing,
                };
                results.lock().unwrap().push(sample);
            });
            sent += 1;
            next += interval;
        }
        phase_start += duration;
    }
    while tasks.join_next().await.is_some() {}
    let mut samples = results.lock().unwrap().clone();
    samples.sort_by_key(|s| s.sent);
    samples
}

/// Returns the `gateway`, `queue` and `backend` entries of a `Server-Timing` header.
fn server_timing(headers: &reqwest::header::HeaderMap) -> Option<Timing> {
    let value = headers.get("server-timing")?.to_str().ok()?;
    let part = |name: &str| {
        value.split(',').find_map(|entry| {
            let duration = entry.trim().strip_prefix(name)?.strip_prefix(";dur=")?;
            duration.parse::<f64>().ok()
        })
    };
    Some(Timing {
        gateway: part("gateway")?,
        queue: part("queue")?,
        backend: part("backend")?,
    })
}

#[derive(Debug)]
struct Stats {
    ok: usize,
    errors: usize,
    p50: f64,
    p95: f64,
    p99: f64,
}

fn summarize(samples: &[Sample]) -> Stats {
    let latencies: Vec<f64> = samples
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.latency.as_secs_f64() * 1000.0)
        .collect();
    let ok = latencies.len();
    let (p50, p95, p99) = percentiles(latencies);
    Stats {
        ok,
        errors: samples.len() - ok,
        p50,
        p95,
        p99,
    }
}

/// Returns the gateway's own time per successful request: p50, p95 and p99 in ms.
fn gateway_percentiles(samples: &[Sample]) -> (f64, f64, f64) {
    percentiles(
        samples
            .iter()
            .filter(|s| s.ok)
            .filter_map(|s| s.timing.map(|t| t.gateway))
            .collect(),
    )
}

/// Returns the 50th, 95th and 99th percentile of `values` by nearest rank; NaN when
/// empty.
fn percentiles(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if values.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
        values[rank - 1]
    };
    (at(0.5), at(0.95), at(0.99))
}

fn print_row(name: &str, stats: &Stats) {
    println!(
        "| {name} | {} | {} | {:.2} | {:.2} | {:.2} |",
        stats.ok + stats.errors,
        stats.errors,
        stats.p50,
        stats.p95,
        stats.p99
    );
}

/// Prints the failed requests of all phases by status, if any failed.
fn print_errors(samples: &[Sample]) {
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for sample in samples.iter().filter(|s| !s.ok) {
        let status = sample
            .status
            .map_or("no response".to_owned(), |code| code.to_string());
        *by_status.entry(status).or_default() += 1;
    }
    if by_status.is_empty() {
        return;
    }
    let counts: Vec<String> = by_status
        .iter()
        .map(|(status, count)| format!("{status}: {count}"))
        .collect();
    println!("\nFailed requests by status: {}", counts.join(", "));
}

/// Prints the step phase, from `start` for `duration`, one second per row: the p95 of
/// the whole request and of each `Server-Timing` part, and the replicas at the second's
/// end. A part's p95 that rises with the total shows where a slow second came from.
fn print_step_seconds(
    samples: &[Sample],
    replicas: &[(Duration, usize)],
    start: Duration,
    duration: Duration,
) {
    println!("\nThe step, second by second (p95 in ms):\n");
    println!("| second | requests | errors | total | gateway | queue | backend | replicas |");
    println!("|---|---|---|---|---|---|---|---|");
    let second = Duration::from_secs(1);
    let mut at = start;
    while at + second <= start + duration {
        let window = sent_between(samples, at, at + second);
        let stats = summarize(&window);
        let part = |get: fn(&Timing) -> f64| {
            let values = window.iter().filter_map(|s| s.timing.as_ref().map(get));
            percentiles(values.collect()).1
        };
        let count = replicas
            .iter()
            .take_while(|(t, _)| *t < at + second)
            .last()
            .map_or(0, |(_, count)| *count);
        println!(
            "| {:.0} | {} | {} | {:.2} | {:.3} | {:.3} | {:.2} | {count} |",
            (at - start).as_secs_f64(),
            stats.ok + stats.errors,
            stats.errors,
            stats.p95,
            part(|t| t.gateway),
            part(|t| t.queue),
            part(|t| t.backend),
        );
        at += second;
    }
}

/// Returns the samples of the requests sent from `start` until before `end`.
fn sent_between(samples: &[Sample], start: Duration, end: Duration) -> Vec<Sample> {
    samples
        .iter()
        .copied()
        .filter(|s| s.sent >= start && s.sent < end)
        .collect()
}

/// Returns the time from the phase start until the p95 of requests sent in a
/// one-second window is under the SLO and stays there for the rest of the phase.
fn recovery_time(samples: &[Sample], start: Duration, end: Duration) -> Option<Duration> {
    let window = Duration::from_secs(1);
    let mut recovered_at = None;
    let mut at = start;
    while at + window <= end {
        let in_window = sent_between(samples, at, at + window);
        let stats = summarize(&in_window);
        let good = stats.errors == 0 && (in_window.is_empty() || stats.p95 <= SLO_MS);
        match (good, recovered_at) {
            (true, None) => recovered_at = Some(at + window - start),
            (false, _) => recovered_at = None,
            _ => {}
        }
        at += Duration::from_millis(250);
    }
    recovered_at
}

fn timeline(replicas: &[(Duration, usize)]) -> String {
    let mut changes = Vec::new();
    let mut last = None;
    for &(at, count) in replicas {
        if last != Some(count) {
            changes.push(format!("{:.1}: {count}", at.as_secs_f64()));
            last = Some(count);
        }
    }
    changes.join(", ")
}
