//! The panic guard, a tower layer around the handler service (the pattern of
//! aws-lambda-rust-runtime's `layers/panic.rs`). It starts the invocation (span, start time, the
//! event parsed once), runs the handler on a task of its own, and if that task panics answers
//! the §5 500 `internal_error` in the front door's shape, still with its one `request finished`
//! line and metrics record. The runtime's own panic layer, further out, would answer a bare
//! Lambda error instead (API Gateway turns it into a 502 without a body).
//!
//! A task rather than the runtime layer's `catch_unwind`: no `futures` dependency and no
//! `AssertUnwindSafe` over the proxy's shared state (breakers, caches), whose locks recover from
//! a panicked holder; the next request is served as usual (tests/invocation_logs.rs).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use lambda_runtime::LambdaEvent;
use lambda_runtime::tower::{Layer, Service, ServiceExt, service_fn};
use serde_json::Value;
use tracing::Instrument;

use super::finish::Ending;
use super::render::Payload;
use super::request::{Front, GatewayEvent};
use super::response::ProxyResponse;
use super::{Invocation, Proxy, answer, routes};
use crate::retry::Clock;
use crate::telemetry::logs;

/// One invocation, started: its event (parsed once; `None` when it is no HTTP request), what the
/// runtime said of it, its span and its ending record. What the handler service is called with.
#[derive(Debug)]
pub struct Started {
    pub(super) event: Option<GatewayEvent>,
    pub(super) invocation: Invocation,
    pub(super) ending: Arc<Ending>,
    pub(super) span: tracing::Span,
}

/// What a panic answer needs, kept outside the handler's task.
struct Before {
    front: Option<Front>,
    start_ms: Option<u64>,
    path: Option<String>,
    invocation: Invocation,
    ending: Arc<Ending>,
    span: tracing::Span,
}

impl Before {
    fn of(s: &Started) -> Before {
        Before {
            front: s.event.as_ref().map(GatewayEvent::front),
            start_ms: s.event.as_ref().and_then(|e| e.start_ms),
            path: s.event.as_ref().map(|e| e.path.clone()),
            invocation: s.invocation.clone(),
            ending: s.ending.clone(),
            span: s.span.clone(),
        }
    }
}

/// Wraps a handler service (`Started` → payload) into the service the runtime calls.
#[derive(Clone)]
pub struct PanicGuardLayer {
    proxy: Arc<Proxy>,
}

impl PanicGuardLayer {
    pub fn new(proxy: Arc<Proxy>) -> PanicGuardLayer {
        PanicGuardLayer { proxy }
    }
}

impl<S> Layer<S> for PanicGuardLayer {
    type Service = PanicGuard<S>;

    fn layer(&self, inner: S) -> PanicGuard<S> {
        PanicGuard {
            proxy: self.proxy.clone(),
            inner,
        }
    }
}

/// See [`PanicGuardLayer`]. Never fails: every event gets an answer.
#[derive(Clone)]
pub struct PanicGuard<S> {
    proxy: Arc<Proxy>,
    inner: S,
}

impl<S> Service<LambdaEvent<Value>> for PanicGuard<S>
where
    S: Service<Started, Error = Infallible> + Clone + Send + 'static,
    S::Response: Payload + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Each call drives its own clone of the inner service to readiness (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: LambdaEvent<Value>) -> Self::Future {
        let (proxy, inner) = (self.proxy.clone(), self.inner.clone());
        let invocation = Invocation {
            request_id: event.context.request_id.clone(),
            deadline_ms: event.context.deadline,
        };
        Box::pin(async move { Ok(proxy.guarded(inner, event.payload, invocation).await) })
    }
}

impl Proxy {
    /// A handler service over `handle` (see [`Proxy::buffered`], [`Proxy::streaming`]).
    pub(super) fn handler<F, Fut>(
        self: &Arc<Self>,
        handle: F,
    ) -> impl Service<Started, Response = Fut::Output, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + 'static
    where
        F: Fn(Arc<Proxy>, Started) -> Fut + Clone + Send + 'static,
        Fut: Future + Send + 'static,
    {
        let proxy = self.clone();
        service_fn(move |started: Started| {
            let answer = handle(proxy.clone(), started);
            async move { Ok(answer.await) }
        })
    }

    /// Answers one event with `handler` behind the panic guard, as the runtime does.
    pub(super) async fn guarded_call<S>(
        self: &Arc<Self>,
        handler: S,
        event: Value,
        invocation: Invocation,
    ) -> S::Response
    where
        S: Service<Started, Error = Infallible> + Clone + Send + 'static,
        S::Response: Payload + Send + 'static,
        S::Future: Send + 'static,
    {
        let guarded = PanicGuardLayer::new(self.clone()).layer(handler);
        let Ok(payload) = guarded
            .oneshot(LambdaEvent::new(event, invocation.context()))
            .await;
        payload
    }

    /// Runs `inner` on its own task; a panic there becomes the §5 500 answer.
    async fn guarded<S>(
        self: Arc<Self>,
        inner: S,
        event: Value,
        invocation: Invocation,
    ) -> S::Response
    where
        S: Service<Started, Error = Infallible> + Send + 'static,
        S::Response: Payload + Send + 'static,
        S::Future: Send + 'static,
    {
        let started = self.start(event, invocation);
        let before = Before::of(&started);
        let task = inner.oneshot(started).instrument(before.span.clone());
        match tokio::spawn(task).await {
            Ok(Ok(payload)) => payload,
            Ok(Err(never)) => match never {},
            Err(e) => {
                let (front, resp) = self.internal_error(&e, before);
                S::Response::payload(front, resp)
            }
        }
    }

    /// The invocation's span, start and ending record; the event parsed once (its body then
    /// moves to the upstream request without a copy).
    fn start(&self, event: Value, invocation: Invocation) -> Started {
        logs::begin_invocation(&invocation.request_id);
        let span = tracing::info_span!("invocation", lambda_request_id = %invocation.request_id);
        let cold_start = self.cold_start.swap(false, Ordering::Relaxed);
        let ending = Arc::new(Ending::new(self.time.now_ms(), cold_start));
        Started {
            event: GatewayEvent::from_value(event),
            invocation,
            ending,
            span,
        }
    }

    /// After the handler's task failed (a panic): the §5 500 answer, with its one `request
    /// finished` line and metrics record if the handler had not written them yet.
    fn internal_error(
        &self,
        e: &tokio::task::JoinError,
        before: Before,
    ) -> (Option<Front>, ProxyResponse) {
        let _g = before.span.enter();
        tracing::error!(
            panic = e.is_panic(),
            "handler failed; answering 500 internal_error"
        );
        let id = before.invocation.request_id.as_str();
        let route = before.path.as_deref().and_then(routes::find);
        let done = answer::internal_error(route.map_or("unknown", |r| r.path), id);
        let gateway = before.front.map(|f| (f.kind, before.start_ms));
        let deadline = self.deadline(&before.invocation, gateway, before.ending.started);
        self.finish(
            id,
            &done.summary,
            &done.resp,
            &deadline,
            &before.ending,
            None,
        );
        (before.front, done.resp)
    }
}
