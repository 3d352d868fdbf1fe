//! Threads' CPU time, for the predictor's `cpu` metric: what a thread ran, without the time it
//! waited for a CPU that other processes (or the hypervisor) held — which the workers' busy
//! time, read on the wall clock, includes.

use std::time::Duration;

/// A thread's CPU-time clock, readable from any thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadClock(libc::clockid_t);

impl ThreadClock {
    /// The calling thread's clock; `None` if the platform has none.
    pub fn current() -> Option<Self> {
        let mut id: libc::clockid_t = 0;
        // SAFETY: `pthread_self()` is the calling thread, alive for this call, and `id` is a
        // valid place for the result.
        let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut id) };
        (rc == 0).then_some(Self(id))
    }

    /// CPU time the thread has run so far; `None` when the clock cannot be read (the thread
    /// has ended).
    pub fn read(self) -> Option<Duration> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid place for the result; an invalid clock id is an error
        // return, not undefined behaviour.
        let rc = unsafe { libc::clock_gettime(self.0, &mut ts) };
        let secs = u64::try_from(ts.tv_sec).ok()?;
        let nanos = u32::try_from(ts.tv_nsec)
            .ok()
            .filter(|n| *n < 1_000_000_000)?;
        (rc == 0).then(|| Duration::new(secs, nanos))
    }
}

/// The calling thread's CPU time so far.
pub fn current_thread() -> Option<Duration> {
    ThreadClock::current()?.read()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_runs_cpu_time_and_a_sleeping_one_does_not() {
        let clock = ThreadClock::current().expect("a thread clock");
        let t0 = clock.read().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let t1 = clock.read().unwrap();
        assert!(t1 > t0, "{t0:?} → {t1:?}");
        // Read from another thread, the clock is still this thread's; a thread that sleeps
        // 50 ms runs far less than 50 ms of CPU.
        let other = std::thread::spawn(move || {
            let seen = clock.read().unwrap();
            std::thread::sleep(Duration::from_millis(50));
            (seen, current_thread().unwrap())
        });
        let (seen, slept) = other.join().unwrap();
        assert!(seen >= t1, "{seen:?} < {t1:?}");
        assert!(slept < Duration::from_millis(25), "{slept:?}");
    }
}
