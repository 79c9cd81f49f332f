//! The upstreams (spec §11): the ordered list a request may be served by, how each one is
//! addressed (OpenAI or Azure OpenAI), and the warm-environment state kept about them
//! ([`breaker`], [`latency`]) plus the pure switching rule ([`fallback`]).
//!
//! Parsing never echoes a value: a malformed list is a [`ConfigError`] that names the setting,
//! the entry's position and the field.

pub mod breaker;
pub mod fallback;
pub mod latency;
pub mod naming;
pub mod routing;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use crate::config::{ConfigError, KeySource, is_header_token, parse_base_url};

/// How an upstream is spoken to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpstreamKind {
    /// `Authorization: Bearer <key>` (OpenAI and any OpenAI-compatible API).
    OpenAi,
    /// `api-key: <key>` (Azure OpenAI v1 API, `https://<resource>.openai.azure.com/openai/v1`).
    Azure,
}

impl UpstreamKind {
    /// The request header that carries the key, and its value.
    pub fn auth_header(self, key: &str) -> (&'static str, String) {
        match self {
            UpstreamKind::OpenAi => ("authorization", format!("Bearer {key}")),
            UpstreamKind::Azure => ("api-key", key.to_owned()),
        }
    }
}

/// One upstream of the list. `Debug` never shows the key (see [`KeySource`]).
#[derive(Clone, Debug)]
pub struct UpstreamSpec {
    /// `[A-Za-z0-9_-]{1,32}`: safe in headers, logs and metric-free error bodies.
    pub name: String,
    /// Without a trailing slash.
    pub base_url: String,
    pub kind: UpstreamKind,
    pub key: KeySource,
    pub organization: Option<String>,
    pub project: Option<String>,
    /// Requested model → the upstream's model (or Azure deployment).
    pub models: BTreeMap<String, String>,
}

impl UpstreamSpec {
    /// The model name this upstream is sent for `requested`.
    pub fn upstream_model<'a>(&'a self, requested: &'a str) -> &'a str {
        self.models.get(requested).map_or(requested, String::as_str)
    }
}

/// Where the upstream list comes from.
#[derive(Clone, Debug)]
pub enum UpstreamsSource {
    /// `UPSTREAMS`, or the single `openai` upstream built from the §7 settings. Shared, so a
    /// request takes the list without copying it.
    List(Arc<[UpstreamSpec]>),
    /// `UPSTREAMS_SECRET_ARN`: the same JSON, read from Secrets Manager at the first request.
    SecretArn(String),
}

/// At most this many upstreams: a longer list is a mistake, and every request may walk it.
pub const MAX_UPSTREAMS: usize = 16;

const FIELDS: [&str; 8] = [
    "name",
    "base_url",
    "kind",
    "api_key",
    "api_key_secret_arn",
    "organization",
    "project",
    "models",
];

/// Parses the JSON list of upstreams held by `setting` (`UPSTREAMS` or `UPSTREAMS_SECRET_ARN`).
pub fn parse_upstreams(setting: &'static str, raw: &str) -> Result<Vec<UpstreamSpec>, ConfigError> {
    let err = |problem: String| ConfigError::new(setting, problem);
    let value: Value = serde_json::from_str(raw.trim()).map_err(|e| {
        err(format!(
            "is not valid JSON (error at line {} column {})",
            e.line(),
            e.column()
        ))
    })?;
    let Value::Array(entries) = value else {
        return Err(err("must be a JSON array of upstream objects".into()));
    };
    if entries.is_empty() || entries.len() > MAX_UPSTREAMS {
        return Err(err(format!(
            "must list between 1 and {MAX_UPSTREAMS} upstreams"
        )));
    }
    let mut list: Vec<UpstreamSpec> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let spec = parse_entry(entry).map_err(|p| err(format!("entry {}: {p}", i + 1)))?;
        if list.iter().any(|u| u.name == spec.name) {
            return Err(err(format!(
                "entry {}: the name `{}` is used twice",
                i + 1,
                spec.name
            )));
        }
        list.push(spec);
    }
    Ok(list)
}

fn parse_entry(entry: &Value) -> Result<UpstreamSpec, String> {
    let Value::Object(obj) = entry else {
        return Err("is not a JSON object".into());
    };
    if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(match plain_name(unknown) {
            true => format!("unknown field `{unknown}` (known: {})", FIELDS.join(", ")),
            false => format!("has an unknown field (known: {})", FIELDS.join(", ")),
        });
    }
    let string = |field: &str| -> Result<Option<String>, String> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
            Some(_) => Err(format!("`{field}` must be a non-empty string")),
        }
    };
    let name = string("name")?.ok_or("`name` is missing")?;
    if !plain_name(&name) || name.len() > 32 {
        return Err("`name` must be 1 to 32 characters of A-Z, a-z, 0-9, `_` or `-`".into());
    }
    let base_url = string("base_url")?.ok_or("`base_url` is missing")?;
    let base_url =
        parse_base_url("UPSTREAMS", &base_url).map_err(|e| format!("`base_url` {}", e.problem))?;
    let kind = match string("kind")?.as_deref() {
        None | Some("openai") => UpstreamKind::OpenAi,
        Some("azure") => UpstreamKind::Azure,
        Some(_) => return Err("`kind` must be `openai` or `azure`".into()),
    };
    let key = match (string("api_key")?, string("api_key_secret_arn")?) {
        (Some(_), Some(_)) => return Err("set `api_key` or `api_key_secret_arn`, not both".into()),
        (None, Some(arn)) => KeySource::SecretArn(arn),
        (Some(key), None) if is_header_token(&key) => KeySource::Env(key),
        (Some(_), None) => return Err(not_a_header("api_key")),
        (None, None) => return Err("needs `api_key` or `api_key_secret_arn`".into()),
    };
    let header = |field: &str| -> Result<Option<String>, String> {
        match string(field)? {
            Some(v) if !is_header_token(&v) => Err(not_a_header(field)),
            v => Ok(v),
        }
    };
    Ok(UpstreamSpec {
        name,
        base_url,
        kind,
        key,
        organization: header("organization")?,
        project: header("project")?,
        models: parse_model_map(obj.get("models"))?,
    })
}

fn parse_model_map(value: Option<&Value>) -> Result<BTreeMap<String, String>, String> {
    let problem = "`models` must be an object of model name to non-empty upstream model name";
    match value {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| match v.as_str().map(str::trim) {
                Some(to) if !to.is_empty() && !k.is_empty() => Ok((k.clone(), to.to_owned())),
                _ => Err(problem.to_owned()),
            })
            .collect(),
        Some(_) => Err(problem.into()),
    }
}

fn not_a_header(field: &str) -> String {
    format!(
        "`{field}` holds spaces, control or non-ASCII characters, which cannot be sent in an HTTP header"
    )
}

/// `[A-Za-z0-9_-]+`.
fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `MODEL_FALLBACKS`: requested model → the models to try next, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelFallbacks(BTreeMap<String, Vec<String>>);

impl ModelFallbacks {
    pub fn parse(raw: &str) -> Result<ModelFallbacks, ConfigError> {
        let err = |problem: &str| ConfigError::new("MODEL_FALLBACKS", problem);
        let shape = "must be a JSON object of model name to a list of model names, e.g. {\"gpt-4o\": [\"gpt-4o-mini\"]}";
        let value: Value = serde_json::from_str(raw.trim()).map_err(|_| err(shape))?;
        let Value::Object(map) = value else {
            return Err(err(shape));
        };
        let mut out = BTreeMap::new();
        for (model, next) in map {
            let list: Option<Vec<String>> = match next {
                Value::String(s) => Some(vec![s]),
                Value::Array(items) => items
                    .into_iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect(),
                _ => None,
            };
            let list = list
                .filter(|l| l.iter().all(|m| !m.trim().is_empty()))
                .ok_or_else(|| err(shape))?;
            let mut chain: Vec<String> = Vec::new();
            for m in list.into_iter().map(|m| m.trim().to_owned()) {
                if m != model && !chain.contains(&m) {
                    chain.push(m);
                }
            }
            out.insert(model, chain);
        }
        Ok(ModelFallbacks(out))
    }

    /// The requested model followed by its fallbacks.
    pub fn chain(&self, requested: &str) -> Vec<String> {
        let mut chain = vec![requested.to_owned()];
        if let Some(next) = self.0.get(requested) {
            chain.extend(next.iter().cloned());
        }
        chain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AZURE: &str = r#"[
        {"name": "openai-us", "base_url": "https://us.api.openai.com/v1/", "kind": "openai",
         "api_key": "sk-primary", "organization": "org-1", "project": "proj_1"},
        {"name": "azure_eu", "base_url": "https://my-res.openai.azure.com/openai/v1", "kind": "azure",
         "api_key_secret_arn": "arn:aws:secretsmanager:eu-west-1:1:secret:az",
         "models": {"gpt-4o": "my-gpt4o-deployment"}}
    ]"#;

    #[test]
    fn parses_an_ordered_openai_and_azure_list() {
        let list = parse_upstreams("UPSTREAMS", AZURE).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].name, "openai-us");
        assert_eq!(list[0].base_url, "https://us.api.openai.com/v1");
        assert_eq!(list[0].kind, UpstreamKind::OpenAi);
        assert!(matches!(list[0].key, KeySource::Env(ref k) if k == "sk-primary"));
        assert_eq!(list[0].organization.as_deref(), Some("org-1"));
        assert_eq!(list[0].upstream_model("gpt-4o"), "gpt-4o");
        assert_eq!(list[1].kind, UpstreamKind::Azure);
        assert!(matches!(list[1].key, KeySource::SecretArn(_)));
        assert_eq!(list[1].upstream_model("gpt-4o"), "my-gpt4o-deployment");
        assert_eq!(list[1].upstream_model("gpt-4o-mini"), "gpt-4o-mini");
        assert!(
            !format!("{list:?}").contains("sk-primary"),
            "Debug leaks a key"
        );
    }

    #[test]
    fn azure_sends_api_key_and_openai_sends_bearer() {
        assert_eq!(
            UpstreamKind::Azure.auth_header("k1"),
            ("api-key", "k1".to_owned())
        );
        assert_eq!(
            UpstreamKind::OpenAi.auth_header("k1"),
            ("authorization", "Bearer k1".to_owned())
        );
    }

    #[test]
    fn malformed_lists_name_the_setting_and_never_a_value() {
        let secret = "sk-SECRET-123";
        let cases = [
            ("not json sk-SECRET-123".to_owned(), "not valid JSON"),
            (r#"{"name": "sk-SECRET-123"}"#.to_owned(), "JSON array"),
            ("[]".to_owned(), "between 1 and"),
            (format!(r#"["{secret}"]"#), "not a JSON object"),
            (
                format!(r#"[{{"base_url": "http://h", "api_key": "{secret}"}}]"#),
                "`name` is missing",
            ),
            (
                format!(r#"[{{"name": "a b", "base_url": "http://h", "api_key": "{secret}"}}]"#),
                "`name` must be",
            ),
            (
                format!(
                    r#"[{{"name": "{}", "base_url": "http://h", "api_key": "{secret}"}}]"#,
                    "a".repeat(33)
                ),
                "`name` must be",
            ),
            (
                format!(r#"[{{"name": "a", "base_url": "ftp://{secret}", "api_key": "k"}}]"#),
                "`base_url` must be an http(s) URL",
            ),
            (
                format!(
                    r#"[{{"name": "a", "base_url": "http://h/?key={secret}", "api_key": "k"}}]"#
                ),
                "`base_url` must not carry a query",
            ),
            (
                format!(
                    r#"[{{"name": "a", "base_url": "http://h", "kind": "{secret}", "api_key": "k"}}]"#
                ),
                "`kind` must be",
            ),
            (
                r#"[{"name": "a", "base_url": "http://h"}]"#.to_owned(),
                "needs `api_key`",
            ),
            (
                format!(
                    r#"[{{"name": "a", "base_url": "http://h", "api_key": "{secret}", "api_key_secret_arn": "arn"}}]"#
                ),
                "not both",
            ),
            (
                format!(r#"[{{"name": "a", "base_url": "http://h", "api_key": "{secret} x"}}]"#),
                "`api_key` holds spaces",
            ),
            (
                format!(
                    r#"[{{"name": "a", "base_url": "http://h", "api_key": "{secret}", "apikey": 1}}]"#
                ),
                "unknown field `apikey`",
            ),
            (
                format!(
                    r#"[{{"name": "a", "base_url": "http://h", "api_key": "k", "{secret}!": 1}}]"#
                ),
                "has an unknown field",
            ),
            (
                r#"[{"name": "a", "base_url": "http://h", "api_key": "k", "models": {"gpt-4o": 5}}]"#
                    .to_owned(),
                "`models` must be",
            ),
            (
                format!(
                    r#"[{{"name": "a", "base_url": "http://h", "api_key": "{secret}"}}, {{"name": "a", "base_url": "http://h2", "api_key": "k"}}]"#
                ),
                "entry 2: the name `a` is used twice",
            ),
        ];
        for (raw, expected) in cases {
            let err = parse_upstreams("UPSTREAMS", &raw).unwrap_err();
            assert_eq!(err.setting, "UPSTREAMS");
            let text = err.to_string();
            assert!(text.contains(expected), "{raw}: {text}");
            assert!(!text.contains("SECRET"), "{text} leaks a value");
        }
    }

    #[test]
    fn kind_defaults_to_openai() {
        let list = parse_upstreams(
            "UPSTREAMS",
            r#"[{"name":"a","base_url":"http://127.0.0.1:9","api_key":"k"}]"#,
        )
        .unwrap();
        assert_eq!(list[0].kind, UpstreamKind::OpenAi);
    }

    #[test]
    fn model_fallbacks_chain_in_order_without_repeats() {
        let f = ModelFallbacks::parse(
            r#"{"gpt-4o": ["gpt-4o-mini", "gpt-4o", "gpt-4o-mini", "gpt-4.1-mini"], "o3": "o4-mini"}"#,
        )
        .unwrap();
        assert_eq!(f.chain("gpt-4o"), ["gpt-4o", "gpt-4o-mini", "gpt-4.1-mini"]);
        assert_eq!(f.chain("o3"), ["o3", "o4-mini"]);
        assert_eq!(f.chain("other"), ["other"]);
        for bad in [
            r#"["gpt-4o"]"#,
            r#"{"gpt-4o": [1]}"#,
            r#"{"gpt-4o": [""]}"#,
            "{",
        ] {
            let err = ModelFallbacks::parse(bad).unwrap_err();
            assert_eq!(err.setting, "MODEL_FALLBACKS", "{bad}");
        }
    }
}
