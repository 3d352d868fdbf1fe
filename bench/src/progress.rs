//! Progress of a long benchmark: a line on stderr per finished part, with the time elapsed and
//! an estimate of what remains.
//!
//! A bench states up front how much work each part is (in any unit; the benches use the
//! seconds they expect it to take from their arguments), and the estimate scales that by
//! how fast the finished parts actually went: remaining = elapsed × work left / work done.

use std::time::{Duration, Instant};

pub(crate) struct Progress {
    start: Instant,
    total: f64,
    done: f64,
}

impl Progress {
    /// `total`: all the work there is.
    pub(crate) fn new(total: f64) -> Self {
        Self {
            start: Instant::now(),
            total: total.max(f64::MIN_POSITIVE),
            done: 0.0,
        }
    }

    /// `what` finished, which was `work` of the total: prints a line.
    pub(crate) fn done(&mut self, work: f64, what: &str) {
        self.done = (self.done + work.max(0.0)).min(self.total);
        eprintln!("progress: {}", self.line(what, self.start.elapsed()));
    }

    /// The line for `what`, `elapsed` into the run.
    fn line(&self, what: &str, elapsed: Duration) -> String {
        let left = self.remaining(elapsed);
        format!(
            "{what} · {} elapsed · {}",
            clock(elapsed),
            match left {
                Some(d) if d.is_zero() => "done".to_owned(),
                Some(d) => format!("about {} left", clock(d)),
                None => "no estimate yet".to_owned(),
            }
        )
    }

    fn remaining(&self, elapsed: Duration) -> Option<Duration> {
        if self.done <= 0.0 {
            return None;
        }
        let left = (self.total - self.done).max(0.0);
        Duration::try_from_secs_f64(elapsed.as_secs_f64() * left / self.done).ok()
    }
}

/// `1 h 02 min`, `3 min 20 s`, `42 s`.
fn clock(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, s / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_scales_the_work_left_by_the_pace_so_far() {
        let mut p = Progress::new(10.0);
        assert_eq!(p.remaining(Duration::from_secs(5)), None);
        p.done(2.0, "first");
        // 2 units in 30 s: 8 left take 120 s.
        assert_eq!(
            p.remaining(Duration::from_secs(30)),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            p.line("run 1 of 5", Duration::from_secs(30)),
            "run 1 of 5 · 30 s elapsed · about 2 min 00 s left"
        );
        p.done(20.0, "all");
        assert_eq!(
            p.line("end", Duration::from_secs(3700)),
            "end · 1 h 01 min elapsed · done"
        );
    }
}
