//! [`PredictConfig`]: every setting of the predictor, with defaults, and its validation.

use smoltcp::time::Duration;

use super::class::ClassConfig;
use super::detect::DetectConfig;
use super::forecast::ForecastConfig;
use super::lease::LeaseConfig;
use super::plan::PlanConfig;
use super::shadow::ShadowConfig;

/// The predictor's settings. [`PredictConfig::default`] is what a node runs with unless its
/// config file says otherwise; [`PredictConfig::validate`] rejects what would misbehave.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictConfig {
    /// Forecasters of every series.
    pub forecast: ForecastConfig,
    /// Overload detection (horizon, learned threshold, imbalance).
    pub detect: DetectConfig,
    /// The planner (policy, hysteresis, replan interval, move cap, move cost).
    pub plan: PlanConfig,
    /// Shadow trials of candidate peers.
    pub shadow: ShadowConfig,
    /// Leases of offloaded connections.
    pub lease: LeaseConfig,
    /// Connection classes and segment statistics.
    pub class: ClassConfig,
    /// How often the node samples its counters. Default 100 ms.
    pub interval: Duration,
}

impl Default for PredictConfig {
    fn default() -> Self {
        Self {
            forecast: ForecastConfig::default(),
            detect: DetectConfig::default(),
            plan: PlanConfig::default(),
            shadow: ShadowConfig::default(),
            lease: LeaseConfig::default(),
            class: ClassConfig::default(),
            interval: Self::DEFAULT_INTERVAL,
        }
    }
}

impl PredictConfig {
    /// The default sampling interval.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);

    /// The config with every default (as [`Default`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// The horizon in samples: how many intervals ahead detection looks (at least 1).
    pub fn horizon_samples(&self) -> usize {
        let interval = self.interval.total_micros().max(1);
        (self.detect.horizon.total_micros() / interval).max(1) as usize
    }

    /// Checks every setting; the first bad one is the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        duration_in(
            "interval",
            self.interval,
            Duration::from_millis(1),
            Duration::from_secs(60),
        )?;
        self.forecast.validate()?;
        self.detect.validate()?;
        if self.detect.horizon < self.interval {
            return Err(ConfigError::Order {
                low: "interval",
                high: "detect.horizon",
            });
        }
        self.plan.validate()?;
        self.shadow.validate()?;
        self.lease.validate()?;
        self.class.validate()?;
        Ok(())
    }
}

/// A setting [`PredictConfig::validate`] refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A number outside its range (or not finite).
    #[error("{field} must be in {min}..={max}, got {value}")]
    OutOfRange {
        /// The setting.
        field: &'static str,
        /// What it was set to.
        value: f64,
        /// Smallest allowed.
        min: f64,
        /// Largest allowed.
        max: f64,
    },
    /// Two settings in the wrong order.
    #[error("{low} must not exceed {high}")]
    Order {
        /// The one that must be smaller or equal.
        low: &'static str,
        /// The one that must be larger or equal.
        high: &'static str,
    },
}

/// `value` within `min..=max` (and finite).
pub(crate) fn in_range(
    field: &'static str,
    value: f64,
    min: f64,
    max: f64,
) -> Result<(), ConfigError> {
    if value.is_finite() && (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            field,
            value,
            min,
            max,
        })
    }
}

/// A count within `min..=max`.
pub(crate) fn count_in(
    field: &'static str,
    value: usize,
    min: usize,
    max: usize,
) -> Result<(), ConfigError> {
    in_range(field, value as f64, min as f64, max as f64)
}

/// A duration within `min..=max`, reported in seconds.
pub(crate) fn duration_in(
    field: &'static str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    in_range(
        field,
        super::secs(value),
        super::secs(min),
        super::secs(max),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let config = PredictConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.interval, Duration::from_millis(100));
        assert_eq!(config.horizon_samples(), 50);
    }

    #[test]
    fn bad_settings_are_refused_with_their_name() {
        let mut config = PredictConfig::default();
        config.forecast.alpha = f64::NAN;
        assert!(matches!(
            config.validate(),
            Err(ConfigError::OutOfRange {
                field: "forecast.alpha",
                ..
            })
        ));

        let config = PredictConfig {
            interval: Duration::ZERO,
            ..PredictConfig::default()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::OutOfRange {
                field: "interval",
                ..
            })
        ));

        let mut config = PredictConfig::default();
        config.lease.min_lease = config.lease.max_lease + Duration::from_secs(1);
        assert_eq!(
            config.validate(),
            Err(ConfigError::Order {
                low: "lease.min_lease",
                high: "lease.max_lease"
            })
        );

        let mut config = PredictConfig::default();
        config.detect.floor = 0.95;
        assert_eq!(
            config.validate(),
            Err(ConfigError::Order {
                low: "detect.floor",
                high: "detect.ceiling"
            })
        );
    }
}
