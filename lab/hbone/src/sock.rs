//! Sockets made inside a pod's network namespace, as ztunnel's in-pod socket factory does:
//! the calling thread enters the pod netns for the socket() call only, then returns home.
//! A socket stays in the netns it was created in, so the tokio workers can use it anywhere.
//! Every socket gets SO_MARK (ztunnel's 1337, which istio-cni's rules skip).

use std::fs::File;
use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::unix::io::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::path::Path;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const SO_ORIGINAL_DST: libc::c_int = 80; // linux/netfilter_ipv4.h
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80; // linux/netfilter_ipv6/ip6_tables.h

pub struct NetNs {
    file: File,
}

impl NetNs {
    pub fn open(path: &Path) -> io::Result<NetNs> {
        let file = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {}", path.display(), e)))?;
        Ok(NetNs { file })
    }

    /// The calling thread's netns (the process's home, opened before any setns).
    pub fn current() -> io::Result<NetNs> {
        NetNs::open(Path::new("/proc/thread-self/ns/net"))
    }

    fn enter(&self) -> io::Result<()> {
        // Safety: setns on a file descriptor we own; affects only the calling thread.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Creates sockets in one pod's netns.
pub struct Factory {
    pub pod: NetNs,
    pub home: std::sync::Arc<NetNs>,
    pub mark: u32,
}

impl Factory {
    fn in_pod<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        self.pod.enter()?;
        let out = f();
        if let Err(e) = self.home.enter() {
            // A worker thread left in a pod netns would create later sockets there.
            eprintln!("eztunnel-hbone: cannot return to the home netns: {}", e);
            std::process::abort();
        }
        out
    }

    fn socket(&self, v6: bool) -> io::Result<Socket> {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let s = self.in_pod(|| Socket::new(domain, Type::STREAM, Some(Protocol::TCP)))?;
        s.set_mark(self.mark)?;
        s.set_nonblocking(true)?; // socket2 creates it with SOCK_CLOEXEC
        Ok(s)
    }

    /// A dual-stack `[::]:port` listener (ztunnel binds [::] in each pod, SO_REUSEPORT).
    pub fn listen(&self, port: u16, transparent: bool) -> io::Result<TcpListener> {
        let s = self.socket(true)?;
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        if transparent {
            set_int(s.as_raw_fd(), libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)?;
        }
        let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        s.bind(&addr.into())?;
        s.listen(1024)?;
        TcpListener::from_std(std::net::TcpListener::from(s))
    }

    /// Connect to `dst` from this pod; with `src`, from that IP and a kernel-chosen port
    /// (IP_TRANSPARENT + IP_FREEBIND: ztunnel's freebind_connect towards the app).
    pub async fn connect(&self, src: Option<IpAddr>, dst: SocketAddr) -> io::Result<TcpStream> {
        let v6 = dst.is_ipv6();
        let s = self.socket(v6)?;
        s.set_nodelay(true)?;
        if let Some(ip) = src {
            if v6 {
                set_int(s.as_raw_fd(), libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)?;
                s.set_freebind_ipv6(true)?;
            } else {
                s.set_ip_transparent(true)?;
                s.set_freebind(true)?;
            }
            let ip = match (ip, v6) {
                (IpAddr::V4(a), true) => IpAddr::V6(a.to_ipv6_mapped()),
                (ip, _) => ip,
            };
            s.bind(&SocketAddr::new(ip, 0).into())?;
        }
        // Safety: the fd is a fresh, owned, non-blocking TCP socket handed over whole.
        let sock = unsafe { TcpSocket::from_raw_fd(s.into_raw_fd()) };
        let stream = sock.connect(dst).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // Safety: setsockopt with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The destination a REDIRECTed connection had before NAT: SO_ORIGINAL_DST for IPv4
/// (also on a dual-stack socket), IP6T_SO_ORIGINAL_DST for IPv6, as ztunnel tries both.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    // Safety: getsockopt writes at most `len` bytes into a zeroed sockaddr_in6.
    unsafe {
        let mut a6: libc::sockaddr_in6 = mem::zeroed();
        let mut len = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let p = &mut a6 as *mut libc::sockaddr_in6 as *mut libc::c_void;
        if libc::getsockopt(fd, libc::SOL_IP, SO_ORIGINAL_DST, p, &mut len) == 0 {
            let a4 = &*(p as *const libc::sockaddr_in);
            let ip = Ipv4Addr::from(u32::from_be(a4.sin_addr.s_addr));
            return Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a4.sin_port))));
        }
        let e4 = io::Error::last_os_error();
        len = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        if libc::getsockopt(fd, libc::SOL_IPV6, IP6T_SO_ORIGINAL_DST, p, &mut len) == 0 {
            let ip = Ipv6Addr::from(a6.sin6_addr.s6_addr);
            return Ok(canonical(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(a6.sin6_port),
                0,
                0,
            ))));
        }
        let e6 = io::Error::last_os_error();
        Err(io::Error::new(
            io::ErrorKind::Other,
            format!("no original destination (v4: {}, v6: {})", e4, e6),
        ))
    }
}

/// IPv4-mapped IPv6 (a v4 peer on a dual-stack socket) as plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        v4 => v4,
    }
}
