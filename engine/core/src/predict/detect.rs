//! Overload detection: the peak utilisation predicted over a horizon against a threshold learned
//! from the node's own history, and imbalance across the group.
//!
//! The threshold is `mean + k·σ` of the last [`DetectConfig::history`] utilisation samples,
//! clamped to `[floor, ceiling]`: a node whose load is usually flat alarms on a forecast well
//! out of its normal range, but never below `floor` (a quiet node does not offload at 20 %) and
//! never above `ceiling` (a node that always runs hot still alarms before saturating). Until
//! `min_history` samples are in, the threshold is `ceiling`.
//!
//! The detector also scores the forecasts it is shown ([`Detector::forecast_made`]) against
//! the utilisation that came `horizon` samples later: the root mean squared error at the
//! horizon, weighted towards the last [`HORIZON_ERROR_SAMPLES`] or so. With
//! [`DetectConfig::confidence`] `z > 0`, a predicted peak counts only as far as it stands
//! above its own error ([`Detector::confident`]: `peak − z·rmse`, never below the current
//! utilisation): a noisy load whose forecasts often miss must be forecast well above the
//! threshold before it alarms; a smooth ramp, forecast well, alarms almost as early as with
//! `z = 0`.

use std::collections::VecDeque;

use smoltcp::time::Duration;

use super::NodeId;
use super::config::{ConfigError, count_in, duration_in, in_range};

/// Settings of detection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectConfig {
    /// How far ahead the forecast looks. Default 5 s.
    pub horizon: Duration,
    /// `k` in `mean + k·σ`. Default 3.
    pub k: f64,
    /// Lowest threshold (utilisation, fraction of capacity). Default 0.7.
    pub floor: f64,
    /// Highest threshold. Default 0.85.
    pub ceiling: f64,
    /// Samples of history the threshold is learned from. Default 600 (60 s at 100 ms).
    pub history: usize,
    /// Samples needed before the threshold is learned rather than `ceiling`. Default 50.
    pub min_history: usize,
    /// Spread of utilisation (max − min over the group) above which the group is imbalanced.
    /// Default 0.3.
    pub imbalance_threshold: f64,
    /// How many of its own errors at the horizon a predicted peak must stand above the
    /// current utilisation to count (see the module doc). Default 0: the forecast as it is.
    pub confidence: f64,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            horizon: Duration::from_secs(5),
            k: 3.0,
            floor: 0.7,
            ceiling: 0.85,
            history: 600,
            min_history: 50,
            imbalance_threshold: 0.3,
            confidence: 0.0,
        }
    }
}

impl DetectConfig {
    /// Checks every setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        duration_in(
            "detect.horizon",
            self.horizon,
            Duration::from_millis(1),
            Duration::from_secs(3600),
        )?;
        in_range("detect.k", self.k, 0.0, 100.0)?;
        in_range("detect.floor", self.floor, 0.0, 10.0)?;
        in_range("detect.ceiling", self.ceiling, 0.0, 10.0)?;
        if self.floor > self.ceiling {
            return Err(ConfigError::Order {
                low: "detect.floor",
                high: "detect.ceiling",
            });
        }
        count_in("detect.history", self.history, 2, 1 << 20)?;
        count_in("detect.min_history", self.min_history, 2, self.history)?;
        in_range(
            "detect.imbalance_threshold",
            self.imbalance_threshold,
            0.0,
            10.0,
        )?;
        in_range("detect.confidence", self.confidence, 0.0, 10.0)?;
        Ok(())
    }
}

/// What [`Detector::check`] concluded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Detection {
    /// Predicted utilisation stays at or below the threshold.
    Normal {
        /// Predicted peak utilisation.
        predicted: f64,
        /// Threshold it was compared with.
        threshold: f64,
    },
    /// Predicted utilisation exceeds the threshold.
    Overload {
        /// Predicted peak utilisation.
        predicted: f64,
        /// Threshold it exceeds.
        threshold: f64,
    },
}

/// About how many of the last errors at the horizon its RMSE weighs (an exponential weight of
/// `1 / HORIZON_ERROR_SAMPLES`).
pub const HORIZON_ERROR_SAMPLES: usize = 50;

/// A node's utilisation history and its learned threshold.
#[derive(Debug, Clone)]
pub struct Detector {
    config: DetectConfig,
    history: VecDeque<f64>,
    /// Forecasts for the samples to come, the oldest (due next) first.
    forecasts: VecDeque<f64>,
    /// How many samples ahead they forecast.
    horizon: usize,
    /// Mean squared error of the forecasts scored so far (exponentially weighted).
    mse: Option<f64>,
}

impl Detector {
    /// A detector with no history.
    pub fn new(config: DetectConfig) -> Self {
        Self {
            history: VecDeque::with_capacity(config.history.min(1 << 16)),
            forecasts: VecDeque::new(),
            horizon: 0,
            mse: None,
            config,
        }
    }

    /// Records the utilisation of the interval just ended, and scores the forecast made for it
    /// (see [`Self::forecast_made`]); non-finite values are ignored.
    pub fn observe(&mut self, utilisation: f64) {
        if !utilisation.is_finite() {
            return;
        }
        if self.horizon > 0
            && self.forecasts.len() >= self.horizon
            && let Some(f) = self.forecasts.pop_front()
        {
            let e = (utilisation - f) * (utilisation - f);
            let w = 1.0 / HORIZON_ERROR_SAMPLES as f64;
            self.mse = Some(self.mse.map_or(e, |m| m + w * (e - m)));
        }
        if self.history.len() >= self.config.history {
            self.history.pop_front();
        }
        self.history.push_back(utilisation);
    }

    /// Records this sample's forecast of the utilisation `horizon` samples ahead (at most
    /// 65,536), to be scored when that sample is observed. A non-finite forecast is scored as
    /// the last utilisation (it says nothing). A new horizon starts the scoring over.
    pub fn forecast_made(&mut self, forecast: f64, horizon: usize) {
        let horizon = horizon.clamp(1, 1 << 16);
        if horizon != self.horizon {
            self.forecasts.clear();
            self.mse = None;
            self.horizon = horizon;
        }
        let last = self.history.back().copied().unwrap_or(0.0);
        self.forecasts
            .push_back(if forecast.is_finite() { forecast } else { last });
    }

    /// The root mean squared error of the forecasts at the horizon, once one was scored.
    pub fn horizon_rmse(&self) -> Option<f64> {
        self.mse.map(f64::sqrt).filter(|r| r.is_finite())
    }

    /// What of a predicted `peak` counts against the threshold: `peak − confidence·rmse`
    /// (the RMSE at the horizon, 0 until one is scored), never below `current`.
    pub fn confident(&self, peak: f64, current: f64) -> f64 {
        let margin = self.config.confidence * self.horizon_rmse().unwrap_or(0.0);
        (peak - margin).max(current)
    }

    /// The current threshold (see the module doc).
    pub fn threshold(&self) -> f64 {
        let n = self.history.len();
        if n < self.config.min_history.max(2) {
            return self.config.ceiling;
        }
        let mean = self.history.iter().sum::<f64>() / n as f64;
        let var = self
            .history
            .iter()
            .map(|u| (u - mean) * (u - mean))
            .sum::<f64>()
            / (n - 1) as f64;
        let learned = mean + self.config.k * var.sqrt();
        if learned.is_finite() {
            learned.clamp(self.config.floor, self.config.ceiling)
        } else {
            self.config.ceiling
        }
    }

    /// Compares a predicted peak utilisation with the threshold. A non-finite prediction is
    /// reported as an overload at the ceiling's threshold: the caller's forecast is broken.
    pub fn check(&self, predicted: f64) -> Detection {
        let threshold = self.threshold();
        if predicted.is_finite() && predicted <= threshold {
            Detection::Normal {
                predicted,
                threshold,
            }
        } else {
            Detection::Overload {
                predicted,
                threshold,
            }
        }
    }
}

/// The most and least loaded nodes of a group when their spread exceeds the threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Imbalance {
    /// The most loaded node and its utilisation.
    pub busiest: (NodeId, f64),
    /// The least loaded node and its utilisation.
    pub idlest: (NodeId, f64),
}

/// Reads the group's load reports (node, utilisation); `Some` when the spread between the busiest
/// and the idlest node exceeds `threshold`. Non-finite reports are skipped.
pub fn imbalance(loads: &[(NodeId, f64)], threshold: f64) -> Option<Imbalance> {
    let mut finite = loads.iter().copied().filter(|(_, u)| u.is_finite());
    let first = finite.next()?;
    let (busiest, idlest) = finite.fold((first, first), |(hi, lo), x| {
        (
            if x.1 > hi.1 { x } else { hi },
            if x.1 < lo.1 { x } else { lo },
        )
    });
    (busiest.1 - idlest.1 > threshold).then_some(Imbalance { busiest, idlest })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_is_ceiling_until_history_then_learned_and_clamped() {
        let config = DetectConfig {
            min_history: 4,
            ..DetectConfig::default()
        };
        let mut d = Detector::new(config);
        for u in [0.7, 0.8, 0.7] {
            d.observe(u);
        }
        assert_eq!(d.threshold(), 0.85);
        d.observe(0.8);
        // mean 0.75, sample σ = sqrt(0.01 / 3): 0.75 + 3 * 0.0577 = 0.923 → capped at 0.85.
        assert_eq!(d.threshold(), 0.85);

        let mut d = Detector::new(config);
        for u in [0.72, 0.74, 0.72, 0.74] {
            d.observe(u);
        }
        // mean 0.73, σ = sqrt(4e-4 / 3) = 0.011547: threshold 0.764641.
        assert!((d.threshold() - 0.764641).abs() < 1e-6, "{}", d.threshold());
        assert!(matches!(d.check(0.76), Detection::Normal { .. }));
        assert!(matches!(d.check(0.77), Detection::Overload { .. }));

        let mut d = Detector::new(config);
        for _ in 0..10 {
            d.observe(0.1);
        }
        assert_eq!(d.threshold(), 0.7, "a quiet node is held at the floor");
        d.observe(f64::NAN);
        assert_eq!(d.threshold(), 0.7);
        assert!(matches!(d.check(f64::NAN), Detection::Overload { .. }));
    }

    #[test]
    fn forecasts_are_scored_at_the_horizon_and_discount_a_peak_by_their_error() {
        let config = DetectConfig {
            confidence: 2.0,
            ..DetectConfig::default()
        };
        let mut d = Detector::new(config);
        assert_eq!(d.horizon_rmse(), None);
        assert_eq!(
            d.confident(0.9, 0.5),
            0.9,
            "no error scored: the peak as it is"
        );
        // Forecasts 0.1 too high, 3 samples ahead: scored from the fourth sample on.
        for t in 0..20 {
            let u = 0.5 + 0.01 * f64::from(t);
            d.observe(u);
            if t < 3 {
                assert_eq!(d.horizon_rmse(), None);
            }
            d.forecast_made(0.5 + 0.01 * f64::from(t + 3) + 0.1, 3);
        }
        let rmse = d.horizon_rmse().unwrap();
        assert!((rmse - 0.1).abs() < 1e-9, "{rmse}");
        assert!((d.confident(0.9, 0.5) - 0.7).abs() < 1e-9);
        assert_eq!(
            d.confident(0.9, 0.8),
            0.8,
            "never below the current utilisation"
        );
        // Without confidence the peak is the peak.
        let mut plain = Detector::new(DetectConfig::default());
        plain.forecast_made(1.0, 1);
        plain.observe(0.5);
        assert!(plain.horizon_rmse().is_some());
        assert_eq!(plain.confident(0.9, 0.5), 0.9);
        // Hostile forecasts neither panic nor poison the error.
        d.forecast_made(f64::NAN, 3);
        d.forecast_made(f64::INFINITY, 3);
        for _ in 0..5 {
            d.observe(0.7);
        }
        assert!(d.horizon_rmse().is_some_and(f64::is_finite));
        // A new horizon starts over.
        d.forecast_made(0.7, 5);
        assert_eq!(d.horizon_rmse(), None);
    }

    #[test]
    fn history_is_a_sliding_window() {
        let config = DetectConfig {
            history: 4,
            min_history: 4,
            ..DetectConfig::default()
        };
        let mut d = Detector::new(config);
        for u in [5.0, 5.0, 5.0, 5.0, 0.72, 0.74, 0.72, 0.74] {
            d.observe(u);
        }
        assert!((d.threshold() - 0.764641).abs() < 1e-6);
    }

    #[test]
    fn imbalance_needs_a_spread_above_threshold() {
        let loads = [
            (NodeId(1), 0.9),
            (NodeId(2), 0.5),
            (NodeId(3), f64::NAN),
            (NodeId(4), 0.65),
        ];
        assert_eq!(
            imbalance(&loads, 0.3),
            Some(Imbalance {
                busiest: (NodeId(1), 0.9),
                idlest: (NodeId(2), 0.5)
            })
        );
        assert_eq!(imbalance(&loads, 0.45), None);
        assert_eq!(imbalance(&[], 0.1), None);
    }
}
