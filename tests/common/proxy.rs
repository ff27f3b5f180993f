//! A TCP proxy in front of the fleet server's HTTP port that cuts or stalls bundle
//! downloads on purpose, for the tests of resumed and interrupted updates.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What happens to the next archive download through the proxy.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Close the connection after this many response bytes.
    Close { after: usize },
    /// Stop forwarding after this many response bytes and hold the connection open.
    Stall { after: usize },
}

#[derive(Debug, Default)]
struct Shared {
    target: Option<SocketAddr>,
    faults: VecDeque<Fault>,
    /// Request heads of archive downloads, in arrival order.
    downloads: Vec<String>,
}

/// The proxy; it listens until the test ends.
#[derive(Debug, Clone)]
pub struct FaultyProxy {
    pub port: u16,
    shared: Arc<Mutex<Shared>>,
}

impl FaultyProxy {
    /// Listens on a free loopback port; connections wait for [`FaultyProxy::forward_to`].
    pub fn start() -> FaultyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let accepting = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let shared = accepting.clone();
                std::thread::spawn(move || relay(client, &shared));
            }
        });
        FaultyProxy { port, shared }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn forward_to(&self, target: SocketAddr) {
        self.shared.lock().unwrap().target = Some(target);
    }

    /// Applies `fault` to the next archive download that does not already have one.
    pub fn inject(&self, fault: Fault) {
        self.shared.lock().unwrap().faults.push_back(fault);
    }

    /// Returns the request heads of the archive downloads seen so far.
    pub fn downloads(&self) -> Vec<String> {
        self.shared.lock().unwrap().downloads.clone()
    }
}

fn relay(mut client: TcpStream, shared: &Mutex<Shared>) {
    let Some(head) = read_head(&mut client) else {
        return;
    };
    let text = String::from_utf8_lossy(&head).into_owned();
    let (target, fault) = {
        let mut shared = shared.lock().unwrap();
        let fault = if text.starts_with("GET ") && text.contains("/archive") {
            shared.downloads.push(text.clone());
            shared.faults.pop_front()
        } else {
            None
        };
        (shared.target.expect("proxy target set"), fault)
    };
    let Ok(mut server) = TcpStream::connect(target) else {
        return;
    };
    if server.write_all(&head).is_err() {
        return;
    }
    let client_closed = Arc::new(AtomicBool::new(false));
    {
        let (mut from, mut to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let closed = client_closed.clone();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            closed.store(true, Ordering::SeqCst);
            let _ = to.shutdown(Shutdown::Write);
        });
    }
    let limit = match fault {
        Some(Fault::Close { after } | Fault::Stall { after }) => after,
        None => usize::MAX,
    };
    let mut sent = 0usize;
    let mut block = [0u8; 16 * 1024];
    while sent < limit {
        let read = match server.read(&mut block) {
            Ok(0) | Err(_) => break,
            Ok(read) => read.min(limit - sent),
        };
        if client.write_all(&block[..read]).is_err() {
            break;
        }
        sent += read;
    }
    if let Some(Fault::Stall { .. }) = fault {
        let _ = server.shutdown(Shutdown::Both);
        // Hold the client until it gives up or is killed.
        for _ in 0..1200 {
            if client_closed.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

/// Reads up to the end of the HTTP request head.
fn read_head(client: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
        if head.len() > 64 * 1024 {
            return None;
        }
    }
    Some(head)
}
