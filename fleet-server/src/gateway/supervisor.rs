//! Starting and stopping local replica processes.
//!
//! A replica binds port 0 itself and prints `{"listening":"ADDRESS"}` on its first line
//! of standard output, so there is no race between picking a free port and binding it.
//! It runs with `--exit-on-stdin-close`, so closing its standard input makes it finish
//! its requests and exit. A gateway that dies closes those pipes and so takes its
//! replicas with it.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::oneshot;

use super::config::Batching;

/// How long a replica has to exit after its standard input closes.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from starting a replica.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("failed to start replica program {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("replica exited before it listened ({status})")]
    Exited { status: String },
    #[error("replica did not report its address within {0:?}")]
    TimedOut(Duration),
    #[error("replica printed {line:?} instead of its address")]
    BadAddress { line: String },
}

/// Everything needed to start replicas of one model.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// Program and leading arguments, such as `fleet replica`.
    pub command: Vec<String>,
    pub bundle: PathBuf,
    pub public_key: PathBuf,
    pub model_name: String,
    pub batching: Batching,
    pub max_batch_per_request: usize,
    pub max_body_bytes: usize,
    pub startup_timeout: Duration,
}

/// A started replica process that has reported its address.
#[derive(Debug)]
pub struct Launched {
    pub address: String,
    pub pid: Option<u32>,
    pub process: ReplicaProcess,
}

/// The process handle and its standard input, whose closing stops it.
#[derive(Debug)]
pub struct ReplicaProcess {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// Outcome of a supervised replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Stopped on request after finishing its work.
    Stopped,
    /// Did not exit in time after the request and was killed.
    Killed,
    /// Exited by itself, with this status.
    Crashed(String),
}

impl Launcher {
    /// Starts a replica and waits until it reports the address it listens on.
    pub async fn launch(&self) -> Result<Launched, LaunchError> {
        let program = PathBuf::from(&self.command[0]);
        let mut command = Command::new(&program);
        command
            .args(&self.command[1..])
            .arg("--bundle")
            .arg(&self.bundle)
            .arg("--public-key")
            .arg(&self.public_key)
            .args(["--model-name", &self.model_name, "--listen", "127.0.0.1:0"])
            .args([
                "--max-batch-size",
                &self.batching.max_batch_size.to_string(),
            ])
            .arg("--max-queue-delay-microseconds")
            .arg(self.batching.max_queue_delay_microseconds.to_string())
            .args([
                "--max-queue-size",
                &self.batching.max_queue_size.to_string(),
            ])
            .args([
                "--max-batch-per-request",
                &self.max_batch_per_request.to_string(),
            ])
            .args(["--max-body-bytes", &self.max_body_bytes.to_string()])
            .arg("--exit-on-stdin-close")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|source| LaunchError::Spawn {
            program: program.clone(),
            source,
        })?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();

        let first = tokio::time::timeout(self.startup_timeout, lines.next_line()).await;
        let line = match first {
            Ok(Ok(Some(line))) => line,
            Ok(_) => {
                let status = child
                    .wait()
                    .await
                    .map_or_else(|e| e.to_string(), |s| s.to_string());
                return Err(LaunchError::Exited { status });
            }
            Err(_) => {
                let _ = child.kill().await;
                return Err(LaunchError::TimedOut(self.startup_timeout));
            }
        };
        let address =
            parse_listening(&line).ok_or_else(|| LaunchError::BadAddress { line: line.clone() })?;
        // Keep reading, so a replica that prints more does not block on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Launched {
            address,
            pid: child.id(),
            process: ReplicaProcess { child, stdin },
        })
    }
}

fn parse_listening(line: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    Some(value.get("listening")?.as_str()?.to_owned())
}

impl ReplicaProcess {
    /// Waits until the process exits by itself or `stop` fires; on `stop`, closes its
    /// standard input and waits up to [`STOP_TIMEOUT`] before killing it.
    pub async fn supervise(mut self, stop: oneshot::Receiver<()>) -> Exit {
        tokio::select! {
            status = self.child.wait() => {
                Exit::Crashed(status.map_or_else(|e| e.to_string(), |s| s.to_string()))
            }
            _ = stop => {
                drop(self.stdin.take());
                match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
                    Ok(_) => Exit::Stopped,
                    Err(_) => {
                        let _ = self.child.kill().await;
                        Exit::Killed
                    }
                }
            }
        }
    }
}

/// Returns the default replica command: this executable's `replica` subcommand when it
/// is the multicall `fleet` binary, else `fleet-replica` in the same folder.
pub fn default_command() -> std::io::Result<Vec<String>> {
    let exe = std::env::current_exe()?;
    let is_fleet = exe.file_stem().is_some_and(|stem| stem == "fleet");
    let command = if is_fleet {
        vec![exe.to_string_lossy().into_owned(), "replica".to_owned()]
    } else {
        let sibling = exe.with_file_name(format!("fleet-replica{}", std::env::consts::EXE_SUFFIX));
        vec![sibling.to_string_lossy().into_owned()]
    };
    Ok(command)
}

/// A shared, growing id source for backends.
#[derive(Debug, Default, Clone)]
pub struct BackendIds(Arc<std::sync::atomic::AtomicU64>);

impl BackendIds {
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_line_is_parsed() {
        assert_eq!(
            parse_listening(r#"{"listening":"127.0.0.1:4000"}"#),
            Some("127.0.0.1:4000".into())
        );
        assert_eq!(parse_listening("listening on 4000"), None);
    }
}
