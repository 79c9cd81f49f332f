//! `METRICS_BACKEND=cloudwatch` (spec §8): one `PutMetricData` call per invocation, made by an
//! internal Lambda extension **after** the response has been posted to the Runtime API and
//! before the extension asks for its next event (Lambda freezes the environment only once the
//! runtime and every extension have called `/next`).
//!
//! How a flush is paired with its invocation:
//!
//! 1. The edge hands the invocation's record to [`CloudWatchMetrics`] (a [`MetricsSink`]); it
//!    waits in the pending queue.
//! 2. [`AfterResponseLayer`], the outermost runtime layer, marks the request id *finished* once
//!    the runtime has posted the response (whatever the handler answered; `/health` records
//!    nothing but still finishes).
//! 3. The extension's INVOKE event carries the same request id. It waits until that id is
//!    finished, then takes **everything** pending (its own record, plus any record of an
//!    invocation whose INVOKE never reached the extension) and publishes each record with one
//!    `PutMetricData` call, bounded by [`PUT_TIMEOUT`].
//! 4. Under `cargo lambda watch` the first INVOKE reaches the extension late or never. A record
//!    whose invocation finished but was not claimed within [`ORPHAN_GRACE`] is published by a
//!    background task instead (real Lambda never gets there: the extension is already waiting).
//! 5. Every id whose record left the queue (claimed, drained by another claim, or published as
//!    an orphan) is remembered as *settled*: an INVOKE that reaches the extension after that
//!    settles at once instead of waiting for a finish that already happened. Any other wait is
//!    bounded by the invocation's deadline, or `FALLBACK_WAIT` when the deadline is bogus
//!    (emulators); a record that comes after a given-up wait is published as an orphan.
//!
//! Records are taken out of the queue under its lock, so each is published exactly once; a
//! failed or timed-out call is logged once at WARN and the record is dropped (the response was
//! sent long before).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use aws_sdk_cloudwatch::Client;
use aws_sdk_cloudwatch::error::DisplayErrorContext;
use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit};
use lambda_extension::{Extension, LambdaEvent, NextEvent};
use lambda_runtime::LambdaInvocation;
use lambda_runtime::tower::{Layer, Service};
use tokio::sync::Notify;

use super::metrics::{DIMENSION, Datum, InvocationMetrics, MetricsSink, Unit};
use crate::BoxError;
use crate::retry::epoch_ms;

/// Longest a `PutMetricData` call may take (connect, SDK retries, answer) before it is given up.
pub const PUT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a finished invocation's record waits for the extension before a background task
/// publishes it (only happens when the extension missed the INVOKE, e.g. `cargo lambda watch`).
pub const ORPHAN_GRACE: Duration = Duration::from_secs(1);
/// The extension's name in the Extensions API.
pub const EXTENSION_NAME: &str = "openai-lambda-proxy-metrics";
/// Finished ids remembered for the extension (only unclaimed ones pile up; sequential
/// invocations leave at most one).
const MAX_FINISHED: usize = 64;
/// Wait limit when the INVOKE's deadline is not a usable epoch time (local emulators). Safe to
/// keep short: a record that arrives after the wait gave up is published as an orphan.
const FALLBACK_WAIT: Duration = Duration::from_secs(30);

/// One invocation's record, waiting to be published.
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    pub request_id: String,
    pub metrics: InvocationMetrics,
    pub at: SystemTime,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    /// Responses posted, records not yet taken.
    finished: VecDeque<String>,
    /// Records taken (published or being published): a later INVOKE has nothing to wait for.
    settled: VecDeque<String>,
}

/// Remembers `id` in a bounded list (sequential invocations leave only a few).
fn remember(list: &mut VecDeque<String>, id: String) {
    if list.len() >= MAX_FINISHED {
        list.pop_front();
    }
    list.push_back(id);
}

impl Queue {
    /// Pure: what an INVOKE for `id` does now. `Some(batch)`: it is settled (its own record and
    /// every other finished one, or nothing when they were taken before); `None`: its
    /// invocation has not finished yet, wait.
    fn claim(&mut self, id: &str) -> Option<Vec<Pending>> {
        if self.finished.iter().any(|f| f == id) {
            // Invocations are sequential: any other finished id was never claimed.
            for f in std::mem::take(&mut self.finished) {
                remember(&mut self.settled, f);
            }
            return Some(std::mem::take(&mut self.pending));
        }
        self.settled.iter().any(|f| f == id).then(Vec::new)
    }
}

/// The pairing of records, finished invocations and INVOKE events (no I/O; see module docs).
#[derive(Default)]
pub struct FlushQueue {
    queue: Mutex<Queue>,
    changed: Notify,
}

impl FlushQueue {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The edge recorded an invocation.
    pub fn push(&self, request_id: &str, metrics: InvocationMetrics) {
        self.lock().pending.push(Pending {
            request_id: request_id.to_owned(),
            metrics,
            at: SystemTime::now(),
        });
    }

    /// The runtime has posted the invocation's response.
    pub fn finish(&self, request_id: &str) {
        remember(&mut self.lock().finished, request_id.to_owned());
        self.changed.notify_waiters();
    }

    /// The extension got the INVOKE for `request_id`: waits until that invocation is finished
    /// (at most `limit`), then takes everything pending.
    pub async fn claim(&self, request_id: &str, limit: Duration) -> Vec<Pending> {
        let give_up = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(batch) = self.lock().claim(request_id) {
                return batch;
            }
            if tokio::time::timeout_at(give_up, notified).await.is_err() {
                tracing::warn!(
                    lambda_request_id = request_id,
                    "invocation did not finish before its deadline; publishing the metrics pending so far"
                );
                return self.take_all();
            }
        }
    }

    /// Everything pending (e.g. on SHUTDOWN).
    pub fn take_all(&self) -> Vec<Pending> {
        std::mem::take(&mut self.lock().pending)
    }

    /// The extension did not claim `request_id` in time: takes its record, if still there.
    pub fn take_orphan(&self, request_id: &str) -> Option<Vec<Pending>> {
        let mut q = self.lock();
        let pos = q.finished.iter().position(|id| id == request_id)?;
        let id = q.finished.remove(pos)?;
        remember(&mut q.settled, id);
        let (mine, rest) = std::mem::take(&mut q.pending)
            .into_iter()
            .partition(|p| p.request_id == request_id);
        q.pending = rest;
        Some(mine)
    }
}

/// Builds the CloudWatch client the first time a record is published.
type MakeClient = Box<dyn FnOnce() -> Client + Send>;

/// Publishes records with `PutMetricData`.
pub struct Publisher {
    client: LazyLock<Client, MakeClient>,
    namespace: String,
    function_name: String,
}

impl Publisher {
    pub fn new(client: Client, namespace: String, function_name: String) -> Publisher {
        Publisher::lazy(Box::new(move || client), namespace, function_name)
    }

    fn lazy(make: MakeClient, namespace: String, function_name: String) -> Publisher {
        Publisher {
            client: LazyLock::new(make),
            namespace,
            function_name,
        }
    }

    /// A client from the shared AWS configuration (region, credentials, `AWS_ENDPOINT_URL`),
    /// with a short connect timeout: metrics never hold an environment for long. The client is
    /// built on the first publish, after the first response, not during init.
    pub fn from_sdk_config(
        config: &aws_config::SdkConfig,
        namespace: String,
        function_name: String,
    ) -> Publisher {
        let config = config.clone();
        let make = move || {
            let timeouts = aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(1))
                .operation_timeout(PUT_TIMEOUT)
                .build();
            let conf = aws_sdk_cloudwatch::config::Builder::from(&config)
                .timeout_config(timeouts)
                .build();
            Client::from_conf(conf)
        };
        Publisher::lazy(Box::new(make), namespace, function_name)
    }

    /// The `MetricData` of one record: every §8 metric, dimension `FunctionName`.
    pub fn metric_data(&self, p: &Pending) -> Vec<MetricDatum> {
        let dimension = Dimension::builder()
            .name(DIMENSION)
            .value(&self.function_name)
            .build();
        p.metrics
            .data()
            .into_iter()
            .map(|Datum { name, unit, values }| {
                let b = MetricDatum::builder()
                    .metric_name(name)
                    .dimensions(dimension.clone())
                    .timestamp(DateTime::from(p.at))
                    .unit(match unit {
                        Unit::Count => StandardUnit::Count,
                        Unit::Milliseconds => StandardUnit::Milliseconds,
                    });
                match values.as_slice() {
                    [one] if name != "UpstreamLatency" => b.value(*one),
                    _ => b.set_values(Some(values)),
                }
                .build()
            })
            .collect()
    }

    /// One `PutMetricData` call per record; a failure is logged once at WARN.
    pub async fn publish(&self, batch: Vec<Pending>) {
        for p in batch {
            let call = self
                .client
                .put_metric_data()
                .namespace(&self.namespace)
                .set_metric_data(Some(self.metric_data(&p)))
                .send();
            let error = match tokio::time::timeout(PUT_TIMEOUT, call).await {
                Ok(Ok(_)) => {
                    tracing::debug!(lambda_request_id = %p.request_id, "metrics published");
                    continue;
                }
                Ok(Err(e)) => DisplayErrorContext(e).to_string(),
                Err(_) => format!("no answer within {} ms", PUT_TIMEOUT.as_millis()),
            };
            tracing::warn!(
                lambda_request_id = %p.request_id,
                namespace = %self.namespace,
                error = %error,
                "PutMetricData failed; the metrics of this invocation are dropped (the response was not affected)"
            );
        }
    }
}

/// The `cloudwatch` backend: the sink the edge records into, and the flushes.
pub struct CloudWatchMetrics {
    queue: FlushQueue,
    publisher: Publisher,
}

impl CloudWatchMetrics {
    pub fn new(publisher: Publisher) -> Arc<CloudWatchMetrics> {
        Arc::new(CloudWatchMetrics {
            queue: FlushQueue::default(),
            publisher,
        })
    }

    /// The response of `request_id` has been posted; schedules the orphan check.
    pub fn invocation_finished(self: &Arc<Self>, request_id: &str) {
        self.queue.finish(request_id);
        let this = self.clone();
        let id = request_id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(ORPHAN_GRACE).await;
            if let Some(batch) = this.queue.take_orphan(&id)
                && !batch.is_empty()
            {
                tracing::debug!(lambda_request_id = %id, "extension missed this INVOKE; publishing from the background");
                this.publisher.publish(batch).await;
            }
        });
    }

    /// The extension's event handler.
    pub async fn on_event(&self, event: NextEvent) {
        match event {
            NextEvent::Invoke(invoke) => {
                let batch = self
                    .queue
                    .claim(
                        &invoke.request_id,
                        wait_limit(invoke.deadline_ms, epoch_ms()),
                    )
                    .await;
                self.publisher.publish(batch).await;
            }
            // Internal extensions do not get SHUTDOWN; publish what is left if one ever comes.
            NextEvent::Shutdown(_) => self.publisher.publish(self.queue.take_all()).await,
        }
    }

    /// Registers the internal extension (must happen before the runtime starts polling).
    pub async fn register_extension(self: &Arc<Self>) -> Result<FlushExtension, BoxError> {
        let this = self.clone();
        let registered = Extension::new()
            .with_extension_name(EXTENSION_NAME)
            .with_events(&["INVOKE"])
            .with_events_processor(lambda_extension::service_fn(move |e: LambdaEvent| {
                let this = this.clone();
                async move {
                    this.on_event(e.next).await;
                    Ok::<(), BoxError>(())
                }
            }))
            .register()
            .await?;
        Ok(FlushExtension(Box::pin(registered.run())))
    }
}

impl MetricsSink for CloudWatchMetrics {
    fn record(&self, lambda_request_id: &str, metrics: InvocationMetrics) {
        self.queue.push(lambda_request_id, metrics);
    }
}

/// The registered extension's run loop, to be joined with the runtime.
pub struct FlushExtension(Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>);

impl FlushExtension {
    pub async fn run(self) -> Result<(), BoxError> {
        self.0.await
    }
}

/// Until the invocation's deadline (plus a second), or [`FALLBACK_WAIT`] when the deadline is
/// not a plausible epoch time.
fn wait_limit(deadline_ms: u64, now_ms: u64) -> Duration {
    if deadline_ms > now_ms {
        Duration::from_millis(deadline_ms - now_ms + 1000).min(FALLBACK_WAIT)
    } else {
        FALLBACK_WAIT
    }
}

/// The outermost runtime layer: marks an invocation finished once the runtime has posted its
/// response (the inner services' future resolves after the Runtime API call).
#[derive(Clone, Default)]
pub struct AfterResponseLayer(Option<Arc<CloudWatchMetrics>>);

impl AfterResponseLayer {
    pub fn new(metrics: Option<Arc<CloudWatchMetrics>>) -> AfterResponseLayer {
        AfterResponseLayer(metrics)
    }
}

impl<S> Layer<S> for AfterResponseLayer {
    type Service = AfterResponse<S>;
    fn layer(&self, inner: S) -> AfterResponse<S> {
        AfterResponse {
            inner,
            metrics: self.0.clone(),
        }
    }
}

pub struct AfterResponse<S> {
    inner: S,
    metrics: Option<Arc<CloudWatchMetrics>>,
}

impl<S> Service<LambdaInvocation> for AfterResponse<S>
where
    S: Service<LambdaInvocation, Response = (), Error = BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = AfterResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, invocation: LambdaInvocation) -> Self::Future {
        let finish = self
            .metrics
            .clone()
            .map(|m| (m, invocation.context.request_id.clone()));
        AfterResponseFuture {
            inner: Box::pin(self.inner.call(invocation)),
            finish,
        }
    }
}

pub struct AfterResponseFuture<F> {
    inner: Pin<Box<F>>,
    finish: Option<(Arc<CloudWatchMetrics>, String)>,
}

impl<F: Future<Output = Result<(), BoxError>>> Future for AfterResponseFuture<F> {
    type Output = Result<(), BoxError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = std::task::ready!(self.inner.as_mut().poll(cx));
        if let Some((metrics, id)) = self.finish.take() {
            metrics.invocation_finished(&id);
        }
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(retries: u64) -> InvocationMetrics {
        InvocationMetrics {
            requests: 1,
            retries,
            ..Default::default()
        }
    }

    fn ids(batch: &[Pending]) -> Vec<&str> {
        batch.iter().map(|p| p.request_id.as_str()).collect()
    }

    #[tokio::test]
    async fn claim_waits_for_the_finish_of_its_own_invocation() {
        let q = Arc::new(FlushQueue::default());
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.claim("a", Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        q.push("a", m(2));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "claimed before the response was posted"
        );
        q.finish("a");
        let batch = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ids(&batch), ["a"]);
        assert_eq!(batch[0].metrics.retries, 2);
        assert!(q.take_orphan("a").is_none(), "claimed ids are no orphans");
    }

    #[tokio::test]
    async fn a_missed_invoke_is_drained_by_the_next_claim_exactly_once() {
        let q = FlushQueue::default();
        // First invocation: the extension never got its INVOKE.
        q.push("first", m(0));
        q.finish("first");
        // Second one, claimed normally (finished before the claim this time).
        q.push("second", m(1));
        q.finish("second");
        let batch = q.claim("second", Duration::from_secs(1)).await;
        assert_eq!(ids(&batch), ["first", "second"]);
        assert!(q.take_orphan("first").is_none());
        assert!(q.take_all().is_empty());
    }

    #[tokio::test]
    async fn an_orphan_takes_only_its_own_record() {
        let q = FlushQueue::default();
        q.push("first", m(0));
        q.finish("first");
        q.push("second", m(1)); // recorded, response not posted yet
        assert_eq!(ids(&q.take_orphan("first").unwrap()), ["first"]);
        assert!(q.take_orphan("first").is_none());
        q.finish("second");
        assert_eq!(
            ids(&q.claim("second", Duration::from_secs(1)).await),
            ["second"]
        );
    }

    #[tokio::test]
    async fn an_invocation_without_record_claims_nothing() {
        let q = FlushQueue::default();
        q.finish("health");
        assert!(q.claim("health", Duration::from_secs(1)).await.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn claim_gives_up_at_the_limit_with_what_is_pending() {
        let q = FlushQueue::default();
        q.push("x", m(0));
        let batch = q.claim("never-finished", Duration::from_secs(3)).await;
        assert_eq!(ids(&batch), ["x"]);
    }

    #[test]
    fn wait_limit_follows_plausible_deadlines_only() {
        let now = 1_764_000_000_000;
        assert_eq!(wait_limit(now + 10_000, now), Duration::from_secs(11));
        // `cargo lambda watch` sends a constant 600000: a short, bounded wait.
        assert_eq!(wait_limit(600_000, now), FALLBACK_WAIT);
        assert!(FALLBACK_WAIT <= Duration::from_secs(60));
        assert_eq!(wait_limit(now + 3_600_000, now), FALLBACK_WAIT);
    }

    /// Claims `id` in virtual time; returns the batch and how long the claim took.
    async fn timed_claim(q: &FlushQueue, id: &str) -> (Vec<Pending>, Duration) {
        let started = tokio::time::Instant::now();
        let batch = q.claim(id, Duration::from_secs(15 * 60)).await;
        (batch, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_invoke_for_a_record_published_as_orphan_settles_at_once() {
        let q = FlushQueue::default();
        q.push("first", m(0));
        q.finish("first");
        // The extension missed it: the background task published it.
        assert_eq!(ids(&q.take_orphan("first").unwrap()), ["first"]);
        // Then the INVOKE arrives after all (cargo lambda watch): nothing to wait for.
        let (batch, took) = timed_claim(&q, "first").await;
        assert!(batch.is_empty(), "published twice: {batch:?}");
        assert_eq!(took, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_invoke_for_a_record_drained_by_the_next_claim_settles_at_once() {
        let q = FlushQueue::default();
        q.push("first", m(0));
        q.finish("first");
        q.push("second", m(1));
        q.finish("second");
        let (batch, _) = timed_claim(&q, "second").await;
        assert_eq!(ids(&batch), ["first", "second"]);
        let (batch, took) = timed_claim(&q, "first").await;
        assert!(
            batch.is_empty() && took == Duration::ZERO,
            "{batch:?} after {took:?}"
        );
        // And the next invocation pairs as usual.
        q.push("third", m(2));
        q.finish("third");
        let (batch, took) = timed_claim(&q, "third").await;
        assert_eq!((ids(&batch), took), (vec!["third"], Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn every_record_is_published_exactly_once_whatever_the_extension_sees() {
        // For each invocation: whether its INVOKE reaches the extension before the response,
        // after it, after the orphan check, or never.
        #[derive(Clone, Copy, Debug)]
        enum Seen {
            Early,
            Late,
            AfterOrphan,
            Never,
        }
        let orders = [
            [Seen::Never, Seen::Early, Seen::Early],
            [Seen::AfterOrphan, Seen::Late, Seen::Never],
            [Seen::Late, Seen::AfterOrphan, Seen::AfterOrphan],
            [Seen::Never, Seen::Never, Seen::Late],
            [Seen::AfterOrphan, Seen::Early, Seen::Never],
        ];
        for order in orders {
            let q = Arc::new(FlushQueue::default());
            let mut published: Vec<String> = Vec::new();
            for (n, seen) in order.iter().enumerate() {
                let id = format!("inv-{n}");
                let early = matches!(seen, Seen::Early).then(|| {
                    let (q, id) = (q.clone(), id.clone());
                    tokio::spawn(async move { timed_claim(&q, &id).await })
                });
                tokio::task::yield_now().await;
                q.push(&id, m(n as u64));
                q.finish(&id);
                let claimed = match (seen, early) {
                    (_, Some(task)) => Some(task.await.unwrap()),
                    (Seen::Late, _) => Some(timed_claim(&q, &id).await),
                    _ => None,
                };
                // The orphan check, ORPHAN_GRACE after the response.
                published.extend(
                    q.take_orphan(&id)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|p| p.request_id),
                );
                if let Seen::AfterOrphan = seen {
                    let (batch, took) = timed_claim(&q, &id).await;
                    assert_eq!(took, Duration::ZERO, "{order:?}: stalled on {id}");
                    published.extend(batch.into_iter().map(|p| p.request_id));
                }
                if let Some((batch, took)) = claimed {
                    assert_eq!(took, Duration::ZERO, "{order:?}: stalled on {id}");
                    published.extend(batch.into_iter().map(|p| p.request_id));
                }
            }
            published.extend(q.take_all().into_iter().map(|p| p.request_id));
            published.sort();
            assert_eq!(published, ["inv-0", "inv-1", "inv-2"], "{order:?}");
        }
    }

    #[test]
    fn metric_data_has_units_dimension_and_values() {
        let conf = aws_sdk_cloudwatch::Config::builder()
            .behavior_version(aws_sdk_cloudwatch::config::BehaviorVersion::latest())
            .build();
        let p = Publisher::new(Client::from_conf(conf), "NS".into(), "fn-1".into());
        let pending = Pending {
            request_id: "r".into(),
            metrics: InvocationMetrics {
                requests: 1,
                upstream_5xx: 2,
                retries: 2,
                upstream_latency_ms: vec![5.0, 6.0, 7.0],
                time_to_first_byte_ms: Some(42.0),
                ..Default::default()
            },
            at: SystemTime::now(),
        };
        let data = p.metric_data(&pending);
        assert_eq!(data.len(), super::super::metrics::METRIC_NAMES.len());
        for d in &data {
            assert_eq!(d.dimensions()[0].name(), Some("FunctionName"));
            assert_eq!(d.dimensions()[0].value(), Some("fn-1"));
            assert!(d.timestamp().is_some());
        }
        let get = |n: &str| data.iter().find(|d| d.metric_name() == Some(n)).unwrap();
        assert_eq!(get("Upstream5xx").value(), Some(2.0));
        assert_eq!(get("Upstream429").value(), Some(0.0));
        assert_eq!(get("Upstream429").unit(), Some(&StandardUnit::Count));
        assert_eq!(get("UpstreamLatency").values(), [5.0, 6.0, 7.0]);
        assert_eq!(get("TimeToFirstByte").value(), Some(42.0));
        assert_eq!(
            get("TimeToFirstByte").unit(),
            Some(&StandardUnit::Milliseconds)
        );
        assert_eq!(
            get("UpstreamLatency").unit(),
            Some(&StandardUnit::Milliseconds)
        );
    }
}
