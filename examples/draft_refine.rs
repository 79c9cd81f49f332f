//! A handler of your own built on this crate, not the proxy: answer a question with two OpenAI
//! calls under one invocation deadline — a draft, then a refinement of that draft — and skip the
//! refinement, with a clear note, when too little time is left for it.
//!
//! It uses the crate's library face: [`Deadline`] (the time this invocation really has),
//! [`RetryEngine`] (retries with jitter, never past the deadline) and [`UpstreamClient`] (one
//! attempt = one HTTP exchange, classified).
//!
//! Event `{"question": "…"}` → `{"answer": "…", "refined": true|false, "note": "…"}`, or
//! `{"error": {"code": "…", "message": "…"}}` when not even the draft could be had.
//! Settings: `OPENAI_API_KEY`, `OPENAI_BASE_URL` (default `https://api.openai.com/v1`),
//! `MODEL` (default `gpt-4o-mini`). Locally, against the simulator:
//! `OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=sk-sim cargo lambda watch --example draft_refine`.

use bytes::Bytes;
use lambda_runtime::{LambdaEvent, service_fn};
use openai_lambda_proxy::{
    Attempt, AttemptOutcome, BoxError, Clock, Deadline, DeadlineSettings, FastRandJitter,
    ForwardRequest, KeySource, RetryEngine, RetryPolicy, RunOutcome, SystemClock, TokioSleeper,
    UpstreamClient, UpstreamKind, UpstreamSpec,
};
use serde_json::{Value, json};

/// A refinement never gets less than this; below it, the draft is the answer.
const MIN_REFINE_MS: u64 = 1_500;
/// Longest answer body read from OpenAI.
const MAX_BODY_BYTES: usize = 1 << 20;

/// What to do once the draft is in (a pure decision: no clock, no I/O).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterDraft {
    /// Refine, within the time left.
    Refine { within_ms: u64 },
    /// Answer with the draft: `left_ms` is less than the `needed_ms` a refinement likely takes.
    Skip { left_ms: u64, needed_ms: u64 },
}

/// A refinement rereads and rewrites the draft, so it likely takes about as long as the draft
/// took, and never less than [`MIN_REFINE_MS`].
pub fn after_draft(now_ms: u64, deadline_ms: u64, draft_took_ms: u64) -> AfterDraft {
    let left_ms = deadline_ms.saturating_sub(now_ms);
    let needed_ms = draft_took_ms.max(MIN_REFINE_MS);
    if left_ms >= needed_ms {
        AfterDraft::Refine { within_ms: left_ms }
    } else {
        AfterDraft::Skip { left_ms, needed_ms }
    }
}

/// Everything a call needs, built once per cold start.
pub struct App {
    pub client: UpstreamClient,
    /// Where the calls go (an OpenAI-compatible API; Azure would be `UpstreamKind::Azure`).
    pub upstream: UpstreamSpec,
    pub api_key: String,
    pub model: String,
    pub engine: RetryEngine,
}

impl App {
    pub fn from_env() -> Result<App, BoxError> {
        let base =
            std::env::var("OPENAI_BASE_URL").unwrap_or_else(|_| "https://api.openai.com/v1".into());
        let api_key = std::env::var("OPENAI_API_KEY")?;
        Ok(App {
            client: UpstreamClient::new(2_000, MAX_BODY_BYTES)?,
            upstream: openai(&base, &api_key),
            api_key,
            model: std::env::var("MODEL").unwrap_or_else(|_| "gpt-4o-mini".into()),
            engine: RetryEngine {
                policy: RetryPolicy {
                    max_attempts: 3,
                    base_delay_ms: 250,
                    max_delay_ms: 2_000,
                },
                min_attempt_ms: 500,
                attempt_timeout_ms: None,
            },
        })
    }

    /// Draft, then refine if the deadline leaves room for it.
    pub async fn answer(&self, question: &str, deadline_ms: u64) -> Value {
        let clock = SystemClock;
        let started = clock.now_ms();
        let draft = match self.chat(question, None, deadline_ms).await {
            Ok(text) => text,
            Err(message) => return json!({"error": {"code": "draft_failed", "message": message}}),
        };
        let now = clock.now_ms();
        match after_draft(now, deadline_ms, now.saturating_sub(started)) {
            AfterDraft::Skip { left_ms, needed_ms } => json!({
                "answer": draft,
                "refined": false,
                "note": format!("refinement skipped: {left_ms} ms left before the deadline, a refinement needs about {needed_ms} ms; this is the draft"),
            }),
            AfterDraft::Refine { .. } => match self.chat(question, Some(&draft), deadline_ms).await
            {
                Ok(better) => json!({"answer": better, "refined": true, "note": "draft refined"}),
                Err(message) => json!({
                    "answer": draft,
                    "refined": false,
                    "note": format!("refinement failed ({message}); this is the draft"),
                }),
            },
        }
    }

    /// One chat completion, retried within `deadline_ms`; the answer's text or why there is none.
    async fn chat(
        &self,
        question: &str,
        draft: Option<&str>,
        deadline_ms: u64,
    ) -> Result<String, String> {
        let mut messages = vec![json!({"role": "user", "content": question})];
        if let Some(draft) = draft {
            messages.push(json!({"role": "assistant", "content": draft}));
            messages.push(json!({"role": "user", "content": "Check that answer and improve it. Reply with the improved answer only."}));
        }
        let request = ForwardRequest {
            method: reqwest::Method::POST,
            path: "/chat/completions",
            body: Bytes::from(json!({"model": self.model, "messages": messages}).to_string()),
            content_type: None,
            idempotency_key: None,
            client_request_id: format!("draft-refine-{}", fastrand::u64(..)),
        };
        let body = request.body.clone();
        let run = self
            .engine
            .run(
                deadline_ms,
                &SystemClock,
                &TokioSleeper,
                &mut FastRandJitter,
                |plan| {
                    self.client.send(Attempt {
                        req: &request,
                        upstream: &self.upstream,
                        api_key: &self.api_key,
                        body: body.clone(),
                        timeout_ms: plan.timeout_ms,
                    })
                },
                |_| {},
            )
            .await;
        match run.outcome {
            RunOutcome::Answer(reply) if reply.status == 200 => {
                let body: Value = serde_json::from_slice(&reply.body).map_err(|e| e.to_string())?;
                body["choices"][0]["message"]["content"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| "OpenAI's answer has no message content".to_owned())
            }
            RunOutcome::Answer(reply) => Err(format!(
                "OpenAI answered {}",
                AttemptOutcome::Reply(reply).describe()
            )),
            RunOutcome::GaveUp { reason, last, .. } => Err(format!(
                "OpenAI failed: {} ({})",
                last.describe(),
                reason.as_str()
            )),
            RunOutcome::Unsendable { detail } => {
                Err(format!("the request cannot be sent: {detail}"))
            }
            // Only a routed run (several upstreams with breakers) refuses this way.
            RunOutcome::CircuitOpen { retry_after_ms } => Err(format!(
                "every upstream is cooling down for {retry_after_ms} ms"
            )),
            RunOutcome::NoTimeToStart { remaining_ms } => Err(format!(
                "only {remaining_ms} ms left, too little to call OpenAI"
            )),
        }
    }
}

/// An OpenAI-compatible upstream at `base_url`, the model names as the caller gives them.
pub fn openai(base_url: &str, api_key: &str) -> UpstreamSpec {
    UpstreamSpec {
        name: "openai".into(),
        base_url: base_url.trim_end_matches('/').into(),
        kind: UpstreamKind::OpenAi,
        key: KeySource::Env(api_key.into()),
        organization: None,
        project: None,
        models: Default::default(),
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let app = &*Box::leak(Box::new(App::from_env()?));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        // The invocation's own deadline; no gateway in front here (a function URL, say).
        let budget = Deadline::compute(
            event.context.deadline,
            None,
            SystemClock.now_ms(),
            &DeadlineSettings::default(),
        );
        let question = event.payload["question"].as_str().unwrap_or_default();
        if question.is_empty() {
            return Ok::<Value, BoxError>(json!({"error": {"code": "invalid_request", "message": "the event needs a non-empty \"question\" string"}}));
        }
        Ok(app.answer(question, budget.deadline_ms).await)
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use openai_lambda_proxy::epoch_ms;
    use openai_simulator::{Simulator, parse_script};

    #[test]
    fn refines_when_the_time_left_covers_what_the_draft_took() {
        let now = 1_000_000;
        assert_eq!(
            after_draft(now, now + 5_000, 2_000),
            AfterDraft::Refine { within_ms: 5_000 }
        );
        // Exactly enough is enough.
        assert_eq!(
            after_draft(now, now + 2_000, 2_000),
            AfterDraft::Refine { within_ms: 2_000 }
        );
    }

    #[test]
    fn skips_when_less_is_left_than_the_draft_took_or_the_minimum() {
        let now = 1_000_000;
        assert_eq!(
            after_draft(now, now + 1_999, 2_000),
            AfterDraft::Skip {
                left_ms: 1_999,
                needed_ms: 2_000
            }
        );
        // A fast draft still leaves a refinement its minimum.
        assert_eq!(
            after_draft(now, now + 1_000, 10),
            AfterDraft::Skip {
                left_ms: 1_000,
                needed_ms: MIN_REFINE_MS
            }
        );
        // Past the deadline: nothing left, never an underflow.
        assert_eq!(
            after_draft(now + 10, now, 10),
            AfterDraft::Skip {
                left_ms: 0,
                needed_ms: MIN_REFINE_MS
            }
        );
    }

    async fn app(script: &str) -> (Simulator, App) {
        let sim = Simulator::start(0).await.unwrap();
        sim.set_script(parse_script(script).unwrap());
        let app = App {
            client: UpstreamClient::new(1_000, MAX_BODY_BYTES).unwrap(),
            upstream: openai(&sim.base_url(), "sk-sim-test"),
            api_key: "sk-sim-test".into(),
            model: "gpt-4o-mini".into(),
            engine: RetryEngine {
                policy: RetryPolicy {
                    max_attempts: 3,
                    base_delay_ms: 20,
                    max_delay_ms: 100,
                },
                min_attempt_ms: 200,
                attempt_timeout_ms: None,
            },
        };
        (sim, app)
    }

    #[tokio::test]
    async fn with_time_to_spare_the_draft_is_refined_in_a_second_call() {
        // The draft is retried once (a 500), the refinement goes through.
        let (sim, app) = app("500,ok,ok").await;
        let out = app
            .answer("Why is the sky blue?", epoch_ms() + 20_000)
            .await;
        assert_eq!(out["refined"], true, "{out}");
        let requests = sim.requests();
        assert_eq!(requests.len(), 3);
        let refine = requests[2].json().unwrap();
        let draft = refine["messages"][1]["content"].as_str().unwrap();
        assert!(!draft.is_empty() && refine["messages"][1]["role"] == "assistant");
        assert!(out["answer"].as_str().is_some_and(|a| !a.is_empty()));
    }

    #[tokio::test]
    async fn a_slow_draft_leaves_no_time_and_the_refinement_is_skipped_with_a_note() {
        // The draft takes 2 s (or more, on a loaded machine) of a 3.5 s budget: at most 1.5 s
        // is left, less than the 2 s a refinement is expected to take.
        let (sim, app) = app("delay=2000,ok").await;
        let deadline = epoch_ms() + 3_500;
        let out = app.answer("Why is the sky blue?", deadline).await;
        assert!(epoch_ms() < deadline, "answered after the deadline");
        assert_eq!(out["refined"], false, "{out}");
        let note = out["note"].as_str().unwrap();
        assert!(
            note.starts_with("refinement skipped:") && note.contains("this is the draft"),
            "{note}"
        );
        assert!(out["answer"].as_str().is_some_and(|a| !a.is_empty()));
        assert_eq!(sim.requests().len(), 1, "the refinement was not sent");
    }

    #[tokio::test]
    async fn no_draft_at_all_is_a_clear_error_before_the_deadline() {
        let (sim, app) = app("500,500,500,500").await;
        let deadline = epoch_ms() + 5_000;
        let out = app.answer("Why is the sky blue?", deadline).await;
        assert!(epoch_ms() < deadline);
        assert_eq!(out["error"]["code"], "draft_failed", "{out}");
        let message = out["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("500") && message.contains("attempts exhausted"),
            "{message}"
        );
        assert_eq!(sim.requests().len(), 3, "RETRY: max_attempts");
    }
}
