//! The retry policy: how long to wait after a failure, as pure functions with named constants.

/// `Retry-After` is honoured up to this long.
pub const MAX_RETRY_AFTER_MS: u64 = 3_600_000;
/// Jitter spreads each wait over ±20%, in 1/1000 steps, so that retries of many deliveries that
/// failed together do not all come back at once.
const JITTER_MIN_PERMILLE: u64 = 800;
const JITTER_SPAN_PERMILLE: u64 = 401;
/// The probe period of an open circuit when the schedule is empty.
const DEFAULT_PROBE_PERIOD_MS: u64 = 1_000;

/// `base_ms` scaled by a factor in [0.8, 1.2] drawn from `random`.
pub fn jitter(base_ms: u64, random: u32) -> u64 {
    base_ms * (JITTER_MIN_PERMILLE + u64::from(random) % JITTER_SPAN_PERMILLE) / 1000
}

/// The retry schedule as data: the delay before each retry; attempts = retries + 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub schedule_ms: Vec<u64>,
}

impl RetryPolicy {
    pub fn new(schedule_ms: Vec<u64>) -> Self {
        RetryPolicy { schedule_ms }
    }

    pub fn max_attempts(&self) -> u32 {
        self.schedule_ms.len() as u32 + 1
    }

    /// The delay after `failed_attempts` failures, jittered; None when the schedule is used up.
    pub fn backoff_ms(&self, failed_attempts: u32, random: u32) -> Option<u64> {
        let base = *self
            .schedule_ms
            .get(failed_attempts.checked_sub(1)? as usize)?;
        Some(jitter(base, random))
    }

    /// How long an open circuit waits before its next probe, after `failed_probes` failed
    /// probes: the schedule's steps in turn, staying on the last one.
    pub fn probe_period_ms(&self, failed_probes: u32, random: u32) -> u64 {
        let step = (failed_probes as usize).min(self.schedule_ms.len().saturating_sub(1));
        let base = self
            .schedule_ms
            .get(step)
            .copied()
            .unwrap_or(DEFAULT_PROBE_PERIOD_MS);
        jitter(base, random)
    }

    /// The wait before the next attempt after a failed one: the backoff, or a longer
    /// `Retry-After` (capped at [`MAX_RETRY_AFTER_MS`]). None when the schedule is used up.
    pub fn next_wait_ms(
        &self,
        failed_attempts: u32,
        retry_after_ms: Option<u64>,
        random: u32,
    ) -> Option<u64> {
        let backoff = self.backoff_ms(failed_attempts, random)?;
        Some(backoff.max(retry_after_ms.unwrap_or(0).min(MAX_RETRY_AFTER_MS)))
    }
}

/// Whether a status's `Retry-After` is honoured: only 429 and 503 mean "come back later".
pub fn honours_retry_after(code: u16) -> bool {
    matches!(code, 429 | 503)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(vec![200, 500, 1000])
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let p = policy();
        assert_eq!(p.backoff_ms(1, 0), Some(160));
        assert_eq!(p.backoff_ms(1, 400), Some(240));
        assert_eq!(p.backoff_ms(1, 200), Some(200));
        assert_eq!(p.backoff_ms(3, 200), Some(1000));
        assert_eq!(p.backoff_ms(4, 200), None);
        assert_eq!(p.backoff_ms(0, 200), None);
        for r in [0, 1, 7, u32::MAX] {
            let d = p.backoff_ms(2, r).unwrap();
            assert!((400..=600).contains(&d), "{d}");
        }
    }

    #[test]
    fn probe_periods_walk_the_schedule_and_stay_on_its_last_step() {
        let p = policy();
        assert_eq!(p.probe_period_ms(0, 200), 200);
        assert_eq!(p.probe_period_ms(1, 200), 500);
        assert_eq!(p.probe_period_ms(9, 200), 1000);
        assert_eq!(RetryPolicy::new(vec![]).probe_period_ms(0, 200), 1000);
    }
}
