//! Retry pacing for the etcd tasks: exponential backoff with jitter, and a sleep that
//! a cancellation token cuts short.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Doubles from `min` to `max`; each wait is drawn from the upper half of the current
/// step, so that workers cut off together do not retry in lockstep.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        Backoff { min, max: max.max(min), step: min }
    }

    pub fn next_wait(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(self.max);
        let half = step / 2;
        // A fresh RandomState is freshly keyed: a cheap random number without a crate.
        let r = RandomState::new().hash_one(0u8);
        half + Duration::from_nanos(r % (half.as_nanos() as u64 + 1))
    }

    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

/// Sleeps `wait` unless `cancel` fires first; false if it did.
pub(crate) async fn sleep_or_cancel(cancel: &CancellationToken, wait: Duration) -> bool {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_with_jitter_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        let mut b = Backoff::new(min, max);
        let steps = [100, 200, 400, 800, 1000, 1000];
        for ms in steps {
            let step = Duration::from_millis(ms);
            let w = b.next_wait();
            assert!(w >= step / 2 && w <= step, "{w:?} not in [{:?}, {step:?}]", step / 2);
        }
        b.reset();
        assert!(b.next_wait() <= min);
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_is_cut_short_by_cancel() {
        let cancel = CancellationToken::new();
        assert!(sleep_or_cancel(&cancel, Duration::from_secs(1)).await);
        cancel.cancel();
        assert!(!sleep_or_cancel(&cancel, Duration::from_secs(3600)).await);
    }
}
