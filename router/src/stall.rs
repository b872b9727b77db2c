//! The bound on a client that stops reading its stream.
//!
//! A streamed response leaves the router through a bounded channel: the gRPC transport
//! (tonic, HTTP/2 flow control) or the HTTP body (hyper, the socket) takes the next chunk
//! only when the client has read enough of the last ones. A client that reads nothing
//! fills its socket buffers and flow-control window, then the channel, and the sender
//! waits. [`Outbox::send`] waits at most `--stream-stall-timeout` for room; past it the
//! caller cancels the request (its workers get `Cancel`, its blocks and slots are freed).
//!
//! Each send keeps one place in the channel free, so that the last word (an error
//! saying why the stream ends) always fits without waiting: [`Outbox::last`].
//! This module only bounds the hand-off; the callers log and count a stall.

use std::time::Duration;

use tokio::sync::mpsc;

/// How long a stream may go without the client taking a chunk, by default.
pub const STREAM_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a chunk could not be handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOff {
    /// The client is gone (the receiver was dropped).
    Closed,
    /// The channel stayed full for the whole stall timeout: the client is not reading.
    Stalled,
}

/// The sending side of a client's stream, bounded in how long it waits for the client.
#[derive(Debug)]
pub struct Outbox<T> {
    tx: mpsc::Sender<T>,
    stall: Duration,
}

impl<T> Outbox<T> {
    /// `tx`'s channel must hold at least 2 items (one is kept for [`Outbox::last`]).
    pub fn new(tx: mpsc::Sender<T>, stall: Duration) -> Self {
        debug_assert!(tx.max_capacity() >= 2, "an outbox needs room for an item and a last word");
        Outbox { tx, stall }
    }

    /// Hands `item` on, waiting at most the stall timeout for room, and leaving a place
    /// free behind it for a last word.
    pub async fn send(&self, item: T) -> Result<(), HandOff> {
        match tokio::time::timeout(self.stall, self.tx.reserve_many(2)).await {
            Ok(Ok(mut places)) => {
                // The second place goes back to the channel when `places` drops.
                places.next().expect("two places were reserved").send(item);
                Ok(())
            }
            Ok(Err(_)) => Err(HandOff::Closed),
            Err(_) => Err(HandOff::Stalled),
        }
    }

    /// Hands on a last item without waiting: there is room for it when every earlier item
    /// went through [`Outbox::send`]. False if the client is gone.
    pub fn last(&self, item: T) -> bool {
        self.tx.try_send(item).is_ok()
    }

    /// Resolves when the client is gone.
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// The stall timeout.
    pub fn stall(&self) -> Duration {
        self.stall
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_is_a_stall_after_the_timeout_and_the_last_word_fits() {
        let (tx, mut rx) = mpsc::channel(4);
        let out = Outbox::new(tx, STALL);
        // Three items fit (the fourth place is kept for the last word).
        for i in 0..3 {
            assert_eq!(out.send(i).await, Ok(()));
        }
        let t0 = tokio::time::Instant::now();
        assert_eq!(out.send(3).await, Err(HandOff::Stalled));
        assert_eq!(t0.elapsed(), STALL);
        assert!(out.last(-1), "the kept place takes the last word without waiting");
        drop(out);
        let mut got = Vec::new();
        while let Some(x) = rx.recv().await {
            got.push(x);
        }
        assert_eq!(got, vec![0, 1, 2, -1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_never_a_stall() {
        let (tx, mut rx) = mpsc::channel(2);
        let out = Outbox::new(tx, STALL);
        let reader = tokio::spawn(async move {
            let mut n = 0;
            // One item each 29 s: slower than anything real, within the timeout each time.
            while rx.recv().await.is_some() {
                n += 1;
                tokio::time::sleep(STALL - Duration::from_secs(1)).await;
            }
            n
        });
        for i in 0..20 {
            assert_eq!(out.send(i).await, Ok(()), "item {i}");
        }
        drop(out);
        assert_eq!(reader.await.unwrap(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_left_is_closed_at_once() {
        let (tx, rx) = mpsc::channel(2);
        let out = Outbox::new(tx, STALL);
        drop(rx);
        let t0 = tokio::time::Instant::now();
        assert_eq!(out.send(1).await, Err(HandOff::Closed));
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert!(out.is_closed() && !out.last(2));
        out.closed().await;
    }
}
