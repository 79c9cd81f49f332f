//! Settings (spec §7), parsed once at cold start from the environment.
//!
//! A bad value never crashes the process: the error names the setting (never its value) and
//! the edge answers every proxied request with 500 `config_error` while `/health` keeps working.

use std::fmt;
use std::sync::Arc;

use reqwest::Url;

use crate::deadline::{DeadlineSettings, METRICS_FLUSH_RESERVE_MS};
use crate::retry::{RetryEngine, RetryPolicy};
use crate::upstreams::breaker::BreakerSettings;
use crate::upstreams::{
    ModelFallbacks, UpstreamKind, UpstreamSpec, UpstreamsSource, parse_upstreams,
};

/// Everything the function can be configured with. Built by [`Settings::from_env`].
#[derive(Clone, Debug)]
pub struct Settings {
    /// Upstream base URL without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub openai_base_url: String,
    pub openai_organization: Option<String>,
    pub openai_project: Option<String>,
    /// Unset only when `UPSTREAMS` / `UPSTREAMS_SECRET_ARN` lists the upstreams and their keys.
    pub openai_key: Option<KeySource>,
    pub auth: ClientAuth,
    pub allowed_models: Option<ModelAllowList>,
    pub max_body_bytes: usize,
    pub retry_max_attempts: u32,
    pub retry_base_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    pub deadline_margin_ms: u64,
    pub min_attempt_ms: u64,
    pub connect_timeout_ms: u64,
    pub attempt_timeout_ms: Option<u64>,
    pub gateway_timeout_ms: Option<u64>,
    pub fallback_timeout_ms: u64,
    /// `SECRETS_TTL_MS`: keys and tokens from Secrets Manager are read again once this old.
    pub secrets_ttl_ms: u64,
    pub metrics_backend: MetricsBackend,
    pub metrics_namespace: String,
    /// `AWS_LAMBDA_FUNCTION_NAME`, the metrics dimension.
    pub function_name: String,
    /// `UPSTREAMS` / `UPSTREAMS_SECRET_ARN`, else the one `openai` upstream of §7 (spec §11).
    pub upstreams: UpstreamsSource,
    pub fallback_after_failures: u32,
    pub model_fallbacks: ModelFallbacks,
    pub breaker: BreakerSettings,
    pub skip_hopeless_attempts: bool,
    /// `INVOKE_MODE`: how Lambda is invoked (must match the function URL / REST integration).
    pub invoke_mode: InvokeMode,
    /// `STREAM_IDLE_TIMEOUT_MS`: a committed stream with no data for longer than this ends.
    pub stream_idle_timeout_ms: u64,
}

/// `INVOKE_MODE` (spec §10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvokeMode {
    /// One JSON response per invocation (API Gateway HTTP API, REST API, function URL `BUFFERED`).
    Buffered,
    /// Lambda's streaming HTTP integration format (prelude, 8 NUL bytes, body) for every invocation.
    ResponseStream,
}

impl InvokeMode {
    fn parse(raw: Option<&str>) -> Result<InvokeMode, ConfigError> {
        match raw.map(str::trim).filter(|m| !m.is_empty()) {
            None => Ok(InvokeMode::Buffered),
            Some(m) if m.eq_ignore_ascii_case("BUFFERED") => Ok(InvokeMode::Buffered),
            Some(m) if m.eq_ignore_ascii_case("RESPONSE_STREAM") => Ok(InvokeMode::ResponseStream),
            Some(_) => Err(ConfigError::new(
                "INVOKE_MODE",
                "must be `BUFFERED` or `RESPONSE_STREAM`",
            )),
        }
    }

    /// The mode the runtime must answer in, read on its own: even when another setting is bad
    /// (every request then gets 500 `config_error`), that answer must come in the format Lambda
    /// expects. An unreadable `INVOKE_MODE` falls back to `BUFFERED`.
    pub fn from_env() -> InvokeMode {
        InvokeMode::parse(std::env::var("INVOKE_MODE").ok().as_deref())
            .unwrap_or(InvokeMode::Buffered)
    }
}

/// Where the server's OpenAI key comes from.
#[derive(Clone)]
pub enum KeySource {
    SecretArn(String),
    Env(String),
}

impl fmt::Debug for KeySource {
    // Never print the key itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::SecretArn(arn) => write!(f, "SecretArn({arn})"),
            KeySource::Env(_) => f.write_str("Env(<redacted>)"),
        }
    }
}

/// How callers of the function are authenticated.
#[derive(Clone)]
pub enum ClientAuth {
    /// `AUTH_MODE=none`: an API Gateway authorizer does it.
    Disabled,
    /// Tokens from a Secrets Manager secret (comma list or JSON).
    SecretArn(String),
    /// Tokens from `PROXY_API_KEYS`.
    Tokens(Vec<String>),
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientAuth::Disabled => f.write_str("Disabled"),
            ClientAuth::SecretArn(arn) => write!(f, "SecretArn({arn})"),
            ClientAuth::Tokens(t) => write!(f, "Tokens(<{} redacted>)", t.len()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsBackend {
    CloudWatch,
    Emf,
    None,
}

/// `ALLOWED_MODELS`: exact names, or prefixes written with a trailing `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelAllowList {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl ModelAllowList {
    pub fn parse(list: &str) -> Option<ModelAllowList> {
        let mut allow = ModelAllowList {
            exact: Vec::new(),
            prefixes: Vec::new(),
        };
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.strip_suffix('*') {
                Some(prefix) => allow.prefixes.push(prefix.to_owned()),
                None => allow.exact.push(item.to_owned()),
            }
        }
        (!allow.exact.is_empty() || !allow.prefixes.is_empty()).then_some(allow)
    }

    pub fn allows(&self, model: &str) -> bool {
        self.exact.iter().any(|m| m == model) || self.prefixes.iter().any(|p| model.starts_with(p))
    }
}

/// A setting that could not be used, or a secret it names that could not be had: what callers
/// get as 500 `config_error` (spec §5). `setting` and `problem` are what they may see, and all
/// that `Display` shows: never a value, never AWS's error text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub setting: &'static str,
    pub problem: String,
    /// The whole error (the SDK's text, an ARN), for the operator's log only.
    pub detail: String,
    /// Secrets Manager could not be reached or failed (timeout, network, 5xx, throttling): a
    /// value read before stays in use. Otherwise the answer is definite (a bad setting, a missing
    /// secret, access denied, an unusable value).
    pub transient: bool,
}

impl ConfigError {
    /// A definite problem with `setting`; `problem` holds no value, so the log gets it as is.
    pub fn new(setting: &'static str, problem: impl Into<String>) -> ConfigError {
        let problem = problem.into();
        ConfigError {
            setting,
            detail: problem.clone(),
            problem,
            transient: false,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.setting, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// Largest payload Lambda accepts synchronously; a bigger limit could never apply.
const LAMBDA_PAYLOAD_LIMIT: u64 = 6 * 1024 * 1024;
/// Lambda's maximum timeout; no sensible duration setting exceeds it.
const FIFTEEN_MINUTES_MS: u64 = 15 * 60 * 1000;

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Settings, ConfigError> {
        Settings::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup` (tests pass a map). Empty values count as unset. The
    /// first bad setting, in the order below, is the error.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
        let env = Env(&lookup);
        let openai_base_url = match env.get("OPENAI_BASE_URL") {
            None => "https://api.openai.com/v1".to_owned(),
            Some(raw) => parse_base_url("OPENAI_BASE_URL", &raw)?,
        };
        let openai_key = openai_key(&env)?;
        let auth = client_auth(&env)?;
        let (metrics_backend, metrics_namespace) = metrics(&env)?;
        let invoke_mode = InvokeMode::parse(env.get("INVOKE_MODE").as_deref())?;
        let retry_max_attempts = env.number("RETRY_MAX_ATTEMPTS", 5, 1, 20)? as u32;
        let openai_organization = env.header_token("OPENAI_ORGANIZATION")?;
        let openai_project = env.header_token("OPENAI_PROJECT")?;
        let upstreams = upstreams(&env, || {
            Ok(UpstreamSpec {
                name: DEFAULT_UPSTREAM.into(),
                base_url: openai_base_url.clone(),
                kind: UpstreamKind::OpenAi,
                key: openai_key.clone().ok_or_else(missing_openai_key)?,
                organization: openai_organization.clone(),
                project: openai_project.clone(),
                models: Default::default(),
            })
        })?;
        let model_fallbacks = env
            .get("MODEL_FALLBACKS")
            .map(|raw| ModelFallbacks::parse(&raw))
            .transpose()?
            .unwrap_or_default();
        let breaker = breaker(&env)?;
        let limits = Limits::read(&env)?;
        Ok(Settings {
            openai_base_url,
            openai_organization,
            openai_project,
            openai_key,
            auth,
            allowed_models: limits.allowed_models,
            max_body_bytes: limits.max_body_bytes,
            retry_max_attempts,
            retry_base_delay_ms: limits.retry_base_delay_ms,
            retry_max_delay_ms: limits.retry_max_delay_ms,
            deadline_margin_ms: limits.deadline_margin_ms,
            min_attempt_ms: limits.min_attempt_ms,
            connect_timeout_ms: limits.connect_timeout_ms,
            attempt_timeout_ms: limits.attempt_timeout_ms,
            gateway_timeout_ms: limits.gateway_timeout_ms,
            fallback_timeout_ms: limits.fallback_timeout_ms,
            secrets_ttl_ms: limits.secrets_ttl_ms,
            metrics_backend,
            metrics_namespace,
            function_name: limits.function_name,
            upstreams,
            fallback_after_failures: limits.fallback_after_failures,
            model_fallbacks,
            breaker,
            skip_hopeless_attempts: limits.skip_hopeless_attempts,
            invoke_mode,
            stream_idle_timeout_ms: limits.stream_idle_timeout_ms,
        })
    }
}

/// `OPENAI_API_KEY_SECRET_ARN` or `OPENAI_API_KEY`; not needed with an upstream list (each
/// entry brings its own key).
fn openai_key(env: &Env<'_, impl Lookup>) -> Result<Option<KeySource>, ConfigError> {
    let own_list = env.get("UPSTREAMS").is_some() || env.get("UPSTREAMS_SECRET_ARN").is_some();
    match (
        env.get("OPENAI_API_KEY_SECRET_ARN"),
        env.get("OPENAI_API_KEY"),
    ) {
        (Some(arn), _) => Ok(Some(KeySource::SecretArn(arn))),
        (None, Some(key)) => Ok(Some(KeySource::Env(header_token("OPENAI_API_KEY", key)?))),
        (None, None) if own_list => Ok(None),
        (None, None) => Err(missing_openai_key()),
    }
}

/// `AUTH_MODE`, then `PROXY_API_KEYS_SECRET_ARN` or `PROXY_API_KEYS` (spec §7).
fn client_auth(env: &Env<'_, impl Lookup>) -> Result<ClientAuth, ConfigError> {
    match env.get("AUTH_MODE").as_deref() {
        None => {}
        Some(mode) if mode.eq_ignore_ascii_case("none") => return Ok(ClientAuth::Disabled),
        Some(mode) if mode.eq_ignore_ascii_case("api_key") => {}
        Some(_) => return Err(ConfigError::new("AUTH_MODE", "must be `api_key` or `none`")),
    }
    if let Some(arn) = env.get("PROXY_API_KEYS_SECRET_ARN") {
        return Ok(ClientAuth::SecretArn(arn));
    }
    let tokens: Vec<String> = env
        .get("PROXY_API_KEYS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    if tokens.is_empty() {
        return Err(ConfigError::new(
            "PROXY_API_KEYS",
            "is not set: no client tokens configured (set PROXY_API_KEYS_SECRET_ARN or PROXY_API_KEYS, or AUTH_MODE=none behind an authorizer)",
        ));
    }
    Ok(ClientAuth::Tokens(tokens))
}

/// `METRICS_BACKEND` and `METRICS_NAMESPACE` (spec §8).
fn metrics(env: &Env<'_, impl Lookup>) -> Result<(MetricsBackend, String), ConfigError> {
    let backend = match env.get("METRICS_BACKEND").as_deref() {
        None => MetricsBackend::CloudWatch,
        Some(b) if b.eq_ignore_ascii_case("cloudwatch") => MetricsBackend::CloudWatch,
        Some(b) if b.eq_ignore_ascii_case("emf") => MetricsBackend::Emf,
        Some(b) if b.eq_ignore_ascii_case("none") => MetricsBackend::None,
        Some(_) => {
            return Err(ConfigError::new(
                "METRICS_BACKEND",
                "must be `cloudwatch`, `emf` or `none`",
            ));
        }
    };
    let namespace = env
        .get("METRICS_NAMESPACE")
        .unwrap_or_else(|| "OpenAIProxy".into());
    if namespace.len() > 255 || namespace.starts_with("AWS/") {
        return Err(ConfigError::new(
            "METRICS_NAMESPACE",
            "must be at most 255 characters and not start with `AWS/`",
        ));
    }
    Ok((backend, namespace))
}

/// `UPSTREAMS_SECRET_ARN` or `UPSTREAMS`, else the one `openai` upstream of §7 (spec §11).
fn upstreams(
    env: &Env<'_, impl Lookup>,
    default: impl FnOnce() -> Result<UpstreamSpec, ConfigError>,
) -> Result<UpstreamsSource, ConfigError> {
    match (env.get("UPSTREAMS_SECRET_ARN"), env.get("UPSTREAMS")) {
        (Some(arn), _) => Ok(UpstreamsSource::SecretArn(arn)),
        (None, Some(raw)) => Ok(UpstreamsSource::List(
            parse_upstreams("UPSTREAMS", &raw)?.into(),
        )),
        (None, None) => Ok(UpstreamsSource::List(Arc::from([default()?]))),
    }
}

/// `BREAKER_FAILURES` and `BREAKER_COOLDOWN_MS`. The defaults are `BreakerSettings::default()`
/// (a test checks), written out for the template test that reads them from here.
fn breaker(env: &Env<'_, impl Lookup>) -> Result<BreakerSettings, ConfigError> {
    Ok(BreakerSettings {
        failures: env.number("BREAKER_FAILURES", 5, 0, 1000)? as u32,
        cooldown_ms: env.number("BREAKER_COOLDOWN_MS", 10_000, 1, FIFTEEN_MINUTES_MS)?,
    })
}

/// The settings that stand alone: sizes, times, counts and switches, each with its default and
/// range (the template's parameters have the same; a test compares them).
struct Limits {
    allowed_models: Option<ModelAllowList>,
    max_body_bytes: usize,
    retry_base_delay_ms: u64,
    retry_max_delay_ms: u64,
    deadline_margin_ms: u64,
    min_attempt_ms: u64,
    connect_timeout_ms: u64,
    attempt_timeout_ms: Option<u64>,
    gateway_timeout_ms: Option<u64>,
    fallback_timeout_ms: u64,
    secrets_ttl_ms: u64,
    function_name: String,
    fallback_after_failures: u32,
    skip_hopeless_attempts: bool,
    stream_idle_timeout_ms: u64,
}

impl Limits {
    fn read(env: &Env<'_, impl Lookup>) -> Result<Limits, ConfigError> {
        let deadline = DeadlineSettings::default();
        Ok(Limits {
            allowed_models: env
                .get("ALLOWED_MODELS")
                .and_then(|l| ModelAllowList::parse(&l)),
            max_body_bytes: env.number("MAX_BODY_BYTES", 1024 * 1024, 1, LAMBDA_PAYLOAD_LIMIT)?
                as usize,
            retry_base_delay_ms: env.number("RETRY_BASE_DELAY_MS", 1000, 0, FIFTEEN_MINUTES_MS)?,
            retry_max_delay_ms: env.number("RETRY_MAX_DELAY_MS", 8000, 0, FIFTEEN_MINUTES_MS)?,
            deadline_margin_ms: env.number("DEADLINE_MARGIN_MS", deadline.margin_ms, 0, 60_000)?,
            min_attempt_ms: env.number("MIN_ATTEMPT_MS", 1000, 0, FIFTEEN_MINUTES_MS)?,
            connect_timeout_ms: env.number("CONNECT_TIMEOUT_MS", 2000, 1, FIFTEEN_MINUTES_MS)?,
            attempt_timeout_ms: env.optional_number("ATTEMPT_TIMEOUT_MS", 1, FIFTEEN_MINUTES_MS)?,
            gateway_timeout_ms: env.optional_number("GATEWAY_TIMEOUT_MS", 1, FIFTEEN_MINUTES_MS)?,
            fallback_timeout_ms: env.number(
                "FALLBACK_TIMEOUT_MS",
                deadline.fallback_timeout_ms,
                1,
                FIFTEEN_MINUTES_MS,
            )?,
            // Below a second, every request could read Secrets Manager.
            secrets_ttl_ms: env.number("SECRETS_TTL_MS", 300_000, 1_000, FIFTEEN_MINUTES_MS)?,
            function_name: env
                .get("AWS_LAMBDA_FUNCTION_NAME")
                .unwrap_or_else(|| "openai-lambda-proxy".into()),
            fallback_after_failures: env.number("FALLBACK_AFTER_FAILURES", 2, 1, 20)? as u32,
            skip_hopeless_attempts: env.flag("SKIP_HOPELESS_ATTEMPTS", true)?,
            stream_idle_timeout_ms: env.number(
                "STREAM_IDLE_TIMEOUT_MS",
                crate::stream::DEFAULT_IDLE_TIMEOUT_MS,
                1,
                FIFTEEN_MINUTES_MS,
            )?,
        })
    }
}

/// The name of the one upstream built from the §7 settings when `UPSTREAMS` is unset.
pub const DEFAULT_UPSTREAM: &str = "openai";

impl Settings {
    /// Whether a Secrets Manager client is needed.
    pub fn uses_secrets(&self) -> bool {
        let key_secret = |k: &KeySource| matches!(k, KeySource::SecretArn(_));
        self.openai_key.as_ref().is_some_and(key_secret)
            || matches!(self.auth, ClientAuth::SecretArn(_))
            || match &self.upstreams {
                UpstreamsSource::SecretArn(_) => true,
                UpstreamsSource::List(list) => list.iter().any(|u| key_secret(&u.key)),
            }
    }

    /// The retry engine these settings describe (`RETRY_*`, `MIN_ATTEMPT_MS`,
    /// `ATTEMPT_TIMEOUT_MS`): built here and nowhere else.
    pub fn retry_engine(&self) -> RetryEngine {
        RetryEngine {
            policy: RetryPolicy {
                max_attempts: self.retry_max_attempts,
                base_delay_ms: self.retry_base_delay_ms,
                max_delay_ms: self.retry_max_delay_ms,
            },
            min_attempt_ms: self.min_attempt_ms,
            attempt_timeout_ms: self.attempt_timeout_ms,
        }
    }

    /// The settings the deadline budget uses. With `METRICS_BACKEND=cloudwatch` the metrics are
    /// flushed after the answer, inside the Lambda deadline, so time is kept free for it.
    pub fn deadline(&self) -> DeadlineSettings {
        let flushes_after_answer = self.metrics_backend == MetricsBackend::CloudWatch;
        DeadlineSettings {
            margin_ms: self.deadline_margin_ms,
            fallback_timeout_ms: self.fallback_timeout_ms,
            gateway_timeout_ms: self.gateway_timeout_ms,
            flush_reserve_ms: if flushes_after_answer {
                METRICS_FLUSH_RESERVE_MS
            } else {
                0
            },
        }
    }
}

fn missing_openai_key() -> ConfigError {
    ConfigError::new(
        "OPENAI_API_KEY",
        "is not set (set OPENAI_API_KEY_SECRET_ARN or OPENAI_API_KEY, or list upstreams in UPSTREAMS)",
    )
}

/// Whether `value` can be sent as one HTTP header token: visible ASCII, no spaces or control
/// characters (keys and OpenAI ids never have any; a stray newline would break every request).
pub fn is_header_token(value: &str) -> bool {
    !value.is_empty() && value.bytes().all(|b| b.is_ascii_graphic())
}

fn header_token(setting: &'static str, value: String) -> Result<String, ConfigError> {
    if is_header_token(&value) {
        Ok(value)
    } else {
        Err(ConfigError::new(
            setting,
            "holds spaces, control or non-ASCII characters, which cannot be sent in an HTTP header",
        ))
    }
}

/// An http(s) base URL with a host and no query or fragment, without its trailing slash.
pub(crate) fn parse_base_url(setting: &'static str, raw: &str) -> Result<String, ConfigError> {
    let url =
        Url::parse(raw.trim()).map_err(|_| ConfigError::new(setting, "is not a valid URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ConfigError::new(
            setting,
            "must be an http(s) URL with a host",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::new(
            setting,
            "must not carry a query or fragment",
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// Whether the (validated) upstream `base_url` is the host a request arrived on (its `Host`
/// header): then `OPENAI_BASE_URL` is this proxy's own URL and every request would call the
/// function again until the deadline. Hosts compare case-insensitively; ports must match (a
/// `Host` without a port is the default port, as an upstream URL without one).
pub fn is_own_host(base_url: &str, host_header: &str) -> bool {
    let (Ok(upstream), Ok(arrived)) = (
        Url::parse(base_url),
        // A scheme without a default port, so an explicit `:443` or `:80` is kept as given.
        Url::parse(&format!("host://{}", host_header.trim())),
    ) else {
        return false;
    };
    let name = |u: &Url| {
        u.host_str()
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
    };
    let same_port = match arrived.port() {
        Some(port) => upstream.port_or_known_default() == Some(port),
        None => upstream.port().is_none(),
    };
    name(&upstream).is_some() && name(&upstream) == name(&arrived) && same_port
}

/// Where settings are read from: the process environment, or a map in tests.
trait Lookup: Fn(&str) -> Option<String> {}
impl<F: Fn(&str) -> Option<String>> Lookup for F {}

struct Env<'a, F: Lookup>(&'a F);

impl<F: Lookup> Env<'_, F> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// An optional setting that goes into an HTTP header as it is.
    fn header_token(&self, name: &'static str) -> Result<Option<String>, ConfigError> {
        self.get(name).map(|v| header_token(name, v)).transpose()
    }

    fn optional_number(
        &self,
        name: &'static str,
        min: u64,
        max: u64,
    ) -> Result<Option<u64>, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(None);
        };
        match raw.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            Ok(_) => Err(ConfigError::new(
                name,
                format!("is out of range (allowed {min}..={max})"),
            )),
            Err(_) => Err(ConfigError::new(name, "is not a whole number")),
        }
    }

    fn flag(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name).map(|v| v.to_ascii_lowercase()).as_deref() {
            None => Ok(default),
            Some("true" | "1" | "yes" | "on") => Ok(true),
            Some("false" | "0" | "no" | "off") => Ok(false),
            Some(_) => Err(ConfigError::new(name, "must be `true` or `false`")),
        }
    }

    fn number(
        &self,
        name: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        Ok(self.optional_number(name, min, max)?.unwrap_or(default))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    const MINIMAL: [(&str, &str); 2] =
        [("OPENAI_API_KEY", "sk-test"), ("PROXY_API_KEYS", "t1, t2")];

    #[test]
    fn defaults_follow_the_spec() {
        let s = settings(&MINIMAL).unwrap();
        assert_eq!(s.openai_base_url, "https://api.openai.com/v1");
        assert_eq!(s.max_body_bytes, 1_048_576);
        assert_eq!(s.retry_max_attempts, 5);
        assert_eq!((s.retry_base_delay_ms, s.retry_max_delay_ms), (1000, 8000));
        assert_eq!((s.deadline_margin_ms, s.min_attempt_ms), (500, 1000));
        assert_eq!(s.connect_timeout_ms, 2000);
        assert_eq!((s.attempt_timeout_ms, s.gateway_timeout_ms), (None, None));
        assert_eq!(s.fallback_timeout_ms, 30_000);
        assert_eq!(s.secrets_ttl_ms, 300_000);
        assert_eq!(s.metrics_backend, MetricsBackend::CloudWatch);
        assert_eq!(s.metrics_namespace, "OpenAIProxy");
        assert_eq!(s.invoke_mode, InvokeMode::Buffered);
        assert_eq!(s.stream_idle_timeout_ms, 30_000);
        assert!(matches!(s.auth, ClientAuth::Tokens(ref t) if t == &["t1", "t2"]));
    }

    #[test]
    fn bad_values_name_the_setting_never_the_value() {
        for (name, value) in [
            ("RETRY_MAX_ATTEMPTS", "lots"),
            ("RETRY_MAX_ATTEMPTS", "21"),
            ("MAX_BODY_BYTES", "99999999999"),
            ("METRICS_BACKEND", "statsd-secret"),
            ("OPENAI_BASE_URL", "not a url secret"),
            ("OPENAI_BASE_URL", "ftp://example.com"),
            ("AUTH_MODE", "maybe"),
            ("CONNECT_TIMEOUT_MS", "-5"),
            ("SECRETS_TTL_MS", "5m"),
            ("SECRETS_TTL_MS", "999"),
            ("SECRETS_TTL_MS", "900001"),
            ("OPENAI_ORGANIZATION", "org-x\nInjected: yes"),
            ("OPENAI_PROJECT", "proj ünïcode"),
            ("OPENAI_API_KEY", "sk-with\u{7}bell"),
            ("UPSTREAMS", "[{\"name\": \"secret-name!\"}]"),
            ("UPSTREAMS", "not-json-secret"),
            ("MODEL_FALLBACKS", "[\"secret-model\"]"),
            ("FALLBACK_AFTER_FAILURES", "21"),
            ("FALLBACK_AFTER_FAILURES", "twice"),
            ("BREAKER_FAILURES", "-1"),
            ("BREAKER_COOLDOWN_MS", "1000000"),
            ("SKIP_HOPELESS_ATTEMPTS", "perhaps-secret"),
            ("INVOKE_MODE", "STREAMING-secret"),
            ("STREAM_IDLE_TIMEOUT_MS", "9999999"),
            ("STREAM_IDLE_TIMEOUT_MS", "soon"),
        ] {
            let mut pairs = MINIMAL.to_vec();
            pairs.retain(|(n, _)| *n != name);
            pairs.push((name, value));
            let err = settings(&pairs).unwrap_err();
            assert_eq!(err.setting, name);
            assert!(!err.to_string().contains(value), "{err} leaks {value}");
        }
    }

    #[test]
    fn upstream_settings_default_to_the_single_openai_upstream() {
        let s = settings(&[
            ("OPENAI_API_KEY", "sk-test"),
            ("PROXY_API_KEYS", "t"),
            ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1"),
            ("OPENAI_ORGANIZATION", "org-1"),
        ])
        .unwrap();
        let UpstreamsSource::List(list) = &s.upstreams else {
            panic!("{:?}", s.upstreams)
        };
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].name, "openai");
        assert_eq!(list[0].base_url, "http://127.0.0.1:9/v1");
        assert_eq!(list[0].kind, UpstreamKind::OpenAi);
        assert!(matches!(list[0].key, KeySource::Env(ref k) if k == "sk-test"));
        assert_eq!(list[0].organization.as_deref(), Some("org-1"));
        assert_eq!(s.fallback_after_failures, 2);
        assert_eq!(s.model_fallbacks.chain("gpt-4o"), ["gpt-4o"]);
        assert_eq!(s.breaker, BreakerSettings::default());
        assert_eq!((s.breaker.failures, s.breaker.cooldown_ms), (5, 10_000));
        assert!(s.skip_hopeless_attempts);
    }

    #[test]
    fn upstream_settings_are_read() {
        let mut pairs = MINIMAL.to_vec();
        pairs.extend([
            (
                "UPSTREAMS",
                r#"[{"name":"a","base_url":"http://127.0.0.1:1/v1","api_key":"k1"},
                    {"name":"b","base_url":"http://127.0.0.1:2/openai/v1","kind":"azure","api_key":"k2"}]"#,
            ),
            ("MODEL_FALLBACKS", r#"{"gpt-4o": ["gpt-4o-mini"]}"#),
            ("FALLBACK_AFTER_FAILURES", "3"),
            ("BREAKER_FAILURES", "0"),
            ("BREAKER_COOLDOWN_MS", "2500"),
            ("SKIP_HOPELESS_ATTEMPTS", "FALSE"),
        ]);
        let s = settings(&pairs).unwrap();
        let UpstreamsSource::List(list) = &s.upstreams else {
            panic!("{:?}", s.upstreams)
        };
        let names: Vec<&str> = list.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(list[1].kind, UpstreamKind::Azure);
        assert_eq!(s.model_fallbacks.chain("gpt-4o"), ["gpt-4o", "gpt-4o-mini"]);
        assert_eq!(s.fallback_after_failures, 3);
        assert_eq!((s.breaker.failures, s.breaker.cooldown_ms), (0, 2500));
        assert!(!s.skip_hopeless_attempts);
        // The secret wins over the inline list, like OPENAI_API_KEY_SECRET_ARN does.
        pairs.push((
            "UPSTREAMS_SECRET_ARN",
            "arn:aws:secretsmanager:us-east-1:1:secret:u",
        ));
        let s = settings(&pairs).unwrap();
        assert!(matches!(s.upstreams, UpstreamsSource::SecretArn(_)));
    }

    #[test]
    fn fails_closed_without_tokens_unless_auth_is_off() {
        let err = settings(&[("OPENAI_API_KEY", "k")]).unwrap_err();
        assert_eq!(err.setting, "PROXY_API_KEYS");
        let s = settings(&[("OPENAI_API_KEY", "k"), ("AUTH_MODE", "none")]).unwrap();
        assert!(matches!(s.auth, ClientAuth::Disabled));
        let err = settings(&[("PROXY_API_KEYS", "t")]).unwrap_err();
        assert_eq!(err.setting, "OPENAI_API_KEY");
    }

    #[test]
    fn empty_values_count_as_unset_and_urls_are_normalised() {
        let mut pairs = MINIMAL.to_vec();
        pairs.extend([
            ("ATTEMPT_TIMEOUT_MS", ""),
            ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/"),
        ]);
        let s = settings(&pairs).unwrap();
        assert_eq!(s.attempt_timeout_ms, None);
        assert_eq!(s.openai_base_url, "http://127.0.0.1:9/v1");
    }

    #[test]
    fn metrics_namespace_reserved_for_aws_is_refused() {
        // PutMetricData rejects "AWS/..." namespaces: every invocation's metrics would be lost.
        for bad in ["AWS/Lambda", "AWS/"] {
            let mut pairs = MINIMAL.to_vec();
            pairs.push(("METRICS_NAMESPACE", bad));
            let err = settings(&pairs).unwrap_err();
            assert_eq!(err.setting, "METRICS_NAMESPACE");
            assert!(err.problem.contains("AWS/"), "{err}");
        }
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("METRICS_NAMESPACE", "Team/AWS/Proxy"));
        assert_eq!(
            settings(&pairs).unwrap().metrics_namespace,
            "Team/AWS/Proxy"
        );
    }

    #[test]
    fn flush_reserve_only_when_metrics_are_flushed_after_the_answer() {
        for (backend, reserve) in [
            ("cloudwatch", METRICS_FLUSH_RESERVE_MS),
            ("emf", 0),
            ("none", 0),
        ] {
            let mut pairs = MINIMAL.to_vec();
            pairs.push(("METRICS_BACKEND", backend));
            let d = settings(&pairs).unwrap().deadline();
            assert_eq!(d.flush_reserve_ms, reserve, "{backend}");
        }
        // The default backend is cloudwatch.
        let d = settings(&MINIMAL).unwrap().deadline();
        assert_eq!(d.flush_reserve_ms, METRICS_FLUSH_RESERVE_MS);
    }

    #[test]
    fn own_host_is_recognised_by_name_and_port() {
        let api = "https://abc123.execute-api.us-east-1.amazonaws.com/v1";
        assert!(is_own_host(
            api,
            "abc123.execute-api.us-east-1.amazonaws.com"
        ));
        assert!(is_own_host(
            api,
            "ABC123.execute-api.us-east-1.amazonaws.com."
        ));
        assert!(is_own_host(
            api,
            "abc123.execute-api.us-east-1.amazonaws.com:443"
        ));
        assert!(!is_own_host(
            api,
            "abc123.execute-api.us-east-1.amazonaws.com:8443"
        ));
        assert!(!is_own_host(api, "xyz.execute-api.us-east-1.amazonaws.com"));
        assert!(is_own_host("http://127.0.0.1:9000/v1", "127.0.0.1:9000"));
        // Same machine, other port: the local simulator behind `cargo lambda watch`.
        assert!(!is_own_host("http://127.0.0.1:9123/v1", "127.0.0.1:9000"));
        assert!(!is_own_host("http://127.0.0.1:9123/v1", "127.0.0.1"));
        assert!(is_own_host("http://[::1]:8080/v1", "[::1]:8080"));
        assert!(!is_own_host("https://api.openai.com/v1", ""));
        assert!(!is_own_host("https://api.openai.com/v1", "bad host header"));
    }

    #[test]
    fn invoke_mode_accepts_lambdas_spelling_in_any_case() {
        for (raw, mode) in [
            ("RESPONSE_STREAM", InvokeMode::ResponseStream),
            ("response_stream", InvokeMode::ResponseStream),
            ("BUFFERED", InvokeMode::Buffered),
        ] {
            let mut pairs = MINIMAL.to_vec();
            pairs.push(("INVOKE_MODE", raw));
            assert_eq!(settings(&pairs).unwrap().invoke_mode, mode);
        }
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("STREAM_IDLE_TIMEOUT_MS", "5000"));
        assert_eq!(settings(&pairs).unwrap().stream_idle_timeout_ms, 5000);
    }

    #[test]
    fn model_allow_list_matches_exact_names_and_prefixes() {
        let allow = ModelAllowList::parse("gpt-4o*, text-embedding-3-small").unwrap();
        assert!(allow.allows("gpt-4o-mini"));
        assert!(allow.allows("gpt-4o"));
        assert!(allow.allows("text-embedding-3-small"));
        assert!(!allow.allows("text-embedding-3-large"));
        assert!(!allow.allows("gpt-4"));
        assert_eq!(ModelAllowList::parse(" , "), None);
    }

    #[test]
    fn debug_output_redacts_keys() {
        let s = settings(&MINIMAL).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("sk-test") && !dbg.contains("t1"));
    }
}
