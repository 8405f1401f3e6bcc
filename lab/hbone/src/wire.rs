//! A tunnel's TCP socket, counting what the proxy writes to it and reads from it (TLS
//! records): what crosses the pod-to-pod hop, to compare with what a splice moved.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::Ctx;

pub enum Side {
    Client, // the source pod's end (stats `hbone`)
    Server, // the destination pod's end (stats `in`)
}

pub struct Counted {
    inner: TcpStream,
    ctx: Arc<Ctx>,
    pod: usize,
    side: Side,
}

impl Counted {
    pub fn new(inner: TcpStream, ctx: Arc<Ctx>, pod: usize, side: Side) -> Self {
        Counted { inner, ctx, pod, side }
    }

    fn counter(&self, out: bool) -> &AtomicU64 {
        let s = &self.ctx.pods[self.pod].stats;
        let c = match self.side {
            Side::Client => &s.hbone,
            Side::Server => &s.inbound,
        };
        if out {
            &c.wire_bytes_out
        } else {
            &c.wire_bytes_in
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.counter(false).fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.counter(true).fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.counter(true).fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
