//! A guest's stdout or stderr for one turn: kept up to a cap, the rest dropped and marked,
//! and, when the caller streams, sent on as it is written.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::mpsc;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Which of the guest's streams a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stream {
    #[default]
    Stdout,
    Stderr,
}

impl Stream {
    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Output as the guest wrote it (within the cap), for a caller that streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub stream: Stream,
    pub data: Bytes,
}

/// Where a streaming caller receives chunks. Unbounded because guest writes cannot wait; what
/// it can hold is bounded by the per-turn output cap.
pub type Sink = mpsc::UnboundedSender<Chunk>;

#[derive(Debug, Default)]
struct Captured {
    stream: Stream,
    data: Vec<u8>,
    cap: usize,
    truncated: bool,
    tee: Option<Sink>,
}

/// One output stream of a session. The session resets it before each turn and takes what was
/// written after; writes past the cap succeed for the guest but are not kept.
#[derive(Debug, Clone, Default)]
pub struct Capture(Arc<Mutex<Captured>>);

impl Capture {
    fn with<R>(&self, f: impl FnOnce(&mut Captured) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn new(stream: Stream) -> Self {
        let capture = Self::default();
        capture.with(|c| c.stream = stream);
        capture
    }

    /// Empties the stream and sets the byte cap for the next turn, and where to send what is
    /// written as it comes.
    pub fn reset(&self, cap: usize, tee: Option<Sink>) {
        self.with(|c| {
            c.data.clear();
            c.cap = cap;
            c.truncated = false;
            c.tee = tee;
        });
    }

    /// What was written since the reset, and whether any of it was dropped.
    pub fn take(&self) -> (Vec<u8>, bool) {
        self.with(|c| {
            c.tee = None;
            (std::mem::take(&mut c.data), c.truncated)
        })
    }

    fn push(&self, bytes: &[u8]) {
        self.with(|c| {
            let room = c.cap.saturating_sub(c.data.len());
            if bytes.len() > room {
                c.truncated = true;
            }
            let kept = &bytes[..bytes.len().min(room)];
            if let Some(tee) = c.tee.as_ref().filter(|_| !kept.is_empty()) {
                let chunk = Chunk {
                    stream: c.stream,
                    data: Bytes::copy_from_slice(kept),
                };
                if tee.send(chunk).is_err() {
                    c.tee = None; // the caller stopped listening; the turn is being stopped
                }
            }
            c.data.extend_from_slice(kept);
        });
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(1 << 20)
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_up_to_the_cap_and_marks_the_rest() {
        let out = Capture::default();
        out.reset(5, None);
        out.push(b"abc");
        out.push(b"defg");
        assert_eq!(out.take(), (b"abcde".to_vec(), true));
        out.reset(5, None);
        out.push(b"xy");
        assert_eq!(out.take(), (b"xy".to_vec(), false));
    }

    #[test]
    fn a_streaming_caller_gets_what_is_kept_as_it_is_written() {
        let err = Capture::new(Stream::Stderr);
        let (tx, mut rx) = mpsc::unbounded_channel();
        err.reset(4, Some(tx));
        err.push(b"ab");
        err.push(b"cdef");
        err.push(b"gh");
        let chunk = |d: &'static [u8]| Chunk {
            stream: Stream::Stderr,
            data: Bytes::from_static(d),
        };
        assert_eq!(rx.try_recv().ok(), Some(chunk(b"ab")));
        assert_eq!(rx.try_recv().ok(), Some(chunk(b"cd")));
        assert!(rx.try_recv().is_err(), "nothing past the cap");
        assert_eq!(err.take(), (b"abcd".to_vec(), true));
    }
}
