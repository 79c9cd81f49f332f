//! Reading the Lambda event: which front door sent it, method, path, headers, body, start time.
//! Total over any JSON: a shape we do not know is an error value, never a panic.
//!
//! Front doors: API Gateway HTTP API (payload 2.0), REST API (payload 1.0, also what an HTTP
//! API with payload 1.0 sends), Lambda function URLs, Application Load Balancer target groups
//! and API Gateway WebSocket APIs (recognised so they get a clear answer; not served).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;

use crate::deadline::GatewayKind;

/// The parts of a gateway event the function uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayEvent {
    pub kind: GatewayKind,
    /// Upper case. For a WebSocket event, its `eventType` (`CONNECT`, `MESSAGE`, …).
    pub method: String,
    /// The request path. For a WebSocket event, its `routeKey` (`$connect`, …).
    pub path: String,
    /// Lower-case names; repeated headers joined with `,`.
    pub headers: Vec<(String, String)>,
    /// The event carried `multiValueHeaders`: for an ALB target group with multi-value headers
    /// on, the answer must use `multiValueHeaders` too (REST API answers ignore this).
    pub multi_value_headers: bool,
    /// Raw `body` field, still base64 if `is_base64`.
    pub body: Option<String>,
    pub is_base64: bool,
    /// `requestContext.timeEpoch` (v2, function URL) or `requestTimeEpoch` (v1, WebSocket),
    /// epoch ms. ALB events carry none.
    pub start_ms: Option<u64>,
}

/// How the answer must be shaped for the front door that sent the event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Front {
    pub kind: GatewayKind,
    pub multi_value_headers: bool,
}

/// The body could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyError {
    TooLarge,
    BadBase64,
}

/// What tells the front doors apart: kind, method, path, start time.
type Head<'a> = (GatewayKind, &'a str, &'a str, Option<u64>);

impl GatewayEvent {
    /// Recognises the front doors above; `None` for anything else (including the events an
    /// API Gateway *authorizer* receives: this function is not one).
    pub fn parse(event: &Value) -> Option<GatewayEvent> {
        let ctx = event.get("requestContext").filter(|c| c.is_object());
        if is_authorizer_request(event) {
            return None;
        }
        let (kind, method, path, start_ms) = match ctx {
            Some(c) if c.get("elb").is_some() => alb_head(event)?,
            Some(c) if is_websocket(c) => websocket_head(c),
            Some(c) if c.get("http").is_some() => http_api_head(event, c)?,
            _ => rest_head(event, ctx)?,
        };
        let multi_value_headers = event.get("multiValueHeaders").is_some_and(Value::is_object);
        Some(GatewayEvent {
            kind,
            method: method.to_ascii_uppercase(),
            path: path.to_owned(),
            headers: headers_of(event),
            multi_value_headers,
            body: str_of(event, "body").map(str::to_owned),
            is_base64: event
                .get("isBase64Encoded")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            start_ms,
        })
    }

    /// [`GatewayEvent::parse`] of an owned event, moving its body out instead of copying it
    /// (the body is the one large part of an event).
    pub fn from_value(mut event: Value) -> Option<GatewayEvent> {
        let body = match event.get_mut("body").map(Value::take) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let mut parsed = GatewayEvent::parse(&event)?;
        parsed.body = body;
        Some(parsed)
    }

    /// Moves the body out of the event, to be decoded once ([`EventBody::decode`]).
    pub fn take_body(&mut self) -> EventBody {
        EventBody {
            raw: self.body.take(),
            is_base64: self.is_base64,
        }
    }

    pub fn front(&self) -> Front {
        Front {
            kind: self.kind,
            multi_value_headers: self.multi_value_headers,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An event's body as the gateway sent it, taken out of the event ([`GatewayEvent::take_body`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventBody {
    /// Raw `body` field, still base64 if `is_base64`.
    pub raw: Option<String>,
    pub is_base64: bool,
}

impl EventBody {
    /// The decoded body, refusing anything over `max` bytes before and after decoding. A plain
    /// body keeps its allocation: no copy between the event and the request sent upstream.
    pub fn decode(self, max: usize) -> Result<Vec<u8>, BodyError> {
        let Some(raw) = self.raw else {
            return Ok(Vec::new());
        };
        if !self.is_base64 {
            return if raw.len() > max {
                Err(BodyError::TooLarge)
            } else {
                Ok(raw.into_bytes())
            };
        }
        // Base64 is 4/3 of the payload: reject early without decoding a huge string.
        if raw.len() / 4 * 3 > max + 3 {
            return Err(BodyError::TooLarge);
        }
        let bytes = BASE64
            .decode(raw.trim())
            .map_err(|_| BodyError::BadBase64)?;
        if bytes.len() > max {
            Err(BodyError::TooLarge)
        } else {
            Ok(bytes)
        }
    }
}

/// A `TOKEN` / `REQUEST` authorizer input (REST or HTTP API): it names the method or route
/// being authorised, and expects a policy or `{"isAuthorized": …}` back, not an HTTP answer.
fn is_authorizer_request(event: &Value) -> bool {
    matches!(str_of(event, "type"), Some("TOKEN" | "REQUEST"))
        && (event.get("methodArn").is_some() || event.get("routeArn").is_some())
}

/// WebSocket API events name a connection; some also carry `httpMethod` and `path`.
fn is_websocket(ctx: &Value) -> bool {
    ctx.get("connectionId").is_some() || ctx.get("eventType").is_some()
}

fn alb_head(event: &Value) -> Option<Head<'_>> {
    Some((
        GatewayKind::Alb,
        str_of(event, "httpMethod")?,
        str_of(event, "path")?,
        None,
    ))
}

fn websocket_head(ctx: &Value) -> Head<'_> {
    (
        GatewayKind::WebSocket,
        str_of(ctx, "eventType").unwrap_or("MESSAGE"),
        str_of(ctx, "routeKey").unwrap_or(""),
        u64_of(ctx, "requestTimeEpoch"),
    )
}

/// HTTP API payload 2.0 and function URLs (told apart by the function URL's domain).
fn http_api_head<'a>(event: &'a Value, ctx: &'a Value) -> Option<Head<'a>> {
    let http = ctx.get("http")?;
    let domain = str_of(ctx, "domainName").unwrap_or("");
    let kind = if domain.contains(".lambda-url.") {
        GatewayKind::FunctionUrl
    } else {
        GatewayKind::HttpApiV2
    };
    let path = str_of(event, "rawPath").or_else(|| str_of(http, "path"))?;
    Some((
        kind,
        str_of(http, "method")?,
        path,
        u64_of(ctx, "timeEpoch"),
    ))
}

fn rest_head<'a>(event: &'a Value, ctx: Option<&'a Value>) -> Option<Head<'a>> {
    let method = str_of(event, "httpMethod")?;
    let path = str_of(event, "path").or_else(|| ctx.and_then(|c| str_of(c, "path")))?;
    let start = ctx.and_then(|c| u64_of(c, "requestTimeEpoch"));
    Some((GatewayKind::RestV1, method, path, start))
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Epoch ms as a number (or a numeric string, as some emulators send).
fn u64_of(v: &Value, key: &str) -> Option<u64> {
    match v.get(key)? {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn headers_of(event: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut add = |name: &str, value: &str| {
        let name = name.to_ascii_lowercase();
        match out.iter_mut().find(|(k, _)| *k == name) {
            Some((_, v)) if !v.split(',').any(|x| x.trim() == value) => {
                v.push(',');
                v.push_str(value);
            }
            Some(_) => {}
            None => out.push((name, value.to_owned())),
        }
    };
    if let Some(map) = event.get("headers").and_then(Value::as_object) {
        for (k, v) in map {
            if let Some(v) = v.as_str() {
                add(k, v);
            }
        }
    }
    // REST v1 repeats headers here; single-value `headers` already has the last of each.
    if let Some(map) = event.get("multiValueHeaders").and_then(Value::as_object) {
        for (k, vs) in map {
            for v in vs
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                add(k, v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn http_api_v2() {
        let e = json!({"version": "2.0", "rawPath": "/v1/chat/completions",
            "headers": {"Authorization": "Bearer x", "content-type": "application/json"},
            "requestContext": {"domainName": "abc.execute-api.us-east-1.amazonaws.com",
                "http": {"method": "post", "path": "/v1/chat/completions"}, "timeEpoch": 1700000000000u64},
            "body": "{}", "isBase64Encoded": false});
        let g = GatewayEvent::parse(&e).unwrap();
        assert_eq!(g.kind, GatewayKind::HttpApiV2);
        assert_eq!(
            (g.method.as_str(), g.path.as_str()),
            ("POST", "/v1/chat/completions")
        );
        assert_eq!(g.header("authorization"), Some("Bearer x"));
        assert_eq!(g.start_ms, Some(1_700_000_000_000));
    }

    #[test]
    fn function_url_is_told_apart_by_its_domain() {
        let e = json!({"version": "2.0", "rawPath": "/health",
            "requestContext": {"domainName": "xyz.lambda-url.us-east-1.on.aws", "http": {"method": "GET"}, "timeEpoch": 1}});
        assert_eq!(
            GatewayEvent::parse(&e).unwrap().kind,
            GatewayKind::FunctionUrl
        );
    }

    #[test]
    fn rest_v1_with_multi_value_headers() {
        let e = json!({"httpMethod": "POST", "path": "/v1/embeddings",
            "headers": {"X-A": "1"}, "multiValueHeaders": {"X-A": ["1", "2"]},
            "requestContext": {"requestTimeEpoch": 1700000000000u64, "stage": "prod"}, "body": null});
        let g = GatewayEvent::parse(&e).unwrap();
        assert_eq!(g.kind, GatewayKind::RestV1);
        assert_eq!(g.header("x-a"), Some("1,2"));
        assert_eq!(g.body, None);
    }

    #[test]
    fn alb_events_and_their_header_form() {
        let arn = "arn:aws:elasticloadbalancing:us-east-2:123456789012:targetgroup/t/1";
        let single = json!({"requestContext": {"elb": {"targetGroupArn": arn}},
            "httpMethod": "POST", "path": "/v1/chat/completions",
            "headers": {"Authorization": "Bearer x"}, "body": "{}", "isBase64Encoded": false});
        let g = GatewayEvent::parse(&single).unwrap();
        assert_eq!((g.kind, g.start_ms), (GatewayKind::Alb, None));
        assert!(!g.multi_value_headers);
        assert_eq!(g.header("authorization"), Some("Bearer x"));
        let multi = json!({"requestContext": {"elb": {"targetGroupArn": arn}},
            "httpMethod": "GET", "path": "/health",
            "multiValueHeaders": {"Accept": ["a", "b"], "X-Null": null}, "body": ""});
        let g = GatewayEvent::parse(&multi).unwrap();
        assert_eq!(g.front().kind, GatewayKind::Alb);
        assert!(g.front().multi_value_headers);
        assert_eq!(g.header("accept"), Some("a,b"));
    }

    #[test]
    fn websocket_events_name_their_route() {
        let e = json!({"requestContext": {"routeKey": "$connect", "eventType": "CONNECT",
            "connectionId": "abc=", "requestTimeEpoch": 1700000000000u64},
            "headers": null, "isBase64Encoded": false});
        let g = GatewayEvent::parse(&e).unwrap();
        assert_eq!(g.kind, GatewayKind::WebSocket);
        assert_eq!(
            (g.method.as_str(), g.path.as_str()),
            ("CONNECT", "$connect")
        );
        // Even with the httpMethod and path some of them carry.
        let e = json!({"httpMethod": "POST", "path": "/v1/chat/completions",
            "requestContext": {"connectionId": "abc=", "routeKey": "$default"}});
        assert_eq!(
            GatewayEvent::parse(&e).unwrap().kind,
            GatewayKind::WebSocket
        );
    }

    #[test]
    fn authorizer_inputs_are_not_requests() {
        for e in [
            json!({"type": "TOKEN", "authorizationToken": "t", "methodArn": "arn:x"}),
            json!({"type": "REQUEST", "methodArn": "arn:x", "httpMethod": "GET", "path": "/",
                "requestContext": {"stage": "test"}}),
            json!({"version": "2.0", "type": "REQUEST", "routeArn": "arn:x", "rawPath": "/",
                "requestContext": {"http": {"method": "POST"}}}),
        ] {
            assert_eq!(GatewayEvent::parse(&e), None, "{e}");
        }
    }

    #[test]
    fn null_and_missing_headers_and_bodies() {
        let e = json!({"httpMethod": "GET", "path": "/health", "headers": null,
            "multiValueHeaders": null, "body": null, "isBase64Encoded": null,
            "requestContext": {"requestTimeEpoch": null}});
        let g = GatewayEvent::parse(&e).unwrap();
        assert!(g.headers.is_empty() && g.body.is_none() && !g.is_base64);
        assert_eq!(g.start_ms, None);
        let e = json!({"httpMethod": "GET", "path": "/health",
            "headers": {"A": null, "B": 1, "C": "c"}, "multiValueHeaders": {"D": [null, 2, "d"], "E": "e"}});
        let g = GatewayEvent::parse(&e).unwrap();
        assert_eq!(
            g.headers,
            vec![
                ("c".to_owned(), "c".to_owned()),
                ("d".to_owned(), "d".to_owned())
            ]
        );
    }

    #[test]
    fn unknown_shapes_are_none() {
        for e in [
            json!(null),
            json!([]),
            json!({"foo": 1}),
            json!({"requestContext": {"http": {}}}),
            json!({"httpMethod": 5}),
        ] {
            assert_eq!(GatewayEvent::parse(&e), None, "{e}");
        }
    }

    #[test]
    fn base64_bodies_are_decoded_and_size_checked() {
        let mut g = GatewayEvent::parse(&json!({"httpMethod": "POST", "path": "/", "body": "eyJhIjoxfQ==", "isBase64Encoded": true})).unwrap();
        let body = g.take_body();
        assert_eq!(g.body, None, "moved out");
        assert_eq!(body.clone().decode(100).unwrap(), br#"{"a":1}"#);
        assert_eq!(body.decode(6), Err(BodyError::TooLarge));
        let bad = |raw: &str, is_base64| EventBody {
            raw: Some(raw.into()),
            is_base64,
        };
        assert_eq!(bad("!!!", true).decode(100), Err(BodyError::BadBase64));
        assert_eq!(bad("!!!", false).decode(2), Err(BodyError::TooLarge));
    }

    #[test]
    fn an_owned_event_gives_up_its_body_without_a_copy() {
        let body = r#"{"model":"gpt-4o-mini","input":"a long body"}"#.repeat(1000);
        let event = json!({"httpMethod": "POST", "path": "/v1/embeddings", "body": body});
        let at = event["body"].as_str().unwrap().as_ptr();
        let mut g = GatewayEvent::from_value(event).unwrap();
        assert_eq!(
            (g.kind, g.path.as_str()),
            (GatewayKind::RestV1, "/v1/embeddings")
        );
        let bytes = g.take_body().decode(1 << 20).unwrap();
        assert_eq!(bytes, body.as_bytes());
        assert_eq!(bytes.as_ptr(), at, "the event's own allocation");
        // Without a body, or with a non-string one, there is none.
        let g =
            GatewayEvent::from_value(json!({"httpMethod": "GET", "path": "/health", "body": 5}));
        assert_eq!(g.unwrap().body, None);
    }
}
