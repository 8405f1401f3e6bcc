//! The stand-in's configuration: a small line-based file written by the lab (sim.py).
//!
//! ```text
//! workers 2
//! mark 1337
//! ca /tmp/ezsim-x/pki/ca.pem
//! trust_domain cluster.local
//! stats /tmp/ezsim-x/hbone.sock
//! pool_max_streams 100
//! pool_idle_timeout_ms 300000
//! stream_window 4194304
//! connection_window 16777216
//! frame_size 1048576
//! pod <name> <netns path> <cert+key PEM> <spiffe id> <ip> [<ip> ...]
//! ```
//!
//! Every `pod` is a workload of this node: listeners in its netns, its certificate, and
//! its addresses (the destination table ztunnel would learn from xDS).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = 15008;

#[derive(Debug, Clone)]
pub struct PodConfig {
    pub name: String,
    pub netns: PathBuf,
    pub bundle: PathBuf,
    pub identity: String,
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub workers: usize,
    pub mark: u32,
    pub ca: PathBuf,
    pub trust_domain: String,
    pub stats: PathBuf,
    pub pool_max_streams: usize,
    pub pool_idle_timeout: Duration,
    pub stream_window: u32,
    pub connection_window: u32,
    pub frame_size: u32,
    pub pods: Vec<PodConfig>,
}

impl Config {
    /// ztunnel's defaults (config.rs): 2 workers, mark 1337, 100 streams per pooled
    /// connection, released after 5 minutes unused, windows 4 MiB / 16 MiB, frames 1 MiB.
    fn defaults() -> Self {
        Config {
            workers: 2,
            mark: 0x539,
            ca: PathBuf::new(),
            trust_domain: "cluster.local".into(),
            stats: PathBuf::new(),
            pool_max_streams: 100,
            pool_idle_timeout: Duration::from_secs(300),
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            frame_size: 1 << 20,
            pods: Vec::new(),
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut c = Config::defaults();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = |e: String| format!("line {}: {}", n + 1, e);
            let one = || -> Result<&str, String> {
                if words.len() == 2 {
                    Ok(words[1])
                } else {
                    Err(at(format!("`{}` takes one value", words[0])))
                }
            };
            let num = |what: &str| -> Result<u64, String> {
                let v = one()?;
                v.parse::<u64>()
                    .map_err(|_| at(format!("{}: not a number: {:?}", what, v)))
            };
            match words[0] {
                "workers" => c.workers = num("workers")?.clamp(1, 64) as usize,
                "mark" => c.mark = num("mark")? as u32,
                "ca" => c.ca = PathBuf::from(one()?),
                "trust_domain" => c.trust_domain = one()?.to_string(),
                "stats" => c.stats = PathBuf::from(one()?),
                "pool_max_streams" => c.pool_max_streams = num("pool_max_streams")?.max(1) as usize,
                "pool_idle_timeout_ms" => {
                    c.pool_idle_timeout = Duration::from_millis(num("pool_idle_timeout_ms")?)
                }
                "stream_window" => c.stream_window = window(num("stream_window")?).map_err(at)?,
                "connection_window" => {
                    c.connection_window = window(num("connection_window")?).map_err(at)?
                }
                "frame_size" => {
                    let v = num("frame_size")?;
                    // RFC 9113 6.5.2: 2^14 ..= 2^24-1
                    if !(16_384..=16_777_215).contains(&v) {
                        return Err(at(format!("frame_size {} outside 16384..16777215", v)));
                    }
                    c.frame_size = v as u32;
                }
                "pod" => {
                    if words.len() < 6 {
                        return Err(at(
                            "pod needs: name netns bundle identity ip [ip...]".to_string()
                        ));
                    }
                    let mut ips = Vec::new();
                    for w in &words[5..] {
                        ips.push(
                            w.parse::<IpAddr>()
                                .map_err(|_| at(format!("not an IP address: {:?}", w)))?,
                        );
                    }
                    c.pods.push(PodConfig {
                        name: words[1].to_string(),
                        netns: PathBuf::from(words[2]),
                        bundle: PathBuf::from(words[3]),
                        identity: words[4].to_string(),
                        ips,
                    });
                }
                other => return Err(at(format!("unknown setting {:?}", other))),
            }
        }
        if c.ca.as_os_str().is_empty() || c.stats.as_os_str().is_empty() {
            return Err("`ca` and `stats` are required".into());
        }
        if c.pods.is_empty() {
            return Err("no `pod` configured".into());
        }
        Ok(c)
    }
}

fn window(v: u64) -> Result<u32, String> {
    // RFC 9113 6.9.1: at most 2^31-1
    if (65_535..=2_147_483_647).contains(&v) {
        Ok(v as u32)
    } else {
        Err(format!("window {} outside 65535..2147483647", v))
    }
}
