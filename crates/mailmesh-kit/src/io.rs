//! Streams of the mail ports.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A stream whose writes fail with [`io::ErrorKind::TimedOut`] once the peer has
/// taken no byte for `limit`: a client that stops reading would otherwise hold its
/// session, and whatever the reply being written holds (a FETCH's message), for as
/// long as the kernel's buffers stay full. A slow reader that keeps taking bytes is
/// never cut off; reads are untouched (each protocol times those itself).
pub struct WriteStall<S> {
    inner: S,
    limit: Duration,
    /// Made once per connection, re-armed each time a write starts waiting.
    timer: Pin<Box<Sleep>>,
    /// The timer runs: a write is waiting for the peer since it was armed.
    armed: bool,
}

impl<S> WriteStall<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
            armed: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Keeps the inner stream's answer: progress disarms the timer; `Pending` arms it
    /// (unless already running) and becomes `TimedOut` once it fires.
    fn progressed<T>(
        &mut self,
        result: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.armed = false;
            return result;
        }
        if !self.armed {
            self.timer.as_mut().reset(Instant::now() + self.limit);
            self.armed = true;
        }
        ready!(self.timer.as_mut().poll(cx));
        self.armed = false;
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the peer took no data for {:?}", self.limit),
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteStall<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteStall<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progressed(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progressed(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.progressed(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.progressed(result, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_times_out_and_a_slow_one_does_not() {
        let (ours, mut theirs) = tokio::io::duplex(16);
        let mut stream = WriteStall::new(ours, Duration::from_secs(10));
        // The peer reads 8 bytes every 5 s: slow, but never stalled for 10 s.
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0; 8];
            while got < 64 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                got += theirs.read(&mut buf).await.unwrap();
            }
            theirs
        });
        stream.write_all(&[7; 64]).await.unwrap();
        stream.flush().await.unwrap();
        let _theirs = reader.await.unwrap();
        // Now it reads nothing: the write fails once the buffer is full for 10 s.
        let started = Instant::now();
        let error = stream.write_all(&[7; 64]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_secs(10));
    }
}
