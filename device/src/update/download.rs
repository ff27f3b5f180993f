//! Resumable download of a bundle archive from the fleet server.
//!
//! Bytes are appended to a `.part` file and flushed after every attempt, so a cut
//! connection or a restarted agent continues with an HTTP range request where the last
//! attempt stopped. The caller checks the hash of the finished file.

use std::fs;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::time::Duration;

/// Attempts per download before the update fails.
const ATTEMPTS: u32 = 5;
/// Wait before the second attempt, doubled after each further failure.
const FIRST_RETRY: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A server silent for this long counts as a cut connection.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Download failure.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("the server refused the download with HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("the server sent more than the {expected} bytes the command announced")]
    TooLong { expected: u64 },
    #[error("gave up after {attempts} attempts; the last failed with: {last}")]
    GaveUp { attempts: u32, last: String },
    #[error("failed to write {path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Statistics of a finished download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Downloaded {
    /// Bytes already on disk from an earlier attempt or agent run.
    pub resumed_from: u64,
    /// Requests made, the first included.
    pub attempts: u32,
}

/// Downloads `url` into `part` until the file is `size` bytes long, resuming after the
/// bytes already in it. `token` is sent in an `Authorization: Bearer` header.
pub fn download(
    url: &str,
    token: Option<&str>,
    part: &Path,
    size: u64,
) -> Result<Downloaded, DownloadError> {
    let io_error = |source| DownloadError::Io {
        path: part.to_path_buf(),
        source,
    };
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(CONNECT_TIMEOUT)
        .timeout_read(READ_TIMEOUT)
        .build();
    let mut file = fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(part)
        .map_err(io_error)?;
    let mut have = file.metadata().map_err(io_error)?.len();
    if have > size {
        file.set_len(0).map_err(io_error)?;
        have = 0;
    }
    let resumed_from = have;
    let mut wait = FIRST_RETRY;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        if have == size {
            return Ok(Downloaded {
                resumed_from,
                attempts: attempt - 1,
            });
        }
        match fetch_from(&agent, url, token, (part, &mut file), have, size) {
            Ok(()) => {}
            Err(Attempt::Fatal(error)) => return Err(error),
            Err(Attempt::Retry(reason)) => {
                tracing::warn!(url, attempt, have, size, reason = %reason, "download interrupted; resuming");
                last = reason;
            }
            Err(Attempt::Restart(reason)) => {
                tracing::warn!(url, attempt, reason = %reason, "download restarts from the beginning");
                file.set_len(0).map_err(io_error)?;
                last = reason;
            }
        }
        file.sync_data().map_err(io_error)?;
        have = file.metadata().map_err(io_error)?.len();
        if have == size {
            return Ok(Downloaded {
                resumed_from,
                attempts: attempt,
            });
        }
        if attempt < ATTEMPTS {
            std::thread::sleep(wait);
            wait *= 2;
        }
    }
    Err(DownloadError::GaveUp {
        attempts: ATTEMPTS,
        last,
    })
}

/// Outcome of a request that ended short of the whole file.
enum Attempt {
    /// Stop: retrying cannot help.
    Fatal(DownloadError),
    /// Resume from the bytes on disk.
    Retry(String),
    /// The bytes on disk are unusable; start again from zero.
    Restart(String),
}

fn fetch_from(
    agent: &ureq::Agent,
    url: &str,
    token: Option<&str>,
    (path, file): (&Path, &mut fs::File),
    have: u64,
    size: u64,
) -> Result<(), Attempt> {
    let mut request = agent.get(url);
    if let Some(token) = token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    if have > 0 {
        request = request.set("Range", &format!("bytes={have}-"));
    }
    let response = match request.call() {
        Ok(response) => response,
        Err(ureq::Error::Status(416, _)) => {
            return Err(Attempt::Restart(
                "the server rejected the resume range".into(),
            ));
        }
        Err(ureq::Error::Status(status, response)) if status < 500 => {
            let body = response.into_string().unwrap_or_default();
            return Err(Attempt::Fatal(DownloadError::Refused {
                status,
                body: body.chars().take(300).collect(),
            }));
        }
        Err(error) => return Err(Attempt::Retry(error.to_string())),
    };
    let mut offset = have;
    match response.status() {
        206 => {
            let range = response.header("Content-Range").unwrap_or_default();
            if !range.starts_with(&format!("bytes {have}-")) {
                return Err(Attempt::Restart(format!(
                    "asked for bytes from {have}, the server sent {range:?}"
                )));
            }
        }
        200 if have > 0 => {
            // The server ignored the range and sends the whole file.
            file.set_len(0)
                .map_err(|error| Attempt::Retry(error.to_string()))?;
            offset = 0;
        }
        _ => {}
    }
    file.seek(std::io::SeekFrom::End(0))
        .map_err(|error| Attempt::Retry(error.to_string()))?;
    let mut body = response.into_reader();
    let mut block = vec![0u8; 64 * 1024];
    loop {
        let read = match body.read(&mut block) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) => return Err(Attempt::Retry(error.to_string())),
        };
        if offset + read as u64 > size {
            return Err(Attempt::Fatal(DownloadError::TooLong { expected: size }));
        }
        file.write_all(&block[..read]).map_err(|source| {
            Attempt::Fatal(DownloadError::Io {
                path: path.to_path_buf(),
                source,
            })
        })?;
        offset += read as u64;
    }
    if offset < size {
        return Err(Attempt::Retry(format!(
            "the connection closed after {offset} of {size} bytes"
        )));
    }
    Ok(())
}
