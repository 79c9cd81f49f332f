//! Per-upstream circuit breaker (spec §11), kept in the warm environment.
//!
//! [`Breaker`] is the pure state machine (the clock is an argument); [`Breakers`] shares one per
//! upstream between concurrent invocations behind a mutex that is never held across an await.
//!
//! Closed: `BREAKER_FAILURES` retryable failures in a row (across requests) open it. Open: the
//! upstream is skipped until the cooldown ends. Then exactly one attempt probes it (half-open):
//! a success closes it, a retryable failure opens it again for twice the cooldown (at most
//! [`MAX_COOLDOWN_MS`], or the configured cooldown if that is longer). While open or half-open,
//! only the probe's result counts: late results of attempts started before it opened are ignored.
//! (A request that was already running when every breaker opened carries on; its attempts
//! report as probes, so its success closes the breaker and its failures change nothing.)

use std::collections::HashMap;
use std::sync::Mutex;

/// The cooldown doubles up to this while probes fail.
pub const MAX_COOLDOWN_MS: u64 = 60_000;

/// `BREAKER_FAILURES` (0 = off) and `BREAKER_COOLDOWN_MS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerSettings {
    pub failures: u32,
    pub cooldown_ms: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 5,
            cooldown_ms: 10_000,
        }
    }
}

impl BreakerSettings {
    fn enabled(&self) -> bool {
        self.failures > 0
    }

    fn next_cooldown(&self, current: u64) -> u64 {
        current
            .saturating_mul(2)
            .min(MAX_COOLDOWN_MS.max(self.cooldown_ms))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until_ms: u64, cooldown_ms: u64 },
    HalfOpen { cooldown_ms: u64 },
}

/// May an attempt go to this upstream now?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Closed (or the breaker is off): go ahead.
    Allowed,
    /// The cooldown ended and this attempt is the one probe. Its result must be reported.
    Probe,
    /// Open, or half-open with the probe still out; try again at `until_ms` at the earliest.
    Refused { until_ms: u64 },
}

/// What an attempt on the upstream showed, for the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// The upstream answered something final (a success, or an error retrying cannot fix).
    Healthy,
    /// A retryable failure (§3).
    Failed,
    /// The probe was admitted but never sent (the request stopped first).
    ProbeNotSent,
}

/// One upstream's breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breaker {
    state: State,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: State::Closed { failures: 0 },
        }
    }
}

impl Breaker {
    /// Whether an attempt would be admitted at `now_ms` (without claiming the probe).
    pub fn is_available(&self, settings: &BreakerSettings, now_ms: u64) -> bool {
        match self.state {
            _ if !settings.enabled() => true,
            State::Closed { .. } => true,
            State::Open { until_ms, .. } => now_ms >= until_ms,
            State::HalfOpen { .. } => false,
        }
    }

    /// When a refused attempt could be admitted again: the end of the cooldown, or "now" while
    /// a probe is out (its result decides, and it is bounded by its own request's deadline).
    pub fn reopens_at(&self, now_ms: u64) -> u64 {
        match self.state {
            State::Open { until_ms, .. } => until_ms.max(now_ms),
            _ => now_ms,
        }
    }

    /// Decides whether an attempt may start; claims the probe when the cooldown is over.
    pub fn admit(self, settings: &BreakerSettings, now_ms: u64) -> (Breaker, Admission) {
        match self.state {
            _ if !settings.enabled() => (self, Admission::Allowed),
            State::Closed { .. } => (self, Admission::Allowed),
            State::Open {
                until_ms,
                cooldown_ms,
            } if now_ms >= until_ms => (
                Breaker {
                    state: State::HalfOpen { cooldown_ms },
                },
                Admission::Probe,
            ),
            State::Open { until_ms, .. } => (self, Admission::Refused { until_ms }),
            State::HalfOpen { .. } => (self, Admission::Refused { until_ms: now_ms }),
        }
    }

    /// Takes an attempt's result into account. `probe`: the attempt was admitted as the probe.
    pub fn record(
        self,
        settings: &BreakerSettings,
        now_ms: u64,
        probe: bool,
        report: Report,
    ) -> Breaker {
        let state = match (self.state, probe, report) {
            _ if !settings.enabled() => self.state,
            (State::Closed { .. }, false, Report::Healthy) => State::Closed { failures: 0 },
            (State::Closed { failures }, false, Report::Failed) => {
                let failures = failures + 1;
                if failures >= settings.failures {
                    State::Open {
                        until_ms: now_ms + settings.cooldown_ms,
                        cooldown_ms: settings.cooldown_ms,
                    }
                } else {
                    State::Closed { failures }
                }
            }
            // A probe, or a request that carried on while every breaker was open, got through.
            (State::HalfOpen { .. } | State::Open { .. }, true, Report::Healthy) => {
                State::Closed { failures: 0 }
            }
            (State::HalfOpen { cooldown_ms }, true, Report::Failed) => {
                let cooldown_ms = settings.next_cooldown(cooldown_ms);
                State::Open {
                    until_ms: now_ms + cooldown_ms,
                    cooldown_ms,
                }
            }
            // The probe was claimed but not used: the next request may probe at once.
            (State::HalfOpen { cooldown_ms }, true, Report::ProbeNotSent) => State::Open {
                until_ms: now_ms,
                cooldown_ms,
            },
            // Late results of attempts admitted before the breaker opened, and stray reports.
            (state, _, _) => state,
        };
        Breaker { state }
    }
}

/// The breakers of every upstream, shared by concurrent invocations, keyed by upstream name:
/// a list refreshed from `UPSTREAMS_SECRET_ARN` may reorder, add or remove upstreams, and each
/// state follows its name. Closed with no failure counted is the same as no entry.
#[derive(Debug)]
pub struct Breakers {
    settings: BreakerSettings,
    states: Mutex<HashMap<String, Breaker>>,
}

impl Breakers {
    /// `capacity`: how many upstreams to make room for up front.
    pub fn new(settings: BreakerSettings, capacity: usize) -> Breakers {
        Breakers {
            settings,
            states: Mutex::new(HashMap::with_capacity(capacity)),
        }
    }

    pub fn settings(&self) -> BreakerSettings {
        self.settings
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Breaker>) -> T) -> T {
        // A panic elsewhere while holding the lock cannot leave a torn state (every update is
        // one assignment), so a poisoned lock is still usable.
        let mut guard = self.states.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Forgets the upstreams not in `names` (removed from a refreshed list): one that comes back
    /// later starts closed.
    pub fn keep_only<S: AsRef<str>>(&self, names: &[S]) {
        self.with(|s| s.retain(|name, _| names.iter().any(|n| n.as_ref() == name)));
    }

    /// Which of `names` would admit an attempt at `now_ms`.
    pub fn available(&self, now_ms: u64, names: &[String]) -> Vec<bool> {
        self.with(|s| {
            names
                .iter()
                .map(|n| {
                    s.get(n)
                        .is_none_or(|b| b.is_available(&self.settings, now_ms))
                })
                .collect()
        })
    }

    /// Milliseconds from `now_ms` until the first of `names` could be tried again.
    pub fn wait_until_first_reopens(&self, now_ms: u64, names: &[String]) -> u64 {
        self.with(|s| {
            names
                .iter()
                .map(|n| s.get(n).map_or(now_ms, |b| b.reopens_at(now_ms)))
                .min()
                .unwrap_or(now_ms)
                .saturating_sub(now_ms)
        })
    }

    pub fn admit(&self, name: &str, now_ms: u64) -> Admission {
        self.with(|s| {
            let Some(b) = s.get_mut(name) else {
                return Admission::Allowed;
            };
            let (next, admission) = b.admit(&self.settings, now_ms);
            *b = next;
            admission
        })
    }

    pub fn record(&self, name: &str, now_ms: u64, probe: bool, report: Report) {
        self.with(|s| {
            let b = s.get(name).copied().unwrap_or_default();
            let next = b.record(&self.settings, now_ms, probe, report);
            if next == Breaker::default() {
                s.remove(name);
            } else {
                s.insert(name.to_owned(), next);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const T0: u64 = 1_764_000_000_000;
    const S: BreakerSettings = BreakerSettings {
        failures: 3,
        cooldown_ms: 10_000,
    };

    fn fail(b: Breaker, now: u64, times: u32) -> Breaker {
        (0..times).fold(b, |b, _| b.record(&S, now, false, Report::Failed))
    }

    #[test]
    fn opens_after_failures_in_a_row_and_a_success_resets_the_count() {
        let b = fail(Breaker::default(), T0, 2);
        let b = b.record(&S, T0, false, Report::Healthy);
        let b = fail(b, T0, 2);
        assert_eq!(b.admit(&S, T0).1, Admission::Allowed);
        let b = fail(b, T0 + 5, 1);
        assert_eq!(
            b.admit(&S, T0 + 6).1,
            Admission::Refused {
                until_ms: T0 + 10_005
            }
        );
        assert!(!b.is_available(&S, T0 + 10_004));
        assert!(b.is_available(&S, T0 + 10_005));
    }

    #[test]
    fn one_probe_after_the_cooldown_success_closes() {
        let b = fail(Breaker::default(), T0, 3);
        let (b, first) = b.admit(&S, T0 + 10_000);
        assert_eq!(first, Admission::Probe);
        let (b, second) = b.admit(&S, T0 + 10_001);
        assert_eq!(
            second,
            Admission::Refused {
                until_ms: T0 + 10_001
            }
        );
        // A late failure of an attempt admitted before the breaker opened does not count.
        let b = b.record(&S, T0 + 10_002, false, Report::Failed);
        let b = b.record(&S, T0 + 10_500, true, Report::Healthy);
        assert_eq!(b.admit(&S, T0 + 10_501).1, Admission::Allowed);
        // Closed again with a fresh count.
        let b = fail(b, T0 + 11_000, 2);
        assert_eq!(b.admit(&S, T0 + 11_000).1, Admission::Allowed);
    }

    #[test]
    fn failing_probes_double_the_cooldown_up_to_sixty_seconds() {
        let mut b = fail(Breaker::default(), T0, 3);
        let mut cooldowns = vec![];
        let mut until = T0 + 10_000;
        for _ in 0..6 {
            assert_eq!(
                b.admit(&S, until - 1).1,
                Admission::Refused { until_ms: until }
            );
            let (probing, adm) = b.admit(&S, until);
            assert_eq!(adm, Admission::Probe);
            let now = until + 100;
            b = probing.record(&S, now, true, Report::Failed);
            let Admission::Refused { until_ms } = b.admit(&S, now).1 else {
                panic!("not open after a failed probe")
            };
            cooldowns.push(until_ms - now);
            until = until_ms;
        }
        assert_eq!(cooldowns, [20_000, 40_000, 60_000, 60_000, 60_000, 60_000]);
        // A successful probe resets the cooldown to the configured one.
        let (b, _) = b.admit(&S, until);
        let b = b.record(&S, until, true, Report::Healthy);
        let b = fail(b, until, 3);
        assert_eq!(
            b.admit(&S, until).1,
            Admission::Refused {
                until_ms: until + 10_000
            }
        );
    }

    #[test]
    fn a_probe_not_sent_lets_the_next_request_probe_at_once() {
        let b = fail(Breaker::default(), T0, 3);
        let (b, adm) = b.admit(&S, T0 + 10_000);
        assert_eq!(adm, Admission::Probe);
        let b = b.record(&S, T0 + 10_010, true, Report::ProbeNotSent);
        assert_eq!(b.admit(&S, T0 + 10_010).1, Admission::Probe);
    }

    #[test]
    fn a_request_carrying_on_while_open_closes_it_on_success_only() {
        let b = fail(Breaker::default(), T0, 3);
        let still = b.record(&S, T0 + 5, true, Report::Failed);
        assert_eq!(still, b, "a failure changes nothing while open");
        let closed = b.record(&S, T0 + 6, true, Report::Healthy);
        assert_eq!(closed.admit(&S, T0 + 7).1, Admission::Allowed);
    }

    #[test]
    fn zero_failures_turns_it_off() {
        let off = BreakerSettings { failures: 0, ..S };
        let b = (0..100).fold(Breaker::default(), |b, _| {
            b.record(&off, T0, false, Report::Failed)
        });
        assert_eq!(b.admit(&off, T0).1, Admission::Allowed);
        assert!(b.is_available(&off, T0));
    }

    #[test]
    fn a_long_configured_cooldown_is_not_cut_to_sixty_seconds() {
        let long = BreakerSettings {
            failures: 1,
            cooldown_ms: 90_000,
        };
        let b = Breaker::default().record(&long, T0, false, Report::Failed);
        let (b, _) = b.admit(&long, T0 + 90_000);
        let b = b.record(&long, T0 + 90_000, true, Report::Failed);
        assert_eq!(
            b.admit(&long, T0 + 90_000).1,
            Admission::Refused {
                until_ms: T0 + 180_000
            }
        );
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn shared_breakers_report_availability_and_the_first_reopening() {
        let bs = Breakers::new(S, 3);
        let ab = names(&["a", "b"]);
        for _ in 0..3 {
            bs.record("a", T0, false, Report::Failed);
        }
        assert_eq!(bs.available(T0 + 1, &ab), [false, true]);
        for _ in 0..3 {
            bs.record("b", T0 + 4_000, false, Report::Failed);
        }
        assert_eq!(bs.available(T0 + 5_000, &ab), [false, false]);
        assert_eq!(bs.wait_until_first_reopens(T0 + 5_000, &ab), 5_000);
        assert_eq!(bs.available(T0 + 10_000, &ab), [true, false]);
    }

    /// A refreshed list (`UPSTREAMS_SECRET_ARN`) may reorder upstreams: the state follows the
    /// name, not the position; an upstream dropped from the list loses its state.
    #[test]
    fn state_follows_the_name_across_a_reordered_or_shortened_list() {
        let bs = Breakers::new(S, 3);
        for _ in 0..3 {
            bs.record("primary", T0, false, Report::Failed);
        }
        bs.record("backup", T0, false, Report::Failed);
        assert_eq!(
            bs.available(T0 + 1, &names(&["primary", "backup"])),
            [false, true]
        );
        let reordered = names(&["backup", "primary"]);
        assert_eq!(bs.available(T0 + 1, &reordered), [true, false]);
        assert_eq!(bs.wait_until_first_reopens(T0 + 1, &reordered), 0);
        assert!(matches!(
            bs.admit("primary", T0 + 1),
            Admission::Refused { .. }
        ));
        // backup's one failure is still counted under its name: two more open it.
        bs.record("backup", T0 + 2, false, Report::Failed);
        bs.record("backup", T0 + 2, false, Report::Failed);
        assert_eq!(bs.available(T0 + 3, &reordered), [false, false]);
        // primary leaves the list, then comes back: it starts closed.
        bs.keep_only(&names(&["backup"]));
        assert_eq!(bs.available(T0 + 3, &reordered), [false, true]);
        assert_eq!(bs.admit("primary", T0 + 3), Admission::Allowed);
        assert!(matches!(
            bs.admit("backup", T0 + 3),
            Admission::Refused { .. }
        ));
    }

    #[test]
    fn closed_breakers_with_no_failure_keep_no_entry() {
        let bs = Breakers::new(S, 1);
        bs.record("a", T0, false, Report::Failed);
        bs.record("a", T0, false, Report::Healthy);
        bs.record("b", T0, false, Report::Healthy);
        assert!(bs.with(|s| s.is_empty()));
    }

    /// Many invocations at once, on real threads, right after the cooldown: exactly one probes.
    #[test]
    fn concurrent_invocations_get_exactly_one_probe() {
        for round in 0..50 {
            let bs = Arc::new(Breakers::new(S, 1));
            for _ in 0..3 {
                bs.record("u", T0, false, Report::Failed);
            }
            let barrier = Arc::new(std::sync::Barrier::new(8));
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (bs, barrier) = (bs.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        bs.admit("u", T0 + 10_000 + round)
                    })
                })
                .collect();
            let admissions: Vec<Admission> =
                handles.into_iter().map(|h| h.join().unwrap()).collect();
            let probes = admissions
                .iter()
                .filter(|a| **a == Admission::Probe)
                .count();
            assert_eq!(probes, 1, "{admissions:?}");
            assert!(
                admissions
                    .iter()
                    .all(|a| matches!(a, Admission::Probe | Admission::Refused { .. }))
            );
            // Concurrent failures while the probe is out do not reopen or double anything.
            bs.record("u", T0 + 10_050, false, Report::Failed);
            bs.record("u", T0 + 10_100, true, Report::Healthy);
            assert_eq!(bs.admit("u", T0 + 10_101), Admission::Allowed);
        }
    }

    /// Concurrent failures across requests are all counted (no lost updates).
    #[test]
    fn concurrent_failures_are_all_counted() {
        let settings = BreakerSettings {
            failures: 400,
            cooldown_ms: 1_000,
        };
        let bs = Arc::new(Breakers::new(settings, 1));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let bs = bs.clone();
                std::thread::spawn(move || {
                    for _ in 0..99 {
                        bs.record("u", T0, false, Report::Failed);
                    }
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(bs.admit("u", T0), Admission::Allowed, "396 < 400");
        for _ in 0..4 {
            bs.record("u", T0, false, Report::Failed);
        }
        assert!(matches!(bs.admit("u", T0), Admission::Refused { .. }));
    }
}
