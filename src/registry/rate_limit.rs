//! Token buckets, one per key (an organisation, for its writes through the admin API). Pure: the clock is passed
//! in (monotonic milliseconds), nothing is logged here; the caller logs what [`Taken::report`] and
//! [`TokenBuckets::sweep`] hand back.
//!
//! A bucket holds up to `burst` tokens and gains `per_second` a second; each write takes one, a write that finds
//! less than one is refused, with the whole seconds until one is there. Tokens are counted in billionths, whole
//! numbers, so that no rounding of a float lets one write more or fewer through. A full bucket is the same as none, so
//! buckets that filled up again are forgotten, and the table holds at most `most` buckets: a new key beyond that
//! pushes out the fullest bucket (the oldest of the fullest), which loses its organisation at most what it had
//! left to refill.

use std::collections::HashMap;

/// Refusals of one key are reported at most once per this period.
pub const REPORT_EVERY_MS: u64 = 10_000;
/// A token, in the units counted.
const TOKEN: u64 = 1_000_000_000;
/// Lowest rate on: one write in 1000 s (a rate is counted in billionths of a token a millisecond).
pub const LEAST_RATE: f64 = 0.001;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens gained a second; 0 turns the limit off.
    pub per_second: f64,
    /// Most tokens a bucket holds (the burst allowed after a quiet period).
    pub burst: u32,
}

impl Rate {
    pub fn is_off(&self) -> bool {
        self.per_second <= 0.0 || !self.per_second.is_finite()
    }

    /// Billionths of a token gained a millisecond (at least 1 while on).
    fn per_ms(&self) -> u64 {
        ((self.per_second * 1e6).round() as u64).max(1)
    }

    fn burst(&self) -> u64 {
        u64::from(self.burst.max(1)).saturating_mul(TOKEN)
    }
}

/// Refusals of one key not reported yet: how many, since when (the first of them, monotonic ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub key: String,
    pub refused: u64,
    pub since_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Refused; a token is there again in this many whole seconds (rounded up, at least 1).
    Refused {
        retry_after_s: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub decision: Decision,
    /// Refusals of this key to report now (at most once per [`REPORT_EVERY_MS`]).
    pub report: Option<Report>,
}

#[derive(Debug, Clone)]
struct Bucket {
    /// Billionths of a token.
    tokens: u64,
    /// When `tokens` was computed.
    at_ms: u64,
    refused: u64,
    first_refused_ms: u64,
    last_report_ms: Option<u64>,
}

#[derive(Debug)]
pub struct TokenBuckets {
    rate: Rate,
    most: usize,
    buckets: HashMap<String, Bucket>,
    /// Unreported refusals of buckets pushed out of a full table, reported by the next sweep; since when.
    forgotten_refused: u64,
    forgotten_since_ms: u64,
}

impl TokenBuckets {
    /// `most` is at least 1.
    pub fn new(rate: Rate, most: usize) -> Self {
        TokenBuckets {
            rate,
            most: most.max(1),
            buckets: HashMap::new(),
            forgotten_refused: 0,
            forgotten_since_ms: 0,
        }
    }

    #[cfg(test)]
    pub fn rate(&self) -> Rate {
        self.rate
    }

    #[cfg(test)]
    /// Buckets held.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The bucket's tokens at `now_ms` (never more than the burst; a clock that went back refills nothing).
    fn tokens_at(&self, bucket: &Bucket, now_ms: u64) -> u64 {
        tokens_at(self.rate, bucket, now_ms)
    }

    /// One write of `key` at `now_ms`: allowed (a token taken) or refused with the time until the next token.
    pub fn take(&mut self, key: &str, now_ms: u64) -> Taken {
        if self.rate.is_off() {
            return Taken {
                decision: Decision::Allowed,
                report: None,
            };
        }
        if !self.buckets.contains_key(key) {
            self.make_room(now_ms);
            let fresh = Bucket {
                tokens: self.rate.burst(),
                at_ms: now_ms,
                refused: 0,
                first_refused_ms: now_ms,
                last_report_ms: None,
            };
            self.buckets.insert(key.to_string(), fresh);
        }
        let per_ms = self.rate.per_ms();
        let Some(mut bucket) = self.buckets.get(key).cloned() else {
            return Taken {
                decision: Decision::Allowed,
                report: None,
            };
        };
        bucket.tokens = self.tokens_at(&bucket, now_ms);
        bucket.at_ms = bucket.at_ms.max(now_ms);
        let taken = if bucket.tokens >= TOKEN {
            bucket.tokens -= TOKEN;
            Taken {
                decision: Decision::Allowed,
                report: None,
            }
        } else {
            if bucket.refused == 0 {
                bucket.first_refused_ms = now_ms;
            }
            bucket.refused += 1;
            let report = due(&bucket, now_ms).then(|| take_report(key, &mut bucket, now_ms));
            let wait_ms = (TOKEN - bucket.tokens).div_ceil(per_ms);
            Taken {
                decision: Decision::Refused {
                    retry_after_s: retry_after_s(wait_ms),
                },
                report,
            }
        };
        self.buckets.insert(key.to_string(), bucket);
        taken
    }

    /// Forgets the buckets that are full again (and whose last report is older than [`REPORT_EVERY_MS`], so a
    /// forgotten key is not reported twice within it); returns the refusals due for a report: of each key whose
    /// last report is that old, and of buckets pushed out of a full table (with the key "").
    pub fn sweep(&mut self, now_ms: u64) -> Vec<Report> {
        let mut reports = Vec::new();
        let rate = self.rate;
        self.buckets.retain(|key, bucket| {
            if bucket.refused > 0 && due(bucket, now_ms) {
                reports.push(take_report(key, bucket, now_ms));
            }
            let full = tokens_at(rate, bucket, now_ms) >= rate.burst();
            !(full && bucket.refused == 0 && due(bucket, now_ms))
        });
        if self.forgotten_refused > 0 {
            reports.push(Report {
                key: String::new(),
                refused: std::mem::take(&mut self.forgotten_refused),
                since_ms: self.forgotten_since_ms,
            });
        }
        reports
    }

    /// Every refusal not reported yet, due or not (when the registry stops).
    pub fn final_reports(&mut self) -> Vec<Report> {
        let mut reports: Vec<Report> = self
            .buckets
            .iter_mut()
            .filter(|(_, bucket)| bucket.refused > 0)
            .map(|(key, bucket)| Report {
                key: key.clone(),
                refused: std::mem::take(&mut bucket.refused),
                since_ms: bucket.first_refused_ms,
            })
            .collect();
        if self.forgotten_refused > 0 {
            reports.push(Report {
                key: String::new(),
                refused: std::mem::take(&mut self.forgotten_refused),
                since_ms: self.forgotten_since_ms,
            });
        }
        reports
    }

    /// Before a new key: when the table is full, the full buckets go, then if need be the fullest one.
    fn make_room(&mut self, now_ms: u64) {
        if self.buckets.len() < self.most {
            return;
        }
        let rate = self.rate;
        self.buckets.retain(|_, bucket| {
            !(tokens_at(rate, bucket, now_ms) >= rate.burst() && bucket.refused == 0)
        });
        while self.buckets.len() >= self.most {
            let fullest = self
                .buckets
                .iter()
                .map(|(key, bucket)| (self.tokens_at(bucket, now_ms), bucket.at_ms, key))
                .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
                .map(|(_, _, key)| key.clone());
            let Some(key) = fullest else { return };
            if let Some(gone) = self.buckets.remove(&key) {
                if self.forgotten_refused == 0 && gone.refused > 0 {
                    self.forgotten_since_ms = gone.first_refused_ms;
                }
                self.forgotten_refused = self.forgotten_refused.saturating_add(gone.refused);
            }
        }
    }
}

fn tokens_at(rate: Rate, bucket: &Bucket, now_ms: u64) -> u64 {
    let gained = now_ms
        .saturating_sub(bucket.at_ms)
        .saturating_mul(rate.per_ms());
    bucket.tokens.saturating_add(gained).min(rate.burst())
}

fn due(bucket: &Bucket, now_ms: u64) -> bool {
    bucket
        .last_report_ms
        .is_none_or(|last| now_ms.saturating_sub(last) >= REPORT_EVERY_MS)
}

fn take_report(key: &str, bucket: &mut Bucket, now_ms: u64) -> Report {
    bucket.last_report_ms = Some(now_ms);
    Report {
        key: key.to_string(),
        refused: std::mem::take(&mut bucket.refused),
        since_ms: bucket.first_refused_ms,
    }
}

/// Whole seconds, rounded up, at least 1.
pub fn retry_after_s(wait_ms: u64) -> u64 {
    wait_ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests;
