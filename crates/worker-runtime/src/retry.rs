//! Job-level retry: which failures retry ([`Classifier`]) and how long to wait
//! ([`RetryPolicy`]).
//!
//! Node-level retries (a node's [`NodePolicy`](flow_core::NodePolicy)) happen inside one
//! job attempt; job-level retries run the whole flow again later. They multiply: a node
//! with 2 retries in a job with 3 retries may run `(2 + 1) * (3 + 1) = 12` times. Keep
//! side effects idempotent, and keep one of the two small.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use flow_core::{FlowError, FlowErrorCode};

/// What to do with a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Run the job again later, if it has attempts left.
    Retry,
    /// Move it to the dead-letter set now.
    DeadLetter,
}

/// Decides whether a failure is worth another attempt.
pub trait Classifier: Send + Sync + 'static {
    /// Classifies the terminal error of one attempt.
    fn classify(&self, error: &FlowError) -> Disposition;
}

impl<F> Classifier for F
where
    F: Fn(&FlowError) -> Disposition + Send + Sync + 'static,
{
    fn classify(&self, error: &FlowError) -> Disposition {
        self(error)
    }
}

/// Retries a fixed set of codes, by default `NODE_TIMEOUT` and `NODE_EXCEPTION`;
/// everything else (`INVALID_PAYLOAD`, `JOB_TIMEOUT`, `UNEXPECTED_ERROR`, ...) is
/// dead-lettered at once.
///
/// ```
/// use flow_core::{FlowError, FlowErrorCode};
/// use worker_runtime::{Classifier, CodeClassifier, Disposition};
///
/// let c = CodeClassifier::default();
/// let transient = FlowError::new(FlowErrorCode::NodeTimeout, "slow");
/// let invalid = FlowError::new(FlowErrorCode::InvalidPayload, "bad");
/// assert_eq!(c.classify(&transient), Disposition::Retry);
/// assert_eq!(c.classify(&invalid), Disposition::DeadLetter);
/// let c = c.with_retryable("JOB_TIMEOUT");
/// assert_eq!(c.classify(&FlowError::new(FlowErrorCode::JobTimeout, "t")), Disposition::Retry);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct CodeClassifier {
    retryable: HashSet<String>,
}

impl fmt::Debug for CodeClassifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut codes: Vec<&String> = self.retryable.iter().collect();
        codes.sort();
        f.debug_struct("CodeClassifier")
            .field("retryable", &codes)
            .finish()
    }
}

impl Default for CodeClassifier {
    fn default() -> Self {
        Self::new([
            FlowErrorCode::NodeTimeout.as_str(),
            FlowErrorCode::NodeException.as_str(),
        ])
    }
}

impl CodeClassifier {
    /// Retries exactly `codes`.
    pub fn new<'a>(codes: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            retryable: codes.into_iter().map(str::to_owned).collect(),
        }
    }
    /// Adds a retryable code.
    pub fn with_retryable(mut self, code: &str) -> Self {
        self.retryable.insert(code.to_owned());
        self
    }
    /// Whether `code` is retried.
    pub fn is_retryable(&self, code: &str) -> bool {
        self.retryable.contains(code)
    }
}

impl Classifier for CodeClassifier {
    fn classify(&self, error: &FlowError) -> Disposition {
        if self.retryable.contains(error.code.as_str()) {
            Disposition::Retry
        } else {
            Disposition::DeadLetter
        }
    }
}

/// Capped exponential backoff with jitter between job attempts.
///
/// The delay after failed attempt `n` (1-based) is `min(base * 2^(n-1), cap)`, then with
/// jitter a uniformly random value between half of that and all of it, so a wave of
/// failures does not come back as one wave.
///
/// ```
/// use std::time::Duration;
/// use worker_runtime::RetryPolicy;
///
/// let p = RetryPolicy { base: Duration::from_secs(1), cap: Duration::from_secs(60), jitter: false };
/// assert_eq!(p.delay(1), Duration::from_secs(1));
/// assert_eq!(p.delay(3), Duration::from_secs(4));
/// assert_eq!(p.delay(30), Duration::from_secs(60));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay after the first failed attempt. Default 1 s.
    pub base: Duration,
    /// Largest delay. Default 60 s.
    pub cap: Duration,
    /// Whether to randomise each delay between 50 % and 100 %. Default on.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The delay after failed attempt `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(62);
        let raw = self
            .base
            .checked_mul(1u32.checked_shl(exp.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.cap);
        let capped = raw.min(self.cap);
        if self.jitter {
            capped.mul_f64(0.5 + fastrand::f64() * 0.5)
        } else {
            capped
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_between_half_and_full() {
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            jitter: true,
        };
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let d = p.delay(2);
            assert!(
                d >= Duration::from_millis(100) && d <= Duration::from_millis(200),
                "{d:?}"
            );
            seen.insert(d.as_micros());
        }
        assert!(seen.len() > 10, "delays are spread out");
        assert!(p.delay(40) <= Duration::from_secs(1));
    }

    #[test]
    fn only_transient_codes_retry_by_default() {
        let c = CodeClassifier::default();
        for (code, want) in [
            (FlowErrorCode::NodeTimeout, Disposition::Retry),
            (FlowErrorCode::NodeException, Disposition::Retry),
            (FlowErrorCode::InvalidPayload, Disposition::DeadLetter),
            (FlowErrorCode::JobTimeout, Disposition::DeadLetter),
            (FlowErrorCode::UnexpectedError, Disposition::DeadLetter),
            (FlowErrorCode::DeadlineExceeded, Disposition::DeadLetter),
        ] {
            assert_eq!(
                c.classify(&FlowError::new(code.clone(), "x")),
                want,
                "{code}"
            );
        }
    }
}
