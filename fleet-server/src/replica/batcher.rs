//! Dynamic batching: requests that arrive within the queue delay of the first one run
//! as one model call, on a thread of their own so inference never blocks the async
//! runtime.
//!
//! The model is prepared once per batch size bucket (1, 2, 4, ... up to the maximum
//! batch size), because tract runs fastest with every dimension fixed. A batch runs on
//! the smallest bucket that holds it, padded with zeros whose outputs are dropped.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fleet_runtime::{Backend, RuntimeError, Tensor, TractBackend};
use tokio::sync::oneshot;

use super::metrics::ReplicaMetrics;

/// Output rows of one request, flat, with the shape of one row.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutput {
    pub data: Vec<f32>,
    pub row_shape: Vec<usize>,
}

/// One request waiting for a batch.
#[derive(Debug)]
struct Job {
    samples: usize,
    data: Vec<f32>,
    reply: oneshot::Sender<Result<BatchOutput, String>>,
}

/// Batching settings.
#[derive(Debug, Clone, Copy)]
pub struct BatchingConfig {
    pub max_batch_size: usize,
    pub max_queue_delay: Duration,
    pub max_queue_size: usize,
}

/// Error from queueing a request.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the replica's queue is full ({0} requests); retry later")]
    QueueFull(usize),
    #[error("the replica is shutting down")]
    Closed,
}

/// The handle requests are queued through; dropping it lets the thread finish the
/// queued requests and exit.
#[derive(Debug)]
pub struct Batcher {
    sender: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    queue_size: usize,
    queued: Arc<AtomicI64>,
    metrics: Arc<ReplicaMetrics>,
}

impl Batcher {
    /// Prepares the ONNX model at `model` for every bucket up to the maximum batch size
    /// with `sample_shape` per sample, and starts the batching thread.
    pub fn start(
        model: &Path,
        sample_shape: &[usize],
        config: BatchingConfig,
        metrics: Arc<ReplicaMetrics>,
    ) -> Result<Batcher, RuntimeError> {
        let mut backends = Vec::new();
        for size in bucket_sizes(config.max_batch_size) {
            let shape: Vec<usize> = std::iter::once(size)
                .chain(sample_shape.iter().copied())
                .collect();
            backends.push(TractBackend::load_onnx(model, &shape)?);
        }
        let (sender, receiver) = mpsc::sync_channel(config.max_queue_size);
        let queued = Arc::new(AtomicI64::new(0));
        let worker = Worker {
            backends,
            config,
            queued: queued.clone(),
            metrics: metrics.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("batcher".into())
            .spawn(move || worker.run(receiver))
            .map_err(|error| RuntimeError::Inference {
                backend: "tract",
                reason: format!("failed to start the batching thread: {error}"),
            })?;
        Ok(Batcher {
            sender: Some(sender),
            thread: Some(thread),
            queue_size: config.max_queue_size,
            queued,
            metrics,
        })
    }

    /// Queues `samples` samples laid out one after another in `data`, and returns where
    /// their output will arrive.
    pub fn submit(
        &self,
        samples: usize,
        data: Vec<f32>,
    ) -> Result<oneshot::Receiver<Result<BatchOutput, String>>, SubmitError> {
        let sender = self.sender.as_ref().ok_or(SubmitError::Closed)?;
        let (reply, receiver) = oneshot::channel();
        let job = Job {
            samples,
            data,
            reply,
        };
        self.queued.fetch_add(1, Ordering::SeqCst);
        match sender.try_send(job) {
            Ok(()) => {
                self.metrics
                    .queue_depth
                    .set(self.queued.load(Ordering::SeqCst));
                Ok(receiver)
            }
            Err(error) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                match error {
                    TrySendError::Full(_) => Err(SubmitError::QueueFull(self.queue_size)),
                    TrySendError::Disconnected(_) => Err(SubmitError::Closed),
                }
            }
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        drop(self.sender.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Returns the batch sizes the model is prepared for: powers of two below `max`, and
/// `max` itself.
pub fn bucket_sizes(max: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |size| size.checked_mul(2))
        .take_while(|&size| size < max)
        .collect();
    sizes.push(max.max(1));
    sizes
}

/// The batching thread's state.
struct Worker {
    /// One prepared model per bucket size, smallest first.
    backends: Vec<TractBackend>,
    config: BatchingConfig,
    queued: Arc<AtomicI64>,
    metrics: Arc<ReplicaMetrics>,
}

impl Worker {
    fn run(mut self, receiver: mpsc::Receiver<Job>) {
        while let Ok(first) = receiver.recv() {
            let deadline = Instant::now() + self.config.max_queue_delay;
            let mut samples = first.samples;
            let mut jobs = vec![first];
            while samples < self.config.max_batch_size {
                let wait = deadline.saturating_duration_since(Instant::now());
                match receiver.recv_timeout(wait) {
                    Ok(job) => {
                        samples += job.samples;
                        jobs.push(job);
                    }
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
            let remaining = self.queued.fetch_sub(jobs.len() as i64, Ordering::SeqCst);
            self.metrics.queue_depth.set(remaining - jobs.len() as i64);
            self.run_batch(jobs, samples);
        }
        tracing::debug!("batching thread stopped");
    }

    /// Runs the jobs' samples through the model and sends each job its rows.
    fn run_batch(&mut self, jobs: Vec<Job>, samples: usize) {
        let started = Instant::now();
        let mut data = Vec::with_capacity(jobs.iter().map(|job| job.data.len()).sum());
        for job in &jobs {
            data.extend_from_slice(&job.data);
        }
        let result = guarded(|| self.infer(samples, &data));
        self.metrics.batches.inc();
        self.metrics.requests.inc_by(jobs.len() as u64);
        self.metrics.batch_size.observe(samples as f64);
        self.metrics
            .inference_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(requests = jobs.len(), samples, "batch ran");

        match result {
            Ok((rows, row_shape)) => {
                let row_len: usize = row_shape.iter().product();
                let mut offset = 0;
                for job in jobs {
                    let end = offset + job.samples * row_len;
                    let output = BatchOutput {
                        data: rows[offset..end].to_vec(),
                        row_shape: row_shape.clone(),
                    };
                    offset = end;
                    let _ = job.reply.send(Ok(output));
                }
            }
            Err(error) => {
                tracing::error!(error = %error, samples, "batch inference failed");
                for job in jobs {
                    let _ = job.reply.send(Err(error.to_string()));
                }
            }
        }
    }

    /// Runs `samples` samples in chunks of the largest bucket, and the last chunk on the
    /// smallest bucket that fits it. Returns the output rows, flat, and one row's shape.
    fn infer(
        &mut self,
        samples: usize,
        data: &[f32],
    ) -> Result<(Vec<f32>, Vec<usize>), RuntimeError> {
        let sample_len = data.len() / samples.max(1);
        let mut rows = Vec::new();
        let mut row_shape = Vec::new();
        let mut done = 0;
        while done < samples {
            let left = samples - done;
            let index = self
                .backends
                .iter()
                .position(|backend| backend.batch_size() >= left)
                .unwrap_or(self.backends.len() - 1);
            let backend = &mut self.backends[index];
            let size = backend.batch_size();
            let take = left.min(size);
            let mut input = data[done * sample_len..(done + take) * sample_len].to_vec();
            input.resize(size * sample_len, 0.0);
            let output = backend.run(Tensor::new(backend.input_shape().to_vec(), input)?)?;
            row_shape = output.shape[1..].to_vec();
            for row in 0..take {
                rows.extend_from_slice(output.row(row));
            }
            done += take;
        }
        Ok((rows, row_shape))
    }
}

/// Runs `infer`, turning a panic inside it (tract asserts on some inputs) into an
/// error for the batch's requests. Without this the batching thread would die, and every
/// later request would get the shutting-down error while the health routes still
/// reported the replica ready.
fn guarded<T>(infer: impl FnOnce() -> Result<T, RuntimeError>) -> Result<T, RuntimeError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(infer)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|text| text.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_string());
        Err(RuntimeError::Inference {
            backend: "tract",
            reason: format!("the model panicked: {message}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarded_turns_panic_into_error() {
        let result: Result<(), RuntimeError> = guarded(|| panic!("index out of bounds"));
        let error = result.unwrap_err().to_string();
        assert!(
            error.contains("the model panicked: index out of bounds"),
            "{error}"
        );
    }

    #[test]
    fn guarded_passes_results_through() {
        assert_eq!(guarded(|| Ok(7)).unwrap(), 7);
    }

    #[test]
    fn buckets_are_powers_of_two_up_to_max() {
        assert_eq!(bucket_sizes(1), vec![1]);
        assert_eq!(bucket_sizes(8), vec![1, 2, 4, 8]);
        assert_eq!(bucket_sizes(6), vec![1, 2, 4, 6]);
    }
}
