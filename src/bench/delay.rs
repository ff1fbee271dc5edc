//! A TCP forwarder that adds latency: every byte is held for a fixed time before it is
//! passed on, in each direction, so a request and its answer cost one round trip of
//! twice that on top of what the server takes. Bandwidth is not limited and nothing is
//! lost or reordered: a link as `tc qdisc ... netem delay` makes one, for a kernel
//! without the netem qdisc (this project's development host has none).
//!
//! Each connection gets two pumps per direction: a reader that stamps what it reads
//! with the time it is due and queues it, and a writer that sleeps until each piece is
//! due. A half-close travels through the queue as well, delayed like the data.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A forwarder on a loopback port to `to`; stops accepting when dropped (connections
/// already open run until their ends close).
pub(super) struct DelayProxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl DelayProxy {
    /// Listens on an ephemeral loopback port and forwards each connection to `to`,
    /// holding every byte `one_way` in each direction.
    pub fn start(to: SocketAddr, one_way: Duration) -> std::io::Result<DelayProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::Builder::new().name("delay-proxy".into()).spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(down) = conn else { continue };
                let Ok(up) = TcpStream::connect(to) else { continue };
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                for (from, into) in [(down.try_clone(), up.try_clone()), (Ok(up), Ok(down))] {
                    if let (Ok(from), Ok(into)) = (from, into) {
                        pump(from, into, one_way);
                    }
                }
            }
        })?;
        Ok(DelayProxy { addr, stop })
    }

    /// `http://ADDR`, for a client's endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Bytes read from `from` are written to `into` `delay` later; `from`'s end of stream
/// becomes a half-close of `into`, as late.
fn pump(mut from: TcpStream, mut into: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = from.read(&mut buf).unwrap_or(0);
            let due = Instant::now() + delay;
            let piece = (n > 0).then(|| buf[..n].to_vec());
            if tx.send((due, piece)).is_err() || n == 0 {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, piece) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            match piece {
                Some(bytes) if into.write_all(&bytes).is_ok() => {}
                _ => {
                    let _ = into.shutdown(Shutdown::Write);
                    break;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_and_its_answer_take_a_round_trip_and_arrive_whole() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut c in server.incoming().flatten() {
                let mut got = Vec::new();
                c.read_to_end(&mut got).unwrap();
                got.reverse();
                c.write_all(&got).unwrap();
            }
        });
        let proxy = DelayProxy::start(to, Duration::from_millis(30)).unwrap();
        let mut c = TcpStream::connect(proxy.addr).unwrap();
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let t = Instant::now();
        c.write_all(&sent).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        let took = t.elapsed();
        back.reverse();
        assert!(back == sent, "the bytes did not come back whole and in order");
        assert!(took >= Duration::from_millis(60), "a round trip took {took:?}, not at least 2 x 30 ms");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
}
