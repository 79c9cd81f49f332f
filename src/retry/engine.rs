//! The retry loop, bounded by the deadline (spec §3, §4), over the upstreams of §11.
//!
//! A thin loop: claim the upstream from its breaker, make the attempt, tell the breaker and the
//! latency book, then ask [`decide`] what follows and sleep or stop. Every rule lives in
//! [`decide`] (and in [`Rotation`], where the next attempt goes); the clock, the sleep and the
//! randomness are injected, so the loop runs in virtual time in the tests.
//!
//! Invariants (checked by the property test below): the loop never starts an attempt with less
//! than `MIN_ATTEMPT_MS` left, never starts a sleep after which less than that would remain,
//! never lets an attempt's timeout pass the deadline, and never makes more than
//! `RETRY_MAX_ATTEMPTS` attempts, on all upstreams together. So it always finishes by the
//! deadline.

use std::future::Future;

use super::decide::{Decided, Ended, Next, Stop, decide};
use super::policy::{self, Jitter, RetryPolicy, Verdict};
use super::{AttemptOutcome, FailureKind, UpstreamReply};
use crate::upstreams::breaker::{Admission, Report};
use crate::upstreams::fallback::{Move, Rotation, Target, switches};
use crate::upstreams::routing::{OneUpstream, Routing};

/// Milliseconds since the Unix epoch, injected.
pub trait Clock {
    fn now_ms(&self) -> u64;
}

/// Waiting, injected.
pub trait Sleeper {
    fn sleep(&self, ms: u64) -> impl Future<Output = ()> + Send;
}

/// The engine's settings (`RETRY_*`, `MIN_ATTEMPT_MS`, `ATTEMPT_TIMEOUT_MS`).
#[derive(Clone, Copy, Debug)]
pub struct RetryEngine {
    pub policy: RetryPolicy,
    /// `MIN_ATTEMPT_MS`: no attempt is started with less time than this left.
    pub min_attempt_ms: u64,
    /// `ATTEMPT_TIMEOUT_MS`, if set.
    pub attempt_timeout_ms: Option<u64>,
}

impl RetryEngine {
    /// The same engine for a run that follows `spent` attempts of the same request (after a key
    /// refresh): they count against the same `RETRY_MAX_ATTEMPTS`.
    pub fn after_attempts(self, spent: u32) -> RetryEngine {
        let max_attempts = self.policy.max_attempts.saturating_sub(spent);
        RetryEngine {
            policy: RetryPolicy {
                max_attempts,
                ..self.policy
            },
            ..self
        }
    }
}

/// What the attempt closure is told: which attempt, how long it may take at most, and where it
/// goes (indexes into the upstream list and the model chain).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptPlan {
    pub number: u32,
    pub timeout_ms: u64,
    pub target: Target,
}

/// The log's `decision`.
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

impl AttemptRecord {
    /// The record of the attempt `plan` that ran from `begin` to `end` and what was decided.
    fn new(
        plan: AttemptPlan,
        outcome: &AttemptOutcome,
        span: (u64, u64),
        deadline_ms: u64,
        decided: &Decided,
    ) -> AttemptRecord {
        let (begin, end) = span;
        let (status, upstream_request_id, error_kind) = match outcome {
            AttemptOutcome::Reply(r) => (Some(r.status), r.request_id().map(str::to_owned), None),
            AttemptOutcome::Failed { kind, .. } => (None, None, Some(*kind)),
        };
        let decision = match decided.next {
            Next::Stop(Stop::Final) => Decision::Done,
            Next::Stop(Stop::GiveUp(_)) => Decision::GiveUp,
            Next::Retry { .. } | Next::Switch => Decision::Retry,
        };
        AttemptRecord {
            attempt: plan.number,
            target: plan.target,
            status,
            error_kind,
            latency_ms: end.saturating_sub(begin),
            upstream_request_id,
            decision,
            reason: decided.reason.clone(),
            next_delay_ms: decided.next.wait_ms(),
            remaining_ms: deadline_ms.saturating_sub(end),
            expected_ms: decided.expected_ms,
        }
    }
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

impl RunOutcome {
    /// How a run that stopped after `last` ended.
    fn stopped(stop: Stop, last: AttemptOutcome, retry_after_ms: Option<u64>) -> RunOutcome {
        match (stop, last) {
            (Stop::GiveUp(reason), last) => RunOutcome::GaveUp {
                reason,
                last,
                retry_after_ms,
            },
            (Stop::Final, AttemptOutcome::Reply(reply)) => RunOutcome::Answer(reply),
            // The only final failure: the request could not be built.
            (Stop::Final, AttemptOutcome::Failed { detail, .. }) => {
                RunOutcome::Unsendable { detail }
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryRun {
    pub outcome: RunOutcome,
    pub attempts: Vec<AttemptRecord>,
    pub elapsed_ms: u64,
    /// Moves from one attempt's upstream or model to the next one's (`x-proxy-fallbacks`,
    /// `Fallbacks`): only moves an attempt followed.
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

    /// The same run, `elapsed_ms` after it started.
    fn after(self, elapsed_ms: u64) -> RetryRun {
        RetryRun { elapsed_ms, ..self }
    }

    /// The run that ended with `outcome` after `attempts`, `elapsed_ms` after it started.
    fn ended(
        outcome: RunOutcome,
        attempts: Vec<AttemptRecord>,
        rotation: &Rotation,
        elapsed_ms: u64,
    ) -> RetryRun {
        let skipped = matches!(
            outcome,
            RunOutcome::GaveUp {
                reason: GiveUpReason::ExpectedLatencyExceedsBudget,
                ..
            }
        );
        RetryRun {
            outcome,
            switches: switches(attempts.iter().map(|a| a.target)),
            attempts,
            elapsed_ms,
            circuit_open: rotation.skipped_open(),
            skipped: u32::from(skipped),
        }
    }
}

/// Whether the next attempt may go to the rotation's current upstream.
enum Claim {
    /// Yes; `probe`: as the breaker's half-open probe (its result must be reported).
    Go { probe: bool },
    /// The breaker refused (it opened, or another request holds its probe): go there instead.
    Elsewhere(Rotation),
    /// Every breaker is open and no attempt was made yet.
    CircuitOpen { retry_after_ms: u64 },
}

/// Refusals by breakers (races with other requests) tolerated per upstream before a request
/// treats every upstream as open.
const MAX_REFUSALS_PER_UPSTREAM: u32 = 2;

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
        let routing = &OneUpstream;
        self.run_routed(
            deadline_ms,
            clock,
            sleeper,
            jitter,
            routing,
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
        let mut rotation = match self.start(deadline_ms, started, routing) {
            Ok(rotation) => rotation,
            Err(outcome) => return RetryRun::empty(outcome),
        };
        let (mut attempts, mut refusals) = (Vec::<AttemptRecord>::new(), 0);
        loop {
            let begin = clock.now_ms();
            let last = attempts.last().map(|a| a.target);
            let probe = match claim(&rotation, routing, begin, refusals, last) {
                Claim::Go { probe } => probe,
                Claim::Elsewhere(next) => {
                    (rotation, refusals) = (next, refusals + 1);
                    continue;
                }
                Claim::CircuitOpen { retry_after_ms } => {
                    let run = RetryRun::empty(RunOutcome::CircuitOpen { retry_after_ms });
                    return run.after(begin.saturating_sub(started));
                }
            };
            let number = attempts.len() as u32 + 1;
            let plan = self.plan(number, rotation.current(), begin, deadline_ms);
            let outcome = attempt(plan).await;
            let end = clock.now_ms();
            tell(routing, plan, probe, &outcome, (begin, end));
            let ended = Ended {
                number,
                outcome: &outcome,
                now_ms: end,
            };
            let decided = self.decide_on(routing, &ended, deadline_ms, &rotation, jitter);
            let record = AttemptRecord::new(plan, &outcome, (begin, end), deadline_ms, &decided);
            on_attempt(&record);
            attempts.push(record);
            rotation = decided.rotation;
            let Next::Stop(stop) = decided.next else {
                sleeper.sleep(decided.next.wait_ms().unwrap_or(0)).await;
                continue;
            };
            let outcome = RunOutcome::stopped(stop, outcome, decided.retry_after_ms);
            return RetryRun::ended(outcome, attempts, &rotation, end.saturating_sub(started));
        }
    }

    /// [`decide`], with which upstreams admit attempts and what they are expected to take when
    /// the attempt ended.
    fn decide_on(
        &self,
        routing: &impl Routing,
        ended: &Ended<'_>,
        deadline_ms: u64,
        rotation: &Rotation,
        jitter: &mut impl Jitter,
    ) -> Decided {
        let available = routing.available(ended.now_ms);
        let expected_ms = |target| routing.expected_ms(target);
        decide(
            self,
            ended,
            deadline_ms,
            rotation,
            &available,
            expected_ms,
            jitter,
        )
    }

    /// Where the first attempt goes, or why there is none.
    fn start(
        &self,
        deadline_ms: u64,
        now_ms: u64,
        routing: &impl Routing,
    ) -> Result<Rotation, RunOutcome> {
        let remaining_ms = deadline_ms.saturating_sub(now_ms);
        if remaining_ms < self.min_attempt() {
            return Err(RunOutcome::NoTimeToStart { remaining_ms });
        }
        let available = routing.available(now_ms);
        Rotation::start(&available, routing.models(), routing.fallback_after()).ok_or_else(|| {
            let retry_after_ms = routing.wait_until_first_reopens(now_ms);
            RunOutcome::CircuitOpen { retry_after_ms }
        })
    }

    /// Attempt `number` at `target`, starting at `now_ms`: its timeout is `ATTEMPT_TIMEOUT_MS`,
    /// cut at the deadline (spec §4).
    fn plan(&self, number: u32, target: Target, now_ms: u64, deadline_ms: u64) -> AttemptPlan {
        let remaining = deadline_ms.saturating_sub(now_ms);
        AttemptPlan {
            number,
            timeout_ms: self
                .attempt_timeout_ms
                .map_or(remaining, |t| t.min(remaining)),
            target,
        }
    }
}

/// Claims the rotation's current upstream from its breaker at `now_ms`. A request that already
/// made attempts when every breaker opened carries on where its last attempt went (its own
/// retries are not refused; the breakers then only turn away new requests).
fn claim(
    rotation: &Rotation,
    routing: &impl Routing,
    now_ms: u64,
    refusals: u32,
    last: Option<Target>,
) -> Claim {
    let admission = match rotation.carries_on() {
        true => Admission::Probe,
        false => routing.admit(rotation.current().upstream, now_ms),
    };
    match admission {
        Admission::Allowed => Claim::Go { probe: false },
        Admission::Probe => Claim::Go { probe: true },
        Admission::Refused { .. } => {
            let (next, mv) = rotation.after_refusal(&routing.available(now_ms));
            let stuck = mv == Move::NoneAvailable || refusals + 1 > 2 * MAX_REFUSALS_PER_UPSTREAM;
            match (stuck, last) {
                (false, _) => Claim::Elsewhere(next),
                (true, Some(target)) => Claim::Elsewhere(next.resume(target)),
                (true, None) => Claim::CircuitOpen {
                    retry_after_ms: routing.wait_until_first_reopens(now_ms),
                },
            }
        }
    }
}

/// Tells the breaker what the attempt (from `begin` to `end`) showed, and the latency book how
/// long a success took.
fn tell(
    routing: &impl Routing,
    plan: AttemptPlan,
    probe: bool,
    outcome: &AttemptOutcome,
    (begin, end): (u64, u64),
) {
    let report = match policy::verdict(outcome) {
        Verdict::Final(_) => Report::Healthy,
        Verdict::Retryable(_) => Report::Failed,
    };
    routing.report(plan.target.upstream, end, probe, report);
    if let AttemptOutcome::Reply(r) = outcome
        && (200..300).contains(&r.status)
    {
        routing.learn(plan.target, end.saturating_sub(begin));
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

    use crate::retry::tests::engine;

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
                router: &impl Routing,
                budget_ms: u64,
                scripts: Vec<Vec<Step>>,
            ) -> (RetryRun, Vec<AttemptPlan>, Vec<u64>) {
                self.run_engine(engine(), router, budget_ms, scripts)
            }

            fn run_engine(
                &self,
                engine: RetryEngine,
                router: &impl Routing,
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
                let run = rt.block_on(engine.run_routed(
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

        /// Another invocation claims `upstream`'s half-open probe just before this request asks
        /// for it (two concurrent invocations racing for the probe, made deterministic): the
        /// upstream looked available when the run chose it, and its breaker then refuses.
        struct ProbeTakenByAnother<'a> {
            router: Router<'a>,
            upstream: usize,
        }

        impl Routing for ProbeTakenByAnother<'_> {
            fn models(&self) -> usize {
                self.router.models()
            }
            fn fallback_after(&self) -> u32 {
                self.router.fallback_after()
            }
            fn available(&self, now_ms: u64) -> Vec<bool> {
                self.router.available(now_ms)
            }
            fn admit(&self, upstream: usize, now_ms: u64) -> Admission {
                if upstream == self.upstream {
                    // The other invocation's claim; it wins the race (or was refused).
                    let _ = self.router.admit(upstream, now_ms);
                }
                self.router.admit(upstream, now_ms)
            }
            fn report(&self, upstream: usize, now_ms: u64, probe: bool, report: Report) {
                self.router.report(upstream, now_ms, probe, report)
            }
            fn wait_until_first_reopens(&self, now_ms: u64) -> u64 {
                self.router.wait_until_first_reopens(now_ms)
            }
            fn expected_ms(&self, target: Target) -> Option<u64> {
                self.router.expected_ms(target)
            }
            fn learn(&self, target: Target, latency_ms: u64) {
                self.router.learn(target, latency_ms)
            }
        }

        /// Opens `upstream`'s breaker (5 failures) and lets its cooldown pass: it half-opens
        /// for the first request that asks.
        fn cooled_down(env: &Env, upstream: usize) {
            for _ in 0..5 {
                let name = format!("u{upstream}");
                env.breakers
                    .record(&name, env.clock.now_ms(), false, Report::Failed);
            }
            env.clock.advance(10_000);
        }

        #[test]
        fn fallbacks_count_only_switches_an_attempt_followed_when_a_probe_race_is_lost() {
            // u0 answers 429: the run switches to u1, which looked available (its cooldown
            // ended) but whose probe another request takes first; the attempt goes to u2.
            // One switch (u0 → u2), not two.
            let env = Env::new(5);
            cooled_down(&env, 1);
            let racing = ProbeTakenByAnother {
                router: env.router(3, &["gpt-4o"], true),
                upstream: 1,
            };
            let (run, plans, _) =
                env.run(&racing, 30_000, vec![vec![status(429, 10)], vec![], vec![]]);
            assert_eq!(targets(&plans), [(0, 0), (2, 0)]);
            assert!(matches!(run.outcome, RunOutcome::Answer(ref r) if r.status == 200));
            assert_eq!(run.switches, 1, "x-proxy-fallbacks");
            assert!(run.circuit_open, "the refused upstream was skipped");

            // Two upstreams: refused on u1, the run starts over on u0. Both attempts went to
            // u0: no switch at all.
            let env = Env::new(5);
            cooled_down(&env, 1);
            let racing = ProbeTakenByAnother {
                router: env.router(2, &["gpt-4o"], true),
                upstream: 1,
            };
            let scripts = vec![vec![status(429, 10), status(200, 10)], vec![]];
            let (run, plans, _) = env.run(&racing, 30_000, scripts);
            assert_eq!(targets(&plans), [(0, 0), (0, 0)]);
            assert_eq!(run.switches, 0, "x-proxy-fallbacks");

            // The race at the first attempt: the request starts on u1, no switch either.
            let env = Env::new(5);
            cooled_down(&env, 0);
            let racing = ProbeTakenByAnother {
                router: env.router(2, &["gpt-4o"], true),
                upstream: 0,
            };
            let (run, plans, _) = env.run(&racing, 30_000, vec![vec![], vec![]]);
            assert_eq!(targets(&plans), [(1, 0)]);
            assert_eq!(run.switches, 0, "x-proxy-fallbacks");
            assert!(run.circuit_open);
        }

        #[test]
        fn a_switch_planned_after_the_last_attempt_is_not_counted() {
            // RETRY_MAX_ATTEMPTS=2: two failures on the primary use up the attempts; the move
            // to the backup that FALLBACK_AFTER_FAILURES=2 would make never happens.
            let env = Env::new(5);
            let router = env.router(2, &["gpt-4o"], true);
            let two_attempts = RetryEngine {
                policy: RetryPolicy {
                    max_attempts: 2,
                    ..engine().policy
                },
                ..engine()
            };
            let scripts = vec![vec![status(500, 10), status(500, 10)], vec![]];
            let (run, plans, _) = env.run_engine(two_attempts, &router, 30_000, scripts);
            assert_eq!(targets(&plans), [(0, 0), (0, 0)]);
            assert!(matches!(
                run.outcome,
                RunOutcome::GaveUp {
                    reason: GiveUpReason::AttemptsExhausted,
                    ..
                }
            ));
            assert_eq!(run.switches, 0, "x-proxy-fallbacks");
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
