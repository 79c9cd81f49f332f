//! Telemetry on the side of the request path: JSON logs and CloudWatch metrics.

pub mod logs;
pub mod metrics;
