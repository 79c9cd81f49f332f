//! Realistic OpenAI response bodies for the simulated routes, and OpenAI-shaped error bodies.

use serde_json::{Value, json};

use crate::ErrorStep;

pub(crate) const REPLY: &str = "Hello from the OpenAI simulator.";
const REPLY_TOKENS: u64 = 8;
const DEFAULT_MODEL: &str = "gpt-4o-mini";
const FINGERPRINT: &str = "fp_sim0000001";

/// A generated route answer before the common headers are added.
pub(crate) struct RouteAnswer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Body is an SSE stream; `event_ends` holds the byte offset after each event.
    pub stream: bool,
    pub event_ends: Vec<usize>,
}

impl RouteAnswer {
    fn json(status: u16, v: &impl serde::Serialize) -> RouteAnswer {
        RouteAnswer {
            status,
            content_type: "application/json",
            body: serde_json::to_vec_pretty(v).unwrap_or_default(),
            stream: false,
            event_ends: Vec::new(),
        }
    }

    fn sse(events: Vec<String>) -> RouteAnswer {
        let mut body = Vec::new();
        let mut event_ends = Vec::new();
        for e in events {
            body.extend_from_slice(e.as_bytes());
            event_ends.push(body.len());
        }
        RouteAnswer {
            status: 200,
            content_type: "text/event-stream",
            body,
            stream: true,
            event_ends,
        }
    }
}

/// Context for generating one answer.
pub(crate) struct Ctx<'a> {
    /// A fresh random-looking hex string for object ids.
    pub hex: &'a str,
    pub now_secs: u64,
    /// Minimum length of the generated reply text (0: the short default reply).
    pub reply_bytes: u64,
}

/// OpenAI's error envelope; a struct (not a `Value`) so the fields keep OpenAI's order.
#[derive(serde::Serialize)]
pub(crate) struct ErrorBody {
    error: ErrorInner,
}

#[derive(serde::Serialize)]
struct ErrorInner {
    message: String,
    #[serde(rename = "type")]
    typ: String,
    param: Option<String>,
    code: Option<String>,
}

pub(crate) fn error_value(
    message: &str,
    typ: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> ErrorBody {
    ErrorBody {
        error: ErrorInner {
            message: message.to_string(),
            typ: typ.to_string(),
            param: param.map(str::to_string),
            code: code.map(str::to_string),
        },
    }
}

/// Body of an error step (`500`, `429:quota`, ...), shaped like OpenAI's.
pub(crate) fn error_body(e: &ErrorStep, model: &str, request_id: &str) -> ErrorBody {
    let server = format!(
        "The server had an error processing your request. Sorry about that! You can retry your request, or contact us through our help center at help.openai.com if you keep seeing this error. (Please include the request ID {request_id} in your email.)"
    );
    match e.status {
        429 if e.quota => error_value(
            "You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
            "insufficient_quota",
            None,
            Some("insufficient_quota"),
        ),
        429 => error_value(
            &format!(
                "Rate limit reached for {model} in organization org-simulator on requests per min (RPM): Limit 10000, Used 10000, Requested 1. Please try again in 6ms. Visit https://platform.openai.com/account/rate-limits to learn more."
            ),
            "requests",
            Some("requests"),
            Some("rate_limit_exceeded"),
        ),
        400 => error_value(
            "Invalid request (simulated by openai-simulator). Please check your request parameters.",
            "invalid_request_error",
            None,
            None,
        ),
        401 => error_value(
            "Incorrect API key provided: sk-sim****************************1234. You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        ),
        403 => error_value(
            "Country, region, or territory not supported",
            "request_forbidden",
            None,
            Some("unsupported_country_region_territory"),
        ),
        404 => error_value(
            &format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            None,
            Some("model_not_found"),
        ),
        409 => error_value(
            "The request conflicted with another request (simulated).",
            "invalid_request_error",
            None,
            None,
        ),
        422 => error_value(
            "Unprocessable entity (simulated).",
            "invalid_request_error",
            None,
            None,
        ),
        502 => error_value("Bad gateway.", "server_error", None, None),
        503 => error_value(
            "The engine is currently overloaded, please try again later.",
            "server_error",
            None,
            None,
        ),
        504 => error_value("Gateway timeout.", "server_error", None, None),
        s if s >= 500 => error_value(&server, "server_error", None, None),
        _ => error_value(
            &format!("Simulated client error {} (openai-simulator).", e.status),
            "invalid_request_error",
            None,
            None,
        ),
    }
}

pub(crate) fn error_answer(e: &ErrorStep, model: &str, request_id: &str) -> RouteAnswer {
    RouteAnswer::json(e.status, &error_body(e, model, request_id))
}

/// The model named in a request body, or the default.
pub(crate) fn model_of(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("model").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| DEFAULT_MODEL.to_string())
}

fn prompt_tokens(req: &Value, keys: &[&str]) -> u64 {
    let chars: usize = keys
        .iter()
        .filter_map(|k| req.get(*k))
        .map(|v| v.to_string().len())
        .sum();
    (chars as u64 / 4).max(1)
}

/// Filler for long streams: one ~1 KiB piece per event.
const FILLER: &str = "The quick brown fox jumps over the lazy dog. ";

/// The reply, word by word; with `ctx.reply_bytes` set, followed by ~1 KiB pieces until the text
/// is at least that long.
fn reply_pieces(ctx: &Ctx<'_>) -> Vec<String> {
    let mut out = Vec::new();
    for (i, w) in REPLY.split(' ').enumerate() {
        out.push(if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        });
    }
    let piece = format!(" {}", FILLER.repeat(23).trim_end());
    let mut len = REPLY.len() as u64;
    while len < ctx.reply_bytes {
        out.push(piece.clone());
        len += piece.len() as u64;
    }
    out
}

/// The whole reply text (what the pieces add up to).
fn reply_text(ctx: &Ctx<'_>) -> String {
    if ctx.reply_bytes == 0 {
        REPLY.to_owned()
    } else {
        reply_pieces(ctx).concat()
    }
}

fn data_event(v: &Value) -> String {
    format!("data: {}\n\n", serde_json::to_string(v).unwrap_or_default())
}

const MODELS: &[(&str, u64, &str)] = &[
    ("gpt-4o-mini", 1_721_172_741, "system"),
    ("gpt-4o", 1_715_367_049, "system"),
    ("gpt-4.1", 1_744_316_542, "system"),
    ("o3-mini", 1_737_146_383, "system"),
    ("text-embedding-3-small", 1_705_948_997, "system"),
    ("omni-moderation-latest", 1_731_689_265, "system"),
    ("gpt-3.5-turbo-instruct", 1_692_901_427, "system"),
];

fn model_obj(id: &str, created: u64, owner: &str) -> Value {
    json!({"id": id, "object": "model", "created": created, "owned_by": owner})
}

fn invalid_url(method: &str, path: &str) -> RouteAnswer {
    RouteAnswer::json(
        404,
        &error_value(
            &format!("Invalid URL ({method} {path})"),
            "invalid_request_error",
            None,
            None,
        ),
    )
}

fn bad_json() -> RouteAnswer {
    RouteAnswer::json(
        400,
        &error_value(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have trouble figuring out how to fix this, please contact us through our help center at help.openai.com.)",
            "invalid_request_error",
            None,
            None,
        ),
    )
}

fn b64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

fn embedding_for(input: &Value) -> Vec<f32> {
    // Deterministic pseudo-embedding from an FNV-1a hash of the input.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in input.to_string().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (0..8)
        .map(|i| {
            h ^= h >> 33;
            h = h.wrapping_mul(0xff51_afd7_ed55_8ccd).wrapping_add(i);
            ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The `ok` answer for an API request.
pub(crate) fn route(method: &str, path: &str, body: &[u8], ctx: &Ctx<'_>) -> RouteAnswer {
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    // Azure OpenAI's v1 API: the same routes below `/openai` (`.../openai/v1/chat/completions`).
    let path = path
        .strip_prefix("/openai")
        .filter(|p| p.starts_with("/v1/"))
        .unwrap_or(path);
    let post_route = matches!(
        path,
        "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/embeddings"
            | "/v1/responses"
            | "/v1/moderations"
    );
    if post_route {
        if method != "POST" {
            return invalid_url(method, path);
        }
        let req: Value = match serde_json::from_slice(body) {
            Ok(v @ Value::Object(_)) => v,
            _ => return bad_json(),
        };
        let model = req
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_MODEL)
            .to_string();
        let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
        return match path {
            "/v1/chat/completions" => chat(&req, &model, stream, ctx),
            "/v1/completions" => completion(&req, &model, stream, ctx),
            "/v1/embeddings" => embeddings(&req, &model),
            "/v1/responses" => responses(&req, &model, stream, ctx),
            _ => moderations(&req, ctx),
        };
    }
    if path == "/v1/models" && method == "GET" {
        let data: Vec<Value> = MODELS
            .iter()
            .map(|(id, c, o)| model_obj(id, *c, o))
            .collect();
        return RouteAnswer::json(200, &json!({"object": "list", "data": data}));
    }
    if let Some(id) = path.strip_prefix("/v1/models/")
        && method == "GET"
    {
        return match MODELS.iter().find(|(m, _, _)| *m == id) {
            Some((m, c, o)) => RouteAnswer::json(200, &model_obj(m, *c, o)),
            None => RouteAnswer::json(
                404,
                &error_value(
                    &format!("The model `{id}` does not exist or you do not have access to it."),
                    "invalid_request_error",
                    None,
                    Some("model_not_found"),
                ),
            ),
        };
    }
    invalid_url(method, path)
}

fn usage_chat(p: u64) -> Value {
    json!({
        "prompt_tokens": p,
        "completion_tokens": REPLY_TOKENS,
        "total_tokens": p + REPLY_TOKENS,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    })
}

fn include_usage(req: &Value) -> bool {
    req.pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn chat(req: &Value, model: &str, stream: bool, ctx: &Ctx<'_>) -> RouteAnswer {
    let id = format!("chatcmpl-{}", &ctx.hex[..29.min(ctx.hex.len())]);
    let p = prompt_tokens(req, &["messages"]);
    if !stream {
        return RouteAnswer::json(
            200,
            &json!({
                "id": id,
                "object": "chat.completion",
                "created": ctx.now_secs,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": REPLY, "refusal": null, "annotations": []},
                    "logprobs": null,
                    "finish_reason": "stop"
                }],
                "usage": usage_chat(p),
                "service_tier": "default",
                "system_fingerprint": FINGERPRINT
            }),
        );
    }
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": ctx.now_secs,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        })
    };
    let mut events = vec![data_event(&chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        Value::Null,
    ))];
    for piece in reply_pieces(ctx) {
        events.push(data_event(&chunk(json!({"content": piece}), Value::Null)));
    }
    events.push(data_event(&chunk(json!({}), json!("stop"))));
    if include_usage(req) {
        events.push(data_event(&json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": ctx.now_secs,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [],
            "usage": usage_chat(p)
        })));
    }
    events.push("data: [DONE]\n\n".to_string());
    RouteAnswer::sse(events)
}

fn completion(req: &Value, model: &str, stream: bool, ctx: &Ctx<'_>) -> RouteAnswer {
    let id = format!("cmpl-{}", &ctx.hex[..29.min(ctx.hex.len())]);
    let p = prompt_tokens(req, &["prompt"]);
    let usage = json!({"prompt_tokens": p, "completion_tokens": REPLY_TOKENS, "total_tokens": p + REPLY_TOKENS});
    if !stream {
        return RouteAnswer::json(
            200,
            &json!({
                "id": id,
                "object": "text_completion",
                "created": ctx.now_secs,
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"text": REPLY, "index": 0, "logprobs": null, "finish_reason": "stop"}],
                "usage": usage
            }),
        );
    }
    let chunk = |text: &str, finish: Value| {
        json!({
            "id": id,
            "object": "text_completion",
            "created": ctx.now_secs,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]
        })
    };
    let mut events: Vec<String> = reply_pieces(ctx)
        .iter()
        .map(|p| data_event(&chunk(p, Value::Null)))
        .collect();
    events.push(data_event(&chunk("", json!("stop"))));
    events.push("data: [DONE]\n\n".to_string());
    RouteAnswer::sse(events)
}

fn embeddings(req: &Value, model: &str) -> RouteAnswer {
    let inputs: Vec<Value> = match req.get("input") {
        Some(Value::Array(items)) if items.iter().all(|i| !i.is_number()) && !items.is_empty() => {
            items.clone()
        }
        Some(v) => vec![v.clone()],
        None => vec![Value::Null],
    };
    let base64 = req.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let emb = embedding_for(input);
            let emb = if base64 {
                let bytes: Vec<u8> = emb.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(b64(&bytes))
            } else {
                json!(emb)
            };
            json!({"object": "embedding", "index": i, "embedding": emb})
        })
        .collect();
    let p = prompt_tokens(req, &["input"]);
    RouteAnswer::json(
        200,
        &json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": p, "total_tokens": p}
        }),
    )
}

/// The `big=<bytes>` step: `answer` grown to at least `bytes`. A 200 embeddings answer becomes a
/// list of 1536-dimension float embeddings (written directly: no huge `Value` in memory twice);
/// anything else gets trailing newlines, which JSON and SSE readers skip.
pub(crate) fn grow(mut answer: RouteAnswer, path: &str, bytes: usize) -> RouteAnswer {
    let embeddings = path.trim_end_matches('/') == "/v1/embeddings";
    if answer.status == 200 && !answer.stream && embeddings {
        let v: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
        let model = v["model"].as_str().unwrap_or(DEFAULT_MODEL);
        let vector: Vec<f32> = (0..1536u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 8) as f32 / (1u32 << 24) as f32) - 0.5)
            .collect();
        let vector = serde_json::to_string(&vector).unwrap_or_default();
        let mut body = String::from(r#"{"object":"list","data":["#);
        let mut index = 0u64;
        while body.len() < bytes || index == 0 {
            if index > 0 {
                body.push(',');
            }
            body.push_str(&format!(
                r#"{{"object":"embedding","index":{index},"embedding":{vector}}}"#
            ));
            index += 1;
        }
        body.push_str(&format!(
            r#"],"model":"{model}","usage":{{"prompt_tokens":{index},"total_tokens":{index}}}}}"#
        ));
        answer.body = body.into_bytes();
    }
    if answer.body.len() < bytes {
        answer.body.resize(bytes, b'\n');
    }
    answer
}

fn response_obj(req: &Value, model: &str, ctx: &Ctx<'_>, completed: bool) -> Value {
    let p = prompt_tokens(req, &["input", "instructions"]);
    let output = if completed {
        json!([{
            "type": "message",
            "id": format!("msg_{}", ctx.hex),
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": reply_text(ctx), "annotations": [], "logprobs": []}]
        }])
    } else {
        json!([])
    };
    let usage = if completed {
        json!({
            "input_tokens": p,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": REPLY_TOKENS,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": p + REPLY_TOKENS
        })
    } else {
        Value::Null
    };
    json!({
        "id": format!("resp_{}", ctx.hex),
        "object": "response",
        "created_at": ctx.now_secs,
        "status": if completed { "completed" } else { "in_progress" },
        "background": false,
        "error": null,
        "incomplete_details": null,
        "instructions": req.get("instructions").cloned().unwrap_or(Value::Null),
        "max_output_tokens": req.get("max_output_tokens").cloned().unwrap_or(Value::Null),
        "model": model,
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": req.get("previous_response_id").cloned().unwrap_or(Value::Null),
        "reasoning": {"effort": null, "summary": null},
        "service_tier": "default",
        "store": true,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": null,
        "metadata": {}
    })
}

fn responses(req: &Value, model: &str, stream: bool, ctx: &Ctx<'_>) -> RouteAnswer {
    if !stream {
        return RouteAnswer::json(200, &response_obj(req, model, ctx, true));
    }
    let item_id = format!("msg_{}", ctx.hex);
    let mut seq = 0u64;
    let mut events = Vec::new();
    let mut ev = |typ: &str, mut v: Value| {
        v["type"] = json!(typ);
        v["sequence_number"] = json!(seq);
        seq += 1;
        events.push(format!(
            "event: {typ}\ndata: {}\n\n",
            serde_json::to_string(&v).unwrap_or_default()
        ));
    };
    ev(
        "response.created",
        json!({"response": response_obj(req, model, ctx, false)}),
    );
    for piece in reply_pieces(ctx) {
        ev(
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece, "logprobs": []}),
        );
    }
    ev(
        "response.output_text.done",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": reply_text(ctx), "logprobs": []}),
    );
    ev(
        "response.completed",
        json!({"response": response_obj(req, model, ctx, true)}),
    );
    RouteAnswer::sse(events)
}

fn moderations(req: &Value, ctx: &Ctx<'_>) -> RouteAnswer {
    const CATS: &[&str] = &[
        "harassment",
        "harassment/threatening",
        "hate",
        "hate/threatening",
        "illicit",
        "illicit/violent",
        "self-harm",
        "self-harm/instructions",
        "self-harm/intent",
        "sexual",
        "sexual/minors",
        "violence",
        "violence/graphic",
    ];
    let n = match req.get("input") {
        Some(Value::Array(items)) if !items.is_empty() => items.len(),
        _ => 1,
    };
    let mut categories = serde_json::Map::new();
    let mut scores = serde_json::Map::new();
    for c in CATS {
        categories.insert((*c).into(), json!(false));
        scores.insert((*c).into(), json!(0.000_012_5));
    }
    let result = json!({
        "flagged": false,
        "categories": categories,
        "category_scores": scores
    });
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("omni-moderation-latest");
    RouteAnswer::json(
        200,
        &json!({
            "id": format!("modr-{}", ctx.hex),
            "model": model,
            "results": vec![result; n]
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(b64(b""), "");
        assert_eq!(b64(b"f"), "Zg==");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(b"foobar"), "Zm9vYmFy");
    }
}
