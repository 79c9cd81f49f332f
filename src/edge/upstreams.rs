//! The §11 part of the edge: which upstreams serve a request and with which keys, the routed
//! retry run (with the key refresh after a 401), and what the caller sees of it: the
//! `x-proxy-*` headers and `upstream.by_upstream`. Never a URL, query string or key.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::Value;

use super::finish::log_attempt;
use super::routes::Route;
use super::{Proxy, Ready};
use crate::config::{ConfigError, KeySource, Settings};
use crate::deadline::Deadline;
use crate::retry::{AttemptPlan, AttemptRecord, Clock, RetryRun, RunOutcome};
use crate::upstream::{Attempt, ForwardRequest, LiveStream};
use crate::upstreams::fallback::switches;
use crate::upstreams::naming::{Naming, naming};
use crate::upstreams::routing::Router;
use crate::upstreams::{UpstreamSpec, UpstreamsSource};

/// The request as the routed run sees it.
pub(super) struct Routed<'a> {
    pub route: &'a Route,
    pub forward: &'a ForwardRequest,
    pub list: &'a [UpstreamSpec],
    /// The requested model and its `MODEL_FALLBACKS`; `None` for a request without a model.
    pub models: Option<Vec<String>>,
    pub stream: bool,
    /// Streamed for real (spec §10): each attempt may commit to a stream; the last committed one
    /// is kept here.
    pub live: Option<Mutex<Option<LiveStream>>>,
}

/// A committed upstream stream still to be forwarded, and the upstream sending it as messages
/// name it (for its error event, should it break).
pub(super) struct Committed {
    pub live: LiveStream,
    pub upstream: Naming,
}

impl Routed<'_> {
    pub fn names(&self) -> Vec<String> {
        self.list.iter().map(|u| u.name.clone()).collect()
    }

    /// The committed stream, if `run` ended on one, with the upstream that sends it.
    pub fn take_live(&self, run: &RetryRun) -> Option<Committed> {
        let slot = self.live.as_ref()?;
        let live = slot.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        let upstream = run.attempts.last().map(|a| a.target.upstream);
        Some(Committed {
            live,
            upstream: naming(self.list, upstream.as_slice()),
        })
    }

    /// The body of an attempt at `spec` for the model at `model_index` of the chain: the caller's
    /// bytes as they are when that is the model the caller named (the usual case: no second JSON
    /// parse of what may be a long conversation), else with `model` rewritten.
    pub fn body_for(&self, spec: &UpstreamSpec, model_index: usize) -> Bytes {
        let body = &self.forward.body;
        match self.model(model_index).map(|m| spec.upstream_model(m)) {
            Some(wanted) if Some(wanted) != self.model(0) => with_model(body, wanted),
            _ => body.clone(),
        }
    }

    /// The model an attempt asks for (before the upstream's own model map).
    pub fn model(&self, index: usize) -> Option<&str> {
        self.models
            .as_ref()
            .and_then(|m| m.get(index))
            .map(String::as_str)
    }
}

impl Proxy {
    /// The upstream list: from the settings, or read from `UPSTREAMS_SECRET_ARN` (cached; a
    /// refreshed list may drop upstreams, and their breakers go with them).
    pub(super) async fn upstream_list(
        &self,
        ready: &Ready,
        within: std::time::Duration,
    ) -> Result<Arc<[UpstreamSpec]>, ConfigError> {
        match &ready.settings.upstreams {
            UpstreamsSource::List(list) => Ok(list.clone()),
            UpstreamsSource::SecretArn(arn) => {
                let list = self.secrets.upstreams(arn, within).await?;
                let names: Vec<&str> = list.iter().map(|u| u.name.as_str()).collect();
                ready.breakers.keep_only(&names);
                Ok(list)
            }
        }
    }

    /// Every upstream's key (cached); `rejected`: that upstream answered 401, read its key again.
    pub(super) async fn upstream_keys(
        &self,
        settings: &Settings,
        list: &[UpstreamSpec],
        rejected: Option<usize>,
        within: std::time::Duration,
    ) -> Result<Vec<Arc<str>>, ConfigError> {
        let mut keys = Vec::with_capacity(list.len());
        for (i, spec) in list.iter().enumerate() {
            let again = rejected == Some(i);
            // The §7 key keeps its own setting name (OPENAI_API_KEY_SECRET_ARN) in errors.
            let key = match (&spec.key, &settings.openai_key) {
                (KeySource::SecretArn(a), Some(KeySource::SecretArn(b))) if a == b => {
                    self.secrets.openai_key(&spec.key, again, within).await?
                }
                _ => self.secrets.upstream_key(&spec.key, again, within).await?,
            };
            keys.push(key);
        }
        Ok(keys)
    }

    /// Runs the retry engine over the upstreams; after an upstream 401 with a key from Secrets
    /// Manager, reads that key again once (rotation) and runs again with what is left.
    pub(super) async fn call_upstream(
        &self,
        ready: &Ready,
        req: &Routed<'_>,
        keys: Vec<Arc<str>>,
        deadline: &Deadline,
    ) -> RetryRun {
        let run = self.run_engine(ready, req, &keys, deadline, 0).await;
        let rejected = match (&run.outcome, run.attempts.last()) {
            (RunOutcome::Answer(r), Some(last)) if r.status == 401 => last.target.upstream,
            _ => return run,
        };
        if !matches!(req.list[rejected].key, KeySource::SecretArn(_)) {
            return run;
        }
        self.with_fresh_key(ready, req, &keys, deadline, run, rejected)
            .await
    }

    /// One run of the engine; `offset`: attempts already made (after a key refresh), which
    /// spend from the same `RETRY_MAX_ATTEMPTS` (and deadline).
    async fn run_engine(
        &self,
        ready: &Ready,
        req: &Routed<'_>,
        keys: &[Arc<str>],
        deadline: &Deadline,
        offset: u32,
    ) -> RetryRun {
        let settings = &ready.settings;
        let engine = settings.retry_engine().after_attempts(offset);
        let router = Router {
            breakers: &ready.breakers,
            latency: &ready.latency,
            names: req.names(),
            models: req.models.clone().unwrap_or_else(|| vec![String::new()]),
            route: req.route.path,
            stream: req.stream,
            fallback_after: settings.fallback_after_failures,
            skip_hopeless: settings.skip_hopeless_attempts,
        };
        let names = router.names.clone();
        let time = &self.time;
        engine
            .run_routed(
                deadline.deadline_ms,
                time,
                time,
                &mut &*time,
                &router,
                |plan| self.attempt(ready, req, keys, plan),
                |r| log_attempt(req, &names, r, offset),
            )
            .await
    }

    /// After upstream `rejected` refused its key (401): reads the key again and, if it was
    /// rotated and an attempt is left, runs again with it; the two runs as one.
    async fn with_fresh_key(
        &self,
        ready: &Ready,
        req: &Routed<'_>,
        keys: &[Arc<str>],
        deadline: &Deadline,
        mut run: RetryRun,
        rejected: usize,
    ) -> RetryRun {
        let (settings, upstream) = (&ready.settings, &req.list[rejected].name);
        let within = deadline.time_left(self.time.now_ms());
        let Ok(fresh) = self
            .upstream_keys(settings, req.list, Some(rejected), within)
            .await
        else {
            return run;
        };
        if fresh[rejected] == keys[rejected] {
            // Not rotated: the same key would be rejected again.
            tracing::warn!(%upstream, "upstream rejected the key (401); the secret still holds the same key");
            return run;
        }
        let offset = run.attempts.len() as u32;
        if offset >= settings.retry_max_attempts {
            tracing::warn!(%upstream, "upstream rejected the key (401); read a new one from Secrets Manager for the next request (no attempt left for this one)");
            return run;
        }
        tracing::warn!(%upstream, "upstream rejected the key (401); read it again from Secrets Manager and retrying once");
        let second = self.run_engine(ready, req, &fresh, deadline, offset).await;
        if matches!(second.outcome, RunOutcome::NoTimeToStart { .. }) {
            return run;
        }
        run.attempts
            .extend(second.attempts.into_iter().map(|mut a| {
                a.attempt += offset;
                a
            }));
        run.outcome = second.outcome;
        // Counted over both runs: the second may start where the first did not end.
        run.switches = switches(run.attempts.iter().map(|a| a.target));
        run.circuit_open |= second.circuit_open;
        run.skipped += second.skipped;
        run.elapsed_ms = self.time.now_ms().saturating_sub(deadline.started_ms);
        run
    }

    /// One attempt: the planned upstream, its key, and the body with the model it expects.
    fn attempt<'a>(
        &'a self,
        ready: &'a Ready,
        req: &'a Routed<'_>,
        keys: &[Arc<str>],
        plan: AttemptPlan,
    ) -> impl Future<Output = crate::retry::AttemptOutcome> + 'a {
        let spec = &req.list[plan.target.upstream];
        let key = keys[plan.target.upstream].clone();
        let body = req.body_for(spec, plan.target.model);
        async move {
            let client = &ready.upstream;
            let attempt = Attempt {
                req: req.forward,
                upstream: spec,
                api_key: &key,
                body,
                timeout_ms: plan.timeout_ms,
            };
            let Some(live) = &req.live else {
                return client.send(attempt).await;
            };
            let (outcome, stream) = client.send_stream(attempt).await;
            *live.lock().unwrap_or_else(|e| e.into_inner()) = stream;
            outcome
        }
    }
}

/// The request body with `model` set to `model`; the same bytes when it already is.
pub(super) fn with_model(body: &Bytes, model: &str) -> Bytes {
    let Ok(Value::Object(mut object)) = serde_json::from_slice::<Value>(body) else {
        return body.clone();
    };
    if object.get("model").and_then(Value::as_str) == Some(model) {
        return body.clone();
    }
    object.insert("model".into(), Value::String(model.to_owned()));
    Bytes::from(Value::Object(object).to_string())
}

/// Attempts per upstream name, in list order, only upstreams that were tried.
pub(super) fn by_upstream(attempts: &[AttemptRecord], names: &[String]) -> Vec<(String, u32)> {
    names
        .iter()
        .enumerate()
        .filter_map(|(i, name)| {
            let n = attempts.iter().filter(|a| a.target.upstream == i).count() as u32;
            (n > 0).then(|| (name.clone(), n))
        })
        .collect()
}

/// `x-proxy-upstream` (the upstream that answered or was tried last), `x-proxy-fallbacks` and,
/// when a fallback model answered, `x-proxy-model`. None when no upstream was called.
pub(super) fn route_headers(run: &RetryRun, req: &Routed<'_>) -> Vec<(&'static str, String)> {
    let Some(last) = run.attempts.last() else {
        return Vec::new();
    };
    let mut headers = vec![("x-proxy-fallbacks", run.switches.to_string())];
    if let Some(spec) = req.list.get(last.target.upstream) {
        headers.push(("x-proxy-upstream", spec.name.clone()));
    }
    if let (RunOutcome::Answer(_), true) = (&run.outcome, last.target.model > 0)
        && let Some(model) = req.model(last.target.model)
    {
        headers.push(("x-proxy-model", model.to_owned()));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstreams::fallback::Target;

    #[test]
    fn the_model_is_rewritten_only_when_it_differs() {
        let body = Bytes::from(r#"{"model":"gpt-4o","messages":[],"stream":true}"#);
        assert_eq!(with_model(&body, "gpt-4o"), body);
        let v: Value = serde_json::from_slice(&with_model(&body, "my-deployment")).unwrap();
        assert_eq!(v["model"], "my-deployment");
        assert_eq!(v["stream"], true);
        assert_eq!(v["messages"], serde_json::json!([]));
        let not_json = Bytes::from("nope");
        assert_eq!(with_model(&not_json, "x"), not_json);
    }

    /// The caller's bytes go as they are (the same buffer, key order and spacing kept) unless
    /// the upstream's model map or a model fallback asks for another model.
    #[test]
    fn each_attempt_sends_the_model_its_upstream_expects() {
        let list = crate::upstreams::parse_upstreams(
            "UPSTREAMS",
            r#"[{"name":"a","base_url":"http://127.0.0.1:9/v1","api_key":"k"},
                {"name":"az","kind":"azure","base_url":"http://127.0.0.1:9/openai/v1","api_key":"k",
                 "models":{"gpt-4o":"dep-4o","gpt-4o-mini":"dep-mini"}}]"#,
        )
        .unwrap();
        let body = Bytes::from(r#"{ "messages": [], "model": "gpt-4o" }"#);
        let forward = ForwardRequest {
            method: http::Method::POST,
            path: "/chat/completions",
            body: body.clone(),
            content_type: None,
            idempotency_key: None,
            client_request_id: "r".into(),
        };
        let req = Routed {
            route: super::super::routes::find("/v1/chat/completions").unwrap(),
            forward: &forward,
            list: &list,
            models: Some(vec!["gpt-4o".into(), "gpt-4o-mini".into()]),
            stream: false,
            live: None,
        };
        let sent = req.body_for(&list[0], 0);
        assert_eq!(sent.as_ptr(), body.as_ptr(), "a copy of an unchanged body");
        let model = |b: Bytes| serde_json::from_slice::<Value>(&b).unwrap()["model"].clone();
        assert_eq!(model(req.body_for(&list[1], 0)), "dep-4o");
        assert_eq!(model(req.body_for(&list[0], 1)), "gpt-4o-mini");
        assert_eq!(model(req.body_for(&list[1], 1)), "dep-mini");
        let no_model = Routed {
            models: None,
            ..req
        };
        assert_eq!(no_model.body_for(&list[1], 0).as_ptr(), body.as_ptr());
    }

    #[test]
    fn attempts_are_counted_per_upstream_name() {
        let record = |upstream| AttemptRecord {
            attempt: 1,
            target: Target { upstream, model: 0 },
            status: Some(500),
            error_kind: None,
            latency_ms: 1,
            upstream_request_id: None,
            decision: crate::retry::Decision::Retry,
            reason: String::new(),
            next_delay_ms: None,
            remaining_ms: 0,
            expected_ms: None,
        };
        let names = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let attempts = [record(0), record(0), record(2)];
        assert_eq!(
            by_upstream(&attempts, &names),
            [("a".to_owned(), 2), ("c".to_owned(), 1)]
        );
    }
}
