//! The error contract (spec §5): one enum of codes, each with its status and OpenAI error type,
//! and the OpenAI-shaped body that SDKs parse.

use bytes::Bytes;
use serde_json::json;

/// Every error the function itself answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    UpstreamUnavailable,
    UpstreamTimeout,
    UpstreamRateLimited,
    UpstreamAuthFailed,
    InvalidJson,
    InvalidRequest,
    Unauthorized,
    ModelNotAllowed,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    UpstreamResponseTooLarge,
    ConfigError,
    UpstreamCircuitOpen,
    /// Not in the spec's table: the last-resort answer if the handler itself failed.
    InternalError,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::UpstreamUnavailable
            | ErrorCode::UpstreamAuthFailed
            | ErrorCode::UpstreamResponseTooLarge => 502,
            ErrorCode::UpstreamTimeout => 504,
            ErrorCode::UpstreamRateLimited => 429,
            ErrorCode::InvalidJson | ErrorCode::InvalidRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::ModelNotAllowed => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::ConfigError | ErrorCode::InternalError => 500,
            ErrorCode::UpstreamCircuitOpen => 503,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::UpstreamUnavailable => "upstream_unavailable",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::UpstreamRateLimited => "upstream_rate_limited",
            ErrorCode::UpstreamAuthFailed => "upstream_auth_failed",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::ModelNotAllowed => "model_not_allowed",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UpstreamResponseTooLarge => "upstream_response_too_large",
            ErrorCode::ConfigError => "config_error",
            ErrorCode::UpstreamCircuitOpen => "upstream_circuit_open",
            ErrorCode::InternalError => "internal_error",
        }
    }

    /// OpenAI's `error.type` vocabulary, so SDKs and dashboards group these sensibly.
    pub fn error_type(self) -> &'static str {
        match self {
            ErrorCode::UpstreamUnavailable
            | ErrorCode::UpstreamTimeout
            | ErrorCode::UpstreamAuthFailed
            | ErrorCode::UpstreamResponseTooLarge
            | ErrorCode::ConfigError
            | ErrorCode::UpstreamCircuitOpen
            | ErrorCode::InternalError => "server_error",
            ErrorCode::UpstreamRateLimited => "rate_limit_error",
            ErrorCode::Unauthorized => "authentication_error",
            ErrorCode::ModelNotAllowed => "permission_error",
            ErrorCode::NotFound => "not_found_error",
            ErrorCode::InvalidJson
            | ErrorCode::InvalidRequest
            | ErrorCode::MethodNotAllowed
            | ErrorCode::PayloadTooLarge => "invalid_request_error",
        }
    }

    /// The codes that count as `UpstreamFailures`: the function answered 502/504/429 instead of
    /// the upstream's answer (an answer too large to return included: the caller got a 502).
    pub fn is_upstream_failure(self) -> bool {
        matches!(
            self,
            ErrorCode::UpstreamUnavailable
                | ErrorCode::UpstreamTimeout
                | ErrorCode::UpstreamRateLimited
                | ErrorCode::UpstreamAuthFailed
                | ErrorCode::UpstreamResponseTooLarge
        )
    }
}

/// The most a buffered Lambda function may return: the whole response payload (the gateway
/// envelope with the JSON-escaped or base64 body), as Lambda counts it.
pub const LAMBDA_RESPONSE_LIMIT: usize = 6_291_556;

/// Room kept for the envelope and the headers added after the size check.
const ENVELOPE_ALLOWANCE: usize = 2_048;

/// What the upstream did, for the `error.upstream` object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamSummary {
    /// The last upstream HTTP status, if any attempt got one.
    pub status: Option<u16>,
    pub attempts: u32,
    pub elapsed_ms: u64,
    pub request_ids: Vec<String>,
    pub last_error: Option<String>,
    /// Attempts per upstream name (§11).
    pub by_upstream: Vec<(String, u32)>,
}

/// A response before it is shaped for the gateway that delivered the event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyResponse {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl ProxyResponse {
    pub fn json(status: u16, value: &serde_json::Value) -> ProxyResponse {
        ProxyResponse {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(value.to_string()),
        }
    }

    /// An error in OpenAI's shape, with `upstream` details when the upstream was involved.
    pub fn error(
        code: ErrorCode,
        message: impl Into<String>,
        upstream: Option<&UpstreamSummary>,
        lambda_request_id: &str,
    ) -> ProxyResponse {
        let mut error = json!({
            "message": message.into(),
            "type": code.error_type(),
            "param": null,
            "code": code.as_str(),
        });
        if let Some(u) = upstream {
            error["upstream"] = json!({
                "status": u.status,
                "attempts": u.attempts,
                "elapsed_ms": u.elapsed_ms,
                "request_ids": u.request_ids,
                "last_error": u.last_error,
                "by_upstream": u
                    .by_upstream
                    .iter()
                    .map(|(name, n)| (name.clone(), json!(n)))
                    .collect::<serde_json::Map<_, _>>(),
            });
        }
        error["lambda_request_id"] = json!(lambda_request_id);
        ProxyResponse::json(code.status(), &json!({ "error": error }))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether this response, once shaped for the gateway (body JSON-escaped, or base64 when it
    /// is not UTF-8), stays within [`LAMBDA_RESPONSE_LIMIT`].
    pub fn fits_lambda_limit(&self) -> bool {
        let body = match std::str::from_utf8(&self.body) {
            Ok(text) => escaped_len(text),
            Err(_) => self.body.len().div_ceil(3) * 4,
        };
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| escaped_len(k) + escaped_len(v) + 6)
            .sum();
        body + headers + ENVELOPE_ALLOWANCE <= LAMBDA_RESPONSE_LIMIT
    }

    pub fn set_header(&mut self, name: &str, value: impl Into<String>) {
        self.headers.retain(|(k, _)| k != name);
        self.headers.push((name.to_owned(), value.into()));
    }
}

/// Length of `s` as a JSON string's content (what serde_json writes between the quotes).
fn escaped_len(s: &str) -> usize {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

/// `12.3 s` for messages.
pub fn seconds(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_the_spec_table() {
        let table = [
            (ErrorCode::UpstreamUnavailable, 502, "upstream_unavailable"),
            (ErrorCode::UpstreamTimeout, 504, "upstream_timeout"),
            (ErrorCode::UpstreamRateLimited, 429, "upstream_rate_limited"),
            (ErrorCode::UpstreamAuthFailed, 502, "upstream_auth_failed"),
            (ErrorCode::InvalidJson, 400, "invalid_json"),
            (ErrorCode::InvalidRequest, 400, "invalid_request"),
            (ErrorCode::Unauthorized, 401, "unauthorized"),
            (ErrorCode::ModelNotAllowed, 403, "model_not_allowed"),
            (ErrorCode::NotFound, 404, "not_found"),
            (ErrorCode::MethodNotAllowed, 405, "method_not_allowed"),
            (ErrorCode::PayloadTooLarge, 413, "payload_too_large"),
            (
                ErrorCode::UpstreamResponseTooLarge,
                502,
                "upstream_response_too_large",
            ),
            (ErrorCode::ConfigError, 500, "config_error"),
            (ErrorCode::UpstreamCircuitOpen, 503, "upstream_circuit_open"),
        ];
        for (code, status, name) in table {
            assert_eq!((code.status(), code.as_str()), (status, name));
        }
    }

    #[test]
    fn the_lambda_limit_counts_the_encoded_body() {
        let resp = |body: Vec<u8>| ProxyResponse {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(body),
        };
        let room = LAMBDA_RESPONSE_LIMIT - ENVELOPE_ALLOWANCE - 200;
        assert!(resp(vec![b'a'; room]).fits_lambda_limit());
        // The same size in quotes doubles once escaped; control characters take six bytes.
        assert!(!resp(vec![b'"'; room]).fits_lambda_limit());
        assert!(resp(vec![b'"'; room / 2]).fits_lambda_limit());
        assert!(!resp(vec![1u8; room / 5]).fits_lambda_limit());
        // Not UTF-8: base64, 4 bytes for 3.
        assert!(!resp(vec![0xff; room]).fits_lambda_limit());
        assert!(resp(vec![0xff; room / 4 * 3]).fits_lambda_limit());
        // escaped_len agrees with serde_json.
        let text = "a\"b\\c\nd\u{1}e\u{7f}é😀\t";
        assert_eq!(
            escaped_len(text) + 2,
            serde_json::to_string(text).unwrap().len()
        );
    }

    #[test]
    fn error_body_has_openais_shape_with_upstream_details() {
        let summary = UpstreamSummary {
            status: Some(503),
            attempts: 4,
            elapsed_ms: 27_140,
            request_ids: vec!["req_abc".into(), "req_def".into()],
            last_error: Some("503 Service Unavailable".into()),
            by_upstream: vec![("primary".into(), 2), ("azure-eu".into(), 2)],
        };
        let r = ProxyResponse::error(
            ErrorCode::UpstreamUnavailable,
            "down",
            Some(&summary),
            "8f5c",
        );
        assert_eq!(r.status, 502);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v,
            json!({"error": {"message": "down", "type": "server_error", "param": null,
                "code": "upstream_unavailable",
                "upstream": {"status": 503, "attempts": 4, "elapsed_ms": 27140,
                             "request_ids": ["req_abc", "req_def"], "last_error": "503 Service Unavailable",
                             "by_upstream": {"primary": 2, "azure-eu": 2}},
                "lambda_request_id": "8f5c"}})
        );
        let plain = ProxyResponse::error(ErrorCode::NotFound, "nope", None, "id");
        let v: serde_json::Value = serde_json::from_slice(&plain.body).unwrap();
        assert!(v["error"].get("upstream").is_none());
    }
}
