//! Free TCP ports for test servers. Also used by the fleet server's gateway tests, which
//! include this file by path.

use std::net::TcpListener;

/// Returns a TCP port nothing listens on right now, and never the same port twice in
/// one test process: the kernel may offer a released port again before the first
/// caller's server has bound it.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("bind an ephemeral port")
            .port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}
