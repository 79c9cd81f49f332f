//! The retry decision (spec §3, §4, §11): one pure step from how an attempt ended to what follows.
//!
//! Shaped like tower's `retry::Policy::retry` and openai-python's `_should_retry` +
//! `_calculate_retry_timeout`: no I/O, no clock, no shared state. The time, the deadline, which
//! upstreams admit attempts, their expected latency and the randomness are arguments, so every
//! rule is a table test below. The loop around it ([`super::engine`]) only attempts, sleeps and
//! tells the breakers.
//!
//! The rules, in the order they apply to a retryable failure:
//! - where the next attempt goes ([`Rotation::after_retryable`]): the same target, or another
//!   upstream or model at once ([`Next::Switch`], no backoff);
//! - the wait: `Retry-After` if the upstream sent one, else the jittered backoff (§3);
//! - no further attempt when the attempt was cut at the deadline, `RETRY_MAX_ATTEMPTS` is used
//!   up, `Retry-After` ends past the deadline, less than `MIN_ATTEMPT_MS` would be left after
//!   the wait, or the next attempt is expected to take longer than the time it would have.

use super::engine::{GiveUpReason, RetryEngine};
use super::policy::{self, Jitter, Verdict};
use super::{AttemptOutcome, FailureKind};
use crate::upstreams::fallback::{Move, Rotation, Target, hopeless};

/// What follows an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Sleep `wait_ms` (the upstream's `Retry-After` or the backoff), then try again: on the
    /// same upstream and model, or from the first upstream again once every one failed.
    Retry { wait_ms: u64 },
    /// Try another upstream or model at once, without a backoff.
    Switch,
    /// No further attempt.
    Stop(Stop),
}

/// Why a run stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A final answer (or a request that could not be built): pass it on.
    Final,
    /// Retryable, but no further attempt fits.
    GiveUp(GiveUpReason),
}

impl Next {
    /// The sleep before the next attempt (0 for a switch); `None` when there is no next attempt.
    pub fn wait_ms(self) -> Option<u64> {
        match self {
            Next::Retry { wait_ms } => Some(wait_ms),
            Next::Switch => Some(0),
            Next::Stop(_) => None,
        }
    }
}

/// One finished attempt, as the decision sees it.
#[derive(Clone, Copy, Debug)]
pub struct Ended<'a> {
    /// The attempt's number (1-based, over every upstream).
    pub number: u32,
    pub outcome: &'a AttemptOutcome,
    /// When it ended (epoch ms).
    pub now_ms: u64,
}

/// The decision and what it rests on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    pub next: Next,
    /// Where the next attempt goes (unchanged after a final answer).
    pub rotation: Rotation,
    /// The log's `reason`: the policy's verdict, and why the run stops when it gives up.
    pub reason: String,
    /// The upstream's `Retry-After`, in ms from `now_ms`.
    pub retry_after_ms: Option<u64>,
    /// The skipped attempt's expected latency, when it was hopeless.
    pub expected_ms: Option<u64>,
}

/// Decides what follows `ended`, the attempt at `rotation.current()`.
///
/// `available[i]`: upstream `i` admits attempts now (after this attempt was reported to its
/// breaker). `expected_ms`: how long a success at a target is expected to take (`None`: not
/// known, or hopeless attempts are not skipped). `jitter` is drawn from for the backoff only.
pub fn decide(
    engine: &RetryEngine,
    ended: &Ended<'_>,
    deadline_ms: u64,
    rotation: &Rotation,
    available: &[bool],
    expected_ms: impl Fn(Target) -> Option<u64>,
    jitter: &mut impl Jitter,
) -> Decided {
    let retry_after_ms = match ended.outcome {
        AttemptOutcome::Reply(r) => policy::retry_after_ms(r, ended.now_ms),
        AttemptOutcome::Failed { .. } => None,
    };
    let verdict_reason = match policy::verdict(ended.outcome) {
        Verdict::Final(reason) => {
            return Decided {
                next: Next::Stop(Stop::Final),
                rotation: rotation.clone(),
                reason: reason.to_owned(),
                retry_after_ms,
                expected_ms: None,
            };
        }
        Verdict::Retryable(reason) => reason,
    };
    let (rotation, mv) = rotation.after_retryable(switches_at_once(ended.outcome), available);
    let expected = expected_ms(rotation.current());
    let retryable = Retryable {
        number: ended.number,
        remaining_ms: deadline_ms.saturating_sub(ended.now_ms),
        retry_after_ms,
        cut_by_deadline: cut_by_deadline(ended.outcome, deadline_ms, ended.now_ms),
        mv,
        expected_ms: expected,
    };
    let next = engine.next_after(&retryable, jitter);
    let (reason, expected_ms) = match next {
        Next::Stop(Stop::GiveUp(GiveUpReason::ExpectedLatencyExceedsBudget)) => (
            GiveUpReason::ExpectedLatencyExceedsBudget
                .as_str()
                .to_owned(),
            expected,
        ),
        Next::Stop(Stop::GiveUp(why)) => (format!("{verdict_reason}; {}", why.as_str()), None),
        _ => (verdict_reason.to_owned(), None),
    };
    Decided {
        next,
        rotation,
        reason,
        retry_after_ms,
        expected_ms,
    }
}

/// A 429 or a connect error leaves the upstream at once (spec §11).
fn switches_at_once(outcome: &AttemptOutcome) -> bool {
    match outcome {
        AttemptOutcome::Reply(r) => r.status == 429,
        AttemptOutcome::Failed { kind, .. } => *kind == FailureKind::Connect,
    }
}

/// Only a timeout that ran until the deadline was cut by it; a timeout that ended earlier
/// (`ATTEMPT_TIMEOUT_MS`, a connect timeout) is a failure like any.
fn cut_by_deadline(outcome: &AttemptOutcome, deadline_ms: u64, now_ms: u64) -> bool {
    let timed_out = matches!(
        outcome,
        AttemptOutcome::Failed {
            kind: FailureKind::Timeout,
            ..
        }
    );
    timed_out && now_ms >= deadline_ms
}

/// A retryable failure, as the wait and the give-up rules see it.
struct Retryable {
    number: u32,
    remaining_ms: u64,
    retry_after_ms: Option<u64>,
    cut_by_deadline: bool,
    /// Where the next attempt goes ([`Move::Switch`] goes at once, without a backoff).
    mv: Move,
    /// The next attempt's expected latency, when hopeless attempts are skipped.
    expected_ms: Option<u64>,
}

impl RetryEngine {
    /// An attempt needs at least 1 ms even when `MIN_ATTEMPT_MS` is 0.
    pub(super) fn min_attempt(&self) -> u64 {
        self.min_attempt_ms.max(1)
    }

    /// After a retryable failure: the wait before the next attempt, or why there is none.
    fn next_after(&self, r: &Retryable, jitter: &mut impl Jitter) -> Next {
        let switching = r.mv == Move::Switch;
        let wait = match switching {
            true => 0,
            false => r
                .retry_after_ms
                .unwrap_or_else(|| self.policy.backoff_ms(r.number, jitter)),
        };
        let left_after_wait = r.remaining_ms.saturating_sub(wait);
        let time_for_attempt = self
            .attempt_timeout_ms
            .map_or(left_after_wait, |t| t.min(left_after_wait));
        let why = if r.cut_by_deadline {
            GiveUpReason::DeadlineReached
        } else if r.number >= self.policy.max_attempts {
            GiveUpReason::AttemptsExhausted
        } else if !switching && r.retry_after_ms.is_some_and(|w| w > r.remaining_ms) {
            GiveUpReason::RetryAfterPastDeadline
        } else if left_after_wait < self.min_attempt() {
            GiveUpReason::BudgetExhausted
        } else if hopeless(true, true, r.expected_ms, time_for_attempt).is_some() {
            GiveUpReason::ExpectedLatencyExceedsBudget
        } else if switching {
            return Next::Switch;
        } else {
            return Next::Retry { wait_ms: wait };
        };
        Next::Stop(Stop::GiveUp(why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::UpstreamReply;
    use crate::retry::tests::engine;

    const NOW: u64 = 1_764_000_000_000;

    /// The top of the jitter range: the backoff ceiling.
    struct Max;
    impl Jitter for Max {
        fn between(&mut self, _lo: u64, hi: u64) -> u64 {
            hi
        }
    }

    fn reply(status: u16, headers: &[(&str, &str)]) -> AttemptOutcome {
        AttemptOutcome::Reply(UpstreamReply::for_test(status, headers, "{}"))
    }

    fn failed(kind: FailureKind) -> AttemptOutcome {
        AttemptOutcome::Failed {
            kind,
            detail: String::new(),
        }
    }

    fn t(upstream: usize, model: usize) -> Target {
        Target { upstream, model }
    }

    /// One case: attempt `number` ended with `outcome`, `left_ms` before the deadline, on a
    /// rotation over `upstreams` (all available, `FALLBACK_AFTER_FAILURES` = 2).
    struct Case {
        engine: RetryEngine,
        number: u32,
        outcome: AttemptOutcome,
        left_ms: u64,
        rotation: Rotation,
        available: Vec<bool>,
        expected_ms: Option<u64>,
    }

    fn case(number: u32, outcome: AttemptOutcome, left_ms: u64, upstreams: usize) -> Case {
        let available = vec![true; upstreams];
        Case {
            engine: engine(),
            number,
            outcome,
            left_ms,
            rotation: Rotation::start(&available, 1, 2).unwrap(),
            available,
            expected_ms: None,
        }
    }

    impl Case {
        fn decide(&self) -> Decided {
            let ended = Ended {
                number: self.number,
                outcome: &self.outcome,
                now_ms: NOW,
            };
            let expected = |_: Target| self.expected_ms;
            let (rotation, available) = (&self.rotation, &self.available);
            decide(
                &self.engine,
                &ended,
                NOW + self.left_ms,
                rotation,
                available,
                expected,
                &mut Max,
            )
        }
    }

    fn give_up(why: GiveUpReason) -> Next {
        Next::Stop(Stop::GiveUp(why))
    }

    #[test]
    fn final_answers_stop_and_never_switch() {
        for (outcome, reason) in [
            (reply(200, &[]), "success"),
            (reply(400, &[]), "final status"),
            (reply(401, &[]), "final status"),
            (
                reply(503, &[("x-should-retry", "false")]),
                "x-should-retry: false",
            ),
            (
                failed(FailureKind::Unsendable),
                "request could not be built",
            ),
        ] {
            // Two upstreams, a full budget, the first attempt: nothing keeps it from switching.
            let c = case(1, outcome, 30_000, 2);
            let d = c.decide();
            assert_eq!(d.next, Next::Stop(Stop::Final), "{reason}");
            assert_eq!(d.next.wait_ms(), None);
            assert_eq!(
                d.rotation, c.rotation,
                "{reason}: the rotation did not move"
            );
            assert_eq!(d.reason, reason);
        }
    }

    #[test]
    fn retryable_failures_back_off_exponentially() {
        for (number, wait_ms) in [(1, 1_000), (2, 2_000), (3, 4_000), (4, 8_000)] {
            let d = case(number, reply(500, &[]), 30_000, 1).decide();
            assert_eq!(d.next, Next::Retry { wait_ms }, "attempt {number}");
            assert_eq!(d.reason, "retryable status");
            assert_eq!(d.rotation.current(), t(0, 0));
        }
        for kind in [
            FailureKind::Connect,
            FailureKind::Connection,
            FailureKind::Timeout,
            FailureKind::IncompleteBody,
        ] {
            let d = case(1, failed(kind), 30_000, 1).decide();
            assert_eq!(d.next, Next::Retry { wait_ms: 1_000 }, "{kind:?}");
            assert_eq!(d.reason, kind.as_str());
        }
    }

    #[test]
    fn retry_after_replaces_the_backoff() {
        let d = case(1, reply(503, &[("retry-after-ms", "1500")]), 30_000, 1).decide();
        assert_eq!(d.next, Next::Retry { wait_ms: 1_500 });
        assert_eq!(d.retry_after_ms, Some(1_500));
    }

    #[test]
    fn retry_after_past_the_deadline_stops_at_once() {
        let d = case(1, reply(429, &[("retry-after", "40")]), 10_000, 1).decide();
        assert_eq!(d.next, give_up(GiveUpReason::RetryAfterPastDeadline));
        assert_eq!(d.retry_after_ms, Some(40_000), "passed on to the caller");
        assert_eq!(d.reason, "retryable status; retry-after past deadline");
        // Within the deadline but leaving less than MIN_ATTEMPT_MS: the budget is exhausted.
        let d = case(1, reply(503, &[("retry-after-ms", "9500")]), 10_000, 1).decide();
        assert_eq!(d.next, give_up(GiveUpReason::BudgetExhausted));
        // With a backup, a 429 switches at once: its Retry-After is the primary's business.
        let d = case(1, reply(429, &[("retry-after", "40")]), 10_000, 2).decide();
        assert_eq!((d.next, d.rotation.current()), (Next::Switch, t(1, 0)));
    }

    #[test]
    fn no_retry_past_the_attempt_limit_or_the_budget() {
        let d = case(5, reply(503, &[]), 60_000, 1).decide();
        assert_eq!(d.next, give_up(GiveUpReason::AttemptsExhausted));
        assert_eq!(d.reason, "retryable status; attempts exhausted");
        // 2 s backoff with 2.9 s left leaves 0.9 s < MIN_ATTEMPT_MS; with 3 s left, 1 s is enough.
        let d = case(2, reply(503, &[]), 2_900, 1).decide();
        assert_eq!(d.next, give_up(GiveUpReason::BudgetExhausted));
        let d = case(2, reply(503, &[]), 3_000, 1).decide();
        assert_eq!(d.next, Next::Retry { wait_ms: 2_000 });
    }

    #[test]
    fn only_a_timeout_at_the_deadline_was_cut_by_it() {
        let d = case(1, failed(FailureKind::Timeout), 0, 1).decide();
        assert_eq!(d.next, give_up(GiveUpReason::DeadlineReached));
        assert_eq!(d.reason, "timeout; deadline reached");
        // Even the last attempt: the caller must hear that the deadline cut it (504).
        let d = case(5, failed(FailureKind::Timeout), 0, 1).decide();
        assert_eq!(d.next, give_up(GiveUpReason::DeadlineReached));
        // A reset at the deadline is not a timeout: the budget is used up.
        let d = case(1, failed(FailureKind::Connection), 0, 1).decide();
        assert_eq!(d.next, give_up(GiveUpReason::BudgetExhausted));
    }

    #[test]
    fn a_hopeless_retry_is_skipped_with_its_expected_latency() {
        // Successes take 8 s; after a 1 s backoff only 6.9 s would be left.
        let mut c = case(1, reply(500, &[]), 7_900, 1);
        c.expected_ms = Some(8_000);
        let d = c.decide();
        assert_eq!(d.next, give_up(GiveUpReason::ExpectedLatencyExceedsBudget));
        assert_eq!(d.reason, "expected_latency_exceeds_budget");
        assert_eq!(d.expected_ms, Some(8_000));
        // Exactly the time it would have is not hopeless.
        c.expected_ms = Some(6_900);
        assert_eq!(c.decide().next, Next::Retry { wait_ms: 1_000 });
        assert_eq!(c.decide().expected_ms, None);
        // ATTEMPT_TIMEOUT_MS caps the time an attempt would have.
        c.engine.attempt_timeout_ms = Some(5_000);
        assert_eq!(
            c.decide().next,
            give_up(GiveUpReason::ExpectedLatencyExceedsBudget)
        );
    }

    #[test]
    fn the_expected_latency_is_the_next_targets() {
        // A slow primary answered 429: the switch goes to a fast backup.
        let mut c = case(1, reply(429, &[]), 10_000, 2);
        let slow_primary = |target: Target| Some(if target.upstream == 0 { 20_000 } else { 500 });
        let ended = Ended {
            number: 1,
            outcome: &c.outcome,
            now_ms: NOW,
        };
        let (rotation, available) = (&c.rotation, &c.available);
        let d = decide(
            &c.engine,
            &ended,
            NOW + 10_000,
            rotation,
            available,
            slow_primary,
            &mut Max,
        );
        assert_eq!((d.next, d.rotation.current()), (Next::Switch, t(1, 0)));
        // The same estimate on the backup: hopeless.
        c.expected_ms = Some(20_000);
        assert_eq!(
            c.decide().next,
            give_up(GiveUpReason::ExpectedLatencyExceedsBudget)
        );
    }

    #[test]
    fn the_switch_comes_after_fallback_after_failures_without_a_sleep() {
        let c = case(1, reply(500, &[]), 30_000, 2);
        let d = c.decide();
        assert_eq!(
            (d.next, d.rotation.current()),
            (Next::Retry { wait_ms: 1_000 }, t(0, 0))
        );
        let second = Case {
            number: 2,
            rotation: d.rotation,
            ..c
        };
        let d = second.decide();
        assert_eq!((d.next, d.rotation.current()), (Next::Switch, t(1, 0)));
        assert_eq!(d.next.wait_ms(), Some(0));
        assert_eq!(d.reason, "retryable status");
    }

    #[test]
    fn a_429_or_a_connect_error_switches_at_once() {
        for outcome in [reply(429, &[]), failed(FailureKind::Connect)] {
            let d = case(1, outcome.clone(), 30_000, 2).decide();
            assert_eq!(
                (d.next, d.rotation.current()),
                (Next::Switch, t(1, 0)),
                "{outcome:?}"
            );
        }
        // One upstream: nowhere to switch to, the usual backoff.
        let d = case(1, reply(429, &[]), 30_000, 1).decide();
        assert_eq!(d.next, Next::Retry { wait_ms: 1_000 });
    }

    #[test]
    fn a_switch_is_bound_by_the_attempt_limit_and_the_budget_too() {
        let d = case(5, reply(429, &[]), 30_000, 2).decide();
        assert_eq!(d.next, give_up(GiveUpReason::AttemptsExhausted));
        let d = case(1, reply(429, &[]), 900, 2).decide();
        assert_eq!(d.next, give_up(GiveUpReason::BudgetExhausted));
        // Cut at the deadline: no switch either.
        let d = case(1, failed(FailureKind::Timeout), 0, 2).decide();
        assert_eq!(d.next, give_up(GiveUpReason::DeadlineReached));
    }

    #[test]
    fn every_upstream_failed_the_run_starts_over_after_a_backoff() {
        let c = case(1, reply(429, &[]), 30_000, 2);
        let on_backup = c.decide().rotation;
        let d = Case {
            number: 2,
            rotation: on_backup,
            ..c
        }
        .decide();
        assert_eq!(
            (d.next, d.rotation.current()),
            (Next::Retry { wait_ms: 2_000 }, t(0, 0))
        );
    }

    #[test]
    fn every_breaker_open_the_run_carries_on_after_a_backoff() {
        let mut c = case(1, reply(500, &[]), 30_000, 2);
        c.available = vec![false, false];
        let d = c.decide();
        assert_eq!(
            (d.next, d.rotation.current()),
            (Next::Retry { wait_ms: 1_000 }, t(0, 0))
        );
        assert!(d.rotation.carries_on());
    }
}
