//! openai-lambda-proxy: an OpenAI-compatible endpoint for AWS Lambda behind API Gateway that
//! rides out OpenAI's transient failures within the time the invocation really has left.
//!
//! One request flows one way: [`edge`] → [`budget`] → [`retry`] → [`upstream`] → [`edge`],
//! with [`telemetry`] on the side and [`config`], [`auth`], [`secrets`] set up at cold start.

pub mod auth;
pub mod budget;
pub mod config;
pub mod edge;
pub mod retry;
pub mod secrets;
pub mod stream;
pub mod telemetry;
pub mod upstream;
pub mod upstreams;

pub use edge::{Invocation, Proxy};
