//! The retry loop, bounded by the deadline (spec §3, §4), over the upstreams of §11.
//!
//! Invariants (checked by the property test below): the loop never starts an attempt with less
//! than `MIN_ATTEMPT_MS` left, never starts a sleep after which less than that would remain,
//! never lets an attempt's timeout pass the deadline, and never makes more than
//! `RETRY_MAX_ATTEMPTS` attempts, on all upstreams together. So it always finishes by the
//! deadline. Which upstream and model each attempt goes to is [`Rotation`]'s pure decision;
//! the breakers and latency estimates are reached through [`Routing`].

use std::future::Future;

use super::policy::{self, Jitter, RetryPolicy, Verdict};
use super::{AttemptOutcome, FailureKind, UpstreamReply};
use crate::upstreams::breaker::{Admission, Report};
use crate::upstreams::fallback::{Move, Rotation, Target, hopeless};
use crate::upstreams::routing::{OneUpstream, Routing};

/// Milliseconds since the Unix epoch, injected.
pub trait Clock {
    fn now_ms(&self) -> u64;
}

/// Waiting, injected.
pub trait Sleeper {
    fn sleep(&self, ms: u64) -> impl Future<Output = ()> + Send;
}

/// The engine's settings.
#[derive(Clone, Copy, Debug)]
pub struct RetryEngine {
    pub policy: RetryPolicy,
    /// `MIN_ATTEMPT_MS`: no attempt is started with less time than this left.
    pub min_attempt_ms: u64,
    /// `ATTEMPT_TIMEOUT_MS`, if set.
    pub attempt_timeout_ms: Option<u64>,
}

/// What the attempt closure is told: which attempt, how long it may take at most, and where it
/// goes (indexes into the upstream list and the model chain).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptPlan {
    pub number: u32,
    pub timeout_ms: u64,
    pub target: Target,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Done,
    Retry,
    GiveUp,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Done => "done",
            Decision::Retry => "retry",
            Decision::GiveUp => "give_up",
        }
    }
}

/// Why the engine stopped retrying a retryable failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUpReason {
    /// `RETRY_MAX_ATTEMPTS` reached.
    AttemptsExhausted,
    /// After the next wait, less than `MIN_ATTEMPT_MS` would remain.
    BudgetExhausted,
    /// The upstream's `Retry-After` wait ends past the deadline.
    RetryAfterPastDeadline,
    /// The attempt was cut at the deadline while still waiting on the upstream.
    DeadlineReached,
    /// The next attempt's expected latency (§11) exceeds the time it would have.
    ExpectedLatencyExceedsBudget,
}

impl GiveUpReason {
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUpReason::AttemptsExhausted => "attempts exhausted",
            GiveUpReason::BudgetExhausted => "budget exhausted",
            GiveUpReason::RetryAfterPastDeadline => "retry-after past deadline",
            GiveUpReason::DeadlineReached => "deadline reached",
            GiveUpReason::ExpectedLatencyExceedsBudget => "expected_latency_exceeds_budget",
        }
    }
}

/// One attempt, as logged (`upstream attempt`, spec §6, §11).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptRecord {
    pub attempt: u32,
    /// Where the attempt went.
    pub target: Target,
    pub status: Option<u16>,
    pub error_kind: Option<FailureKind>,
    pub latency_ms: u64,
    pub upstream_request_id: Option<String>,
    pub decision: Decision,
    pub reason: String,
    pub next_delay_ms: Option<u64>,
    /// Deadline left when the attempt ended.
    pub remaining_ms: u64,
    /// The next attempt was skipped as hopeless: its expected latency.
    pub expected_ms: Option<u64>,
}

/// How the run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// A final upstream answer (success or a non-retryable status) to pass on.
    Answer(UpstreamReply),
    /// Retryable failures used up the attempts or the budget.
    GaveUp {
        reason: GiveUpReason,
        last: AttemptOutcome,
        /// The upstream's last `Retry-After`, in ms from when the run ended.
        retry_after_ms: Option<u64>,
    },
    /// Less than `MIN_ATTEMPT_MS` was left before the first attempt: the upstream was not called.
    NoTimeToStart { remaining_ms: u64 },
    /// Every upstream's breaker was open before the first attempt: nothing was called.
    CircuitOpen { retry_after_ms: u64 },
    /// The request could not be built ([`FailureKind::Unsendable`]): nothing was sent.
    Unsendable { detail: String },
}

/// What follows an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// A final answer: pass it on.
    Done,
    /// Sleep `wait_ms`, then try again.
    Retry { wait_ms: u64 },
    /// Retryable, but no further attempt fits.
    GiveUp(GiveUpReason),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryRun {
    pub outcome: RunOutcome,
    pub attempts: Vec<AttemptRecord>,
    pub elapsed_ms: u64,
    /// Moves to another upstream or model (`x-proxy-fallbacks`, `Fallbacks`).
    pub switches: u32,
    /// An open breaker made the run skip an upstream or refuse the request (`CircuitOpen`).
    pub circuit_open: bool,
    /// Attempts not started because they were hopeless (`AttemptsSkipped`).
    pub skipped: u32,
}

impl RetryRun {
    fn empty(outcome: RunOutcome) -> RetryRun {
        let circuit_open = matches!(outcome, RunOutcome::CircuitOpen { .. });
        RetryRun {
            outcome,
            attempts: Vec::new(),
            elapsed_ms: 0,
            switches: 0,
            circuit_open,
            skipped: 0,
        }
    }
}

/// What the loop knows after an attempt was decided.
struct Decided {
    record: AttemptRecord,
    next: Next,
    rotation: Rotation,
    retry_after: Option<u64>,
    /// Every upstream's breaker is open: the next attempt carries on where this one went.
    none_available: bool,
}

/// Refusals by breakers (races with other requests) tolerated per upstream before a request
/// treats every upstream as open.
const MAX_REFUSALS_PER_UPSTREAM: usize = 2;

impl RetryEngine {
    /// The v1 loop over one upstream: [`RetryEngine::run_routed`] with [`OneUpstream`].
    pub async fn run<A, Fut>(
        &self,
        deadline_ms: u64,
        clock: &impl Clock,
        sleeper: &impl Sleeper,
        jitter: &mut impl Jitter,
        attempt: A,
        on_attempt: impl FnMut(&AttemptRecord),
    ) -> RetryRun
    where
        A: FnMut(AttemptPlan) -> Fut,
        Fut: Future<Output = AttemptOutcome>,
    {
        self.run_routed(
            deadline_ms,
            clock,
            sleeper,
            jitter,
            &OneUpstream,
            attempt,
            on_attempt,
        )
        .await
    }

    /// Runs attempts until one is final, or retrying is no longer possible before `deadline_ms`.
    /// `attempt` must finish within the `timeout_ms` it is given. `on_attempt` sees each record
    /// as soon as it is decided (for logging).
    #[allow(clippy::too_many_arguments)]
    pub async fn run_routed<A, Fut>(
        &self,
        deadline_ms: u64,
        clock: &impl Clock,
        sleeper: &impl Sleeper,
        jitter: &mut impl Jitter,
        routing: &impl Routing,
        mut attempt: A,
        mut on_attempt: impl FnMut(&AttemptRecord),
    ) -> RetryRun
    where
        A: FnMut(AttemptPlan) -> Fut,
        Fut: Future<Output = AttemptOutcome>,
    {
        let started = clock.now_ms();
        let remaining = deadline_ms.saturating_sub(started);
        if remaining < self.min_attempt() {
            let outcome = RunOutcome::NoTimeToStart {
                remaining_ms: remaining,
            };
            return RetryRun::empty(outcome);
        }
        let Some(mut rotation) = Rotation::start(
            &routing.available(started),
            routing.models(),
            routing.fallback_after(),
        ) else {
            let retry_after_ms = routing.wait_until_first_reopens(started);
            return RetryRun::empty(RunOutcome::CircuitOpen { retry_after_ms });
        };
        let mut run = RetryRun::empty(RunOutcome::NoTimeToStart { remaining_ms: 0 });
        let mut number = 0;
        let mut refusals = 0;
        // Every breaker is open but this request already runs: it keeps to its upstream (its
        // own retries are not refused; the breakers then only turn away new requests).
        let mut carry_on = false;
        let mut last_target: Option<Target> = None;
        loop {
            let begin = clock.now_ms();
            let target = rotation.current();
            let admission = match carry_on {
                true => Admission::Probe,
                false => routing.admit(target.upstream, begin),
            };
            let probe = match admission {
                Admission::Allowed => false,
                Admission::Probe => true,
                Admission::Refused { .. } => {
                    // Another request took the probe, or the breaker opened since the plan.
                    let (next, mv) = rotation.after_refusal(&routing.available(begin));
                    refusals += 1;
                    let stuck =
                        mv == Move::NoneAvailable || refusals > 2 * MAX_REFUSALS_PER_UPSTREAM;
                    rotation = match (stuck, last_target) {
                        (false, _) => next,
                        (true, Some(t)) => {
                            carry_on = true;
                            next.resume(t)
                        }
                        (true, None) => {
                            let retry_after_ms = routing.wait_until_first_reopens(begin);
                            let mut run =
                                RetryRun::empty(RunOutcome::CircuitOpen { retry_after_ms });
                            run.elapsed_ms = begin.saturating_sub(started);
                            return run;
                        }
                    };
                    continue;
                }
            };
            last_target = Some(target);
            number += 1;
            let remaining = deadline_ms.saturating_sub(begin);
            let timeout_ms = self
                .attempt_timeout_ms
                .map_or(remaining, |t| t.min(remaining));
            let plan = AttemptPlan {
                number,
                timeout_ms,
                target,
            };
            let outcome = attempt(plan).await;
            let end = clock.now_ms();
            let decided = self.decide(
                plan,
                &outcome,
                begin,
                end,
                deadline_ms,
                &rotation,
                probe,
                routing,
                jitter,
            );
            let Decided {
                record,
                next,
                rotation: next_rotation,
                retry_after,
                none_available,
            } = decided;
            carry_on = none_available;
            on_attempt(&record);
            run.attempts.push(record);
            rotation = next_rotation;
            run.switches = rotation.switches();
            run.circuit_open = rotation.skipped_open();
            run.elapsed_ms = end.saturating_sub(started);
            match next {
                Next::Retry { wait_ms } => {
                    sleeper.sleep(wait_ms).await;
                    continue;
                }
                Next::GiveUp(reason) => {
                    run.skipped = u32::from(reason == GiveUpReason::ExpectedLatencyExceedsBudget);
                    run.outcome = RunOutcome::GaveUp {
                        reason,
                        last: outcome,
                        retry_after_ms: retry_after,
                    };
                }
                Next::Done => {
                    run.outcome = match outcome {
                        AttemptOutcome::Reply(reply) => RunOutcome::Answer(reply),
                        // The only final failure: the request could not be built.
                        AttemptOutcome::Failed { detail, .. } => RunOutcome::Unsendable { detail },
                    };
                }
            }
            return run;
        }
    }

    /// Classifies one attempt, tells the breaker and the latency book, and decides what follows.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        plan: AttemptPlan,
        outcome: &AttemptOutcome,
        begin: u64,
        end: u64,
        deadline_ms: u64,
        rotation: &Rotation,
        probe: bool,
        routing: &impl Routing,
        jitter: &mut impl Jitter,
    ) -> Decided {
        let remaining = deadline_ms.saturating_sub(end);
        let (status, upstream_request_id, error_kind) = match outcome {
            AttemptOutcome::Reply(r) => (Some(r.status), r.request_id().map(str::to_owned), None),
            AttemptOutcome::Failed { kind, .. } => (None, None, Some(*kind)),
        };
        let mut record = AttemptRecord {
            attempt: plan.number,
            target: plan.target,
            status,
            error_kind,
            latency_ms: end.saturating_sub(begin),
            upstream_request_id,
            decision: Decision::Done,
            reason: String::new(),
            next_delay_ms: None,
            remaining_ms: remaining,
            expected_ms: None,
        };
        let retry_after = match outcome {
            AttemptOutcome::Reply(r) => policy::retry_after_ms(r, end),
            AttemptOutcome::Failed { .. } => None,
        };
        let verdict = policy::verdict(outcome);
        let report = match verdict {
            Verdict::Final(_) => Report::Healthy,
            Verdict::Retryable(_) => Report::Failed,
        };
        routing.report(plan.target.upstream, end, probe, report);
        if status.is_some_and(|s| (200..300).contains(&s)) {
            routing.learn(plan.target, record.latency_ms);
        }
        let mut none_available = false;
        let (next, rotation) = match verdict {
            Verdict::Final(reason) => {
                record.reason = reason.to_owned();
                (Next::Done, rotation.clone())
            }
            Verdict::Retryable(reason) => {
                let at_once = status == Some(429) || error_kind == Some(FailureKind::Connect);
                let (rotation, mv) = rotation.after_retryable(at_once, &routing.available(end));
                none_available = mv == Move::NoneAvailable;
                // Only a timeout that ran until the deadline was cut by it; a timeout that
                // ended earlier (ATTEMPT_TIMEOUT_MS, a connect timeout) is a failure like any.
                let cut_by_deadline = error_kind == Some(FailureKind::Timeout) && remaining == 0;
                let expected = routing.expected_ms(rotation.current());
                let next = self.after_retryable(
                    plan.number,
                    remaining,
                    retry_after,
                    cut_by_deadline,
                    mv,
                    expected,
                    jitter,
                );
                record.reason = match next {
                    Next::GiveUp(GiveUpReason::ExpectedLatencyExceedsBudget) => {
                        record.expected_ms = expected;
                        GiveUpReason::ExpectedLatencyExceedsBudget
                            .as_str()
                            .to_owned()
                    }
                    Next::GiveUp(why) => format!("{reason}; {}", why.as_str()),
                    _ => reason.to_owned(),
                };
                (next, rotation)
            }
        };
        record.decision = match next {
            Next::Done => Decision::Done,
            Next::GiveUp(_) => Decision::GiveUp,
            Next::Retry { wait_ms } => {
                record.next_delay_ms = Some(wait_ms);
                Decision::Retry
            }
        };
        Decided {
            record,
            next,
            rotation,
            retry_after,
            none_available,
        }
    }
}

impl RetryEngine {
    /// An attempt needs at least 1 ms even when `MIN_ATTEMPT_MS` is 0.
    fn min_attempt(&self) -> u64 {
        self.min_attempt_ms.max(1)
    }

    /// After a retryable failure: the wait before the next attempt, or why there is none.
    /// `cut_by_deadline`: the attempt was still waiting on the upstream when the deadline came.
    /// `mv`: where the next attempt goes ([`Move::Switch`] goes at once, without a backoff).
    /// `expected_ms`: the next attempt's expected latency, when hopeless attempts are skipped.
    #[allow(clippy::too_many_arguments)]
    fn after_retryable(
        &self,
        number: u32,
        remaining: u64,
        retry_after: Option<u64>,
        cut_by_deadline: bool,
        mv: Move,
        expected_ms: Option<u64>,
        jitter: &mut impl Jitter,
    ) -> Next {
        let min_attempt = self.min_attempt();
        let switching = mv == Move::Switch;
        let wait = match switching {
            true => 0,
            false => retry_after.unwrap_or_else(|| self.policy.backoff_ms(number, jitter)),
        };
        let left_after_wait = remaining.saturating_sub(wait);
        let time_for_attempt = self
            .attempt_timeout_ms
            .map_or(left_after_wait, |t| t.min(left_after_wait));
        let why = if cut_by_deadline {
            GiveUpReason::DeadlineReached
        } else if number >= self.policy.max_attempts {
            GiveUpReason::AttemptsExhausted
        } else if !switching && retry_after.is_some_and(|w| w > remaining) {
            GiveUpReason::RetryAfterPastDeadline
        } else if left_after_wait < min_attempt {
            GiveUpReason::BudgetExhausted
        } else if hopeless(true, true, expected_ms, time_for_attempt).is_some() {
            GiveUpReason::ExpectedLatencyExceedsBudget
        } else {
            return Next::Retry { wait_ms: wait };
        };
        Next::GiveUp(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::policy::Jitter;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    const T0: u64 = 1_764_000_000_000;

    /// Virtual time: sleeping and attempts advance it instantly.
    #[derive(Clone)]
    struct VirtualClock(Arc<AtomicU64>);
    impl VirtualClock {
        fn new() -> Self {
            VirtualClock(Arc::new(AtomicU64::new(T0)))
        }
        fn advance(&self, ms: u64) {
            self.0.fetch_add(ms, Ordering::SeqCst);
        }
    }
    impl Clock for VirtualClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }
    impl Sleeper for VirtualClock {
        fn sleep(&self, ms: u64) -> impl Future<Output = ()> + Send {
            self.advance(ms);
            std::future::ready(())
        }
    }

    /// The fixture's jitter: the top of the range (deterministic, worst case for the budget), or
    /// anywhere in it from a seed (what production does).
    enum TestJitter {
        Max,
        Seeded(fastrand::Rng),
    }
    impl Jitter for TestJitter {
        fn between(&mut self, lo: u64, hi: u64) -> u64 {
            match self {
                TestJitter::Max => hi,
                TestJitter::Seeded(rng) => rng.u64(lo..=hi.max(lo)),
            }
        }
    }

    /// A scripted upstream step: how long it takes and what it answers.
    #[derive(Clone, Debug)]
    enum Step {
        Status(u16, u64, Vec<(&'static str, String)>),
        Fail(FailureKind, u64),
        /// Never answers: the attempt runs into its timeout.
        Hang,
    }

    fn status(s: u16, latency: u64) -> Step {
        Step::Status(s, latency, vec![])
    }

    struct Fixture {
        clock: VirtualClock,
        engine: RetryEngine,
        jitter: TestJitter,
        plans: Vec<AttemptPlan>,
        sleeps: Vec<u64>,
    }

    fn engine() -> RetryEngine {
        RetryEngine {
            policy: RetryPolicy {
                max_attempts: 5,
                base_delay_ms: 1000,
                max_delay_ms: 8000,
            },
            min_attempt_ms: 1000,
            attempt_timeout_ms: None,
        }
    }

    impl Fixture {
        fn new(engine: RetryEngine) -> Self {
            Fixture {
                clock: VirtualClock::new(),
                engine,
                jitter: TestJitter::Max,
                plans: vec![],
                sleeps: vec![],
            }
        }

        fn run(&mut self, budget_ms: u64, steps: Vec<Step>) -> RetryRun {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let mut steps: VecDeque<Step> = steps.into();
            let clock = self.clock.clone();
            let plans = std::cell::RefCell::new(vec![]);
            let sleeps = SleepLog {
                clock: clock.clone(),
                log: Default::default(),
            };
            let run = rt.block_on(self.engine.run(
                T0 + budget_ms,
                &clock,
                &sleeps,
                &mut self.jitter,
                |plan| {
                    plans.borrow_mut().push(plan);
                    let step = steps.pop_front().unwrap_or(Step::Status(200, 10, vec![]));
                    let out = play(&clock, plan, step);
                    std::future::ready(out)
                },
                |_| {},
            ));
            self.plans = plans.into_inner();
            self.sleeps = sleeps.log.lock().unwrap().clone();
            run
        }
    }

    struct SleepLog {
        clock: VirtualClock,
        log: std::sync::Mutex<Vec<u64>>,
    }
    impl Sleeper for SleepLog {
        fn sleep(&self, ms: u64) -> impl Future<Output = ()> + Send {
            self.log.lock().unwrap().push(ms);
            self.clock.sleep(ms)
        }
    }

    fn play(clock: &VirtualClock, plan: AttemptPlan, step: Step) -> AttemptOutcome {
        let latency = match &step {
            Step::Status(_, l, _) | Step::Fail(_, l) => *l,
            Step::Hang => u64::MAX,
        };
        if latency > plan.timeout_ms {
            clock.advance(plan.timeout_ms);
            return AttemptOutcome::Failed {
                kind: FailureKind::Timeout,
                detail: String::new(),
            };
        }
        clock.advance(latency);
        match step {
            Step::Status(status, _, headers) => {
                let mut h: Vec<(String, String)> = headers
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect();
                h.push(("x-request-id".into(), format!("req_{}", plan.number)));
                let body = if status == 429 && h.iter().any(|(k, _)| k == "x-quota") {
                    r#"{"error":{"code":"insufficient_quota"}}"#
                } else {
                    "{}"
                };
                AttemptOutcome::Reply(UpstreamReply {
                    status,
                    headers: h,
                    body: body.into(),
                    oversized: false,
                })
            }
            Step::Fail(kind, _) => AttemptOutcome::Failed {
                kind,
                detail: String::new(),
            },
            Step::Hang => unreachable!(),
        }
    }

    fn statuses(run: &RetryRun) -> Vec<Option<u16>> {
        run.attempts.iter().map(|a| a.status).collect()
    }

    #[test]
    fn rides_out_two_500s() {
        let mut f = Fixture::new(engine());
        let run = f.run(
            27_500,
            vec![status(500, 100), status(500, 100), status(200, 100)],
        );
        assert!(matches!(run.outcome, RunOutcome::Answer(ref r) if r.status == 200));
        assert_eq!(statuses(&run), [Some(500), Some(500), Some(200)]);
        assert_eq!(f.sleeps, [1000, 2000], "max jitter = full backoff ceiling");
        assert_eq!(run.elapsed_ms, 3_300);
        let decisions: Vec<_> = run.attempts.iter().map(|a| a.decision).collect();
        assert_eq!(
            decisions,
            [Decision::Retry, Decision::Retry, Decision::Done]
        );
        assert_eq!(run.attempts[2].remaining_ms, 27_500 - 3_300);
    }

    #[test]
    fn persistent_503_uses_all_attempts_when_the_budget_allows() {
        let mut f = Fixture::new(engine());
        let run = f.run(60_000, vec![status(503, 50); 10]);
        assert_eq!(run.attempts.len(), 5);
        assert!(matches!(
            run.outcome,
            RunOutcome::GaveUp {
                reason: GiveUpReason::AttemptsExhausted,
                ..
            }
        ));
        assert_eq!(f.sleeps, [1000, 2000, 4000, 8000]);
        assert_eq!(run.attempts.last().unwrap().decision, Decision::GiveUp);
    }

    #[test]
    fn persistent_503_stops_when_the_next_wait_would_leave_too_little() {
        let mut f = Fixture::new(engine());
        // 5 s budget: 100 + 1000 + 100 + 2000 + 100 = 3300 elapsed; next wait 4000 leaves < 1000.
        let run = f.run(5_000, vec![status(503, 100); 10]);
        assert_eq!(run.attempts.len(), 3);
        assert!(matches!(
            run.outcome,
            RunOutcome::GaveUp {
                reason: GiveUpReason::BudgetExhausted,
                ..
            }
        ));
        assert!(run.elapsed_ms <= 5_000);
    }

    #[test]
    fn every_retryable_status_is_retried_and_finals_are_not() {
        for s in [408, 409, 429, 500, 502, 503, 504, 529] {
            let mut f = Fixture::new(engine());
            let run = f.run(30_000, vec![status(s, 10), status(200, 10)]);
            assert_eq!(run.attempts.len(), 2, "{s}");
        }
        for s in [400, 401, 403, 404, 422] {
            let mut f = Fixture::new(engine());
            let run = f.run(30_000, vec![status(s, 10), status(200, 10)]);
            assert_eq!(run.attempts.len(), 1, "{s}");
            assert!(matches!(run.outcome, RunOutcome::Answer(ref r) if r.status == s));
        }
    }

    #[test]
    fn transport_failures_are_retried() {
        let mut f = Fixture::new(engine());
        let run = f.run(
            30_000,
            vec![
                Step::Fail(FailureKind::Connect, 5),
                Step::Fail(FailureKind::Connection, 5),
                Step::Fail(FailureKind::IncompleteBody, 5),
                status(200, 5),
            ],
        );
        assert_eq!(run.attempts.len(), 4);
        assert_eq!(run.attempts[0].error_kind, Some(FailureKind::Connect));
        assert!(matches!(run.outcome, RunOutcome::Answer(_)));
    }

    #[test]
    fn a_request_that_cannot_be_built_is_final() {
        let mut f = Fixture::new(engine());
        let run = f.run(
            30_000,
            vec![Step::Fail(FailureKind::Unsendable, 0), status(200, 5)],
        );
        assert_eq!(run.attempts.len(), 1);
        assert_eq!(run.attempts[0].decision, Decision::Done);
        assert!(matches!(run.outcome, RunOutcome::Unsendable { .. }));
        assert!(f.sleeps.is_empty());
    }

    #[test]
    fn x_should_retry_header_overrides_both_ways() {
        let mut f = Fixture::new(engine());
        let no = Step::Status(503, 10, vec![("x-should-retry", "false".into())]);
        let run = f.run(30_000, vec![no, status(200, 10)]);
        assert_eq!(run.attempts.len(), 1);
        assert!(matches!(run.outcome, RunOutcome::Answer(ref r) if r.status == 503));

        let mut f = Fixture::new(engine());
        let yes = Step::Status(400, 10, vec![("x-should-retry", "true".into())]);
        let run = f.run(30_000, vec![yes, status(200, 10)]);
        assert_eq!(run.attempts.len(), 2);
    }

    #[test]
    fn insufficient_quota_is_not_retried() {
        let mut f = Fixture::new(engine());
        let quota = Step::Status(429, 10, vec![("x-quota", "1".into())]);
        let run = f.run(30_000, vec![quota, status(200, 10)]);
        assert_eq!(run.attempts.len(), 1);
        assert!(matches!(run.outcome, RunOutcome::Answer(ref r) if r.status == 429));
    }

    #[test]
    fn retry_after_is_honoured_without_jitter_in_all_forms() {
        let now_plus = |ms: u64| {
            httpdate::fmt_http_date(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(T0 + ms),
            )
        };
        for (header, value, expect) in [
            ("retry-after-ms", "1500".to_owned(), 1500),
            ("retry-after", "3".to_owned(), 3000),
            // The date is whole seconds: 5 s after T0, and the attempt took 0 ms.
            ("retry-after", now_plus(5_000), 5000),
        ] {
            let mut f = Fixture::new(engine());
            let run = f.run(
                30_000,
                vec![Step::Status(429, 0, vec![(header, value)]), status(200, 10)],
            );
            assert_eq!(f.sleeps, [expect], "{header}");
            assert_eq!(run.attempts[0].next_delay_ms, Some(expect));
        }
    }

    #[test]
    fn retry_after_past_the_deadline_answers_at_once() {
        let mut f = Fixture::new(engine());
        let run = f.run(
            10_000,
            vec![Step::Status(429, 100, vec![("retry-after", "40".into())])],
        );
        assert!(f.sleeps.is_empty());
        assert_eq!(run.elapsed_ms, 100);
        match run.outcome {
            RunOutcome::GaveUp {
                reason,
                retry_after_ms,
                ..
            } => {
                assert_eq!(reason, GiveUpReason::RetryAfterPastDeadline);
                assert_eq!(retry_after_ms, Some(40_000));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_that_fits_but_leaves_too_little_gives_up() {
        let mut f = Fixture::new(engine());
        // 9.5 s wait inside a 10 s budget leaves 0.4 s < MIN_ATTEMPT_MS.
        let run = f.run(
            10_000,
            vec![Step::Status(
                503,
                100,
                vec![("retry-after-ms", "9500".into())],
            )],
        );
        assert!(f.sleeps.is_empty());
        assert!(matches!(
            run.outcome,
            RunOutcome::GaveUp {
                reason: GiveUpReason::BudgetExhausted,
                ..
            }
        ));
    }

    #[test]
    fn no_attempt_starts_with_less_than_min_attempt_ms() {
        let mut f = Fixture::new(engine());
        let run = f.run(999, vec![status(200, 1)]);
        assert_eq!(run.outcome, RunOutcome::NoTimeToStart { remaining_ms: 999 });
        assert!(f.plans.is_empty());
        let mut f = Fixture::new(engine());
        let run = f.run(1_000, vec![status(200, 1)]);
        assert!(matches!(run.outcome, RunOutcome::Answer(_)));
    }

    #[test]
    fn a_hang_is_cut_at_the_deadline_and_reported_as_such() {
        let mut f = Fixture::new(engine());
        let run = f.run(7_000, vec![Step::Hang]);
        assert_eq!(
            f.plans,
            [AttemptPlan {
                number: 1,
                timeout_ms: 7_000,
                target: Target {
                    upstream: 0,
                    model: 0
                },
            }]
        );
        assert_eq!(run.elapsed_ms, 7_000);
        assert!(matches!(
            run.outcome,
            RunOutcome::GaveUp {
                reason: GiveUpReason::DeadlineReached,
                ..
            }
        ));
    }

    #[test]
    fn a_timeout_that_ends_before_the_deadline_is_retried_like_any_failure() {
        // E.g. a connect timeout: most of the budget is still there.
        let timeout = || Step::Fail(FailureKind::Timeout, 2_000);
        let mut f = Fixture::new(engine());
        let run = f.run(30_000, vec![timeout(), status(200, 10)]);
        assert_eq!(run.attempts.len(), 2);
        assert!(matches!(run.outcome, RunOutcome::Answer(ref r) if r.status == 200));

        // The loop stops because the attempts are used up, not because of the deadline.
        let mut f = Fixture::new(engine());
        let run = f.run(60_000, vec![timeout(); 5]);
        assert_eq!(run.attempts.len(), 5);
        assert!(matches!(
            run.outcome,
            RunOutcome::GaveUp {
                reason: GiveUpReason::AttemptsExhausted,
                ..
            }
        ));

        // 2000 + 1000 + 2000 = 5000 of 5500: too little left for another wait and attempt.
        let mut f = Fixture::new(engine());
        let run = f.run(5_500, vec![timeout(); 5]);
        assert_eq!(run.attempts.len(), 2);
        assert!(matches!(
            run.outcome,
            RunOutcome::GaveUp {
                reason: GiveUpReason::BudgetExhausted,
                ..
            }
        ));
    }

    #[test]
    fn a_failure_that_is_not_a_timeout_never_reads_as_cut_by_the_deadline() {
        // A reset that happens to arrive exactly at the deadline: the budget is used up.
        let mut f = Fixture::new(engine());
        let run = f.run(3_000, vec![Step::Fail(FailureKind::Connection, 3_000)]);
        assert!(matches!(
            run.outcome,
            RunOutcome::GaveUp {
                reason: GiveUpReason::BudgetExhausted,
                ..
            }
        ));
    }

    #[test]
    fn attempt_timeout_setting_makes_hangs_retryable_and_is_cut_at_the_deadline() {
        let mut f = Fixture::new(RetryEngine {
            attempt_timeout_ms: Some(3_000),
            ..engine()
        });
        let run = f.run(10_000, vec![Step::Hang, Step::Hang, Step::Hang]);
        // 3000 + 1000 sleep + 3000 + 2000 sleep = 9000; 1000 left = the third attempt's timeout.
        let timeouts: Vec<u64> = f.plans.iter().map(|p| p.timeout_ms).collect();
        assert_eq!(timeouts, [3_000, 3_000, 1_000]);
        assert_eq!(run.elapsed_ms, 10_000);
        assert!(matches!(
            run.outcome,
            RunOutcome::GaveUp {
                reason: GiveUpReason::DeadlineReached,
                ..
            }
        ));
    }

    #[test]
    fn records_carry_request_ids_latency_and_remaining_budget() {
        let mut f = Fixture::new(engine());
        let run = f.run(20_000, vec![status(502, 250), status(200, 40)]);
        let a = &run.attempts[0];
        assert_eq!(a.upstream_request_id.as_deref(), Some("req_1"));
        assert_eq!(
            (a.latency_ms, a.remaining_ms, a.next_delay_ms),
            (250, 19_750, Some(1000))
        );
        assert_eq!(a.reason, "retryable status");
        assert_eq!(run.attempts[1].reason, "success");
    }

    fn arb_step() -> impl Strategy<Value = Step> {
        let latency = 0u64..12_000;
        prop_oneof![
            (
                prop::sample::select(vec![200u16, 400, 401, 408, 409, 429, 500, 502, 503, 504]),
                latency.clone()
            )
                .prop_map(|(s, l)| status(s, l)),
            (
                prop::sample::select(vec![429u16, 503]),
                latency.clone(),
                0u64..40_000
            )
                .prop_map(|(s, l, ra)| Step::Status(
                    s,
                    l,
                    vec![("retry-after-ms", ra.to_string())]
                )),
            // Timeout included: a timeout of its own (e.g. connecting) that ends before the deadline.
            (
                prop::sample::select(vec![
                    FailureKind::Connect,
                    FailureKind::Connection,
                    FailureKind::Timeout,
                    FailureKind::IncompleteBody
                ]),
                latency
            )
                .prop_map(|(k, l)| Step::Fail(k, l)),
            Just(Step::Hang),
        ]
    }

    /// The reason a run gave up is true: 504's "cut at the deadline" only for a timeout that
    /// really ran until the deadline, "attempts exhausted" only with every attempt used.
    fn check_give_up_reason(
        run: &RetryRun,
        f: &Fixture,
        budget: u64,
        max_attempts: u32,
    ) -> Result<(), TestCaseError> {
        let RunOutcome::GaveUp { reason, last, .. } = &run.outcome else {
            return Ok(());
        };
        let at_deadline = f.clock.now_ms() == T0 + budget;
        let timed_out = matches!(
            last,
            AttemptOutcome::Failed {
                kind: FailureKind::Timeout,
                ..
            }
        );
        let used = run.attempts.len() as u32;
        match reason {
            GiveUpReason::DeadlineReached => prop_assert!(at_deadline && timed_out),
            GiveUpReason::AttemptsExhausted => prop_assert_eq!(used, max_attempts),
            GiveUpReason::BudgetExhausted | GiveUpReason::RetryAfterPastDeadline => {
                prop_assert!(used < max_attempts);
                prop_assert!(
                    !(at_deadline && timed_out),
                    "a cut attempt reported as {reason:?}"
                );
            }
            // One upstream, no breaker, no estimates: neither can happen.
            GiveUpReason::ExpectedLatencyExceedsBudget => {
                prop_assert!(false, "{reason:?} without routing")
            }
        }
        Ok(())
    }

    mod routed {
        //! The §11 loop in virtual time: real breakers and latency estimates, scripted upstreams.
        use super::*;
        use crate::upstreams::breaker::{BreakerSettings, Breakers};
        use crate::upstreams::latency::{LatencyBook, LatencyKey};
        use crate::upstreams::routing::Router;

        const ROUTE: &str = "/v1/chat/completions";

        struct Env {
            breakers: Breakers,
            latency: LatencyBook,
            clock: VirtualClock,
        }

        impl Env {
            fn new(breaker_failures: u32) -> Env {
                let settings = BreakerSettings {
                    failures: breaker_failures,
                    cooldown_ms: 10_000,
                };
                Env {
                    breakers: Breakers::new(settings, 16),
                    latency: LatencyBook::new(),
                    clock: VirtualClock::new(),
                }
            }

            fn router(&self, upstreams: usize, models: &[&str], skip_hopeless: bool) -> Router<'_> {
                Router {
                    breakers: &self.breakers,
                    latency: &self.latency,
                    names: (0..upstreams).map(|i| format!("u{i}")).collect(),
                    models: models.iter().map(|m| m.to_string()).collect(),
                    route: ROUTE,
                    stream: false,
                    fallback_after: 2,
                    skip_hopeless,
                }
            }

            /// Runs one request; `scripts[i]` is upstream i's answers in order (then 200s).
            fn run(
                &self,
                router: &Router<'_>,
                budget_ms: u64,
                scripts: Vec<Vec<Step>>,
            ) -> (RetryRun, Vec<AttemptPlan>, Vec<u64>) {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let mut scripts: Vec<VecDeque<Step>> =
                    scripts.into_iter().map(VecDeque::from).collect();
                let plans = std::cell::RefCell::new(vec![]);
                let sleeps = SleepLog {
                    clock: self.clock.clone(),
                    log: Default::default(),
                };
                let deadline = self.clock.now_ms() + budget_ms;
                let run = rt.block_on(engine().run_routed(
                    deadline,
                    &self.clock,
                    &sleeps,
                    &mut TestJitter::Max,
                    router,
                    |plan| {
                        plans.borrow_mut().push(plan);
                        let step = scripts[plan.target.upstream]
                            .pop_front()
                            .unwrap_or(status(200, 10));
                        std::future::ready(play(&self.clock, plan, step))
                    },
                    |_| {},
                ));
                let sleeps = sleeps.log.lock().unwrap().clone();
                (run, plans.into_inner(), sleeps)
            }
        }

        fn targets(plans: &[AttemptPlan]) -> Vec<(usize, usize)> {
            plans
                .iter()
                .map(|p| (p.target.upstream, p.target.model))
                .collect()
        }

        #[test]
        fn primary_down_the_backup_serves_after_two_failures_without_a_sleep_for_the_switch() {
            let env = Env::new(5);
            let router = env.router(2, &["gpt-4o"], true);
            let (run, plans, sleeps) =
                env.run(&router, 30_000, vec![vec![status(500, 100); 5], vec![]]);
            assert_eq!(targets(&plans), [(0, 0), (0, 0), (1, 0)]);
            assert_eq!(
                sleeps,
                [1_000, 0],
                "one backoff on the primary, none for the switch"
            );
            assert!(matches!(run.outcome, RunOutcome::Answer(ref r) if r.status == 200));
            assert_eq!(run.switches, 1);
            assert!(!run.circuit_open);
            assert_eq!(run.attempts[1].next_delay_ms, Some(0));
        }

        #[test]
        fn a_429_or_a_connect_error_switches_at_once() {
            for first in [status(429, 10), Step::Fail(FailureKind::Connect, 10)] {
                let env = Env::new(5);
                let router = env.router(2, &["gpt-4o"], true);
                let (run, plans, sleeps) = env.run(&router, 30_000, vec![vec![first], vec![]]);
                assert_eq!(targets(&plans), [(0, 0), (1, 0)]);
                assert!(sleeps.iter().all(|s| *s == 0), "{sleeps:?}");
                assert!(matches!(run.outcome, RunOutcome::Answer(ref r) if r.status == 200));
            }
        }

        #[test]
        fn final_answers_never_fall_back() {
            for s in [400, 401, 404, 422] {
                let env = Env::new(5);
                let router = env.router(2, &["gpt-4o"], true);
                let (run, plans, _) = env.run(&router, 30_000, vec![vec![status(s, 10)], vec![]]);
                assert_eq!(targets(&plans), [(0, 0)], "{s}");
                assert!(matches!(run.outcome, RunOutcome::Answer(ref r) if r.status == s));
                assert_eq!(run.switches, 0);
            }
        }

        #[test]
        fn attempts_are_counted_over_all_upstreams() {
            let env = Env::new(0);
            let router = env.router(3, &["gpt-4o"], true);
            let down = vec![status(503, 10); 10];
            let (run, plans, _) = env.run(&router, 60_000, vec![down.clone(), down.clone(), down]);
            assert_eq!(targets(&plans), [(0, 0), (0, 0), (1, 0), (1, 0), (2, 0)]);
            assert!(matches!(
                run.outcome,
                RunOutcome::GaveUp {
                    reason: GiveUpReason::AttemptsExhausted,
                    ..
                }
            ));
            assert_eq!(run.switches, 2);
        }

        #[test]
        fn model_fallback_once_every_upstream_failed_for_the_model() {
            let env = Env::new(0);
            let router = env.router(2, &["gpt-4o", "gpt-4o-mini"], true);
            let (run, plans, _) = env.run(
                &router,
                60_000,
                vec![vec![status(429, 10)], vec![status(429, 10)]],
            );
            assert_eq!(targets(&plans), [(0, 0), (1, 0), (0, 1)]);
            assert!(matches!(run.outcome, RunOutcome::Answer(ref r) if r.status == 200));
            assert_eq!(run.switches, 2);
        }

        #[test]
        fn the_breaker_opens_across_requests_refuses_probes_once_and_recovers() {
            let env = Env::new(3);
            let router = env.router(1, &["gpt-4o"], true);
            // A 1.5 s budget leaves room for one attempt per request: three requests that fail
            // open the breaker (a success in between would have reset the count).
            env.run(&router, 1_500, vec![vec![status(500, 10)]]);
            env.run(&router, 1_500, vec![vec![status(500, 10)]]);
            // The request whose failure opens it carries on (its retries are not refused) and
            // its success closes the breaker again.
            let (run, plans, _) = env.run(
                &router,
                30_000,
                vec![vec![status(500, 10), status(500, 10), status(200, 10)]],
            );
            assert_eq!(plans.len(), 3, "a running request keeps its retries");
            assert!(matches!(run.outcome, RunOutcome::Answer(ref r) if r.status == 200));
            let (_, plans, _) = env.run(&router, 1_500, vec![vec![status(500, 10)]]);
            assert_eq!(plans.len(), 1, "closed: the next request is let through");
            // Two more failures open it; open, a request is refused at once, with the time until
            // it half-opens.
            env.run(&router, 1_500, vec![vec![status(500, 10)]]);
            env.run(&router, 1_500, vec![vec![status(500, 10)]]);
            let (run, plans, _) = env.run(&router, 30_000, vec![vec![]]);
            assert!(plans.is_empty());
            assert_eq!(
                run.outcome,
                RunOutcome::CircuitOpen {
                    retry_after_ms: 10_000
                }
            );
            assert!(run.circuit_open);
            // After the cooldown one request probes; its failure doubles the cooldown.
            env.clock.advance(10_000);
            let (_, plans, _) = env.run(&router, 1_500, vec![vec![status(503, 10)]]);
            assert_eq!(plans.len(), 1);
            let (run, _, _) = env.run(&router, 30_000, vec![vec![]]);
            assert_eq!(
                run.outcome,
                RunOutcome::CircuitOpen {
                    retry_after_ms: 20_000
                }
            );
            // The next probe succeeds and closes it.
            env.clock.advance(20_000);
            let (run, _, _) = env.run(&router, 30_000, vec![vec![status(200, 10)]]);
            assert!(matches!(run.outcome, RunOutcome::Answer(ref r) if r.status == 200));
            let (run, _, _) = env.run(
                &router,
                30_000,
                vec![vec![status(500, 10), status(200, 10)]],
            );
            assert!(matches!(run.outcome, RunOutcome::Answer(ref r) if r.status == 200));
        }

        #[test]
        fn an_open_primary_is_skipped_and_counted() {
            let env = Env::new(2);
            let router = env.router(2, &["gpt-4o"], true);
            env.run(
                &router,
                30_000,
                vec![vec![status(500, 10), status(500, 10)], vec![]],
            );
            let (run, plans, _) = env.run(&router, 30_000, vec![vec![], vec![]]);
            assert_eq!(targets(&plans), [(1, 0)]);
            assert!(run.circuit_open);
            assert_eq!(run.switches, 0);
        }

        fn learn(env: &Env, upstream: &str, ms: u64) {
            let key = LatencyKey {
                upstream: upstream.into(),
                route: ROUTE,
                model: "gpt-4o".into(),
                stream: false,
            };
            for _ in 0..5 {
                env.latency.record(&key, ms);
            }
        }

        #[test]
        fn a_hopeless_retry_is_not_started_unless_turned_off() {
            // Successes take 8 s; after a 500 and a 1 s backoff only 6.9 s would be left.
            for skip in [true, false] {
                let env = Env::new(0);
                learn(&env, "u0", 8_000);
                let router = env.router(1, &["gpt-4o"], skip);
                let (run, plans, _) = env.run(&router, 8_000, vec![vec![status(500, 100)]]);
                if skip {
                    assert_eq!(plans.len(), 1);
                    assert!(matches!(
                        run.outcome,
                        RunOutcome::GaveUp {
                            reason: GiveUpReason::ExpectedLatencyExceedsBudget,
                            ..
                        }
                    ));
                    assert_eq!(run.attempts[0].reason, "expected_latency_exceeds_budget");
                    assert_eq!(run.attempts[0].expected_ms, Some(8_000));
                    assert_eq!(run.skipped, 1);
                    assert_eq!(run.elapsed_ms, 100, "answered at once");
                } else {
                    assert_eq!(plans.len(), 2, "the control makes the retry");
                    assert_eq!(run.skipped, 0);
                }
            }
        }

        #[test]
        fn the_first_attempt_is_never_skipped_and_estimates_come_from_successes() {
            let env = Env::new(0);
            let router = env.router(1, &["gpt-4o"], true);
            for _ in 0..5 {
                env.run(&router, 30_000, vec![vec![status(200, 9_000)]]);
            }
            assert_eq!(
                router.expected_ms(Target {
                    upstream: 0,
                    model: 0
                }),
                Some(9_000)
            );
            let (run, plans, _) = env.run(&router, 5_000, vec![vec![status(200, 10)]]);
            assert_eq!(plans.len(), 1);
            assert!(matches!(run.outcome, RunOutcome::Answer(_)));
        }

        #[test]
        fn a_hopeless_primary_still_lets_a_known_fast_backup_serve() {
            let env = Env::new(0);
            learn(&env, "u0", 20_000);
            learn(&env, "u1", 500);
            let router = env.router(2, &["gpt-4o"], true);
            let (run, plans, _) = env.run(&router, 10_000, vec![vec![status(429, 100)], vec![]]);
            assert_eq!(targets(&plans), [(0, 0), (1, 0)]);
            assert!(matches!(run.outcome, RunOutcome::Answer(ref r) if r.status == 200));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        #[test]
        fn never_finishes_after_the_deadline_nor_exceeds_the_attempt_limit(
            steps in prop::collection::vec(arb_step(), 1..12),
            budget in 500u64..=30_000,
            max_attempts in 1u32..8,
            base in 0u64..3_000,
            min_attempt in 0u64..3_000,
            attempt_timeout in prop::option::of(100u64..20_000),
            seed in any::<u64>(),
        ) {
            let policy = RetryPolicy { max_attempts, base_delay_ms: base, max_delay_ms: base * 8 };
            let mut f = Fixture::new(RetryEngine {
                policy,
                min_attempt_ms: min_attempt,
                attempt_timeout_ms: attempt_timeout,
            });
            // Jitter anywhere in [d/2, d], as in production.
            f.jitter = TestJitter::Seeded(fastrand::Rng::with_seed(seed));
            let run = f.run(budget, steps);
            check_give_up_reason(&run, &f, budget, max_attempts)?;
            // Each sleep is the record's next_delay_ms: a Retry-After or a backoff in [d/2, d].
            let delays: Vec<u64> = run.attempts.iter().filter_map(|a| a.next_delay_ms).collect();
            prop_assert_eq!(&delays, &f.sleeps);
            prop_assert!(f.clock.now_ms() <= T0 + budget, "finished {} ms late", f.clock.now_ms() - T0 - budget);
            prop_assert!(run.attempts.len() as u32 <= max_attempts);
            prop_assert_eq!(run.attempts.len(), f.plans.len());
            for p in &f.plans {
                // Each attempt gets its full ATTEMPT_TIMEOUT_MS or at least MIN_ATTEMPT_MS.
                prop_assert!(p.timeout_ms >= min_attempt.max(1).min(attempt_timeout.unwrap_or(u64::MAX)));
                if let Some(t) = attempt_timeout { prop_assert!(p.timeout_ms <= t); }
            }
            // Every record but the last is a retry; the last never is.
            let (last, rest) = match run.attempts.split_last() {
                Some(x) => x,
                None => {
                    let no_time = matches!(run.outcome, RunOutcome::NoTimeToStart { .. });
                    prop_assert!(no_time);
                    return Ok(());
                }
            };
            prop_assert!(rest.iter().all(|a| a.decision == Decision::Retry));
            prop_assert!(last.decision != Decision::Retry);
        }
    }
}
