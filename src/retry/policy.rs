//! What is worth retrying and how long to wait (spec §3). Pure functions, no I/O, no clock.
//!
//! Shaped after openai-python's `_should_retry` / `_calculate_retry_timeout`: the
//! `x-should-retry` header wins, then the status class; `Retry-After` beats our own backoff.

use std::time::{Duration, UNIX_EPOCH};

use super::{AttemptOutcome, FailureKind, UpstreamReply};

/// Backoff settings (`RETRY_MAX_ATTEMPTS`, `RETRY_BASE_DELAY_MS`, `RETRY_MAX_DELAY_MS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay_ms: u64,
    pub max_delay_ms: u64,
}

impl RetryPolicy {
    /// `d = min(RETRY_MAX_DELAY_MS, RETRY_BASE_DELAY_MS · 2^(n-1))` for retry `n` (1-based).
    pub fn backoff_ceiling_ms(&self, retry: u32) -> u64 {
        let factor = 1u64
            .checked_shl(retry.saturating_sub(1))
            .unwrap_or(u64::MAX);
        self.base_delay_ms
            .saturating_mul(factor)
            .min(self.max_delay_ms)
    }

    /// The jittered wait before retry `n`: uniform in `[d/2, d]`.
    pub fn backoff_ms(&self, retry: u32, jitter: &mut impl Jitter) -> u64 {
        let d = self.backoff_ceiling_ms(retry);
        jitter.between(d / 2, d)
    }
}

/// Source of randomness for the jitter, injected so tests can pin it.
pub trait Jitter {
    /// A uniformly random value in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64;
}

/// Why an attempt's outcome is final or worth another try. Logged as `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Final(&'static str),
    Retryable(&'static str),
}

/// Classifies one attempt's outcome (spec §3).
pub fn verdict(outcome: &AttemptOutcome) -> Verdict {
    match outcome {
        AttemptOutcome::Failed {
            kind: FailureKind::Unsendable,
            ..
        } => Verdict::Final("request could not be built"),
        AttemptOutcome::Failed { kind, .. } => Verdict::Retryable(kind.as_str()),
        AttemptOutcome::Reply(reply) => reply_verdict(reply),
    }
}

fn reply_verdict(reply: &UpstreamReply) -> Verdict {
    if (200..300).contains(&reply.status) {
        return Verdict::Final("success");
    }
    match reply.header("x-should-retry").map(str::trim) {
        Some(v) if v.eq_ignore_ascii_case("true") => {
            return Verdict::Retryable("x-should-retry: true");
        }
        Some(v) if v.eq_ignore_ascii_case("false") => {
            return Verdict::Final("x-should-retry: false");
        }
        _ => {}
    }
    match reply.status {
        429 if reply.error_code().as_deref() == Some("insufficient_quota") => {
            Verdict::Final("insufficient_quota")
        }
        408 | 409 | 429 | 500..=599 => Verdict::Retryable("retryable status"),
        _ => Verdict::Final("final status"),
    }
}

/// The wait the upstream asked for, in ms: `retry-after-ms`, else `retry-after` as seconds or
/// an HTTP date (relative to `now_ms`, epoch milliseconds). A date in the past means "now".
pub fn retry_after_ms(reply: &UpstreamReply, now_ms: u64) -> Option<u64> {
    if let Some(ms) = reply.header("retry-after-ms").and_then(parse_non_negative) {
        return Some(ms.ceil() as u64);
    }
    let value = reply.header("retry-after")?.trim();
    if let Some(secs) = parse_non_negative(value) {
        return Some((secs * 1000.0).ceil() as u64);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let at_ms = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64;
    Some(at_ms.saturating_sub(now_ms))
}

fn parse_non_negative(s: &str) -> Option<f64> {
    let v: f64 = s.trim().parse().ok()?;
    // Cap absurd values so the arithmetic stays in range; anything this long is past any deadline.
    (v.is_finite() && v >= 0.0).then_some(v.min(1e12))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, headers: &[(&str, &str)], body: &str) -> UpstreamReply {
        UpstreamReply::for_test(status, headers, body)
    }

    fn verdict_of(status: u16, headers: &[(&str, &str)], body: &str) -> Verdict {
        verdict(&AttemptOutcome::Reply(reply(status, headers, body)))
    }

    #[test]
    fn status_classes() {
        for s in [408, 409, 429, 500, 502, 503, 504, 520, 599] {
            assert!(
                matches!(verdict_of(s, &[], ""), Verdict::Retryable(_)),
                "{s}"
            );
        }
        for s in [200, 201, 204, 400, 401, 403, 404, 413, 422] {
            assert!(matches!(verdict_of(s, &[], ""), Verdict::Final(_)), "{s}");
        }
    }

    #[test]
    fn transport_failures_are_retryable() {
        for kind in [
            FailureKind::Connect,
            FailureKind::Connection,
            FailureKind::Timeout,
            FailureKind::IncompleteBody,
        ] {
            let outcome = AttemptOutcome::Failed {
                kind,
                detail: String::new(),
            };
            assert_eq!(verdict(&outcome), Verdict::Retryable(kind.as_str()));
        }
        // A request that could not be built is a bug or a configuration error: retrying
        // would fail the same way.
        let unsendable = AttemptOutcome::Failed {
            kind: FailureKind::Unsendable,
            detail: String::new(),
        };
        assert!(matches!(verdict(&unsendable), Verdict::Final(_)));
    }

    #[test]
    fn x_should_retry_overrides_the_status_both_ways() {
        assert!(matches!(
            verdict_of(400, &[("x-should-retry", "true")], ""),
            Verdict::Retryable(_)
        ));
        assert!(matches!(
            verdict_of(503, &[("x-should-retry", "false")], ""),
            Verdict::Final(_)
        ));
        assert!(matches!(
            verdict_of(503, &[("x-should-retry", "FALSE")], ""),
            Verdict::Final(_)
        ));
        // Garbage is ignored; a success is never retried.
        assert!(matches!(
            verdict_of(503, &[("x-should-retry", "maybe")], ""),
            Verdict::Retryable(_)
        ));
        assert_eq!(
            verdict_of(200, &[("x-should-retry", "true")], ""),
            Verdict::Final("success")
        );
    }

    #[test]
    fn insufficient_quota_is_final_other_429s_are_not() {
        let quota = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        assert_eq!(
            verdict_of(429, &[], quota),
            Verdict::Final("insufficient_quota")
        );
        let rate = r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        assert!(matches!(verdict_of(429, &[], rate), Verdict::Retryable(_)));
        assert!(matches!(
            verdict_of(429, &[], "not json"),
            Verdict::Retryable(_)
        ));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay_ms: 1000,
            max_delay_ms: 8000,
        };
        let ceilings: Vec<u64> = (1..=6).map(|n| p.backoff_ceiling_ms(n)).collect();
        assert_eq!(ceilings, [1000, 2000, 4000, 8000, 8000, 8000]);
        assert_eq!(
            p.backoff_ceiling_ms(200),
            8000,
            "no overflow on huge retry numbers"
        );
    }

    struct Fixed(u64);
    impl Jitter for Fixed {
        fn between(&mut self, lo: u64, hi: u64) -> u64 {
            self.0.clamp(lo, hi)
        }
    }

    #[test]
    fn jitter_stays_within_half_and_full_delay() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay_ms: 1000,
            max_delay_ms: 8000,
        };
        assert_eq!(p.backoff_ms(3, &mut Fixed(0)), 2000);
        assert_eq!(p.backoff_ms(3, &mut Fixed(u64::MAX)), 4000);
        let mut real = crate::retry::FastRandJitter;
        for n in 1..=8 {
            let d = p.backoff_ceiling_ms(n);
            for _ in 0..200 {
                let w = p.backoff_ms(n, &mut real);
                assert!(
                    (d / 2..=d).contains(&w),
                    "retry {n}: {w} outside [{}, {d}]",
                    d / 2
                );
            }
        }
    }

    #[test]
    fn retry_after_in_all_three_forms() {
        let now = 1_764_000_000_000;
        assert_eq!(
            retry_after_ms(&reply(429, &[("retry-after-ms", "250")], ""), now),
            Some(250)
        );
        assert_eq!(
            retry_after_ms(&reply(429, &[("retry-after-ms", "12.5")], ""), now),
            Some(13)
        );
        assert_eq!(
            retry_after_ms(&reply(429, &[("retry-after", "2")], ""), now),
            Some(2000)
        );
        assert_eq!(
            retry_after_ms(&reply(429, &[("retry-after", "0.5")], ""), now),
            Some(500)
        );
        // retry-after-ms wins over retry-after.
        let both = reply(429, &[("retry-after", "9"), ("retry-after-ms", "100")], "");
        assert_eq!(retry_after_ms(&both, now), Some(100));
        // HTTP date, 7 s ahead of now (the date has whole-second resolution).
        let at = UNIX_EPOCH + Duration::from_millis(now + 7_000);
        let date = httpdate::fmt_http_date(at);
        assert_eq!(
            retry_after_ms(&reply(503, &[("retry-after", &date)], ""), now),
            Some(7_000)
        );
        // A date in the past means retry now.
        let past = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_millis(now - 60_000));
        assert_eq!(
            retry_after_ms(&reply(503, &[("retry-after", &past)], ""), now),
            Some(0)
        );
        // Garbage and negatives are ignored.
        assert_eq!(
            retry_after_ms(&reply(503, &[("retry-after", "soon")], ""), now),
            None
        );
        assert_eq!(
            retry_after_ms(&reply(503, &[("retry-after-ms", "-5")], ""), now),
            None
        );
        assert_eq!(retry_after_ms(&reply(503, &[], ""), now), None);
    }
}
