//! ztunnel's HBONE connection pool (pool.rs there): per key (source workload, source IP,
//! destination identity, destination address), pooled mutual-TLS HTTP/2 connections,
//! each carrying up to `pool_max_streams` CONNECT streams at once. A new connection opens
//! only when every one of that key is full; the key's lock is held while it opens, so
//! concurrent flows wait for that one connection instead of opening their own. A
//! connection that has carried no stream for `pool_idle_timeout` is released.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use tokio_rustls::TlsConnector;

use crate::stats::Counters;
use crate::{tls, wire, Ctx};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub src_pod: usize,
    pub src_ip: IpAddr,
    pub dst_id: String,
    pub dst: SocketAddr, // the destination's HBONE address (its IP, port 15008)
}

struct Tunnel {
    sender: SendRequest<Bytes>,
    active: AtomicUsize,
    closed: Arc<AtomicBool>,
    idle_since: Mutex<Instant>,
}

type Slot = Arc<tokio::sync::Mutex<Vec<Arc<Tunnel>>>>;

#[derive(Default)]
pub struct Pool {
    slots: Mutex<HashMap<Key, Slot>>,
}

/// One stream's hold on its tunnel: counted active until dropped.
pub struct Lease {
    tunnel: Arc<Tunnel>,
    ctx: Arc<Ctx>,
    pod: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.tunnel.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.tunnel.idle_since.lock().unwrap() = Instant::now();
        }
        self.ctx.pods[self.pod]
            .stats
            .hbone
            .streams_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Stream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub lease: Lease,
}

fn err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{}: {}", what, e)
}

impl Pool {
    fn slot(&self, key: &Key) -> Slot {
        let mut slots = self.slots.lock().unwrap();
        slots.entry(key.clone()).or_default().clone()
    }

    /// A CONNECT stream to `key.dst` for `req`, on a pooled tunnel or a new one.
    pub async fn stream(
        &self,
        ctx: &Arc<Ctx>,
        key: Key,
        req: http::Request<()>,
    ) -> Result<Stream, String> {
        let stats = &ctx.pods[key.src_pod].stats.hbone;
        let max = ctx.cfg.pool_max_streams;
        let tunnel = {
            let slot = self.slot(&key);
            let mut list = slot.lock().await;
            list.retain(|t| !t.closed.load(Ordering::SeqCst));
            let reuse = list.iter().find(|t| t.active.load(Ordering::SeqCst) < max).cloned();
            let tunnel = match reuse {
                Some(t) => {
                    Counters::inc(&stats.tunnels_reused);
                    t
                }
                None => {
                    let t = Arc::new(connect(ctx, &key).await?);
                    list.push(t.clone());
                    t
                }
            };
            // Taken while the key is locked: a full tunnel is never handed out twice.
            let n = tunnel.active.fetch_add(1, Ordering::SeqCst) + 1;
            Counters::max(&stats.max_streams_on_a_tunnel, n as u64);
            tunnel
        };
        stats.streams_active.fetch_add(1, Ordering::Relaxed);
        let lease = Lease { tunnel: tunnel.clone(), ctx: ctx.clone(), pod: key.src_pod };
        let mut sender = match tunnel.sender.clone().ready().await {
            Ok(s) => s,
            Err(e) => {
                tunnel.closed.store(true, Ordering::SeqCst);
                return Err(format!("tunnel to {} not usable: {}", key.dst, e));
            }
        };
        let (response, send) = sender.send_request(req, false).map_err(err("CONNECT"))?;
        let response = response.await.map_err(err("CONNECT response"))?;
        if response.status() != http::StatusCode::OK {
            return Err(format!("CONNECT via {} answered {}", key.dst, response.status()));
        }
        Counters::inc(&stats.streams);
        Ok(Stream { send, recv: response.into_body(), lease })
    }

    /// Release every tunnel idle (no stream) for at least `idle`; how many went.
    pub fn release_idle(&self, idle: Duration) -> usize {
        let mut released = 0;
        let mut slots = self.slots.lock().unwrap();
        slots.retain(|_, slot| match slot.try_lock() {
            Ok(mut list) => {
                let before = list.len();
                list.retain(|t| {
                    !t.closed.load(Ordering::SeqCst)
                        && (t.active.load(Ordering::SeqCst) > 0
                            || t.idle_since.lock().unwrap().elapsed() < idle)
                });
                released += before - list.len();
                !list.is_empty()
            }
            Err(_) => true, // a flow is opening a stream on it right now
        });
        released
    }
}

/// A new tunnel: TCP from the source pod to the destination's 15008, mutual TLS 1.3
/// checking the destination's identity, HTTP/2 with ztunnel's client settings.
async fn connect(ctx: &Arc<Ctx>, key: &Key) -> Result<Tunnel, String> {
    let pod = &ctx.pods[key.src_pod];
    let stats = &pod.stats.hbone;
    let fail = |e: String| {
        Counters::inc(&stats.errors);
        e
    };
    let tcp = pod.factory.connect(None, key.dst).await.map_err(|e| {
        fail(format!("connect {}: {}", key.dst, e))
    })?;
    let config = tls::client_config(&pod.identity, ctx.ca.clone(), &key.dst_id).map_err(fail)?;
    let tls = TlsConnector::from(config)
        .connect(
            tls::server_name(key.dst.ip()),
            wire::Counted::new(tcp, ctx.clone(), key.src_pod, wire::Side::Client),
        )
        .await
        .map_err(|e| fail(format!("TLS to {}: {}", key.dst, e)))?;
    let c = &ctx.cfg;
    let (sender, conn) = h2::client::Builder::new()
        .initial_window_size(c.stream_window)
        .initial_connection_window_size(c.connection_window)
        .max_frame_size(c.frame_size)
        .initial_max_send_streams(c.pool_max_streams)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(c.stream_window as usize)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| fail(format!("HTTP/2 to {}: {}", key.dst, e)))?;
    Counters::inc(&stats.tunnels_opened);
    stats.tunnels_active.fetch_add(1, Ordering::Relaxed);
    let closed = Arc::new(AtomicBool::new(false));
    let done = closed.clone();
    let ctx2 = ctx.clone();
    let pod_ix = key.src_pod;
    let dst = key.dst;
    tokio::spawn(async move {
        // Drives the connection until it ends: released from the pool and no stream
        // left, or the peer went away.
        if let Err(e) = conn.await {
            if !e.is_go_away() {
                eprintln!("eztunnel-hbone: HTTP/2 to {}: {}", dst, e);
            }
        }
        done.store(true, Ordering::SeqCst);
        let s = &ctx2.pods[pod_ix].stats.hbone;
        s.tunnels_active.fetch_sub(1, Ordering::Relaxed);
        Counters::inc(&s.tunnels_closed);
    });
    Ok(Tunnel {
        sender,
        active: AtomicUsize::new(0),
        closed,
        idle_since: Mutex::new(Instant::now()),
    })
}

