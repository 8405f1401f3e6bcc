//! eztunnel-hbone: the simulator's ztunnel stand-in that speaks HBONE and pools as
//! ztunnel does. One process serves every pod of the node: its listeners and every socket
//! it makes live in the pod's netns (entered per socket() call), on a 2-worker tokio
//! runtime (ztunnel's default).
//!
//!     eztunnel-hbone <config file>
//!
//! Per pod (config.rs), like ztunnel in-pod mode:
//! - 15001: captured outbound. The original destination (SO_ORIGINAL_DST /
//!   IP6T_SO_ORIGINAL_DST) is a mesh workload: a CONNECT stream (`:authority` = that
//!   destination) on a pooled mutual-TLS HTTP/2 connection to its IP, port 15008.
//!   Anything else: passthrough, plain TCP.
//! - 15008: HBONE inbound. Mutual TLS 1.3, the client's SPIFFE identity checked; each
//!   CONNECT to one of this pod's addresses is connected to the app from the client's
//!   IP (IP_TRANSPARENT) and a fresh port.
//! - 15006: captured plaintext inbound, delivered the same way.
//!
//! Counters per listener on the stats socket (stats.rs). Prints `ready` once serving.

mod config;
mod copy;
mod pool;
mod sock;
mod stats;
mod tls;
mod wire;

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_rustls::TlsAcceptor;

use config::{Config, PodConfig, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use stats::{Counters, PodStats};

pub struct Pod {
    pub cfg: PodConfig,
    pub factory: sock::Factory,
    pub identity: tls::Identity,
    pub server_tls: Arc<rustls::ServerConfig>,
    pub stats: PodStats,
}

pub struct Ctx {
    pub cfg: Config,
    pub pods: Vec<Pod>,
    pub ca: Arc<Vec<u8>>,
    /// Destination table (ztunnel learns it from xDS): address -> pod index.
    pub workloads: HashMap<IpAddr, usize>,
    pub pool: pool::Pool,
}

fn log(msg: String) {
    eprintln!("eztunnel-hbone: {}", msg);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 2 || args[1].starts_with('-') {
        eprintln!("usage: eztunnel-hbone <config file>");
        std::process::exit(2);
    }
    let ctx = match setup(&args[1]) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("eztunnel-hbone: {}", e);
            std::process::exit(1);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(ctx.cfg.workers)
        .thread_name("hbone-worker")
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(serve(ctx)) {
        eprintln!("eztunnel-hbone: {}", e);
        std::process::exit(1);
    }
}

/// Thousands of flows need thousands of descriptors: take the hard limit, as a proxy must.
fn raise_fd_limit() {
    // Safety: getrlimit/setrlimit on a local, initialised struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn setup(path: &str) -> Result<Ctx, String> {
    raise_fd_limit();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {}", path, e))?;
    let cfg = Config::parse(&text).map_err(|e| format!("{}: {}", path, e))?;
    let ca = tls::load_ca(&cfg.ca).map_err(|e| e.to_string())?;
    let home = Arc::new(sock::NetNs::current().map_err(|e| format!("home netns: {}", e))?);
    let mut pods = Vec::new();
    let mut workloads = HashMap::new();
    for pc in &cfg.pods {
        let identity = tls::load_bundle(&pc.bundle).map_err(|e| e.to_string())?;
        let server_tls = tls::server_config(&identity, &ca, &cfg.trust_domain)
            .map_err(|e| format!("pod {}: {}", pc.name, e))?;
        let factory = sock::Factory {
            pod: sock::NetNs::open(&pc.netns).map_err(|e| format!("pod {}: {}", pc.name, e))?,
            home: home.clone(),
            mark: cfg.mark,
        };
        for ip in &pc.ips {
            if workloads.insert(*ip, pods.len()).is_some() {
                return Err(format!("address {} given to two pods", ip));
            }
        }
        pods.push(Pod { cfg: pc.clone(), factory, identity, server_tls, stats: PodStats::default() });
    }
    Ok(Ctx { cfg, pods, ca: Arc::new(ca), workloads, pool: pool::Pool::default() })
}

async fn serve(ctx: Arc<Ctx>) -> Result<(), String> {
    for (i, pod) in ctx.pods.iter().enumerate() {
        let bind = |port: u16, transparent: bool| {
            pod.factory
                .listen(port, transparent)
                .map_err(|e| format!("pod {}: listen on [::]:{}: {}", pod.cfg.name, port, e))
        };
        tokio::spawn(accept_loop(ctx.clone(), i, bind(OUTBOUND_PORT, false)?, Hop::Outbound));
        tokio::spawn(accept_loop(ctx.clone(), i, bind(HBONE_PORT, true)?, Hop::Hbone));
        tokio::spawn(accept_loop(ctx.clone(), i, bind(INBOUND_PLAINTEXT_PORT, true)?, Hop::Plain));
    }
    let _ = std::fs::remove_file(&ctx.cfg.stats);
    let stats = UnixListener::bind(&ctx.cfg.stats)
        .map_err(|e| format!("stats socket {}: {}", ctx.cfg.stats.display(), e))?;
    let idle = ctx.cfg.pool_idle_timeout;
    let reaper = ctx.clone();
    tokio::spawn(async move {
        let period = (idle / 10).max(Duration::from_millis(100)).min(Duration::from_secs(5));
        loop {
            tokio::time::sleep(period).await;
            reaper.pool.release_idle(idle);
        }
    });
    println!("ready");
    let _ = std::io::stdout().flush();
    loop {
        match stats.accept().await {
            Ok((s, _)) => {
                tokio::spawn(stats_client(ctx.clone(), s));
            }
            Err(e) => {
                log(format!("stats accept: {}", e));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn stats_client(ctx: Arc<Ctx>, mut s: tokio::net::UnixStream) {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while line.len() < 256 {
            match s.read(&mut byte).await {
                Ok(1) if byte[0] != b'\n' => line.push(byte[0]),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
    let cmd = String::from_utf8_lossy(&line).trim().to_string();
    let reply = match cmd.as_str() {
        "" | "stats" => {
            let pods: Vec<(&str, &PodStats)> =
                ctx.pods.iter().map(|p| (p.cfg.name.as_str(), &p.stats)).collect();
            stats::json(&pods, &settings_json(&ctx.cfg))
        }
        "release-idle" => format!("{{\"released\":{}}}\n", ctx.pool.release_idle(Duration::ZERO)),
        other => format!("{{\"error\":\"unknown command {:?}\"}}\n", other),
    };
    let _ = s.write_all(reply.as_bytes()).await;
    let _ = s.shutdown().await;
}

fn settings_json(c: &Config) -> String {
    format!(
        "{{\"workers\":{},\"mark\":{},\"pool_max_streams\":{},\"pool_idle_timeout_ms\":{},\
         \"stream_window\":{},\"connection_window\":{},\"frame_size\":{}}}",
        c.workers,
        c.mark,
        c.pool_max_streams,
        c.pool_idle_timeout.as_millis(),
        c.stream_window,
        c.connection_window,
        c.frame_size
    )
}

#[derive(Clone, Copy)]
enum Hop {
    Outbound,
    Hbone,
    Plain,
}

async fn accept_loop(ctx: Arc<Ctx>, pod: usize, listener: TcpListener, hop: Hop) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let ctx = ctx.clone();
                let peer = sock::canonical(peer);
                tokio::spawn(async move {
                    match hop {
                        Hop::Outbound => outbound(ctx, pod, stream, peer).await,
                        Hop::Hbone => inbound_hbone(ctx, pod, stream, peer).await,
                        Hop::Plain => inbound_plain(ctx, pod, stream, peer).await,
                    }
                });
            }
            Err(e) => {
                log(format!("accept: {}", e));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

fn authority(dst: SocketAddr) -> String {
    dst.to_string() // 10.0.0.2:80 or [fd00::2]:80
}

/// 15001: the app's captured connection, to the original destination over HBONE.
async fn outbound(ctx: Arc<Ctx>, pod: usize, stream: TcpStream, peer: SocketAddr) {
    let s = &ctx.pods[pod].stats;
    Counters::inc(&s.out.connections);
    let dst = match sock::original_dst(&stream) {
        Ok(d) => sock::canonical(d),
        Err(e) => {
            Counters::inc(&s.out.errors);
            return log(format!("{}: outbound from {}: {}", ctx.pods[pod].cfg.name, peer, e));
        }
    };
    let dst_pod = match ctx.workloads.get(&dst.ip()) {
        Some(i) => *i,
        None => {
            // Not a mesh workload: ztunnel passes it through as plain TCP.
            Counters::inc(&s.out.passthrough);
            match ctx.pods[pod].factory.connect(None, dst).await {
                Ok(up) => copy::tcp_tcp(stream, up, &s.out.bytes_in, &s.out.bytes_out).await,
                Err(e) => {
                    Counters::inc(&s.out.errors);
                    log(format!("passthrough to {}: {}", dst, e))
                }
            }
            return;
        }
    };
    let key = pool::Key {
        src_pod: pod,
        src_ip: peer.ip(),
        dst_id: ctx.pods[dst_pod].cfg.identity.clone(),
        dst: SocketAddr::new(dst.ip(), HBONE_PORT),
    };
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority(dst))
        .version(http::Version::HTTP_2)
        .header("forwarded", format!("for={}", forwarded_for(peer.ip())))
        .body(())
        .expect("CONNECT request");
    match ctx.pool.stream(&ctx, key, req).await {
        Ok(st) => {
            copy::tcp_h2(stream, st.send, st.recv, &s.out.bytes_in, &s.out.bytes_out).await;
            drop(st.lease);
        }
        Err(e) => {
            Counters::inc(&s.out.errors);
            log(format!("{}: to {}: {}", ctx.pods[pod].cfg.name, dst, e));
        }
    }
}

fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("\"[{}]\"", a),
    }
}

/// 15008: one mutual-TLS HTTP/2 connection, many CONNECT streams.
async fn inbound_hbone(ctx: Arc<Ctx>, pod: usize, stream: TcpStream, peer: SocketAddr) {
    let p = &ctx.pods[pod];
    let s = &p.stats.inbound;
    Counters::inc(&s.connections);
    let counted = wire::Counted::new(stream, ctx.clone(), pod, wire::Side::Server);
    let tls = match TlsAcceptor::from(p.server_tls.clone()).accept(counted).await {
        Ok(t) => t,
        Err(e) => {
            Counters::inc(&s.refused);
            return log(format!("{}: TLS from {} refused: {}", p.cfg.name, peer, e));
        }
    };
    let c = &ctx.cfg;
    let mut conn = match h2::server::Builder::new()
        .initial_window_size(c.stream_window)
        .initial_connection_window_size(c.connection_window)
        .max_frame_size(c.frame_size)
        .max_header_list_size(65_536)
        .max_send_buffer_size(400 * 1024)
        .max_concurrent_streams(200)
        .handshake::<_, Bytes>(tls)
        .await
    {
        Ok(conn) => conn,
        Err(e) => {
            Counters::inc(&s.errors);
            return log(format!("{}: HTTP/2 from {}: {}", p.cfg.name, peer, e));
        }
    };
    Counters::inc(&s.tunnels_opened);
    s.tunnels_active.fetch_add(1, Ordering::Relaxed);
    while let Some(next) = conn.accept().await {
        match next {
            Ok((req, respond)) => {
                tokio::spawn(inbound_stream(ctx.clone(), pod, peer.ip(), req, respond));
            }
            Err(e) => {
                if !e.is_go_away() {
                    log(format!("{}: HBONE connection from {}: {}", p.cfg.name, peer, e));
                }
                break;
            }
        }
    }
    s.tunnels_active.fetch_sub(1, Ordering::Relaxed);
    Counters::inc(&s.tunnels_closed);
}

fn status(respond: &mut SendResponse<Bytes>, code: u16) {
    let resp = http::Response::builder().status(code).body(()).expect("response");
    let _ = respond.send_response(resp, true);
}

async fn inbound_stream(
    ctx: Arc<Ctx>,
    pod: usize,
    client: IpAddr,
    req: http::Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let p = &ctx.pods[pod];
    let s = &p.stats;
    Counters::inc(&s.inbound.streams);
    if req.method() != http::Method::CONNECT {
        Counters::inc(&s.inbound.errors);
        return status(&mut respond, 400);
    }
    let dst = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .map(sock::canonical);
    let dst = match dst {
        // Only this pod's own addresses (ztunnel's validate_destination).
        Some(d) if p.cfg.ips.contains(&d.ip()) => d,
        _ => {
            Counters::inc(&s.inbound.errors);
            log(format!("{}: CONNECT to {:?} refused", p.cfg.name, req.uri().authority()));
            return status(&mut respond, 400);
        }
    };
    let app = match p.factory.connect(Some(client), dst).await {
        Ok(a) => a,
        Err(e) => {
            Counters::inc(&s.app.errors);
            log(format!("{}: to the app {} from {}: {}", p.cfg.name, dst, client, e));
            return status(&mut respond, 503);
        }
    };
    Counters::inc(&s.app.connections);
    let ok = http::Response::builder().status(200).body(()).expect("response");
    let send = match respond.send_response(ok, false) {
        Ok(send) => send,
        Err(_) => return,
    };
    s.inbound.streams_active.fetch_add(1, Ordering::Relaxed);
    let recv = req.into_body();
    copy::tcp_h2(app, send, recv, &s.inbound.bytes_out, &s.inbound.bytes_in).await;
    s.inbound.streams_active.fetch_sub(1, Ordering::Relaxed);
}

/// 15006: a captured plaintext connection, to the original destination from the client.
async fn inbound_plain(ctx: Arc<Ctx>, pod: usize, stream: TcpStream, peer: SocketAddr) {
    let p = &ctx.pods[pod];
    let s = &p.stats;
    Counters::inc(&s.inplain.connections);
    let dst = match sock::original_dst(&stream) {
        Ok(d) => sock::canonical(d),
        Err(e) => {
            Counters::inc(&s.inplain.errors);
            return log(format!("{}: plaintext inbound from {}: {}", p.cfg.name, peer, e));
        }
    };
    match p.factory.connect(Some(peer.ip()), dst).await {
        Ok(app) => {
            Counters::inc(&s.app.connections);
            copy::tcp_tcp(stream, app, &s.inplain.bytes_in, &s.inplain.bytes_out).await;
        }
        Err(e) => {
            Counters::inc(&s.app.errors);
            log(format!("{}: to the app {} from {}: {}", p.cfg.name, dst, peer, e));
        }
    }
}
