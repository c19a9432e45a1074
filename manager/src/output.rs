//! A guest's stdout or stderr for one turn: kept up to a cap, the rest dropped and marked.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

#[derive(Debug, Default)]
struct Captured {
    data: Vec<u8>,
    cap: usize,
    truncated: bool,
}

/// One output stream of a session. The session resets it before each turn and takes what was
/// written after; writes past the cap succeed for the guest but are not kept.
#[derive(Debug, Clone, Default)]
pub struct Capture(Arc<Mutex<Captured>>);

impl Capture {
    fn with<R>(&self, f: impl FnOnce(&mut Captured) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Empties the stream and sets the byte cap for the next turn.
    pub fn reset(&self, cap: usize) {
        self.with(|c| {
            c.data.clear();
            c.cap = cap;
            c.truncated = false;
        });
    }

    /// What was written since the reset, and whether any of it was dropped.
    pub fn take(&self) -> (Vec<u8>, bool) {
        self.with(|c| (std::mem::take(&mut c.data), c.truncated))
    }

    fn push(&self, bytes: &[u8]) {
        self.with(|c| {
            let room = c.cap.saturating_sub(c.data.len());
            if bytes.len() > room {
                c.truncated = true;
            }
            c.data.extend_from_slice(&bytes[..bytes.len().min(room)]);
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
        out.reset(5);
        out.push(b"abc");
        out.push(b"defg");
        assert_eq!(out.take(), (b"abcde".to_vec(), true));
        out.reset(5);
        out.push(b"xy");
        assert_eq!(out.take(), (b"xy".to_vec(), false));
    }
}
