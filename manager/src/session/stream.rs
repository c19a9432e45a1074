//! A turn as a stream: its output as the guest writes it, then its outcome.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use super::types::Outcome;
use crate::Result;
use crate::output::Chunk;

/// What a streamed turn yields.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one Done per turn, moved once; boxing it would allocate on every turn"
)]
pub enum TurnEvent {
    /// Output, in the order the guest wrote it.
    Output(Chunk),
    /// The outcome, last.
    Done(Result<Outcome>),
}

/// A turn as a stream of [`TurnEvent`]s; see
/// [`Session::execute_streaming`](super::Session::execute_streaming).
pub struct TurnStream {
    output: mpsc::UnboundedReceiver<Chunk>,
    turn: Option<Pin<Box<dyn Future<Output = Result<Outcome>> + Send>>>,
    outcome: Option<Result<Outcome>>,
}

impl TurnStream {
    /// The turn `turn`, whose output arrives on `output` while it runs.
    pub(super) fn new(
        output: mpsc::UnboundedReceiver<Chunk>,
        turn: impl Future<Output = Result<Outcome>> + Send + 'static,
    ) -> Self {
        Self {
            output,
            turn: Some(Box::pin(turn)),
            outcome: None,
        }
    }
}

impl futures_util::Stream for TurnStream {
    type Item = TurnEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TurnEvent>> {
        let this = &mut *self;
        if let Some(turn) = &mut this.turn {
            if let Poll::Ready(Some(chunk)) = this.output.poll_recv(cx) {
                return Poll::Ready(Some(TurnEvent::Output(chunk)));
            }
            match turn.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(outcome) => {
                    this.turn = None;
                    this.outcome = Some(outcome);
                }
            }
        }
        // The turn is over: what is left of its output, then its outcome.
        if let Ok(chunk) = this.output.try_recv() {
            return Poll::Ready(Some(TurnEvent::Output(chunk)));
        }
        Poll::Ready(this.outcome.take().map(TurnEvent::Done))
    }
}
