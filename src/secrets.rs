//! Keys: the server's OpenAI key and the proxy tokens, from Secrets Manager or the environment.
//! Secrets are fetched once and cached across warm invocations; every fetch is bounded by the
//! invocation's deadline so a Secrets Manager outage becomes a clear error, not a hang.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::config::{ClientAuth, KeySource};

/// A secret could not be had. Names the setting, never a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretError {
    pub setting: &'static str,
    pub problem: String,
}

impl std::fmt::Display for SecretError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.setting, self.problem)
    }
}

/// Cached secrets. One per process.
#[derive(Debug)]
pub struct Secrets {
    client: Option<aws_sdk_secretsmanager::Client>,
    openai_key: Mutex<Option<Arc<str>>>,
    proxy_tokens: Mutex<Option<Arc<[String]>>>,
}

impl Secrets {
    /// `client` is needed only when a `*_SECRET_ARN` setting is used.
    pub fn new(client: Option<aws_sdk_secretsmanager::Client>) -> Secrets {
        Secrets {
            client,
            openai_key: Mutex::new(None),
            proxy_tokens: Mutex::new(None),
        }
    }

    /// The OpenAI key; with `refresh`, the cached one is dropped first (after an upstream 401).
    pub async fn openai_key(
        &self,
        source: &KeySource,
        refresh: bool,
        within: Duration,
    ) -> Result<Arc<str>, SecretError> {
        let arn = match source {
            KeySource::Env(key) => return Ok(Arc::from(key.as_str())),
            KeySource::SecretArn(arn) => arn,
        };
        let mut cached = self.openai_key.lock().await;
        if let (Some(key), false) = (cached.as_ref(), refresh) {
            return Ok(key.clone());
        }
        const SETTING: &str = "OPENAI_API_KEY_SECRET_ARN";
        let raw = self.fetch(SETTING, arn, within).await?;
        let key = parse_openai_key(&raw).ok_or_else(|| SecretError {
            setting: SETTING,
            problem: "the secret holds neither a key nor JSON with an OPENAI_API_KEY field".into(),
        })?;
        if !crate::config::is_header_token(&key) {
            return Err(SecretError {
                setting: SETTING,
                problem: "the key in the secret holds spaces, control or non-ASCII characters"
                    .into(),
            });
        }
        let key: Arc<str> = Arc::from(key);
        *cached = Some(key.clone());
        Ok(key)
    }

    /// The proxy tokens callers must present; `None` when auth is off.
    pub async fn proxy_tokens(
        &self,
        auth: &ClientAuth,
        within: Duration,
    ) -> Result<Option<Arc<[String]>>, SecretError> {
        let arn = match auth {
            ClientAuth::Disabled => return Ok(None),
            ClientAuth::Tokens(t) => return Ok(Some(Arc::from(t.as_slice()))),
            ClientAuth::SecretArn(arn) => arn,
        };
        let mut cached = self.proxy_tokens.lock().await;
        if let Some(tokens) = cached.as_ref() {
            return Ok(Some(tokens.clone()));
        }
        const SETTING: &str = "PROXY_API_KEYS_SECRET_ARN";
        let raw = self.fetch(SETTING, arn, within).await?;
        let tokens = parse_tokens(&raw);
        if tokens.is_empty() {
            return Err(SecretError {
                setting: SETTING,
                problem: "the secret holds no tokens".into(),
            });
        }
        let tokens: Arc<[String]> = Arc::from(tokens);
        *cached = Some(tokens.clone());
        Ok(Some(tokens))
    }

    async fn fetch(
        &self,
        setting: &'static str,
        arn: &str,
        within: Duration,
    ) -> Result<String, SecretError> {
        let err = |problem: String| SecretError { setting, problem };
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| err("no Secrets Manager client is configured".into()))?;
        let call = client.get_secret_value().secret_id(arn).send();
        let out = tokio::time::timeout(within, call)
            .await
            .map_err(|_| {
                err(format!(
                    "Secrets Manager did not answer within {} ms",
                    within.as_millis()
                ))
            })?
            .map_err(|e| {
                let detail = aws_sdk_secretsmanager::error::DisplayErrorContext(&e).to_string();
                err(format!(
                    "could not read the secret from Secrets Manager ({})",
                    first_line(&detail)
                ))
            })?;
        out.secret_string()
            .map(str::to_owned)
            .ok_or_else(|| err("the secret has no string value".into()))
    }
}

/// The first line, at most 300 characters (cut on a character boundary).
fn first_line(s: &str) -> &str {
    let s = s.lines().next().unwrap_or("");
    match s.char_indices().nth(300) {
        Some((end, _)) => &s[..end],
        None => s,
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

    #[test]
    fn first_line_cuts_on_char_boundaries() {
        assert_eq!(first_line("a\nb"), "a");
        let long = "é".repeat(400);
        assert_eq!(first_line(&long).chars().count(), 300);
        assert_eq!(first_line(""), "");
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
