//! Forecasters: EWMA, Holt (level + trend) and additive Holt-Winters (level + trend + season),
//! and a [`Forecaster`] that runs all three on one series and forecasts with the one that has
//! been most accurate lately.
//!
//! Selection rule: every model is scored on its one-step-ahead errors over the last
//! [`ForecastConfig::window`] samples. A model is eligible once it has
//! [`ForecastConfig::min_history`] scored errors (Holt-Winters first spends one season
//! initialising) and its RMSE is finite; the eligible model with the lowest RMSE wins, ties going
//! to the simpler model. The forecast falls back to the last observed value, and says why
//! ([`FallbackReason`]), when the series is shorter than `min_history`, when no model is eligible
//! or the winner's forecast is not finite, or when the winner's MAPE exceeds
//! [`ForecastConfig::max_mape`].
//!
//! Series are non-negative quantities (rates, utilisation): forecasts are clamped at 0. A
//! non-finite observation is dropped and counted ([`Forecaster::rejected`]); models never see it.

use std::collections::VecDeque;

use super::config::{ConfigError, count_in, in_range};

/// Settings of the forecasters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForecastConfig {
    /// Level smoothing factor of all three models, `(0, 1]`. Default 0.3 (see `beta`).
    pub alpha: f64,
    /// Trend smoothing factor of Holt and Holt-Winters, `(0, 1]`. Default 0.02: samples every
    /// 100 ms are noisy and the trend is extrapolated over the horizon (50 samples at 5 s), which
    /// multiplies its noise; 0.02 averages the trend over about 50 samples. Chosen in the
    /// simulator, where 0.2 (with `alpha` 0.5) made the predictive policy move on noise.
    pub beta: f64,
    /// Seasonal smoothing factor of Holt-Winters, `(0, 1]`. Default 0.3.
    pub gamma: f64,
    /// Season length of Holt-Winters in samples; 0 disables it. Default 0 (a node sets it to its
    /// daily or hourly cycle: at 100 ms samples an hour is 36,000 values per series).
    pub season: usize,
    /// How many recent one-step errors score a model. Default 50.
    pub window: usize,
    /// Samples (and scored errors) needed before a model is trusted. Default 10.
    pub min_history: usize,
    /// The winner's MAPE above which the last value is used instead. Default 0.5 (50 %).
    pub max_mape: f64,
}

impl Default for ForecastConfig {
    fn default() -> Self {
        Self {
            alpha: 0.3,
            beta: 0.02,
            gamma: 0.3,
            season: 0,
            window: 50,
            min_history: 10,
            max_mape: 0.5,
        }
    }
}

impl ForecastConfig {
    /// Checks every setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        in_range("forecast.alpha", self.alpha, 1e-6, 1.0)?;
        in_range("forecast.beta", self.beta, 1e-6, 1.0)?;
        in_range("forecast.gamma", self.gamma, 1e-6, 1.0)?;
        if self.season != 0 {
            count_in("forecast.season", self.season, 2, 1 << 20)?;
        }
        count_in("forecast.window", self.window, 2, 1 << 16)?;
        count_in("forecast.min_history", self.min_history, 1, self.window)?;
        in_range("forecast.max_mape", self.max_mape, 0.0, 1e6)?;
        Ok(())
    }
}

/// The model a forecast came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelChoice {
    /// Exponentially weighted moving average.
    Ewma,
    /// Holt's linear trend.
    Holt,
    /// Additive Holt-Winters.
    HoltWinters,
    /// The last observed value, for the reason given.
    LastValue(FallbackReason),
}

/// Why a forecast is the last observed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackReason {
    /// The best model's recent MAPE is above [`ForecastConfig::max_mape`].
    ErrorAboveBound,
    /// Models have history but none produces finite errors or forecasts.
    NonFinite,
    /// Fewer than [`ForecastConfig::min_history`] samples or scored errors.
    ShortHistory,
}

impl std::fmt::Display for ModelChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelChoice::Ewma => f.write_str("ewma"),
            ModelChoice::Holt => f.write_str("holt"),
            ModelChoice::HoltWinters => f.write_str("holt-winters"),
            ModelChoice::LastValue(FallbackReason::ErrorAboveBound) => {
                f.write_str("last value (error above bound)")
            }
            ModelChoice::LastValue(FallbackReason::NonFinite) => {
                f.write_str("last value (non-finite)")
            }
            ModelChoice::LastValue(FallbackReason::ShortHistory) => {
                f.write_str("last value (short history)")
            }
        }
    }
}

/// A forecast and where it came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    /// The forecast value, finite and `>= 0`.
    pub value: f64,
    /// The model used.
    pub model: ModelChoice,
    /// The chosen model's recent MAPE (fraction), when defined.
    pub mape: Option<f64>,
    /// The chosen model's recent RMSE, when defined.
    pub rmse: Option<f64>,
}

/// One-step-ahead errors of a model over a sliding window.
#[derive(Debug, Clone)]
pub struct Accuracy {
    /// (actual, predicted) pairs, oldest first, at most `window`.
    pairs: VecDeque<(f64, f64)>,
    window: usize,
}

impl Accuracy {
    fn new(window: usize) -> Self {
        Self {
            pairs: VecDeque::new(),
            window,
        }
    }

    fn push(&mut self, actual: f64, predicted: f64) {
        if self.pairs.len() == self.window {
            self.pairs.pop_front();
        }
        self.pairs.push_back((actual, predicted));
    }

    /// Scored errors in the window.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether no error has been scored yet.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Root mean squared error; infinite when a forecast in the window was not finite.
    pub fn rmse(&self) -> Option<f64> {
        if self.pairs.is_empty() {
            return None;
        }
        let sum: f64 = self.pairs.iter().map(|(a, p)| (a - p) * (a - p)).sum();
        let rmse = (sum / self.pairs.len() as f64).sqrt();
        Some(if rmse.is_finite() {
            rmse
        } else {
            f64::INFINITY
        })
    }

    /// Mean absolute percentage error as a fraction, over the pairs whose actual is not 0.
    pub fn mape(&self) -> Option<f64> {
        let (sum, n) = self
            .pairs
            .iter()
            .filter(|(a, _)| a.abs() > 1e-12)
            .fold((0.0, 0usize), |(s, n), (a, p)| {
                (s + ((a - p) / a).abs(), n + 1)
            });
        (n > 0).then(|| {
            if sum.is_finite() {
                sum / n as f64
            } else {
                f64::INFINITY
            }
        })
    }
}

/// Exponentially weighted moving average: forecasts its level at every horizon.
#[derive(Debug, Clone)]
struct Ewma {
    alpha: f64,
    level: Option<f64>,
}

impl Ewma {
    fn observe(&mut self, x: f64) {
        self.level = Some(match self.level {
            None => x,
            Some(l) => self.alpha * x + (1.0 - self.alpha) * l,
        });
    }

    fn forecast(&self, _h: usize) -> Option<f64> {
        self.level
    }
}

/// Holt's linear method: level and trend.
#[derive(Debug, Clone)]
struct Holt {
    alpha: f64,
    beta: f64,
    /// (level, trend) once a value was seen.
    state: Option<(f64, f64)>,
}

impl Holt {
    fn observe(&mut self, x: f64) {
        self.state = Some(match self.state {
            None => (x, 0.0),
            Some((level, trend)) => {
                let new_level = self.alpha * x + (1.0 - self.alpha) * (level + trend);
                let new_trend = self.beta * (new_level - level) + (1.0 - self.beta) * trend;
                (new_level, new_trend)
            }
        });
    }

    fn forecast(&self, h: usize) -> Option<f64> {
        self.state.map(|(level, trend)| level + h as f64 * trend)
    }
}

/// Additive Holt-Winters: level, trend and one seasonal term per position in the season.
///
/// The first season initialises it: level = the season's mean, trend = 0, seasonal terms = each
/// value minus the mean.
#[derive(Debug, Clone)]
struct HoltWinters {
    alpha: f64,
    beta: f64,
    gamma: f64,
    level: f64,
    trend: f64,
    /// Seasonal terms; while initialising, the first season's values.
    seasonal: Vec<f64>,
    season: usize,
    /// Values observed (the next one's position in the season is `seen % season`).
    seen: usize,
}

impl HoltWinters {
    fn new(config: &ForecastConfig) -> Self {
        Self {
            alpha: config.alpha,
            beta: config.beta,
            gamma: config.gamma,
            level: 0.0,
            trend: 0.0,
            seasonal: Vec::new(),
            season: config.season,
            seen: 0,
        }
    }

    fn observe(&mut self, x: f64) {
        if self.seen < self.season {
            self.seasonal.push(x);
            self.seen += 1;
            if self.seen == self.season {
                self.level = self.seasonal.iter().sum::<f64>() / self.season as f64;
                let level = self.level;
                self.seasonal.iter_mut().for_each(|s| *s -= level);
            }
            return;
        }
        let i = self.seen % self.season;
        let prev_level = self.level;
        self.level =
            self.alpha * (x - self.seasonal[i]) + (1.0 - self.alpha) * (prev_level + self.trend);
        self.trend = self.beta * (self.level - prev_level) + (1.0 - self.beta) * self.trend;
        self.seasonal[i] = self.gamma * (x - self.level) + (1.0 - self.gamma) * self.seasonal[i];
        self.seen = self.season + (self.seen + 1 - self.season) % self.season;
    }

    fn forecast(&self, h: usize) -> Option<f64> {
        if self.seen < self.season || h == 0 {
            return None;
        }
        let i = (self.seen % self.season + (h - 1) % self.season) % self.season;
        Some(self.level + h as f64 * self.trend + self.seasonal[i])
    }
}

/// The three models on one series, each scored, and the rule that picks one.
#[derive(Debug, Clone)]
pub struct Forecaster {
    config: ForecastConfig,
    ewma: Ewma,
    holt: Holt,
    holt_winters: Option<HoltWinters>,
    /// Scores of ewma, holt, holt-winters.
    accuracy: [Accuracy; 3],
    last: Option<f64>,
    observed: u64,
    rejected: u64,
}

impl Forecaster {
    /// A forecaster with no history. `config` should have passed [`ForecastConfig::validate`];
    /// out-of-range values give poor forecasts but never a panic.
    pub fn new(config: ForecastConfig) -> Self {
        Self {
            ewma: Ewma {
                alpha: config.alpha,
                level: None,
            },
            holt: Holt {
                alpha: config.alpha,
                beta: config.beta,
                state: None,
            },
            holt_winters: (config.season >= 2).then(|| HoltWinters::new(&config)),
            accuracy: std::array::from_fn(|_| Accuracy::new(config.window.max(1))),
            config,
            last: None,
            observed: 0,
            rejected: 0,
        }
    }

    /// Feeds the next value of the series. A non-finite value is dropped and counted.
    pub fn observe(&mut self, x: f64) {
        if !x.is_finite() {
            self.rejected += 1;
            return;
        }
        if let Some(p) = self.ewma.forecast(1) {
            self.accuracy[0].push(x, p);
        }
        if let Some(p) = self.holt.forecast(1) {
            self.accuracy[1].push(x, p);
        }
        if let Some(p) = self.holt_winters.as_ref().and_then(|m| m.forecast(1)) {
            self.accuracy[2].push(x, p);
        }
        self.ewma.observe(x);
        self.holt.observe(x);
        if let Some(m) = self.holt_winters.as_mut() {
            m.observe(x);
        }
        self.last = Some(x);
        self.observed += 1;
    }

    /// The last finite value observed.
    pub fn last(&self) -> Option<f64> {
        self.last
    }

    /// Finite values observed.
    pub fn observed(&self) -> u64 {
        self.observed
    }

    /// Non-finite values dropped.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// A model's recent accuracy (`None` for Holt-Winters when disabled or for `LastValue`).
    pub fn accuracy(&self, model: ModelChoice) -> Option<&Accuracy> {
        match model {
            ModelChoice::Ewma => Some(&self.accuracy[0]),
            ModelChoice::Holt => Some(&self.accuracy[1]),
            ModelChoice::HoltWinters => self.holt_winters.as_ref().map(|_| &self.accuracy[2]),
            ModelChoice::LastValue(_) => None,
        }
    }

    /// The value `h >= 1` samples ahead; `None` until a finite value was observed.
    pub fn forecast(&self, h: usize) -> Option<Forecast> {
        let h = h.max(1);
        let (model, value) = self.choose(h)?;
        Some(self.finish(model, value))
    }

    /// The largest forecast over the next `horizon` samples (at most 65,536), by the model
    /// chosen for the first.
    pub fn peak(&self, horizon: usize) -> Option<Forecast> {
        let (model, first) = self.choose(1)?;
        let mut best = first;
        for h in 2..=horizon.min(1 << 16) {
            match self.raw(model, h) {
                Some(v) if v.is_finite() => best = best.max(v),
                _ => break,
            }
        }
        Some(self.finish(model, best))
    }

    fn finish(&self, model: ModelChoice, value: f64) -> Forecast {
        let accuracy = self.accuracy(model);
        Forecast {
            value: value.max(0.0),
            model,
            mape: accuracy.and_then(Accuracy::mape),
            rmse: accuracy.and_then(Accuracy::rmse),
        }
    }

    fn raw(&self, model: ModelChoice, h: usize) -> Option<f64> {
        match model {
            ModelChoice::Ewma => self.ewma.forecast(h),
            ModelChoice::Holt => self.holt.forecast(h),
            ModelChoice::HoltWinters => self.holt_winters.as_ref()?.forecast(h),
            ModelChoice::LastValue(_) => self.last,
        }
    }

    /// The selection rule of the module doc.
    fn choose(&self, h: usize) -> Option<(ModelChoice, f64)> {
        let last = self.last?;
        let fallback = |reason| Some((ModelChoice::LastValue(reason), last));
        if self.observed < self.config.min_history as u64 {
            return fallback(FallbackReason::ShortHistory);
        }
        let models = [
            ModelChoice::Ewma,
            ModelChoice::Holt,
            ModelChoice::HoltWinters,
        ];
        let mut best: Option<(ModelChoice, f64)> = None;
        let mut any_scored = false;
        for model in models {
            let Some(acc) = self.accuracy(model) else {
                continue;
            };
            if acc.len() < self.config.min_history {
                continue;
            }
            any_scored = true;
            match acc.rmse() {
                Some(rmse) if rmse.is_finite() && best.is_none_or(|(_, b)| rmse < b) => {
                    best = Some((model, rmse));
                }
                _ => {}
            }
        }
        let Some((model, _)) = best else {
            return fallback(if any_scored {
                FallbackReason::NonFinite
            } else {
                FallbackReason::ShortHistory
            });
        };
        let value = match self.raw(model, h) {
            Some(v) if v.is_finite() => v,
            _ => return fallback(FallbackReason::NonFinite),
        };
        let mape = self.accuracy(model).and_then(Accuracy::mape);
        if mape.is_some_and(|m| m > self.config.max_mape) {
            return fallback(FallbackReason::ErrorAboveBound);
        }
        Some((model, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(f: &mut Forecaster, xs: impl IntoIterator<Item = f64>) {
        xs.into_iter().for_each(|x| f.observe(x));
    }

    /// Faster smoothing than the defaults, so that the models converge within the test's
    /// series.
    fn fast() -> ForecastConfig {
        ForecastConfig {
            alpha: 0.5,
            beta: 0.2,
            ..ForecastConfig::default()
        }
    }

    fn seasonal_config(season: usize) -> ForecastConfig {
        ForecastConfig { season, ..fast() }
    }

    #[test]
    fn constant_series_every_model_exact_simplest_wins() {
        let mut f = Forecaster::new(seasonal_config(12));
        feed(&mut f, std::iter::repeat_n(5.0, 100));
        let fc = f.forecast(10).unwrap();
        assert_eq!(fc.model, ModelChoice::Ewma);
        assert_eq!(fc.value, 5.0);
        assert_eq!(fc.rmse, Some(0.0));
        assert_eq!(fc.mape, Some(0.0));
        assert_eq!(f.accuracy(ModelChoice::Holt).unwrap().rmse(), Some(0.0));
    }

    #[test]
    fn linear_series_holt_wins_and_extrapolates() {
        let mut f = Forecaster::new(fast());
        feed(&mut f, (0..200).map(|t| 2.0 * t as f64 + 10.0));
        let fc = f.forecast(10).unwrap();
        assert_eq!(fc.model, ModelChoice::Holt);
        // Next index is 200; 10 ahead is 209.
        let want = 2.0 * 209.0 + 10.0;
        assert!((fc.value - want).abs() < 1e-6, "{} vs {want}", fc.value);
        // EWMA lags a ramp by slope * (1 - alpha) / alpha = 2.
        let ewma = f.accuracy(ModelChoice::Ewma).unwrap().rmse().unwrap();
        assert!((ewma - 4.0).abs() < 1e-6, "ewma one-step error {ewma}");
    }

    #[test]
    fn seasonal_series_holt_winters_wins() {
        let season = 12;
        let x = |t: usize| 50.0 + 20.0 * (std::f64::consts::TAU * t as f64 / season as f64).sin();
        let mut f = Forecaster::new(seasonal_config(season));
        feed(&mut f, (0..season * 30).map(x));
        let fc = f.forecast(3).unwrap();
        assert_eq!(fc.model, ModelChoice::HoltWinters);
        let want = x(season * 30 + 2);
        assert!((fc.value - want).abs() < 0.01, "{} vs {want}", fc.value);
        // The peak over a whole season is the sinusoid's crest.
        let peak = f.peak(season).unwrap();
        assert!((peak.value - 70.0).abs() < 0.01, "{}", peak.value);
    }

    #[test]
    fn short_history_falls_back_to_last_value() {
        let mut f = Forecaster::new(ForecastConfig::default());
        assert_eq!(f.forecast(1), None);
        feed(&mut f, [1.0, 2.0, 3.0]);
        let fc = f.forecast(5).unwrap();
        assert_eq!(
            fc.model,
            ModelChoice::LastValue(FallbackReason::ShortHistory)
        );
        assert_eq!(fc.value, 3.0);
    }

    #[test]
    fn non_finite_input_is_dropped_and_counted() {
        let mut f = Forecaster::new(ForecastConfig::default());
        feed(&mut f, std::iter::repeat_n(4.0, 20));
        feed(&mut f, [f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
        assert_eq!(f.rejected(), 3);
        assert_eq!(f.observed(), 20);
        let fc = f.forecast(1).unwrap();
        assert_eq!(fc.model, ModelChoice::Ewma);
        assert_eq!(fc.value, 4.0);
    }

    #[test]
    fn overflowing_models_fall_back_non_finite() {
        let mut f = Forecaster::new(ForecastConfig::default());
        feed(
            &mut f,
            (0..20).map(|t| if t % 2 == 0 { f64::MAX } else { -f64::MAX }),
        );
        let fc = f.forecast(1).unwrap();
        assert_eq!(fc.model, ModelChoice::LastValue(FallbackReason::NonFinite));
        assert_eq!(fc.value, 0.0, "-MAX clamped at 0");
    }

    #[test]
    fn wild_series_falls_back_error_above_bound() {
        let mut f = Forecaster::new(ForecastConfig::default());
        feed(
            &mut f,
            (0..40).map(|t| if t % 2 == 0 { 1.0 } else { 100.0 }),
        );
        let fc = f.forecast(1).unwrap();
        assert_eq!(
            fc.model,
            ModelChoice::LastValue(FallbackReason::ErrorAboveBound)
        );
        assert_eq!(fc.value, 100.0);
    }

    #[test]
    fn unvalidated_config_and_horizons_do_not_panic() {
        let config = ForecastConfig {
            alpha: f64::NAN,
            season: usize::MAX,
            window: usize::MAX,
            min_history: 0,
            ..ForecastConfig::default()
        };
        let mut f = Forecaster::new(config);
        feed(&mut f, (0..100).map(f64::from));
        let _ = (f.forecast(usize::MAX), f.peak(usize::MAX));
        let mut f = Forecaster::new(seasonal_config(7));
        feed(&mut f, (0..100).map(f64::from));
        assert!(f.forecast(usize::MAX).is_some());
    }

    #[test]
    fn accuracy_known_values() {
        let mut acc = Accuracy::new(3);
        acc.push(10.0, 8.0); // error 2, 20 %
        acc.push(0.0, 1.0); // error 1, no percentage
        acc.push(4.0, 5.0); // error 1, 25 %
        assert_eq!(acc.rmse(), Some(2.0f64.sqrt()));
        assert!((acc.mape().unwrap() - 0.225).abs() < 1e-12);
        acc.push(10.0, 10.0); // pushes (10, 8) out
        assert_eq!(acc.rmse(), Some((2.0f64 / 3.0).sqrt()));
        assert_eq!(acc.mape(), Some(0.125));
    }
}
