//! Wiring only: logs, settings, clients, then the Lambda runtime.

use std::sync::Arc;

use lambda_runtime::{Error, LambdaEvent, service_fn};
use openai_lambda_proxy::config::{ClientAuth, KeySource, Settings};
use openai_lambda_proxy::secrets::Secrets;
use openai_lambda_proxy::telemetry::{logs, metrics};
use openai_lambda_proxy::{Invocation, Proxy};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    logs::init();
    let settings = Settings::from_env();
    let uses_secrets = settings.as_ref().is_ok_and(|s| {
        matches!(s.openai_key, KeySource::SecretArn(_))
            || matches!(s.auth, ClientAuth::SecretArn(_))
    });
    let secrets_client = if uses_secrets {
        let aws = aws_config::load_from_env().await;
        Some(aws_sdk_secretsmanager::Client::new(&aws))
    } else {
        None
    };
    let proxy = Arc::new(Proxy::new(
        settings,
        Secrets::new(secrets_client),
        Box::new(metrics::NoMetrics),
    ));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let proxy = proxy.clone();
        async move {
            let invocation = Invocation {
                request_id: event.context.request_id.clone(),
                deadline_ms: event.context.deadline,
            };
            Ok::<Value, Error>(proxy.handle_event(event.payload, invocation).await)
        }
    }))
    .await
}
