//! The response payload each front door expects (spec §2): HTTP API payload 2.0 and function
//! URLs (`cookies` may be set), REST and WebSocket APIs (payload 1.0), and ALB target groups
//! (`statusDescription`, and `multiValueHeaders` when the event used them); with
//! `INVOKE_MODE=RESPONSE_STREAM`, Lambda's streaming prelude (spec §10).

use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use lambda_runtime::streaming::Body;
use lambda_runtime::{MetadataPrelude, StreamResponse};
use serde_json::{Map, Value, json};

use super::request::Front;
use super::response::ProxyResponse;
use crate::deadline::GatewayKind;

/// What a handler hands the runtime: the buffered JSON payload ([`render`]) or, with
/// `INVOKE_MODE=RESPONSE_STREAM`, the streaming prelude and body (`edge::streaming`).
pub trait Payload {
    /// `resp` in this form, for the front door that sent the event (`None`: not recognised).
    fn payload(front: Option<Front>, resp: ProxyResponse) -> Self;
}

impl Payload for Value {
    fn payload(front: Option<Front>, resp: ProxyResponse) -> Value {
        render(front, resp)
    }
}

/// Shapes `resp` for the front door that sent the event; the HTTP API v2 / function URL format
/// when the event was not recognised at all.
pub fn render(front: Option<Front>, resp: ProxyResponse) -> Value {
    // The body's own allocation becomes the JSON string when it is UTF-8 (no copy); `json!`
    // would serialize (copy) it, so the object is built by hand.
    let (body, is_base64) = match String::from_utf8(Vec::from(resp.body)) {
        Ok(text) => (text, false),
        Err(e) => (
            base64::engine::general_purpose::STANDARD.encode(e.as_bytes()),
            true,
        ),
    };
    let mut out = Map::new();
    out.insert("statusCode".into(), resp.status.into());
    out.insert("body".into(), Value::String(body));
    out.insert("isBase64Encoded".into(), is_base64.into());
    let mut out = Value::Object(out);
    let single = |headers: Vec<(String, String)>| -> Map<String, Value> {
        headers.into_iter().map(|(k, v)| (k, json!(v))).collect()
    };
    match front {
        Some(Front {
            kind: GatewayKind::Alb,
            multi_value_headers,
        }) => {
            out["statusDescription"] = json!(status_description(resp.status));
            if multi_value_headers {
                let multi: Map<String, Value> = resp
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k, json!([v])))
                    .collect();
                out["multiValueHeaders"] = Value::Object(multi);
            } else {
                out["headers"] = Value::Object(single(resp.headers));
            }
        }
        Some(Front {
            kind: GatewayKind::RestV1 | GatewayKind::WebSocket,
            ..
        }) => out["headers"] = Value::Object(single(resp.headers)),
        _ => {
            out["headers"] = Value::Object(single(resp.headers));
            out["cookies"] = json!([]);
        }
    }
    out
}

/// ALB's status line text: `200 OK`, `502 Bad Gateway`; a code without a standard reason
/// phrase is given as `<code> Unknown`.
pub fn status_description(status: u16) -> String {
    let reason = reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    format!("{status} {reason}")
}

/// The prelude for an answer: its status and headers, no cookies.
pub(super) fn prelude(resp: &ProxyResponse) -> MetadataPrelude {
    let mut headers = HeaderMap::new();
    for (name, value) in &resp.headers {
        // Every header the proxy sets is valid; a value that is not is dropped, not a panic.
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(n, v);
        }
    }
    MetadataPrelude {
        status_code: StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY),
        headers,
        cookies: Vec::new(),
    }
}

impl Payload for StreamResponse<Body> {
    fn payload(_: Option<Front>, resp: ProxyResponse) -> StreamResponse<Body> {
        whole(resp)
    }
}

/// A complete answer in the streaming format: prelude, then the whole body at once.
pub(super) fn whole(resp: ProxyResponse) -> StreamResponse<Body> {
    StreamResponse {
        metadata_prelude: prelude(&resp),
        stream: Body::from(resp.body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn resp(status: u16, body: &'static [u8]) -> ProxyResponse {
        ProxyResponse {
            status,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("x-should-retry".into(), "false".into()),
            ],
            body: Bytes::from_static(body),
        }
    }

    fn front(kind: GatewayKind, multi_value_headers: bool) -> Option<Front> {
        Some(Front {
            kind,
            multi_value_headers,
        })
    }

    #[test]
    fn alb_gets_a_status_description_and_the_header_form_of_its_event() {
        let single = render(front(GatewayKind::Alb, false), resp(502, b"{}"));
        assert_eq!(
            single,
            json!({"statusCode": 502, "statusDescription": "502 Bad Gateway",
                "headers": {"content-type": "application/json", "x-should-retry": "false"},
                "body": "{}", "isBase64Encoded": false})
        );
        let multi = render(front(GatewayKind::Alb, true), resp(200, b"{}"));
        assert_eq!(
            multi,
            json!({"statusCode": 200, "statusDescription": "200 OK",
                "multiValueHeaders": {"content-type": ["application/json"], "x-should-retry": ["false"]},
                "body": "{}", "isBase64Encoded": false})
        );
    }

    #[test]
    fn api_gateway_shapes() {
        let v2 = render(front(GatewayKind::HttpApiV2, false), resp(404, b"x"));
        assert_eq!(v2["cookies"], json!([]));
        assert!(v2.get("statusDescription").is_none());
        for kind in [GatewayKind::RestV1, GatewayKind::WebSocket] {
            let v1 = render(front(kind, true), resp(404, b"x"));
            assert_eq!(v1["headers"]["content-type"], "application/json");
            assert!(v1.get("cookies").is_none() && v1.get("multiValueHeaders").is_none());
        }
        // Not valid UTF-8: base64.
        let bin = render(None, resp(200, b"\xff\x00"));
        assert_eq!(
            (&bin["body"], &bin["isBase64Encoded"]),
            (&json!("/wA="), &json!(true))
        );
    }

    #[test]
    fn status_descriptions() {
        assert_eq!(status_description(504), "504 Gateway Timeout");
        assert_eq!(status_description(429), "429 Too Many Requests");
        assert_eq!(status_description(599), "599 Unknown");
    }

    #[test]
    fn rendering_moves_a_utf8_body_into_the_payload_and_base64s_the_rest() {
        let text = r#"{"object":"list","data":[]}"#.repeat(1000).into_bytes();
        let at = text.as_ptr();
        let resp = ProxyResponse {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(text),
        };
        let http_api = Front {
            kind: GatewayKind::HttpApiV2,
            multi_value_headers: false,
        };
        let v = render(Some(http_api), resp);
        assert_eq!(
            v["body"].as_str().unwrap().as_ptr(),
            at,
            "no copy of the body"
        );
        assert_eq!(
            (&v["statusCode"], &v["isBase64Encoded"], &v["cookies"]),
            (&json!(200), &json!(false), &json!([]))
        );
        assert_eq!(v["headers"]["content-type"], "application/json");
        let binary = ProxyResponse {
            status: 200,
            headers: Vec::new(),
            body: Bytes::from_static(&[0xff, 0x00, 0x01]),
        };
        let rest = Front {
            kind: GatewayKind::RestV1,
            multi_value_headers: false,
        };
        let v = render(Some(rest), binary);
        assert_eq!(
            (&v["body"], &v["isBase64Encoded"]),
            (&json!("/wAB"), &json!(true))
        );
        assert!(
            v.get("cookies").is_none(),
            "REST answers have no cookies field"
        );
    }

    #[test]
    fn the_prelude_carries_status_and_headers() {
        let mut resp = ProxyResponse::error(
            crate::edge::response::ErrorCode::UpstreamUnavailable,
            "down",
            None,
            "req-1",
        );
        resp.set_header("x-upstream-attempts", "3");
        let p = serde_json::to_value(prelude(&resp)).unwrap();
        assert_eq!(p["statusCode"], 502);
        assert_eq!(p["headers"]["x-upstream-attempts"], "3");
        assert_eq!(p["headers"]["content-type"], "application/json");
        assert_eq!(p["cookies"], serde_json::json!([]));
    }
}
