//! Keys: the server's OpenAI key and the proxy tokens, from Secrets Manager or the environment.
//!
//! Each secret is one [`Cell`]: the value and when it was read, or the failures since. What a
//! request does with a cell is the pure [`step`] (use it, read it again, or refuse at once) and
//! what a read leaves behind is the pure [`settle`], both over an injected clock. So:
//! - a read is bounded by the invocation's deadline: a Secrets Manager outage is a clear error,
//!   not a hang;
//! - a failed read is remembered with exponential backoff ([`backoff_ms`]): a flood of requests
//!   (even unauthenticated ones, when the tokens cannot be read) is at most a few
//!   `GetSecretValue` calls per minute, shared by concurrent requests;
//! - a value is read again once older than `SECRETS_TTL_MS` (spec §7), so a rotated or revoked
//!   token or key takes effect within minutes in warm environments too; never because of what a
//!   request carries (an unknown token does not trigger a read);
//! - the caller never sees AWS error text (it names accounts, roles and ARNs): only the setting.
//!   The operator gets the whole error in one ERROR log line per failed read.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_secretsmanager::config::http::HttpResponse;
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError;
use tokio::sync::Mutex;

use crate::config::{ClientAuth, ConfigError, KeySource};
use crate::retry::{Clock, SystemClock};
use crate::upstreams::{UpstreamSpec, parse_upstreams};

/// First wait after a failed read; doubled after each further failure, up to [`BACKOFF_MAX_MS`].
pub const BACKOFF_MIN_MS: u64 = 1_000;
/// Longest wait between two reads of a secret that keeps failing.
pub const BACKOFF_MAX_MS: u64 = 30_000;

/// One cached secret.
#[derive(Clone, Debug)]
pub struct Cell<T> {
    /// The value and when it was read (clock ms).
    value: Option<(T, u64)>,
    failure: Option<Failure>,
    /// Reads after an upstream rejected the value that found the same value again: the next
    /// rejection reads no sooner than `retry_at_ms` (a revoked key would otherwise make every
    /// request read Secrets Manager).
    rejections: Option<Backoff>,
}

impl<T> Default for Cell<T> {
    fn default() -> Self {
        Cell {
            value: None,
            failure: None,
            rejections: None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Backoff {
    consecutive: u32,
    retry_at_ms: u64,
}

impl Backoff {
    /// One more, at `now_ms`.
    fn next(previous: Option<Backoff>, now_ms: u64) -> Backoff {
        let consecutive = previous.map_or(0, |b| b.consecutive) + 1;
        Backoff {
            consecutive,
            retry_at_ms: now_ms.saturating_add(backoff_ms(consecutive)),
        }
    }
}

/// The failed reads since the last good one.
#[derive(Clone, Debug)]
struct Failure {
    error: ConfigError,
    consecutive: u32,
    /// No read before this time (clock ms).
    retry_at_ms: u64,
}

/// What a request does with a cell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step<T> {
    Use(T),
    Read,
    /// A recent read failed and its backoff has not passed: answer with that error, no call.
    Refuse(ConfigError),
}

/// The wait after `consecutive` failed reads: 1 s, 2 s, 4 s, … up to 30 s.
pub fn backoff_ms(consecutive: u32) -> u64 {
    let doublings = consecutive.saturating_sub(1).min(16);
    (BACKOFF_MIN_MS << doublings).min(BACKOFF_MAX_MS)
}

/// Pure: what a request at `now_ms` does. A value is used while younger than `ttl_ms` and not
/// `stale` (rejected upstream); after a failure nothing is read before its backoff passed, and
/// after a rejection that found the same value, no rejection reads before its backoff passed.
pub fn step<T: Clone>(cell: &Cell<T>, now_ms: u64, ttl_ms: u64, stale: bool) -> Step<T> {
    let rejections_wait = cell.rejections.is_some_and(|b| now_ms < b.retry_at_ms);
    if let Some(f) = &cell.failure
        && now_ms < f.retry_at_ms
    {
        return match &cell.value {
            Some((v, _)) => Step::Use(v.clone()),
            None => Step::Refuse(f.error.clone()),
        };
    }
    match &cell.value {
        Some((v, read_at))
            if (!stale || rejections_wait) && now_ms.saturating_sub(*read_at) < ttl_ms =>
        {
            Step::Use(v.clone())
        }
        _ => Step::Read,
    }
}

/// Pure: the cell after a read that ended at `now_ms` (made because the value was `stale`, or
/// not; `same` tells whether it found the value it had), and the request's answer. A transient failure keeps the value read before in use
/// (Secrets Manager being down does not take the proxy down); a definite one drops it.
pub fn settle<T: Clone>(
    cell: Cell<T>,
    read: Result<T, ConfigError>,
    now_ms: u64,
    stale: bool,
    same: fn(&T, &T) -> bool,
) -> (Cell<T>, Result<T, ConfigError>) {
    match read {
        Ok(v) => {
            let same = cell.value.as_ref().is_some_and(|(old, _)| same(old, &v));
            let rejections = match (same, stale) {
                (false, _) => None,
                (true, true) => Some(Backoff::next(cell.rejections, now_ms)),
                (true, false) => cell.rejections,
            };
            let cell = Cell {
                value: Some((v.clone(), now_ms)),
                failure: None,
                rejections,
            };
            (cell, Ok(v))
        }
        Err(error) => {
            let consecutive = cell.failure.as_ref().map_or(0, |f| f.consecutive) + 1;
            let value = cell.value.filter(|_| error.transient);
            let answer = match &value {
                Some((v, _)) => Ok(v.clone()),
                None => Err(error.clone()),
            };
            let failure = Failure {
                error,
                consecutive,
                retry_at_ms: now_ms.saturating_add(backoff_ms(consecutive)),
            };
            let cell = Cell {
                value,
                failure: Some(failure),
                rejections: cell.rejections,
            };
            (cell, answer)
        }
    }
}

/// A cell that requests for the same secret share.
type SharedCell<T> = Arc<Mutex<Cell<T>>>;

/// What callers see when Secrets Manager refused or failed: the setting, nothing of the error.
const UNREADABLE: &str =
    "could not be read from Secrets Manager (the function's log has the details)";

/// Cached secrets. One per process.
pub struct Secrets {
    client: Option<aws_sdk_secretsmanager::Client>,
    clock: Arc<dyn Clock + Send + Sync>,
    /// `SECRETS_TTL_MS`: values older than this are read again (`u64::MAX`: never).
    ttl_ms: u64,
    /// API keys, one cell per secret ARN (the OpenAI key, and any other upstream's).
    keys: std::sync::Mutex<HashMap<String, SharedCell<Arc<str>>>>,
    proxy_tokens: Mutex<Cell<Arc<[String]>>>,
    /// `UPSTREAMS_SECRET_ARN`'s list.
    upstreams: Mutex<Cell<Arc<[UpstreamSpec]>>>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("client", &self.client.is_some())
            .field("ttl_ms", &self.ttl_ms)
            .finish_non_exhaustive()
    }
}

impl Secrets {
    /// `client` is needed only when a `*_SECRET_ARN` setting is used.
    pub fn new(client: Option<aws_sdk_secretsmanager::Client>) -> Secrets {
        Secrets {
            client,
            clock: Arc::new(SystemClock),
            ttl_ms: u64::MAX,
            keys: std::sync::Mutex::default(),
            proxy_tokens: Mutex::default(),
            upstreams: Mutex::default(),
        }
    }

    /// The same, with another clock for the cache's decisions (tests use a virtual one).
    pub fn with_clock(self, clock: Arc<dyn Clock + Send + Sync>) -> Secrets {
        Secrets { clock, ..self }
    }

    /// The same, reading values again once older than `ttl_ms` (`SECRETS_TTL_MS`).
    pub fn with_ttl_ms(self, ttl_ms: u64) -> Secrets {
        Secrets { ttl_ms, ..self }
    }

    /// The OpenAI key; with `rejected` (after an upstream 401), the cached one is read again.
    pub async fn openai_key(
        &self,
        source: &KeySource,
        rejected: bool,
        within: Duration,
    ) -> Result<Arc<str>, ConfigError> {
        match source {
            KeySource::Env(key) => Ok(Arc::from(key.as_str())),
            KeySource::SecretArn(arn) => {
                self.key("OPENAI_API_KEY_SECRET_ARN", arn, rejected, within)
                    .await
            }
        }
    }

    /// An API key from the secret `arn` (raw, or JSON with an `OPENAI_API_KEY` field), cached
    /// per ARN; errors name `setting`. With `rejected`, the cached one is read again.
    pub async fn key(
        &self,
        setting: &'static str,
        arn: &str,
        rejected: bool,
        within: Duration,
    ) -> Result<Arc<str>, ConfigError> {
        let cell = {
            let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            keys.entry(arn.to_owned()).or_default().clone()
        };
        let read = |until| async move {
            let raw = self.read(setting, arn, within, until).await?;
            let key = parse_openai_key(&raw).ok_or_else(|| {
                ConfigError::new(
                    setting,
                    "holds neither a key nor JSON with an OPENAI_API_KEY field",
                )
            })?;
            if !crate::config::is_header_token(&key) {
                return Err(ConfigError::new(
                    setting,
                    "holds a key with spaces, control or non-ASCII characters",
                ));
            }
            Ok(Arc::from(key))
        };
        self.cached(&cell, setting, arn, (rejected, |a, b| a == b), within, read)
            .await
    }

    /// The key of an `UPSTREAMS` entry with `api_key_secret_arn` (a raw key or JSON like the
    /// OpenAI key's secret); with `rejected` (after that upstream's 401), read again.
    pub async fn upstream_key(
        &self,
        source: &KeySource,
        rejected: bool,
        within: Duration,
    ) -> Result<Arc<str>, ConfigError> {
        let arn = match source {
            KeySource::Env(key) => return Ok(Arc::from(key.as_str())),
            KeySource::SecretArn(arn) => arn,
        };
        self.key("UPSTREAMS", arn, rejected, within).await
    }

    /// The upstream list held by `UPSTREAMS_SECRET_ARN` (the same JSON as `UPSTREAMS`).
    pub async fn upstreams(
        &self,
        arn: &str,
        within: Duration,
    ) -> Result<Arc<[UpstreamSpec]>, ConfigError> {
        const SETTING: &str = "UPSTREAMS_SECRET_ARN";
        let read = |until| async move {
            let raw = self.read(SETTING, arn, within, until).await?;
            parse_upstreams(SETTING, &raw).map(Arc::from)
        };
        self.cached(
            &self.upstreams,
            SETTING,
            arn,
            (false, |_, _| false),
            within,
            read,
        )
        .await
    }

    /// The proxy tokens callers must present; `None` when auth is off.
    pub async fn proxy_tokens(
        &self,
        auth: &ClientAuth,
        within: Duration,
    ) -> Result<Option<Arc<[String]>>, ConfigError> {
        let arn = match auth {
            ClientAuth::Disabled => return Ok(None),
            ClientAuth::Tokens(t) => return Ok(Some(Arc::from(t.as_slice()))),
            ClientAuth::SecretArn(arn) => arn,
        };
        const SETTING: &str = "PROXY_API_KEYS_SECRET_ARN";
        let read = |until| async move {
            let tokens = parse_tokens(&self.read(SETTING, arn, within, until).await?);
            if tokens.is_empty() {
                return Err(ConfigError::new(SETTING, "holds no tokens"));
            }
            Ok(Arc::from(tokens))
        };
        self.cached(
            &self.proxy_tokens,
            SETTING,
            arn,
            (false, |a, b| a == b),
            within,
            read,
        )
        .await
        .map(Some)
    }

    /// One cell's way through [`step`], the read if needed, and [`settle`]. Concurrent requests
    /// wait for one read (each no longer than its own `within`) and share its result. `stale`:
    /// whether the value was rejected upstream, and how to tell a read found the same one.
    async fn cached<T, F, Fut>(
        &self,
        cell: &Mutex<Cell<T>>,
        setting: &'static str,
        arn: &str,
        (stale, same): (bool, fn(&T, &T) -> bool),
        within: Duration,
        read: F,
    ) -> Result<T, ConfigError>
    where
        T: Clone,
        F: FnOnce(tokio::time::Instant) -> Fut,
        Fut: Future<Output = Result<T, ConfigError>>,
    {
        let until = tokio::time::Instant::now() + within;
        let mut guard = tokio::time::timeout_at(until, cell.lock())
            .await
            .map_err(|_| timed_out(setting, within))?;
        match step(&guard, self.clock.now_ms(), self.ttl_ms, stale) {
            Step::Use(v) => return Ok(v),
            Step::Refuse(e) => return Err(e),
            Step::Read => {}
        }
        let result = read(until).await;
        let failed = result.is_err();
        let now = self.clock.now_ms();
        let (next, answer) = settle(std::mem::take(&mut *guard), result, now, stale, same);
        if let (true, Some(f)) = (failed, &next.failure) {
            log_failure(arn, f, next.value.is_some());
        }
        *guard = next;
        answer
    }

    /// One `GetSecretValue`, bounded by `until`.
    async fn read(
        &self,
        setting: &'static str,
        arn: &str,
        within: Duration,
        until: tokio::time::Instant,
    ) -> Result<String, ConfigError> {
        let client = self.client.as_ref().ok_or_else(|| {
            ConfigError::new(setting, "cannot be read: no Secrets Manager client")
        })?;
        let call = client.get_secret_value().secret_id(arn).send();
        let out = match tokio::time::timeout_at(until, call).await {
            Err(_) => return Err(timed_out(setting, within)),
            Ok(Err(e)) => {
                return Err(ConfigError {
                    setting,
                    problem: UNREADABLE.into(),
                    detail: describe(&e),
                    transient: is_transient(&e),
                });
            }
            Ok(Ok(out)) => out,
        };
        out.secret_string()
            .map(str::to_owned)
            .ok_or_else(|| ConfigError::new(setting, "holds no string value (SecretString)"))
    }
}

fn log_failure(arn: &str, f: &Failure, keeps_value: bool) {
    let e = &f.error;
    let retry_in_ms = backoff_ms(f.consecutive);
    if keeps_value {
        tracing::error!(setting = e.setting, secret_arn = arn, error = %e.detail, transient = e.transient,
            failures = f.consecutive, retry_in_ms,
            "could not read a secret again; keeping the value read before");
    } else {
        tracing::error!(setting = e.setting, secret_arn = arn, error = %e.detail, transient = e.transient,
            failures = f.consecutive, retry_in_ms,
            "could not read a secret; requests answer 500 config_error until it can be read");
    }
}

fn timed_out(setting: &'static str, within: Duration) -> ConfigError {
    let problem = format!(
        "could not be read from Secrets Manager within {} ms",
        within.as_millis()
    );
    ConfigError {
        transient: true,
        ..ConfigError::new(setting, problem)
    }
}

/// The whole error for the operator: status, AWS code and message, or the error chain. Never
/// the raw response of a call that succeeded (it would hold the secret value); an error
/// response's body, cut short, only when AWS's code and message could not be parsed from it.
fn describe(e: &SdkError<GetSecretValueError, HttpResponse>) -> String {
    if let SdkError::ServiceError(s) = e {
        let status = s.raw().status().as_u16();
        let (code, message) = (s.err().code(), s.err().message());
        if code.is_some() || message.is_some() {
            return format!(
                "HTTP {status} {}: {}",
                code.unwrap_or("(no code)"),
                message.unwrap_or("(no message)")
            );
        }
        if !s.raw().status().is_success() {
            let body = s.raw().body().bytes().unwrap_or_default();
            let body: String = String::from_utf8_lossy(body).chars().take(1_000).collect();
            return format!("HTTP {status}: {body}");
        }
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// Whether Secrets Manager failed (not reached, timed out, 5xx, throttled) rather than answered
/// definitely (missing secret, access denied, bad request).
fn is_transient<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> bool {
    match e {
        SdkError::ServiceError(s) => {
            s.raw().status().is_server_error()
                || matches!(
                    s.err().code(),
                    Some("ThrottlingException" | "InternalServiceError" | "RequestLimitExceeded")
                )
        }
        SdkError::ConstructionFailure(_) => false,
        _ => true,
    }
}

/// A raw key, or JSON `{"OPENAI_API_KEY": "..."}` (also `api_key` / `key`).
fn parse_openai_key(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if raw.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(raw).ok()?;
        return ["OPENAI_API_KEY", "openai_api_key", "api_key", "key"]
            .iter()
            .find_map(|k| v.get(k).and_then(|x| x.as_str()))
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty());
    }
    (!raw.is_empty()).then(|| raw.to_owned())
}

/// A comma list, a JSON array, or JSON `{"PROXY_API_KEYS": "a,b"}` / `{"PROXY_API_KEYS": [..]}`.
fn parse_tokens(raw: &str) -> Vec<String> {
    let raw = raw.trim();
    let from_list = |s: &str| -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let from_value = |v: &serde_json::Value| -> Vec<String> {
        match v {
            serde_json::Value::String(s) => from_list(s),
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str())
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            _ => Vec::new(),
        }
    };
    if raw.starts_with('{') || raw.starts_with('[') {
        return match serde_json::from_str::<serde_json::Value>(raw) {
            Ok(v @ serde_json::Value::Array(_)) => from_value(&v),
            Ok(v) => v.get("PROXY_API_KEYS").map(from_value).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
    }
    from_list(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_key_raw_or_json() {
        assert_eq!(parse_openai_key(" sk-abc \n").as_deref(), Some("sk-abc"));
        assert_eq!(
            parse_openai_key(r#"{"OPENAI_API_KEY":"sk-json"}"#).as_deref(),
            Some("sk-json")
        );
        assert_eq!(parse_openai_key(r#"{"other":"x"}"#), None);
        assert_eq!(parse_openai_key(""), None);
    }

    #[test]
    fn tokens_from_list_or_json() {
        assert_eq!(parse_tokens("a, b,,c"), ["a", "b", "c"]);
        assert_eq!(parse_tokens(r#"["a","b"]"#), ["a", "b"]);
        assert_eq!(parse_tokens(r#"{"PROXY_API_KEYS":"a,b"}"#), ["a", "b"]);
        assert_eq!(parse_tokens(r#"{"PROXY_API_KEYS":["x"]}"#), ["x"]);
        assert!(parse_tokens("{broken").is_empty());
    }

    fn failed(transient: bool) -> ConfigError {
        ConfigError {
            setting: "PROXY_API_KEYS_SECRET_ARN",
            problem: UNREADABLE.into(),
            detail: "AccessDeniedException: User: arn:aws:sts::123456789012:assumed-role/r".into(),
            transient,
        }
    }

    #[test]
    fn backoff_doubles_from_one_second_up_to_thirty() {
        let waits: Vec<u64> = (1..=7).map(backoff_ms).collect();
        assert_eq!(waits, [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]);
        assert_eq!(backoff_ms(u32::MAX), BACKOFF_MAX_MS);
    }

    #[test]
    fn a_failed_read_is_refused_without_a_call_until_its_backoff_passed() {
        let cell: Cell<u32> = Cell::default();
        assert_eq!(step(&cell, 0, u64::MAX, false), Step::Read);
        let (cell, answer) = settle(cell, Err(failed(false)), 0, false, u32::eq);
        assert_eq!(answer, Err(failed(false)));
        assert_eq!(
            step(&cell, 999, u64::MAX, false),
            Step::Refuse(failed(false))
        );
        assert_eq!(
            step(&cell, 999, u64::MAX, true),
            Step::Refuse(failed(false))
        );
        assert_eq!(step(&cell, 1_000, u64::MAX, false), Step::Read);
        let (cell, _) = settle(cell, Err(failed(false)), 1_000, false, u32::eq);
        assert_eq!(
            step(&cell, 2_999, u64::MAX, false),
            Step::Refuse(failed(false))
        );
        assert_eq!(step(&cell, 3_000, u64::MAX, false), Step::Read);
        // A good read clears the failures: the next one waits 1 s again.
        let (cell, answer) = settle(cell, Ok(7), 3_000, false, u32::eq);
        assert_eq!(answer, Ok(7));
        assert_eq!(step(&cell, 3_001, u64::MAX, false), Step::Use(7));
        let (cell, _) = settle(cell, Err(failed(false)), 4_000, false, u32::eq);
        assert_eq!(
            step(&cell, 4_999, u64::MAX, false),
            Step::Refuse(failed(false))
        );
        assert_eq!(step(&cell, 5_000, u64::MAX, false), Step::Read);
    }

    #[test]
    fn a_flood_against_a_failing_secret_reads_it_a_few_times_a_minute() {
        // One request every 10 ms for ten minutes of virtual time; every read fails.
        let mut cell: Cell<u32> = Cell::default();
        let mut reads = Vec::new();
        for now in (0..600_000).step_by(10) {
            if step(&cell, now, u64::MAX, false) == Step::Read {
                reads.push(now);
                cell = settle(cell, Err(failed(false)), now, false, u32::eq).0;
            }
        }
        assert_eq!(reads[..6], [0, 1_000, 3_000, 7_000, 15_000, 31_000]);
        for minute in 0..10 {
            let range = minute * 60_000u64..(minute + 1) * 60_000;
            let n = reads.iter().filter(|t| range.contains(*t)).count();
            assert!(n <= 6, "{n} reads in minute {minute}");
        }
        assert!(
            reads.len() <= 6 + 2 * 9,
            "{} reads in ten minutes",
            reads.len()
        );
    }

    #[test]
    fn outages_keep_the_value_read_before_definite_answers_drop_it() {
        let (cell, _) = settle(Cell::default(), Ok(1), 0, false, u32::eq);
        let (kept, answer) = settle(cell.clone(), Err(failed(true)), 10, false, u32::eq);
        assert_eq!(answer, Ok(1));
        assert_eq!(step(&kept, 11, 5, false), Step::Use(1));
        assert_eq!(step(&kept, 1_010, 5, false), Step::Read);
        let (dropped, answer) = settle(cell, Err(failed(false)), 10, false, u32::eq);
        assert_eq!(answer, Err(failed(false)));
        assert_eq!(
            step(&dropped, 11, u64::MAX, false),
            Step::Refuse(failed(false))
        );
    }

    #[test]
    fn values_are_used_while_younger_than_the_ttl_or_until_rejected() {
        let (cell, _) = settle(Cell::default(), Ok(1), 1_000, false, u32::eq);
        assert_eq!(step(&cell, 1_000 + 299_999, 300_000, false), Step::Use(1));
        assert_eq!(step(&cell, 1_000 + 300_000, 300_000, false), Step::Read);
        assert_eq!(step(&cell, 1_001, 300_000, true), Step::Read);
        assert_eq!(step(&cell, u64::MAX, u64::MAX, false), Step::Use(1));
        // A clock that stepped back never makes a value look older.
        assert_eq!(step(&cell, 0, 300_000, false), Step::Use(1));
    }

    #[test]
    fn a_key_rejected_again_and_again_is_read_a_few_times_a_minute() {
        // The key was revoked at OpenAI but the secret still holds it: every request gets a
        // 401 and asks for the key again, once every 10 ms for a minute of virtual time.
        let (mut cell, _) = settle(Cell::default(), Ok(1), 0, false, u32::eq);
        let mut reads = Vec::new();
        for now in (10..60_000).step_by(10) {
            if step(&cell, now, 300_000, true) == Step::Read {
                reads.push(now);
                cell = settle(cell, Ok(1), now, true, u32::eq).0;
            }
        }
        assert_eq!(reads, [10, 1_010, 3_010, 7_010, 15_010, 31_010]);
        // Other requests use the key meanwhile; a rotated key ends the backoff at once.
        assert_eq!(step(&cell, 31_011, 300_000, false), Step::Use(1));
        let (cell, answer) = settle(cell, Ok(2), 61_010, true, u32::eq);
        assert_eq!(answer, Ok(2));
        assert_eq!(step(&cell, 61_011, 300_000, true), Step::Read);
    }

    #[test]
    fn callers_never_see_the_detail() {
        let e = failed(false);
        assert!(!e.to_string().contains("arn:"), "{e}");
        assert!(e.to_string().starts_with("PROXY_API_KEYS_SECRET_ARN "));
    }

    #[tokio::test]
    async fn env_sources_need_no_client() {
        let s = Secrets::new(None);
        let key = s
            .openai_key(
                &KeySource::Env("sk-env".into()),
                false,
                Duration::from_secs(1),
            )
            .await;
        assert_eq!(key.unwrap().as_ref(), "sk-env");
        let missing = s
            .openai_key(
                &KeySource::SecretArn("arn:x".into()),
                false,
                Duration::from_secs(1),
            )
            .await
            .unwrap_err();
        assert_eq!(missing.setting, "OPENAI_API_KEY_SECRET_ARN");
        assert_eq!(
            s.proxy_tokens(&ClientAuth::Disabled, Duration::from_secs(1))
                .await,
            Ok(None)
        );
    }
}
