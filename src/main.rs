//! Wiring only: logs, settings, clients, metrics backend, then the Lambda runtime (joined with
//! the metrics flush extension when `METRICS_BACKEND=cloudwatch`).

use std::sync::Arc;

use lambda_runtime::{Error, LambdaEvent, Runtime, layers, service_fn};
use openai_lambda_proxy::config::{InvokeMode, Settings};
use openai_lambda_proxy::secrets::Secrets;
use openai_lambda_proxy::telemetry::backend::Metrics;
use openai_lambda_proxy::telemetry::logs;
use openai_lambda_proxy::transport;
use openai_lambda_proxy::{Invocation, Proxy};
use serde_json::Value;

// One thread: the runtime serves one invocation at a time (no `run_concurrent`), and a
// multi-thread runtime's cross-thread wake-ups cost ~30 % more CPU per warm invocation
// (docs/benchmarks.md, "Warm overhead").
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    logs::init();
    let settings = Settings::from_env();
    let uses_secrets = settings.as_ref().is_ok_and(Settings::uses_secrets);
    let aws = if uses_secrets || Metrics::needs_aws_config(settings.as_ref().ok()) {
        Some(transport::aws_config().load().await)
    } else {
        None
    };
    let secrets_client = aws
        .as_ref()
        .filter(|_| uses_secrets)
        .map(aws_sdk_secretsmanager::Client::new);
    let metrics = Metrics::select(settings.as_ref().ok(), aws.as_ref());
    let proxy = Arc::new(Proxy::new(
        settings,
        Secrets::new(secrets_client),
        metrics.sink(),
    ));
    if InvokeMode::from_env() == InvokeMode::ResponseStream {
        let handler = service_fn(move |event: LambdaEvent<Value>| {
            let proxy = proxy.clone();
            async move {
                let invocation = invocation(&event.context);
                let answer = proxy
                    .handle_streaming_event(event.payload, invocation)
                    .await;
                Ok::<_, Error>(answer)
            }
        });
        let runtime = Runtime::new(handler)
            .layer(layers::TracingLayer::new())
            .layer(metrics.after_response_layer());
        return metrics.run(runtime.run()).await;
    }
    let handler = service_fn(move |event: LambdaEvent<Value>| {
        let proxy = proxy.clone();
        async move {
            let invocation = invocation(&event.context);
            Ok::<Value, Error>(proxy.handle_event(event.payload, invocation).await)
        }
    });
    let runtime = Runtime::new(handler)
        .layer(layers::TracingLayer::new())
        .layer(metrics.after_response_layer());
    metrics.run(runtime.run()).await
}

fn invocation(context: &lambda_runtime::Context) -> Invocation {
    Invocation {
        request_id: context.request_id.clone(),
        deadline_ms: context.deadline,
    }
}
