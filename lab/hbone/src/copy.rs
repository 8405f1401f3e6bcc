//! Bidirectional copies with ztunnel's buffer policy (copy.rs there): every read from a
//! TCP socket goes into a buffer reserved at 1 KiB, 16 KiB - 64 once 128 KiB went through
//! that direction, 256 KiB - 64 once 10 MiB did; each read is written on as it came
//! (a DATA frame of that size on a tunnel). Reads from an HBONE stream take the DATA
//! frames as h2 delivers them. Plain userspace reads and writes: no splice, no zero-copy.
//! Both directions run to their end (a half-close is passed on as FIN / END_STREAM).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

const INITIAL_BUFFER_SIZE: usize = 1024;
const LARGE_BUFFER_SIZE: usize = 16_384 - 64;
const JUMBO_BUFFER_SIZE: usize = 16 * 16_384 - 64;
const RESIZE_THRESHOLD_LARGE: u64 = 128 * 1024;
const RESIZE_THRESHOLD_JUMBO: u64 = 10 * 1024 * 1024;

/// A TCP read side with ztunnel's growing buffer.
struct Reader {
    inner: OwnedReadHalf,
    buf: BytesMut,
    size: usize,
    amt: u64,
}

impl Reader {
    fn new(inner: OwnedReadHalf) -> Self {
        Reader {
            inner,
            buf: BytesMut::with_capacity(INITIAL_BUFFER_SIZE),
            size: INITIAL_BUFFER_SIZE,
            amt: 0,
        }
    }

    /// The next chunk; empty at EOF.
    async fn next(&mut self) -> io::Result<Bytes> {
        self.buf.reserve(self.size);
        self.inner.read_buf(&mut self.buf).await?;
        Ok(self.buf.split().freeze())
    }

    /// Count `n` bytes passed on; grow the buffer at the thresholds.
    fn advance(&mut self, n: usize) {
        let old = self.amt;
        self.amt += n as u64;
        if old < RESIZE_THRESHOLD_LARGE && RESIZE_THRESHOLD_LARGE <= self.amt {
            self.size = LARGE_BUFFER_SIZE;
        }
        if old < RESIZE_THRESHOLD_JUMBO && RESIZE_THRESHOLD_JUMBO <= self.amt {
            self.size = JUMBO_BUFFER_SIZE;
        }
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        match e.into_io() {
            Some(io) => io,
            None => io::Error::new(io::ErrorKind::Other, "h2 I/O error"),
        }
    } else {
        io::Error::new(io::ErrorKind::Other, e)
    }
}

/// Errors that only mean "the other side went away": the copy ends quietly (as ztunnel's
/// ignore_io_errors), the write side is still shut down.
fn quiet(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotConnected
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
            ) =>
        {
            Ok(())
        }
        r => r,
    }
}

async fn tcp_to_tcp(mut r: Reader, w: &mut OwnedWriteHalf, count: &AtomicU64) -> io::Result<()> {
    loop {
        let chunk = r.next().await?;
        if chunk.is_empty() {
            return Ok(());
        }
        w.write_all(&chunk).await?;
        count.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        r.advance(chunk.len());
    }
}

/// Poll the stream's send capacity once (h2 has no async fn for it in 0.3).
struct Capacity<'a>(&'a mut SendStream<Bytes>);

impl Future for Capacity<'_> {
    type Output = Option<Result<usize, h2::Error>>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.poll_capacity(cx)
    }
}

async fn tcp_to_h2(mut r: Reader, send: &mut SendStream<Bytes>, count: &AtomicU64) -> io::Result<()> {
    loop {
        let mut chunk = r.next().await?;
        if chunk.is_empty() {
            return send.send_data(Bytes::new(), true).map_err(h2_io);
        }
        let n = chunk.len();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            match Capacity(send).await {
                Some(Ok(0)) => continue,
                Some(Ok(cap)) => {
                    let part = chunk.split_to(cap.min(chunk.len()));
                    send.send_data(part, false).map_err(h2_io)?;
                }
                Some(Err(e)) => return Err(h2_io(e)),
                None => return Err(io::ErrorKind::BrokenPipe.into()),
            }
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        r.advance(n);
    }
}

async fn h2_to_tcp(recv: &mut RecvStream, w: &mut OwnedWriteHalf, count: &AtomicU64) -> io::Result<()> {
    while let Some(data) = recv.data().await {
        let data = match data {
            Ok(d) => d,
            // The peer ended the stream without error: an end of stream, not a failure.
            Err(e) if matches!(e.reason(), Some(h2::Reason::NO_ERROR) | Some(h2::Reason::CANCEL)) => {
                return Ok(())
            }
            Err(e) => return Err(h2_io(e)),
        };
        // Released as received (not as written), as ztunnel does.
        let _ = recv.flow_control().release_capacity(data.len());
        w.write_all(&data).await?;
        count.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// TCP <-> TCP (15006 to the app, passthrough). `fwd` counts a -> b, `back` b -> a.
pub async fn tcp_tcp(a: TcpStream, b: TcpStream, fwd: &AtomicU64, back: &AtomicU64) {
    let (ar, mut aw) = a.into_split();
    let (br, mut bw) = b.into_split();
    let one = async {
        let r = quiet(tcp_to_tcp(Reader::new(ar), &mut bw, fwd).await);
        let _ = bw.shutdown().await;
        r
    };
    let two = async {
        let r = quiet(tcp_to_tcp(Reader::new(br), &mut aw, back).await);
        let _ = aw.shutdown().await;
        r
    };
    let _ = tokio::join!(one, two);
}

/// TCP <-> an HBONE stream. `fwd` counts TCP -> stream, `back` stream -> TCP.
pub async fn tcp_h2(
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    fwd: &AtomicU64,
    back: &AtomicU64,
) {
    let (r, mut w) = tcp.into_split();
    let one = async {
        let res = tcp_to_h2(Reader::new(r), &mut send, fwd).await;
        if res.is_err() {
            // No END_STREAM after a failed read: the peer must not take it as a clean end.
            send.send_reset(h2::Reason::CANCEL);
        }
        quiet(res)
    };
    let two = async {
        let res = quiet(h2_to_tcp(&mut recv, &mut w, back).await);
        let _ = w.shutdown().await;
        res
    };
    let _ = tokio::join!(one, two);
}
