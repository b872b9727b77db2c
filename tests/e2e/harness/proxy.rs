//! A TCP proxy for the end-to-end tests, put in front of a decode worker's KV port: it
//! passes the KV stream through, and can flip a byte in it, cut it or hold it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the proxy does to the next KV bytes that pass from the prefill worker to the
/// decode worker.
#[derive(Debug, Clone, Copy)]
pub enum WireFault {
    /// Flip one byte this many bytes on.
    Corrupt(u64),
    /// Close both directions after this many bytes.
    Cut(u64),
    /// Hold everything after this many bytes until `Proxy::release`.
    Stall(u64),
}

/// A TCP proxy in front of a decode worker's KV listener that can damage the stream.
pub struct Proxy {
    pub addr: String,
    armed: Arc<Mutex<Option<WireFault>>>,
    /// Faults that took effect.
    pub applied: Arc<Mutex<Vec<WireFault>>>,
    /// While set, nothing passes toward the receiver (`WireFault::Stall`).
    stalled: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let armed: Arc<Mutex<Option<WireFault>>> = Arc::new(Mutex::new(None));
        let applied = Arc::new(Mutex::new(Vec::new()));
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (a2, ap2, st2) = (armed.clone(), applied.clone(), stalled.clone());
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(&upstream).await else { continue };
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                let (mut dr, mut dw) = down.into_split();
                let (mut ur, mut uw) = up.into_split();
                // Receiver to sender: untouched.
                let back = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut ur, &mut dw).await;
                });
                let (armed, applied, stalled) = (a2.clone(), ap2.clone(), st2.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match dr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let fault = *armed.lock().unwrap();
                        let mut end = n;
                        let mut cut = false;
                        match fault {
                            Some(WireFault::Corrupt(at)) if at < n as u64 => {
                                buf[at as usize] ^= 0x5a;
                                *armed.lock().unwrap() = None;
                                applied.lock().unwrap().push(fault.unwrap());
                            }
                            Some(WireFault::Cut(at)) if at < n as u64 => {
                                end = at as usize;
                                cut = true;
                                *armed.lock().unwrap() = None;
                                applied.lock().unwrap().push(fault.unwrap());
                            }
                            Some(WireFault::Corrupt(at)) => {
                                *armed.lock().unwrap() = Some(WireFault::Corrupt(at - n as u64))
                            }
                            Some(WireFault::Cut(at)) => *armed.lock().unwrap() = Some(WireFault::Cut(at - n as u64)),
                            Some(WireFault::Stall(at)) if at < n as u64 => {
                                if uw.write_all(&buf[..at as usize]).await.is_err() {
                                    break;
                                }
                                buf.copy_within(at as usize..n, 0);
                                end = n - at as usize;
                                stalled.store(true, std::sync::atomic::Ordering::SeqCst);
                                *armed.lock().unwrap() = None;
                                applied.lock().unwrap().push(fault.unwrap());
                            }
                            Some(WireFault::Stall(at)) => {
                                *armed.lock().unwrap() = Some(WireFault::Stall(at - n as u64))
                            }
                            None => {}
                        }
                        while stalled.load(std::sync::atomic::Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        if uw.write_all(&buf[..end]).await.is_err() || cut {
                            break;
                        }
                    }
                    // Both directions close: the sender sees its connection end mid-frame.
                    let _ = uw.shutdown().await;
                    back.abort();
                });
            }
        });
        Proxy { addr, armed, applied, stalled }
    }

    pub fn arm(&self, f: WireFault) {
        *self.armed.lock().unwrap() = Some(f);
    }

    /// Lets a stalled stream flow again.
    pub fn release(&self) {
        self.stalled.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether a stall holds the stream now.
    pub fn is_stalled(&self) -> bool {
        self.stalled.load(std::sync::atomic::Ordering::SeqCst)
    }
}
