//! A persistent thread pool that runs one data-parallel job at a time.
//!
//! The forward pass issues hundreds of small parallel ops per step (30 layers,
//! ~10 ops each); waking a general-purpose pool for each costs more than the
//! op. Workers here spin briefly on a generation counter before sleeping on a
//! condition variable, and the calling thread works as thread 0, so a job
//! costs one atomic increment to start and one counter to finish.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Iterations a worker spins before it sleeps (on the order of 100 microseconds:
/// longer than the gap between two ops of a forward pass, short enough not to
/// burn a core another process needs).
const SPIN_ITERS: u32 = 3_000;
/// Iterations the caller spins waiting for workers before it starts yielding
/// its core (a worker that was descheduled needs one to finish).
const WAIT_SPINS: u32 = 500;

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    /// The current job, lifetime-erased; valid while `remaining > 0` for this generation.
    job: UnsafeCell<Option<*const Job>>,
    generation: AtomicUsize,
    remaining: AtomicUsize,
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
    n_threads: usize,
}

// SAFETY: `job` is written only by the thread that owns `run`, while no worker
// reads it (all workers finished the previous generation); workers read it
// only after observing the new generation with Acquire ordering.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A fixed set of threads; `run` executes a closure on all of them.
pub struct ThreadPool {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    /// `run` is not reentrant; this catches misuse instead of deadlocking.
    busy: AtomicBool,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool").field("threads", &self.shared.n_threads).finish()
    }
}

impl ThreadPool {
    /// A pool of `n_threads` (at least 1) including the calling thread.
    pub fn new(n_threads: usize) -> Self {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(None),
            generation: AtomicUsize::new(0),
            remaining: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            n_threads,
        });
        let handles = (1..n_threads)
            .map(|idx| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("tandem-kernel-{idx}"))
                    .spawn(move || worker(s, idx))
                    .expect("spawning a kernel thread")
            })
            .collect();
        ThreadPool { shared, handles, busy: AtomicBool::new(false) }
    }

    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs `f(thread_index, n_threads)` on every thread and returns when all are done.
    pub fn run<F: Fn(usize, usize) + Sync>(&self, f: F) {
        let n = self.shared.n_threads;
        if n == 1 {
            f(0, 1);
            return;
        }
        assert!(!self.busy.swap(true, Ordering::Acquire), "ThreadPool::run is not reentrant");
        let job: &(dyn Fn(usize, usize) + Sync + '_) = &f;
        // SAFETY: the lifetime is erased, but the pointer is only used until every
        // worker has finished this generation, which we wait for below.
        unsafe {
            *self.shared.job.get() =
                Some(std::mem::transmute::<*const (dyn Fn(usize, usize) + Sync + '_), *const Job>(job as *const _));
        }
        self.shared.remaining.store(n - 1, Ordering::SeqCst);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        if self.shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        // A panic in thread 0's share must still wait for the workers before unwinding.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0, n)));
        let mut spins = 0u32;
        while self.shared.remaining.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < WAIT_SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        unsafe {
            *self.shared.job.get() = None;
        }
        self.busy.store(false, Ordering::Release);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    }
}

fn worker(s: Arc<Shared>, idx: usize) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0u32;
        let gen = loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                break g;
            }
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
                continue;
            }
            let mut guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while s.generation.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        };
        seen = gen;
        // SAFETY: published before the generation bump; stays valid until we decrement `remaining`.
        let job = unsafe { (*s.job.get()).expect("job set for a new generation") };
        let job: &Job = unsafe { &*job };
        // A panicking job must not leave the caller waiting forever.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(idx, s.n_threads)));
        s.remaining.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The half-open range of `0..n` that thread `idx` of `nt` owns, in multiples of `align`.
pub fn split_range(n: usize, idx: usize, nt: usize, align: usize) -> std::ops::Range<usize> {
    let units = n.div_ceil(align);
    let per = units / nt;
    let extra = units % nt;
    let start = idx * per + idx.min(extra);
    let len = per + usize::from(idx < extra);
    (start * align).min(n)..((start + len) * align).min(n)
}

/// A raw pointer that may be shared across the pool's threads, for writing disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub struct SyncPtr<T>(pub *mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    pub fn new(s: &mut [T]) -> Self {
        SyncPtr(s.as_mut_ptr())
    }
    /// # Safety
    /// The caller guarantees `i` is in bounds and no other thread touches element `i` concurrently.
    #[inline(always)]
    pub unsafe fn write(self, i: usize, v: T) {
        unsafe { self.0.add(i).write(v) }
    }
    /// # Safety
    /// `start..start+len` is in bounds and owned exclusively by the calling thread.
    #[inline(always)]
    pub unsafe fn slice<'a>(self, start: usize, len: usize) -> &'a mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_thread_runs_every_job() {
        for n in 1..=4 {
            let pool = ThreadPool::new(n);
            let total = AtomicU64::new(0);
            for _ in 0..1000 {
                pool.run(|i, nt| {
                    assert_eq!(nt, n);
                    total.fetch_add(i as u64 + 1, Ordering::Relaxed);
                });
            }
            assert_eq!(total.load(Ordering::Relaxed), 1000 * (n * (n + 1) / 2) as u64);
        }
    }

    #[test]
    fn wakes_after_sleeping() {
        let pool = ThreadPool::new(2);
        let hits = AtomicU64::new(0);
        pool.run(|_, _| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        pool.run(|_, _| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn split_range_covers_exactly() {
        for n in [0, 1, 7, 64, 100, 576] {
            for nt in 1..5 {
                for align in [1, 4, 16] {
                    let mut covered = 0;
                    let mut next = 0;
                    for i in 0..nt {
                        let r = split_range(n, i, nt, align);
                        assert_eq!(r.start, next.min(n));
                        next = r.end;
                        covered += r.len();
                    }
                    assert_eq!(covered, n);
                }
            }
        }
    }
}
