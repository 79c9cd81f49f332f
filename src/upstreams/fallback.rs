//! Which upstream and model the next attempt goes to (spec §11): a pure step over the run's
//! [`Rotation`] and the breakers' availability, plus the hopeless-attempt rule.
//!
//! - A request starts on the first upstream whose breaker admits attempts.
//! - After `FALLBACK_AFTER_FAILURES` retryable failures in a row on one upstream, or at once after
//!   a 429 or a connect error, or when its breaker opened meanwhile, the next attempt goes to the
//!   next available upstream that has not failed yet for this model ([`Move::Switch`], no sleep).
//! - When every upstream failed for the model, the next model of `MODEL_FALLBACKS` is tried on
//!   the first available upstream (also [`Move::Switch`]).
//! - When no model is left, the run starts over on the first available upstream after the usual
//!   backoff ([`Move::Restart`]); with one upstream and no fallbacks that is exactly the v1 retry.
//! - When no upstream is available at all, [`Move::NoneAvailable`].
//!
//! Final answers never reach this module: they are passed on as they are.

/// One attempt's destination: indexes into the upstream list and the model chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub upstream: usize,
    pub model: usize,
}

/// What follows a retryable failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Move {
    /// Same upstream and model, after the usual backoff (or `Retry-After`).
    Stay,
    /// Another upstream or model, at once (no backoff sleep).
    Switch,
    /// Every upstream failed for every model: start over, after the usual backoff.
    Restart,
    /// Every upstream's breaker is open.
    NoneAvailable,
}

/// Where a run is in the upstream list and the model chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    models: usize,
    fallback_after: u32,
    current: Target,
    /// Retryable failures in a row on the current target.
    in_a_row: u32,
    /// Upstreams that failed (were switched away from) for the current model.
    spent: Vec<bool>,
    /// An upstream that would have been tried was skipped because its breaker was open.
    skipped_open: bool,
    /// Every breaker is open but the run already made attempts: it carries on where it is.
    carry_on: bool,
}

impl Rotation {
    /// Starts on the first available upstream; `None` when every breaker is open.
    /// `available[i]`: upstream `i` admits attempts. `models`: length of the model chain (≥ 1).
    pub fn start(available: &[bool], models: usize, fallback_after: u32) -> Option<Rotation> {
        let upstream = available.iter().position(|a| *a)?;
        Some(Rotation {
            models: models.max(1),
            fallback_after: fallback_after.max(1),
            current: Target { upstream, model: 0 },
            in_a_row: 0,
            spent: vec![false; available.len()],
            skipped_open: upstream > 0,
            carry_on: false,
        })
    }

    pub fn current(&self) -> Target {
        self.current
    }

    /// Whether an open breaker made the run skip an upstream (the `CircuitOpen` metric).
    pub fn skipped_open(&self) -> bool {
        self.skipped_open
    }

    /// Whether every breaker was open when the run had to move on: its next attempt goes where
    /// the last one went, without asking the breaker (its own retries are not refused; the
    /// breakers only turn away new requests).
    pub fn carries_on(&self) -> bool {
        self.carry_on
    }

    /// After a retryable failure on the current target. `at_once`: a 429 or a connect error.
    pub fn after_retryable(&self, at_once: bool, available: &[bool]) -> (Rotation, Move) {
        let mut next = self.clone();
        next.carry_on = false;
        next.in_a_row += 1;
        let here = available
            .get(self.current.upstream)
            .copied()
            .unwrap_or(false);
        if here && !at_once && next.in_a_row < self.fallback_after {
            return (next, Move::Stay);
        }
        next.spent[self.current.upstream] = true;
        next.away(available)
    }

    /// The current target's breaker refused the attempt (it opened, or another request holds
    /// its probe): move on as if it had failed, without counting an attempt.
    pub fn after_refusal(&self, available: &[bool]) -> (Rotation, Move) {
        let mut next = self.clone();
        next.spent[self.current.upstream] = true;
        next.skipped_open = true;
        let mut available = available.to_vec();
        if let Some(a) = available.get_mut(self.current.upstream) {
            *a = false;
        }
        next.away(&available)
    }

    /// Goes back to `target` (where the last attempt went) when every breaker is open, and
    /// carries on there.
    pub fn resume(mut self, target: Target) -> Rotation {
        self.current = target;
        self.in_a_row = 0;
        self.carry_on = true;
        self
    }

    /// Leaves the current target for the best other one.
    fn away(mut self, available: &[bool]) -> (Rotation, Move) {
        let open = |i: usize| available.get(i).copied().unwrap_or(false);
        let first_unspent = (0..self.spent.len()).find(|&i| open(i) && !self.spent[i]);
        let first_open = (0..self.spent.len()).find(|&i| open(i));
        let (target, mv) = match (first_unspent, first_open) {
            (Some(u), _) => (
                Target {
                    upstream: u,
                    model: self.current.model,
                },
                Move::Switch,
            ),
            (None, None) => {
                self.carry_on = true;
                return (self, Move::NoneAvailable);
            }
            (None, Some(u)) if self.current.model + 1 < self.models => (
                Target {
                    upstream: u,
                    model: self.current.model + 1,
                },
                Move::Switch,
            ),
            (None, Some(u)) => (
                Target {
                    upstream: u,
                    model: self.current.model,
                },
                Move::Restart,
            ),
        };
        let passed_over = if mv == Move::Switch && target.model == self.current.model {
            (0..target.upstream).any(|i| !open(i) && !self.spent[i])
        } else {
            (0..target.upstream).any(|i| !open(i))
        };
        self.skipped_open |= passed_over;
        if target.model != self.current.model || mv == Move::Restart {
            self.spent.iter_mut().for_each(|s| *s = false);
        }
        self.carry_on = false;
        self.current = target;
        self.in_a_row = 0;
        (self, mv)
    }
}

/// How many times consecutive attempts went to different targets (`x-proxy-fallbacks`, the
/// `Fallbacks` metric): only moves an attempt followed count, not a move planned after the last
/// attempt nor one to an upstream whose breaker then refused it.
pub fn switches(attempted: impl IntoIterator<Item = Target>) -> u32 {
    let mut attempted = attempted.into_iter();
    let Some(mut previous) = attempted.next() else {
        return 0;
    };
    let mut count = 0;
    for target in attempted {
        count += u32::from(target != previous);
        previous = target;
    }
    count
}

/// The hopeless-attempt rule: a retry is not started when the expected latency of a successful
/// attempt (see [`super::latency`]) exceeds the time it could have. Returns the expected
/// latency when the attempt should be skipped.
pub fn hopeless(
    enabled: bool,
    is_retry: bool,
    expected_ms: Option<u64>,
    time_for_attempt_ms: u64,
) -> Option<u64> {
    expected_ms.filter(|e| enabled && is_retry && *e > time_for_attempt_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [bool; 3] = [true, true, true];

    fn t(upstream: usize, model: usize) -> Target {
        Target { upstream, model }
    }

    /// Plays a sequence of failures (`true` = at once) and returns the targets visited.
    fn walk(r: Rotation, failures: &[bool], available: &[bool]) -> (Vec<(Target, Move)>, Rotation) {
        let mut out = vec![];
        let mut r = r;
        for at_once in failures {
            let (next, mv) = r.after_retryable(*at_once, available);
            out.push((next.current(), mv));
            r = next;
        }
        (out, r)
    }

    /// Switches when an attempt follows the start and every step of a walk.
    fn switches_over(start: Target, steps: &[(Target, Move)]) -> u32 {
        switches(std::iter::once(start).chain(steps.iter().map(|(target, _)| *target)))
    }

    #[test]
    fn starts_on_the_first_available_upstream_or_nowhere() {
        assert_eq!(Rotation::start(&ALL, 1, 2).unwrap().current(), t(0, 0));
        assert_eq!(
            Rotation::start(&[false, true, true], 1, 2)
                .unwrap()
                .current(),
            t(1, 0)
        );
        assert_eq!(Rotation::start(&[false, false], 1, 2), None);
        let r = Rotation::start(&[false, true], 1, 2).unwrap();
        assert!(r.skipped_open(), "starting past an open breaker is a skip");
        assert_eq!(switches([r.current()]), 0, "not a switch");
    }

    #[test]
    fn switches_after_two_failures_in_a_row() {
        let r = Rotation::start(&ALL, 1, 2).unwrap();
        let (steps, r) = walk(r, &[false, false, false, false], &ALL);
        assert!(!r.skipped_open());
        assert_eq!(
            steps,
            [
                (t(0, 0), Move::Stay),
                (t(1, 0), Move::Switch),
                (t(1, 0), Move::Stay),
                (t(2, 0), Move::Switch),
            ]
        );
        assert_eq!(switches_over(t(0, 0), &steps), 2);
    }

    #[test]
    fn a_429_or_connect_error_switches_at_once() {
        let r = Rotation::start(&ALL, 1, 2).unwrap();
        let (steps, _) = walk(r, &[true, true], &ALL);
        assert_eq!(steps, [(t(1, 0), Move::Switch), (t(2, 0), Move::Switch)]);
    }

    #[test]
    fn skips_upstreams_whose_breaker_is_open() {
        let r = Rotation::start(&ALL, 1, 1).unwrap();
        let (steps, r2) = walk(r, &[false], &[true, false, true]);
        assert_eq!(steps, [(t(2, 0), Move::Switch)]);
        assert!(r2.skipped_open());
        // The current upstream's breaker opened meanwhile: leave it even before the threshold.
        let r = Rotation::start(&ALL, 1, 5).unwrap();
        let (steps, _) = walk(r, &[false], &[false, true, true]);
        assert_eq!(steps, [(t(1, 0), Move::Switch)]);
    }

    #[test]
    fn model_fallback_once_every_upstream_failed_for_the_model() {
        let r = Rotation::start(&[true, true], 3, 1).unwrap();
        let (steps, _) = walk(r, &[false; 7], &[true, true]);
        assert_eq!(
            steps,
            [
                (t(1, 0), Move::Switch),
                (t(0, 1), Move::Switch),
                (t(1, 1), Move::Switch),
                (t(0, 2), Move::Switch),
                (t(1, 2), Move::Switch),
                // No model left: start over on the first upstream, with a backoff.
                (t(0, 2), Move::Restart),
                (t(1, 2), Move::Switch),
            ]
        );
        assert_eq!(switches_over(t(0, 0), &steps), 7);
    }

    #[test]
    fn one_upstream_without_fallbacks_behaves_like_plain_retries() {
        let one = [true];
        let r = Rotation::start(&one, 1, 2).unwrap();
        let (steps, _) = walk(r, &[false, true, false, false, true], &one);
        assert!(
            steps
                .iter()
                .all(|(target, mv)| *target == t(0, 0) && matches!(mv, Move::Stay | Move::Restart))
        );
        assert_eq!(switches_over(t(0, 0), &steps), 0);
    }

    #[test]
    fn nothing_available_is_reported_and_the_run_carries_on_where_it_is() {
        let r = Rotation::start(&[true, true], 2, 1).unwrap();
        assert!(!r.carries_on());
        let (r, mv) = r.after_retryable(false, &[false, false]);
        assert_eq!((r.current(), mv), (t(0, 0), Move::NoneAvailable));
        assert!(r.carries_on());
        // A breaker closed again: the run moves on as usual.
        let (r, mv) = r.after_retryable(false, &[false, true]);
        assert_eq!((r.current(), mv), (t(1, 0), Move::Switch));
        assert!(!r.carries_on());
        // Refused everywhere: back to where the last attempt went, and carry on there.
        let r = r.resume(t(0, 0));
        assert_eq!(r.current(), t(0, 0));
        assert!(r.carries_on());
    }

    #[test]
    fn only_moves_an_attempt_followed_are_switches() {
        assert_eq!(switches([]), 0);
        assert_eq!(switches([t(0, 0), t(0, 0)]), 0);
        assert_eq!(switches([t(0, 0), t(1, 0), t(1, 0), t(0, 1)]), 2);
        // Back where a run started (a restart, or carrying on after a refusal) is a switch too.
        assert_eq!(switches([t(0, 0), t(1, 0), t(0, 0)]), 2);
    }

    #[test]
    fn a_refusal_at_admission_moves_on_without_counting_a_failure() {
        let r = Rotation::start(&ALL, 1, 2).unwrap();
        // Upstream 0 looked available but another request took its probe.
        let (r, mv) = r.after_refusal(&ALL);
        assert_eq!((r.current(), mv), (t(1, 0), Move::Switch));
        assert!(r.skipped_open() && !r.carries_on());
        let (r, mv) = r.after_retryable(false, &ALL);
        assert_eq!((r.current(), mv), (t(1, 0), Move::Stay));
        let only_one = Rotation::start(&[true], 1, 2).unwrap();
        assert_eq!(only_one.after_refusal(&[true]).1, Move::NoneAvailable);
    }

    #[test]
    fn hopeless_only_for_retries_with_an_estimate_over_the_time_left() {
        assert_eq!(hopeless(true, true, Some(5_000), 4_999), Some(5_000));
        assert_eq!(hopeless(true, true, Some(5_000), 5_000), None);
        assert_eq!(hopeless(true, true, None, 10), None, "no estimate yet");
        assert_eq!(
            hopeless(true, false, Some(5_000), 10),
            None,
            "first attempt"
        );
        assert_eq!(hopeless(false, true, Some(5_000), 10), None, "turned off");
    }
}
