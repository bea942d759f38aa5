//! A loopback TCP proxy that injects network faults between a syncd process and a service, for
//! the fault suite. Point a process at [`FaultProxy::address`] instead of the service, then
//! switch the [`Fault`] while it runs:
//!
//! - [`Fault::None`]: bytes pass unchanged;
//! - [`Fault::Down`]: the port refuses connections and every open connection is cut, as when
//!   the service or its host is gone;
//! - [`Fault::Latency`]: every chunk is delayed, both ways;
//! - [`Fault::Bandwidth`]: both directions are throttled to so many bytes per second;
//! - [`Fault::HalfOpen`]: connections stay open but nothing moves, either way, as across a
//!   network partition: only timeouts and heartbeats notice. New connections are accepted and
//!   hang the same way.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    Down,
    Latency(Duration),
    Bandwidth(u64),
    HalfOpen,
}

/// One proxied service.
pub struct FaultProxy {
    address: SocketAddr,
    fault: watch::Sender<Fault>,
    /// Connections accepted so far.
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let address = listener.local_addr()?;
        drop(listener);
        let (fault, faults) = watch::channel(Fault::None);
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve(address, upstream, faults, accepted.clone()));
        // Wait until the port listens again under the serving task.
        for _ in 0..100 {
            if TcpStream::connect(address).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            address,
            fault,
            accepted,
            task,
        })
    }

    /// The upstream of a URL like `postgres://user@127.0.0.1:5432/db` (its host and port).
    pub async fn for_url(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url).with_context(|| format!("parsing {url}"))?;
        let host = parsed.host_str().context("the url has no host")?;
        let port = parsed
            .port_or_known_default()
            .context("the url has no port")?;
        let upstream = tokio::net::lookup_host((host, port))
            .await?
            .next()
            .with_context(|| format!("resolving {host}:{port}"))?;
        Self::start(upstream).await
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `url` with its host and port replaced by this proxy's (without the `/` a bare endpoint
    /// gains on the way through `Url`).
    pub fn route(&self, url: &str) -> Result<String> {
        let mut parsed = url::Url::parse(url).with_context(|| format!("parsing {url}"))?;
        parsed
            .set_host(Some("127.0.0.1"))
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        parsed
            .set_port(Some(self.address.port()))
            .map_err(|()| anyhow::anyhow!("cannot set a port on {url}"))?;
        Ok(parsed.to_string().trim_end_matches('/').to_string())
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn bind(address: SocketAddr) -> Result<tokio::net::TcpListener> {
    let socket = TcpSocket::new_v4()?;
    // The port is bound again after every outage; connections of the last binding may linger.
    socket.set_reuseaddr(true)?;
    socket
        .bind(address)
        .with_context(|| format!("binding {address}"))?;
    Ok(socket.listen(1024)?)
}

/// Accepts while the fault allows, closing the port while it is down.
async fn serve(
    address: SocketAddr,
    upstream: SocketAddr,
    mut faults: watch::Receiver<Fault>,
    accepted: Arc<AtomicU64>,
) {
    loop {
        if *faults.borrow_and_update() == Fault::Down {
            if faults.changed().await.is_err() {
                return;
            }
            continue;
        }
        let listener = match bind(address) {
            Ok(listener) => listener,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                changed = faults.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if *faults.borrow() == Fault::Down {
                        break;
                    }
                }
                connection = listener.accept() => {
                    let Ok((client, _)) = connection else { continue };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(forward(client, upstream, faults.clone()));
                }
            }
        }
    }
}

/// One proxied connection, cut when the proxy goes down.
async fn forward(client: TcpStream, upstream: SocketAddr, faults: watch::Receiver<Fault>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let mut down = faults.clone();
    tokio::select! {
        _ = pump(client_read, server_write, faults.clone()) => {}
        _ = pump(server_read, client_write, faults) => {}
        _ = down.wait_for(|fault| *fault == Fault::Down) => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut faults: watch::Receiver<Fault>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        // Nothing moves while the connection is half-open; what was sent arrives if it heals
        // before the peers give up, as TCP retransmits across a healed partition.
        if faults
            .wait_for(|fault| *fault != Fault::HalfOpen)
            .await
            .is_err()
        {
            return;
        }
        let fault = *faults.borrow_and_update();
        match fault {
            Fault::Latency(delay) => tokio::time::sleep(delay).await,
            Fault::Bandwidth(bytes_per_second) => {
                let seconds = read as f64 / bytes_per_second.max(1) as f64;
                tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            }
            Fault::None | Fault::Down | Fault::HalfOpen => {}
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
