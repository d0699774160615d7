//! Misbehaving Redis servers for the limiter's tests: a proxy to the real Redis that can refuse connections or
//! hold what clients send, and an address that accepts connections and never answers. Used by
//! `tests/api/redis_backend.rs` and `tests/api/rate_limits_redis.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The Redis every proxy forwards to.
const REDIS_ADDR: &str = "127.0.0.1:6379";

/// A TCP proxy to the real Redis that can refuse connections, or hold everything clients send (and deliver
/// it, in order, when released).
pub struct Proxy {
    pub refuse: AtomicBool,
    hold: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    /// Start the proxy on a free loopback port; returns its `redis://` URL.
    pub async fn start() -> (String, Arc<Proxy>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let proxy = Arc::new(Proxy { refuse: AtomicBool::new(false), hold: tokio::sync::watch::channel(false).0 });
        let this = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if this.refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut held = this.hold.subscribe();
                tokio::spawn(async move {
                    let server = TcpStream::connect(REDIS_ADDR).await.unwrap();
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    tokio::spawn(async move { tokio::io::copy(&mut from_server, &mut to_client).await });
                    let mut buf = vec![0_u8; 16 * 1024];
                    while let Ok(read @ 1..) = from_client.read(&mut buf).await {
                        // Held: wait until released, then forward in order.
                        if held.wait_for(|h| !*h).await.is_err() || to_server.write_all(&buf[..read]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, proxy)
    }

    /// Hold (`true`) or release (`false`) what clients send.
    pub fn hold(&self, on: bool) {
        self.hold.send_replace(on);
    }
}

/// A `redis://` URL of a server that accepts connections and never answers.
pub async fn silent_redis() -> String {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    url
}
