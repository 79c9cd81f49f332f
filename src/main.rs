//! The whole wiring, in order: logs, settings, AWS clients (only those the settings need; the
//! CloudWatch client itself is built lazily, at its first flush, after the first response), the
//! proxy, then the Lambda runtime — the handler (buffered or streaming) behind the panic guard
//! layer — joined with the metrics flush extension when `METRICS_BACKEND=cloudwatch`.

use std::sync::Arc;

use lambda_runtime::tower::ServiceBuilder;
use lambda_runtime::{Runtime, layers};
use openai_lambda_proxy::config::{InvokeMode, Settings};
use openai_lambda_proxy::edge::guard::PanicGuardLayer;
use openai_lambda_proxy::secrets::Secrets;
use openai_lambda_proxy::telemetry::backend::Metrics;
use openai_lambda_proxy::telemetry::logs;
use openai_lambda_proxy::transport;
use openai_lambda_proxy::{BoxError, Proxy};

// One thread: the runtime serves one invocation at a time (no `run_concurrent`), and a
// multi-thread runtime's cross-thread wake-ups cost ~30 % more CPU per warm invocation
// (docs/benchmarks.md, "Warm overhead").
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
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
    // Registered before the runtime polls its first event, as Lambda requires.
    let flush = metrics.flush_extension().await;
    // A panic in the handler still answers §5 500 JSON, logs `request finished` and records
    // metrics; the outermost layer tells the flush extension each response has been posted.
    let guard = PanicGuardLayer::new(proxy.clone());
    let after_response = metrics.after_response_layer();
    let runtime = async move {
        match InvokeMode::from_env() {
            InvokeMode::ResponseStream => {
                let handler = ServiceBuilder::new()
                    .layer(guard)
                    .service(proxy.streaming());
                Runtime::new(handler)
                    .layer(layers::TracingLayer::new())
                    .layer(after_response)
                    .run()
                    .await
            }
            InvokeMode::Buffered => {
                let handler = ServiceBuilder::new().layer(guard).service(proxy.buffered());
                Runtime::new(handler)
                    .layer(layers::TracingLayer::new())
                    .layer(after_response)
                    .run()
                    .await
            }
        }
    };
    match flush {
        Some(extension) => tokio::try_join!(runtime, extension.run()).map(|_| ()),
        None => runtime.await,
    }
}
