//! Per-listener counters, served as JSON on a unix socket (`stats` in the config).
//!
//! Per pod, one group per hop of ztunnel's in-pod data path:
//! - `out`     15001: captured application connections (and passthrough ones);
//! - `hbone`   the outbound HBONE side: CONNECT streams sent, TLS tunnels opened/reused;
//! - `in`      15008: TLS tunnels accepted (or refused), CONNECT streams received;
//! - `inplain` 15006: captured plaintext inbound connections;
//! - `app`     connections made to the local application (from the client's IP).
//!
//! The socket takes one line: `stats` (or nothing) answers the JSON, `release-idle`
//! closes every pooled tunnel that carries no stream (what the idle timeout would do).

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Default)]
pub struct Counters {
    pub connections: AtomicU64, // accepted (out, in, inplain) or made (app)
    pub streams: AtomicU64,     // HBONE CONNECT streams (hbone: sent, in: received)
    pub streams_active: AtomicI64,
    pub tunnels_opened: AtomicU64, // hbone: new TLS connections; in: handshakes completed
    pub tunnels_reused: AtomicU64, // hbone: streams that took an existing tunnel
    pub tunnels_active: AtomicI64,
    pub tunnels_closed: AtomicU64,
    pub max_streams_on_a_tunnel: AtomicU64,
    pub refused: AtomicU64, // in: TLS handshakes that failed (bad or missing certificate)
    pub errors: AtomicU64,  // connect/handshake/request failures
    pub passthrough: AtomicU64, // out: to a destination outside the mesh (plain TCP)
    pub bytes_in: AtomicU64,    // from the accepted/downstream side
    pub bytes_out: AtomicU64,   // towards the accepted/downstream side
    pub wire_bytes_out: AtomicU64, // hbone, in: TLS bytes the proxy wrote to tunnel sockets
    pub wire_bytes_in: AtomicU64,  // hbone, in: TLS bytes the proxy read from them
}

impl Counters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn max(c: &AtomicU64, v: u64) {
        c.fetch_max(v, Ordering::Relaxed);
    }

    fn json(&self, out: &mut String) {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let g = |c: &AtomicI64| c.load(Ordering::Relaxed);
        let _ = write!(
            out,
            "{{\"connections\":{},\"streams\":{},\"streams_active\":{},\"tunnels_opened\":{},\
             \"tunnels_reused\":{},\"tunnels_active\":{},\"tunnels_closed\":{},\
             \"max_streams_on_a_tunnel\":{},\"refused\":{},\"errors\":{},\"passthrough\":{},\
             \"bytes_in\":{},\"bytes_out\":{},\"wire_bytes_out\":{},\"wire_bytes_in\":{}}}",
            r(&self.connections),
            r(&self.streams),
            g(&self.streams_active),
            r(&self.tunnels_opened),
            r(&self.tunnels_reused),
            g(&self.tunnels_active),
            r(&self.tunnels_closed),
            r(&self.max_streams_on_a_tunnel),
            r(&self.refused),
            r(&self.errors),
            r(&self.passthrough),
            r(&self.bytes_in),
            r(&self.bytes_out),
            r(&self.wire_bytes_out),
            r(&self.wire_bytes_in),
        );
    }
}

#[derive(Default)]
pub struct PodStats {
    pub out: Counters,
    pub hbone: Counters,
    pub inbound: Counters,
    pub inplain: Counters,
    pub app: Counters,
}

pub fn json(pods: &[(&str, &PodStats)], settings: &str) -> String {
    let mut out = String::from("{\"pods\":{");
    for (i, (name, s)) in pods.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "\"{}\":{{", name);
        for (j, (hop, c)) in [
            ("out", &s.out),
            ("hbone", &s.hbone),
            ("in", &s.inbound),
            ("inplain", &s.inplain),
            ("app", &s.app),
        ]
        .iter()
        .enumerate()
        {
            if j > 0 {
                out.push(',');
            }
            let _ = write!(out, "\"{}\":", hop);
            c.json(&mut out);
        }
        out.push('}');
    }
    let _ = write!(out, "}},\"settings\":{}}}\n", settings);
    out
}
