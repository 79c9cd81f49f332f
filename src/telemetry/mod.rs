//! Telemetry on the side of the request path: JSON logs and CloudWatch metrics.

pub mod backend;
pub mod cloudwatch;
pub mod emf;
pub mod logs;
pub mod metrics;
