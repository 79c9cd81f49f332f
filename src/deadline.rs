//! The deadline budget (spec §4): how long this invocation may spend on the upstream.
//!
//! `deadline = min(Lambda deadline − flush reserve, gateway start + gateway timeout) −
//! DEADLINE_MARGIN_MS`, the flush reserve being [`METRICS_FLUSH_RESERVE_MS`] with
//! `METRICS_BACKEND=cloudwatch` and 0 otherwise.
//! Local emulators lie (a constant Lambda deadline of 600000, stale `timeEpoch` in sample
//! events), so implausible values are replaced or ignored; real ones are never second-guessed.

/// Which front door delivered the event; decides the default gateway timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatewayKind {
    /// API Gateway HTTP API (payload 2.0): 30 s integration timeout.
    HttpApiV2,
    /// API Gateway REST API (payload 1.0): 29 s integration timeout.
    RestV1,
    /// Lambda function URL: no gateway timeout of its own.
    FunctionUrl,
    /// Application Load Balancer target group: no gateway timeout of its own (the load
    /// balancer's idle timeout is the client's business).
    Alb,
    /// API Gateway WebSocket API: 29 s integration timeout. Not a route this proxy serves.
    WebSocket,
}

impl GatewayKind {
    pub fn default_timeout_ms(self) -> Option<u64> {
        match self {
            GatewayKind::HttpApiV2 => Some(30_000),
            GatewayKind::RestV1 | GatewayKind::WebSocket => Some(29_000),
            GatewayKind::FunctionUrl | GatewayKind::Alb => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GatewayKind::HttpApiV2 => "apigw_http_v2",
            GatewayKind::RestV1 => "apigw_rest_v1",
            GatewayKind::FunctionUrl => "function_url",
            GatewayKind::Alb => "alb",
            GatewayKind::WebSocket => "apigw_websocket",
        }
    }
}

/// Time kept free before the Lambda deadline for the metrics flush that runs after the
/// answer (`METRICS_BACKEND=cloudwatch`: one `PutMetricData`, bounded by its timeout). Lambda's
/// timeout covers that post-response work too: an answer that used the whole Lambda deadline
/// would leave the flush to be killed mid-call ("Task timed out"), losing the invocation's
/// metrics and the warm environment. Only binds where the Lambda deadline does (function URLs,
/// or a Lambda timeout shorter than the gateway's plus this reserve).
pub const METRICS_FLUSH_RESERVE_MS: u64 =
    crate::telemetry::cloudwatch::PUT_TIMEOUT.as_millis() as u64;

/// The settings the budget depends on.
#[derive(Clone, Copy, Debug)]
pub struct DeadlineSettings {
    pub margin_ms: u64,
    pub fallback_timeout_ms: u64,
    pub gateway_timeout_ms: Option<u64>,
    /// Kept free before a real Lambda deadline for work after the answer
    /// ([`METRICS_FLUSH_RESERVE_MS`] when metrics are flushed after the response, else 0).
    pub flush_reserve_ms: u64,
}

/// The spec's defaults (`DEADLINE_MARGIN_MS`, `FALLBACK_TIMEOUT_MS`, `GATEWAY_TIMEOUT_MS` unset).
impl Default for DeadlineSettings {
    fn default() -> Self {
        DeadlineSettings {
            margin_ms: 500,
            fallback_timeout_ms: 30_000,
            gateway_timeout_ms: None,
            flush_reserve_ms: 0,
        }
    }
}

/// The time this invocation has, fixed when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    /// Epoch ms after which no attempt or sleep may still be running.
    pub deadline_ms: u64,
    /// Epoch ms when the invocation started.
    pub started_ms: u64,
    /// `deadline − start`, 0 when already past.
    pub budget_ms: u64,
    /// The Lambda deadline was not a plausible epoch time and `FALLBACK_TIMEOUT_MS` was used.
    pub lambda_deadline_replaced: bool,
    /// The event's gateway start time was stale or in the future and was ignored.
    pub gateway_start_ignored: bool,
}

/// A real Lambda deadline is at most 15 minutes ahead; allow a little clock skew on top.
const MAX_PLAUSIBLE_LAMBDA_AHEAD_MS: u64 = 15 * 60 * 1000 + 60_000;
/// A gateway start further in the future than this is a clock we cannot trust.
const MAX_GATEWAY_START_AHEAD_MS: u64 = 5_000;

impl Deadline {
    /// Computes the budget from the Lambda context deadline, the gateway start time carried by the
    /// event (`requestContext.timeEpoch` / `requestTimeEpoch`) and the clock.
    pub fn compute(
        lambda_deadline_ms: u64,
        gateway: Option<(GatewayKind, Option<u64>)>,
        now_ms: u64,
        settings: &DeadlineSettings,
    ) -> Deadline {
        let plausible = lambda_deadline_ms > now_ms
            && lambda_deadline_ms <= now_ms + MAX_PLAUSIBLE_LAMBDA_AHEAD_MS;
        // The reserve applies to real deadlines only: an emulator's fallback kills nothing.
        let lambda_deadline = if plausible {
            lambda_deadline_ms.saturating_sub(settings.flush_reserve_ms)
        } else {
            now_ms + settings.fallback_timeout_ms
        };

        let mut gateway_start_ignored = false;
        let mut gateway_deadline = None;
        if let Some((kind, start)) = gateway {
            let timeout = settings.gateway_timeout_ms.or(kind.default_timeout_ms());
            match (timeout, start) {
                (Some(timeout), Some(start)) => {
                    let stale = start.saturating_add(timeout) < now_ms;
                    let future = start > now_ms + MAX_GATEWAY_START_AHEAD_MS;
                    if stale || future {
                        gateway_start_ignored = true;
                    } else {
                        gateway_deadline = Some(start + timeout);
                    }
                }
                // Without a start time the gateway's clock started about when we did.
                (Some(timeout), None) => gateway_deadline = Some(now_ms + timeout),
                (None, _) => {}
            }
        }

        let deadline_ms = gateway_deadline
            .map_or(lambda_deadline, |g| g.min(lambda_deadline))
            .saturating_sub(settings.margin_ms);
        Deadline {
            deadline_ms,
            started_ms: now_ms,
            budget_ms: deadline_ms.saturating_sub(now_ms),
            lambda_deadline_replaced: !plausible,
            gateway_start_ignored,
        }
    }

    /// What is left until the deadline at `now_ms` (at least 1 ms, to bound a call with it).
    pub fn time_left(&self, now_ms: u64) -> std::time::Duration {
        std::time::Duration::from_millis(self.deadline_ms.saturating_sub(now_ms).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_000_000_000;
    const S: DeadlineSettings = DeadlineSettings {
        margin_ms: 500,
        fallback_timeout_ms: 30_000,
        gateway_timeout_ms: None,
        flush_reserve_ms: 0,
    };

    #[test]
    fn http_api_v2_uses_thirty_seconds_from_the_gateway_start() {
        // Lambda allows 60 s, the gateway started 2 s ago: gateway wins.
        let b = Deadline::compute(
            NOW + 60_000,
            Some((GatewayKind::HttpApiV2, Some(NOW - 2_000))),
            NOW,
            &S,
        );
        assert_eq!(b.deadline_ms, NOW - 2_000 + 30_000 - 500);
        assert_eq!(b.budget_ms, 27_500);
        assert!(!b.lambda_deadline_replaced && !b.gateway_start_ignored);
    }

    #[test]
    fn rest_v1_uses_twenty_nine_seconds() {
        let b = Deadline::compute(
            NOW + 60_000,
            Some((GatewayKind::RestV1, Some(NOW - 27_000))),
            NOW,
            &S,
        );
        assert_eq!(b.budget_ms, 1_500);
    }

    #[test]
    fn function_url_has_no_gateway_timeout() {
        let b = Deadline::compute(
            NOW + 60_000,
            Some((GatewayKind::FunctionUrl, Some(NOW))),
            NOW,
            &S,
        );
        assert_eq!(b.budget_ms, 59_500);
    }

    #[test]
    fn alb_has_no_gateway_timeout_unless_one_is_set() {
        let b = Deadline::compute(NOW + 60_000, Some((GatewayKind::Alb, None)), NOW, &S);
        assert_eq!(b.budget_ms, 59_500);
        let s = DeadlineSettings {
            gateway_timeout_ms: Some(10_000),
            ..S
        };
        let b = Deadline::compute(NOW + 60_000, Some((GatewayKind::Alb, None)), NOW, &s);
        assert_eq!(b.budget_ms, 9_500);
    }

    #[test]
    fn flush_reserve_keeps_the_metrics_flush_inside_a_function_url_lambda_deadline() {
        let s = DeadlineSettings {
            flush_reserve_ms: METRICS_FLUSH_RESERVE_MS,
            ..S
        };
        // Function URL, 35 s Lambda timeout: the answer is due 3 s + margin before Lambda's
        // deadline, so the post-response PutMetricData (at most 3 s) still fits.
        let b = Deadline::compute(
            NOW + 35_000,
            Some((GatewayKind::FunctionUrl, Some(NOW))),
            NOW,
            &s,
        );
        assert_eq!(METRICS_FLUSH_RESERVE_MS, 3_000);
        assert_eq!(b.deadline_ms, NOW + 35_000 - 3_000 - 500);
        assert_eq!(b.budget_ms, 31_500);
        // Behind an HTTP API with a 35 s Lambda timeout the gateway still binds: the reserve
        // costs callers nothing there.
        let b = Deadline::compute(
            NOW + 35_000,
            Some((GatewayKind::HttpApiV2, Some(NOW - 200))),
            NOW,
            &s,
        );
        assert_eq!(b.budget_ms, 29_300);
        // With a 31 s Lambda timeout it would bind, and keep the flush inside it too.
        let b = Deadline::compute(
            NOW + 31_000,
            Some((GatewayKind::HttpApiV2, Some(NOW))),
            NOW,
            &s,
        );
        assert_eq!(b.deadline_ms, NOW + 31_000 - 3_000 - 500);
        // An emulator's fallback deadline is not a real one: no reserve.
        let b = Deadline::compute(600_000, None, NOW, &s);
        assert_eq!(b.budget_ms, 29_500);
    }

    #[test]
    fn lambda_deadline_wins_when_it_is_earlier() {
        let b = Deadline::compute(
            NOW + 10_000,
            Some((GatewayKind::HttpApiV2, Some(NOW))),
            NOW,
            &S,
        );
        assert_eq!(b.deadline_ms, NOW + 9_500);
    }

    #[test]
    fn gateway_timeout_setting_overrides_the_kind_and_applies_to_function_urls() {
        let s = DeadlineSettings {
            gateway_timeout_ms: Some(10_000),
            ..S
        };
        for kind in [
            GatewayKind::HttpApiV2,
            GatewayKind::RestV1,
            GatewayKind::FunctionUrl,
        ] {
            let b = Deadline::compute(NOW + 60_000, Some((kind, Some(NOW - 1_000))), NOW, &s);
            assert_eq!(b.budget_ms, 8_500, "{kind:?}");
        }
    }

    #[test]
    fn cargo_lambda_watch_constant_deadline_is_replaced_by_the_fallback() {
        let b = Deadline::compute(600_000, None, NOW, &S);
        assert!(b.lambda_deadline_replaced);
        assert_eq!(b.deadline_ms, NOW + 30_000 - 500);
        // A deadline beyond 15 minutes is not a Lambda deadline either.
        assert!(Deadline::compute(NOW + 3_600_000, None, NOW, &S).lambda_deadline_replaced);
        // A real one is kept to the millisecond.
        let real = Deadline::compute(NOW + 899_999, None, NOW, &S);
        assert!(!real.lambda_deadline_replaced);
        assert_eq!(real.deadline_ms, NOW + 899_499);
    }

    #[test]
    fn stale_or_future_gateway_start_is_ignored() {
        // A sample event from 2020.
        let stale = Deadline::compute(
            600_000,
            Some((GatewayKind::HttpApiV2, Some(1_583_798_639_428))),
            NOW,
            &S,
        );
        assert!(stale.gateway_start_ignored);
        assert_eq!(stale.budget_ms, 29_500);
        // Exactly the gateway timeout in the past is still honoured (budget already spent).
        let edge = Deadline::compute(
            NOW + 60_000,
            Some((GatewayKind::RestV1, Some(NOW - 29_000))),
            NOW,
            &S,
        );
        assert!(!edge.gateway_start_ignored);
        assert_eq!(edge.budget_ms, 0);
        let future = Deadline::compute(
            NOW + 60_000,
            Some((GatewayKind::HttpApiV2, Some(NOW + 5_001))),
            NOW,
            &S,
        );
        assert!(future.gateway_start_ignored);
        let near = Deadline::compute(
            NOW + 60_000,
            Some((GatewayKind::HttpApiV2, Some(NOW + 5_000))),
            NOW,
            &S,
        );
        assert!(!near.gateway_start_ignored);
    }

    #[test]
    fn missing_gateway_start_counts_from_now() {
        let b = Deadline::compute(NOW + 60_000, Some((GatewayKind::HttpApiV2, None)), NOW, &S);
        assert_eq!(b.budget_ms, 29_500);
    }
}
