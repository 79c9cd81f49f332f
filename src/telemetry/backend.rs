//! `METRICS_BACKEND` (spec §7, §8): picks the metrics sink at cold start and, for `cloudwatch`,
//! registers the flush extension that `main` joins with the Lambda runtime.

use std::sync::Arc;

use crate::config::{MetricsBackend, Settings};

use super::cloudwatch::{AfterResponseLayer, CloudWatchMetrics, FlushExtension, Publisher};
use super::emf::EmfSink;
use super::metrics::{MetricsSink, NoMetrics};

/// The selected backend.
pub enum Metrics {
    CloudWatch(Arc<CloudWatchMetrics>),
    Emf {
        namespace: String,
        function_name: String,
    },
    /// `none`, or settings that could not be read (every proxied request answers 500 then).
    None,
}

impl Metrics {
    /// Whether [`Metrics::select`] needs the AWS SDK configuration.
    pub fn needs_aws_config(settings: Option<&Settings>) -> bool {
        settings.is_some_and(|s| s.metrics_backend == MetricsBackend::CloudWatch)
    }

    /// The backend for `settings`; `aws` is required for `cloudwatch` (without it, nothing is
    /// published).
    pub fn select(settings: Option<&Settings>, aws: Option<&aws_config::SdkConfig>) -> Metrics {
        let Some(s) = settings else {
            return Metrics::None;
        };
        match (s.metrics_backend, aws) {
            (MetricsBackend::CloudWatch, Some(aws)) => {
                Metrics::CloudWatch(CloudWatchMetrics::new(Publisher::from_sdk_config(
                    aws,
                    s.metrics_namespace.clone(),
                    s.function_name.clone(),
                )))
            }
            (MetricsBackend::Emf, _) => Metrics::Emf {
                namespace: s.metrics_namespace.clone(),
                function_name: s.function_name.clone(),
            },
            _ => Metrics::None,
        }
    }

    /// The sink the edge records each invocation into.
    pub fn sink(&self) -> Box<dyn MetricsSink> {
        match self {
            Metrics::CloudWatch(cw) => Box::new(cw.clone()),
            Metrics::Emf {
                namespace,
                function_name,
            } => Box::new(EmfSink::stdout(namespace.clone(), function_name.clone())),
            Metrics::None => Box::new(NoMetrics),
        }
    }

    /// The outermost runtime layer, telling the extension when a response has been posted.
    pub fn after_response_layer(&self) -> AfterResponseLayer {
        match self {
            Metrics::CloudWatch(cw) => AfterResponseLayer::new(Some(cw.clone())),
            _ => AfterResponseLayer::new(None),
        }
    }

    /// For `cloudwatch`, the flush extension, registered (before the runtime starts polling),
    /// for `main` to join with the runtime. `None` for the other backends, and when registration
    /// failed: metrics never fail the function; each record is then published by the background
    /// task after its response (best effort: Lambda may freeze the environment before it runs).
    pub async fn flush_extension(&self) -> Option<FlushExtension> {
        let Metrics::CloudWatch(cw) = self else {
            return None;
        };
        match cw.register_extension().await {
            Ok(extension) => Some(extension),
            Err(e) => {
                tracing::warn!(error = %e, "could not register the metrics flush extension; publishing metrics in the background");
                None
            }
        }
    }
}
