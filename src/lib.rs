//! openai-lambda-proxy: an OpenAI-compatible endpoint for AWS Lambda behind API Gateway that
//! rides out OpenAI's transient failures within the time the invocation really has left.
//!
//! One request flows one way: [`edge`] → [`deadline`] → [`retry`] → [`upstream`] → [`edge`],
//! with [`telemetry`] on the side and [`config`], [`auth`], [`secrets`] set up at cold start.

pub mod auth;
pub mod config;
pub mod deadline;
pub mod edge;
pub mod retry;
pub mod secrets;
pub mod stream;
pub mod telemetry;
pub mod transport;
pub mod upstream;
pub mod upstreams;

pub use edge::{Invocation, Proxy};

/// The crate's one boxed error (the same type as `lambda_runtime::Error`): what the runtime,
/// the flush extension and a handler of your own return. Configuration and secrets have their
/// own error, [`config::ConfigError`], which names the setting and never a value.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

// The library face, for a handler of your own (`examples/draft_refine.rs` makes two OpenAI calls
// under one invocation deadline with these):
// - the time budget: [`Deadline::compute`] turns the Lambda deadline (and a gateway's start time,
//   if any) into the epoch ms by which every call and sleep must be over;
// - the retry engine: [`RetryEngine::run`] retries an attempt closure with jittered backoff and
//   `Retry-After`, never starting an attempt or a sleep that cannot end before that deadline,
//   and says how the run ended ([`RunOutcome`]); clock, sleep and randomness are injected
//   ([`SystemClock`], [`TokioSleeper`], [`FastRandJitter`] in production);
// - the upstream client: [`UpstreamClient::send`] is one [`Attempt`], one HTTP exchange with an
//   OpenAI-compatible API ([`UpstreamSpec`]: base URL, OpenAI or Azure auth), classified into an
//   [`AttemptOutcome`] the engine understands.
pub use config::KeySource;
pub use deadline::{Deadline, DeadlineSettings, GatewayKind};
pub use retry::{
    AttemptOutcome, AttemptPlan, Clock, FailureKind, FastRandJitter, GiveUpReason, Jitter,
    RetryEngine, RetryPolicy, RetryRun, RunOutcome, Sleeper, SystemClock, TokioSleeper,
    UpstreamReply, epoch_ms,
};
pub use upstream::{Attempt, ForwardRequest, UpstreamClient};
pub use upstreams::{UpstreamKind, UpstreamSpec};
