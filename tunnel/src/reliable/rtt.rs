//! Retransmission timeout from RTT samples (RFC 6298).

use std::time::Duration;

/// Clock granularity `G` of RFC 6298.
const GRANULARITY: Duration = Duration::from_millis(1);

/// Smoothed RTT, variation and the resulting RTO.
#[derive(Clone, Debug)]
pub(crate) struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    latest: Option<Duration>,
    min_rtt: Option<Duration>,
    initial_rto: Duration,
    min_rto: Duration,
    max_rto: Duration,
    /// Added to the RTO: the peer may hold an ACK this long.
    max_ack_delay: Duration,
}

impl RttEstimator {
    pub(crate) fn new(
        initial_rto: Duration,
        min_rto: Duration,
        max_rto: Duration,
        max_ack_delay: Duration,
    ) -> Self {
        RttEstimator {
            srtt: None,
            rttvar: Duration::ZERO,
            latest: None,
            min_rtt: None,
            initial_rto,
            min_rto,
            max_rto,
            max_ack_delay,
        }
    }

    /// Smoothed RTT, once there is a sample.
    pub(crate) fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    #[cfg(test)]
    pub(crate) fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// Feeds one sample; `ack_delay` (reported by the peer) is subtracted when that does not
    /// take the sample below the smallest RTT seen.
    pub(crate) fn on_sample(&mut self, rtt: Duration, ack_delay: Duration) {
        self.latest = Some(rtt);
        let min_rtt = self.min_rtt.map_or(rtt, |m| m.min(rtt));
        self.min_rtt = Some(min_rtt);
        let ack_delay = ack_delay.min(self.max_ack_delay);
        let r = if rtt >= min_rtt + ack_delay {
            rtt - ack_delay
        } else {
            rtt
        };
        match self.srtt {
            None => {
                // (2.2) SRTT <- R, RTTVAR <- R/2
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(srtt) => {
                // (2.3) RTTVAR <- 3/4 RTTVAR + 1/4 |SRTT - R'|; SRTT <- 7/8 SRTT + 1/8 R'
                let diff = srtt.abs_diff(r);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + r) / 8);
            }
        }
    }

    /// RTO = SRTT + max(G, 4 RTTVAR) (+ the peer's maximum ACK delay), clamped; the initial
    /// RTO before any sample (2.1).
    pub(crate) fn rto(&self) -> Duration {
        let rto = match self.srtt {
            None => self.initial_rto,
            Some(srtt) => srtt + GRANULARITY.max(self.rttvar * 4) + self.max_ack_delay,
        };
        rto.clamp(self.min_rto, self.max_rto)
    }

    /// How long after a later packet was acknowledged an earlier one counts as lost
    /// (RFC 9002 section 6.1.2): 9/8 of the larger of SRTT and the latest sample, at least
    /// the clock granularity. Before any sample: the initial RTO.
    pub(crate) fn loss_delay(&self) -> Duration {
        match (self.srtt, self.latest) {
            (Some(srtt), Some(latest)) => (srtt.max(latest) * 9 / 8).max(GRANULARITY),
            _ => self.initial_rto,
        }
    }

    /// The RTO after `backoff` consecutive timeouts (5.5: doubled each time, capped).
    pub(crate) fn backed_off_rto(&self, backoff: u32) -> Duration {
        let factor = 1u32 << backoff.min(16);
        self.rto().saturating_mul(factor).min(self.max_rto)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn rfc6298_formulas() {
        let mut r = RttEstimator::new(
            Duration::from_secs(1),
            ms(200),
            Duration::from_secs(60),
            Duration::ZERO,
        );
        assert_eq!(r.rto(), Duration::from_secs(1));
        r.on_sample(ms(100), Duration::ZERO);
        assert_eq!(r.srtt(), Some(ms(100)));
        assert_eq!(r.rttvar(), ms(50));
        // 100 + 4 * 50 = 300 ms
        assert_eq!(r.rto(), ms(300));
        r.on_sample(ms(200), Duration::ZERO);
        // RTTVAR = 3/4*50 + 1/4*100 = 62.5; SRTT = 7/8*100 + 1/8*200 = 112.5
        assert_eq!(r.rttvar(), Duration::from_micros(62_500));
        assert_eq!(r.srtt(), Some(Duration::from_micros(112_500)));
        assert_eq!(r.rto(), Duration::from_micros(362_500));
        assert_eq!(r.backed_off_rto(2), Duration::from_micros(1_450_000));
        assert_eq!(r.backed_off_rto(30), Duration::from_secs(60));
        // 9/8 of max(SRTT 112.5, latest 200) = 225 ms.
        assert_eq!(r.loss_delay(), ms(225));
    }

    #[test]
    fn min_rto_and_ack_delay() {
        let mut r = RttEstimator::new(
            Duration::from_secs(1),
            ms(200),
            Duration::from_secs(60),
            ms(25),
        );
        r.on_sample(ms(10), ms(5));
        // First sample defines min_rtt, so the ack delay is not subtracted.
        assert_eq!(r.srtt(), Some(ms(10)));
        assert_eq!(r.rto(), ms(200));
        r.on_sample(ms(40), ms(20));
        // 40 - 20 = 20 >= min_rtt 10: subtracted.
        assert_eq!(r.srtt(), Some(Duration::from_micros(11_250)));
    }
}
