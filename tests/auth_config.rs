//! Spec §7 (client auth, settings) and the §2 header contract, through the real handler in
//! process against the OpenAI simulator. Every test scans the captured JSON logs for the keys
//! and tokens it used.

mod support;

use std::sync::Arc;

use openai_lambda_proxy::Proxy;
use openai_simulator::Simulator;
use serde_json::{Value, json};
use support::events::{
    assert_error, assert_error_naming, base64_body, bearer, chat_body, chat_event, function_url,
    header, invoke, proxy_for, simulator, status, v1, v2,
};
use support::logs;

const SERVER_KEY: &str = "sk-server-key-auth-config-000001";
const TOKEN_A: &str = "proxy-token-alpha-0000000001";
const TOKEN_B: &str = "proxy-token-bravo-0000000002";
const TOKENS: &str = "proxy-token-alpha-0000000001, proxy-token-bravo-0000000002";

/// A proxy for `sim` with the server key, then the `extra` settings (a later pair wins).
fn proxy_to(sim: &Simulator, extra: &[(&str, &str)]) -> Arc<Proxy> {
    proxy_for(
        sim,
        &[&[("OPENAI_API_KEY", SERVER_KEY)][..], extra].concat(),
        None,
    )
}

/// A fresh simulator and a [`proxy_to`] it.
async fn upstream_and_proxy(extra: &[(&str, &str)]) -> (Simulator, Arc<Proxy>) {
    let sim = simulator().await;
    let p = proxy_to(&sim, extra);
    (sim, p)
}

#[tokio::test]
async fn client_tokens_missing_malformed_wrong_and_right() {
    let logs = logs::check(&[SERVER_KEY, TOKEN_A, TOKEN_B]);
    let (sim, p) = upstream_and_proxy(&[("PROXY_API_KEYS", TOKENS)]).await;

    let (resp, id) = invoke(&p, chat_event(None)).await;
    assert_error_naming(&resp, 401, "unauthorized", "Authorization");
    // The capture sees the handler's own lines (so the secret scan scans real output).
    let finished = logs.capture().lines_with(&id, "request finished");
    assert_eq!(
        finished.len(),
        1,
        "one `request finished` line per invocation"
    );
    assert_eq!(finished[0]["code"], "unauthorized");

    let wrong_a = format!("{TOKEN_A}x");
    let wrong_b = TOKEN_A[..TOKEN_A.len() - 1].to_owned();
    let upper = TOKEN_A.to_uppercase();
    let refused = [
        "".to_owned(),
        "Bearer".to_owned(),
        "Bearer    ".to_owned(),
        format!("Basic {TOKEN_A}"),
        format!("Token {TOKEN_A}"),
        TOKEN_A.to_owned(),
        format!("Bearer{TOKEN_A}"),
        bearer(&wrong_a),
        bearer(&wrong_b),
        bearer(&upper),
        bearer(SERVER_KEY),
        format!("Bearer {TOKEN_A},Bearer {TOKEN_B}"),
        bearer(&format!("{TOKEN_A}\u{0}")),
        bearer("ünïcödé-token-value"),
    ];
    for auth in &refused {
        let (resp, _) = invoke(&p, chat_event(Some(auth))).await;
        let msg = assert_error(&resp, 401, "unauthorized");
        assert!(!msg.contains(TOKEN_A) && !msg.contains(TOKEN_B), "{msg}");
        assert_eq!(header(&resp, "x-should-retry"), Some("false"));
    }
    assert!(
        sim.requests().is_empty(),
        "a refused request reached the upstream"
    );

    // Right tokens, any case of the scheme and of the header name, every gateway shape.
    let accepted = [
        v2(
            "POST",
            "/v1/chat/completions",
            &[("authorization", &bearer(TOKEN_A))],
            Some(&chat_body("m")),
        ),
        v2(
            "POST",
            "/v1/chat/completions",
            &[("Authorization", &format!("bearer  {TOKEN_B} "))],
            Some(&chat_body("m")),
        ),
        v1(
            "POST",
            "/prod/v1/chat/completions",
            &[("AUTHORIZATION", &bearer(TOKEN_B))],
            Some(&chat_body("m")),
        ),
        function_url(
            "POST",
            "/chat/completions",
            &[("authorization", &bearer(TOKEN_A))],
            Some(&chat_body("m")),
        ),
        v2(
            "GET",
            "/v1/models",
            &[("authorization", &bearer(TOKEN_A))],
            None,
        ),
    ];
    let n = accepted.len();
    for event in accepted {
        let (resp, _) = invoke(&p, event).await;
        assert_eq!(status(&resp), 200, "{resp}");
    }
    let reqs = sim.requests();
    assert_eq!(reqs.len(), n);
    for r in &reqs {
        assert_eq!(r.header("authorization"), Some(bearer(SERVER_KEY).as_str()));
    }
}

#[tokio::test]
async fn health_answers_without_a_token_and_without_the_upstream() {
    let _logs = logs::check(&[SERVER_KEY, TOKEN_A]);
    let (sim, p) = upstream_and_proxy(&[("PROXY_API_KEYS", TOKEN_A)]).await;
    for event in [
        v2("GET", "/health", &[], None),
        v2(
            "GET",
            "/prod/health",
            &[("authorization", "Bearer nope-nope-nope")],
            None,
        ),
        v1("GET", "/health", &[], None),
        function_url("GET", "/health", &[], None),
    ] {
        let (resp, _) = invoke(&p, event).await;
        assert_eq!(status(&resp), 200, "{resp}");
        let body: Value = serde_json::from_str(resp["body"].as_str().unwrap()).unwrap();
        assert_eq!(body, json!({"status": "ok"}));
    }
    assert!(sim.requests().is_empty());
}

#[tokio::test]
async fn auth_mode_none_lets_callers_through_and_forwards_no_client_token() {
    let _logs = logs::check(&[SERVER_KEY, TOKEN_A]);
    let (sim, p) = upstream_and_proxy(&[("AUTH_MODE", "none")]).await;
    assert_eq!(status(&invoke(&p, chat_event(None)).await.0), 200);
    assert_eq!(
        status(&invoke(&p, chat_event(Some(&bearer(TOKEN_A)))).await.0),
        200
    );
    for r in sim.requests() {
        assert_eq!(r.header("authorization"), Some(bearer(SERVER_KEY).as_str()));
    }
    // AUTH_MODE=none wins over configured tokens too.
    let p = proxy_to(&sim, &[("AUTH_MODE", "NONE"), ("PROXY_API_KEYS", TOKEN_A)]);
    assert_eq!(status(&invoke(&p, chat_event(None)).await.0), 200);
}

#[tokio::test]
async fn no_tokens_configured_fails_closed() {
    let _logs = logs::check(&[SERVER_KEY]);
    let sim = simulator().await;
    for extra in [
        None,
        Some(("PROXY_API_KEYS", " , ,")),
        Some(("AUTH_MODE", "api_key")),
    ] {
        let p = proxy_to(&sim, extra.as_slice());
        for event in [
            chat_event(None),
            chat_event(Some("Bearer anything-at-all")),
            v2("GET", "/v1/models", &[], None),
        ] {
            let (resp, _) = invoke(&p, event).await;
            assert_error_naming(&resp, 500, "config_error", "PROXY_API_KEYS");
        }
        let (resp, _) = invoke(&p, v2("GET", "/health", &[], None)).await;
        assert_eq!(status(&resp), 200);
    }
    assert!(sim.requests().is_empty());
}

#[tokio::test]
async fn a_bad_setting_is_a_config_error_that_names_it_and_never_its_value() {
    let _logs = logs::check(&[
        SERVER_KEY,
        TOKEN_A,
        "statsd-secretish-value",
        "leaky-query-value",
    ]);
    let sim = simulator().await;
    let cases: &[(&str, &str)] = &[
        ("RETRY_MAX_ATTEMPTS", "many-attempts-value"),
        ("RETRY_MAX_ATTEMPTS", "0"),
        ("RETRY_MAX_ATTEMPTS", "99999"),
        ("MAX_BODY_BYTES", "-1"),
        ("MAX_BODY_BYTES", "99999999999999999999999999"),
        ("MAX_BODY_BYTES", "7000000"),
        ("RETRY_BASE_DELAY_MS", "1e3"),
        ("RETRY_MAX_DELAY_MS", "forever-value"),
        ("DEADLINE_MARGIN_MS", "99999999"),
        ("MIN_ATTEMPT_MS", "1.5"),
        ("CONNECT_TIMEOUT_MS", "0"),
        ("ATTEMPT_TIMEOUT_MS", "soon-value"),
        ("GATEWAY_TIMEOUT_MS", "0x10"),
        ("FALLBACK_TIMEOUT_MS", "0"),
        ("METRICS_BACKEND", "statsd-secretish-value"),
        ("METRICS_NAMESPACE", "AWS/Lambda-value"),
        ("OPENAI_BASE_URL", "not a url value"),
        ("OPENAI_BASE_URL", "ftp://files.example.com/v1"),
        (
            "OPENAI_BASE_URL",
            "https://api.example.com/v1?key=leaky-query-value",
        ),
        ("OPENAI_BASE_URL", "/v1/relative-value"),
        ("AUTH_MODE", "sometimes-value"),
        ("OPENAI_ORGANIZATION", "org-line\nInjected: header-value"),
        ("OPENAI_PROJECT", "proj-ünïcode-value"),
    ];
    for (name, value) in cases {
        let p = proxy_to(&sim, &[("PROXY_API_KEYS", TOKEN_A), (name, value)]);
        for event in [
            chat_event(Some(&bearer(TOKEN_A))),
            chat_event(None),
            v1(
                "GET",
                "/v1/models",
                &[("authorization", &bearer(TOKEN_A))],
                None,
            ),
        ] {
            let (resp, _) = invoke(&p, event).await;
            let msg = assert_error(&resp, 500, "config_error");
            assert!(
                msg.contains(name),
                "{name}={value:?}: message does not name it: {msg}"
            );
            if value.len() >= 4 {
                assert!(
                    !msg.contains(value),
                    "{name}: message leaks the value: {msg}"
                );
            }
            assert!(!msg.contains(SERVER_KEY) && !msg.contains(TOKEN_A), "{msg}");
        }
        let (resp, _) = invoke(&p, v2("GET", "/health", &[], None)).await;
        assert_eq!(
            status(&resp),
            200,
            "{name}={value:?}: /health must keep working"
        );
    }
    assert!(
        sim.requests().is_empty(),
        "a misconfigured proxy called the upstream"
    );
}

/// Transport headers reqwest adds itself; anything else upstream must come from §2's list.
const TRANSPORT: [&str; 6] = [
    "host",
    "content-length",
    "user-agent",
    "accept",
    "accept-encoding",
    "connection",
];
const FORWARDED: [&str; 6] = [
    "authorization",
    "content-type",
    "openai-organization",
    "openai-project",
    "idempotency-key",
    "x-client-request-id",
];

#[tokio::test]
async fn only_the_spec_headers_go_upstream() {
    let _logs = logs::check(&[
        SERVER_KEY,
        TOKEN_A,
        "cookie-secret-value",
        "client-x-api-key-value",
    ]);
    let (sim, p) = upstream_and_proxy(&[
        ("PROXY_API_KEYS", TOKEN_A),
        ("OPENAI_ORGANIZATION", "org-configured-123"),
        ("OPENAI_PROJECT", "proj_configured_456"),
    ])
    .await;
    let auth = bearer(TOKEN_A);
    let client_headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json; charset=utf-8"),
        ("Idempotency-Key", "idem-key-789"),
        ("Cookie", "session=cookie-secret-value"),
        ("x-api-key", "client-x-api-key-value"),
        ("X-Forwarded-For", "203.0.113.99, 10.0.0.1"),
        ("X-Real-IP", "203.0.113.99"),
        ("OpenAI-Organization", "org-from-client"),
        ("OpenAI-Project", "proj-from-client"),
        ("User-Agent", "client-agent/9.9"),
        ("X-Request-Id", "client-chosen-request-id"),
        ("X-Client-Request-Id", "client-chosen-client-id"),
        ("Accept-Encoding", "br"),
        ("Host", "evil.example.com"),
        ("X-Amzn-Trace-Id", "Root=1-client"),
        ("OpenAI-Beta", "assistants=v2"),
        ("Proxy-Authorization", "Basic client-proxy-auth"),
        ("X-Custom", "anything"),
    ];
    let body = "{ \"model\" : \"gpt-4o-mini\",\n \"messages\": [{\"role\":\"user\",\"content\":\"héllo\"}] }";
    let mut ids = Vec::new();
    for event in [
        v2("POST", "/v1/chat/completions", &client_headers, Some(body)),
        v1("POST", "/v1/chat/completions", &client_headers, Some(body)),
        base64_body(function_url(
            "POST",
            "/v1/chat/completions",
            &client_headers,
            Some(body),
        )),
    ] {
        let (resp, id) = invoke(&p, event).await;
        assert_eq!(status(&resp), 200, "{resp}");
        ids.push(id);
    }
    let reqs = sim.requests();
    assert_eq!(reqs.len(), 3);
    for (r, id) in reqs.iter().zip(&ids) {
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(r.body, body.as_bytes(), "body must go upstream unchanged");
        assert_eq!(r.header("authorization"), Some(bearer(SERVER_KEY).as_str()));
        assert_eq!(
            r.header("content-type"),
            Some("application/json; charset=utf-8")
        );
        assert_eq!(r.header("openai-organization"), Some("org-configured-123"));
        assert_eq!(r.header("openai-project"), Some("proj_configured_456"));
        assert_eq!(r.header("idempotency-key"), Some("idem-key-789"));
        assert_eq!(r.header("x-client-request-id"), Some(id.as_str()));
        for (name, value) in &r.headers {
            assert!(
                FORWARDED.contains(&name.as_str()) || TRANSPORT.contains(&name.as_str()),
                "header {name} went upstream"
            );
            for (_, client_value) in &client_headers[2..] {
                if *client_value != "idem-key-789" {
                    assert!(
                        !value.contains(client_value),
                        "client header value went upstream in {name}: {value}"
                    );
                }
            }
            assert!(
                !value.contains(TOKEN_A),
                "client token went upstream in {name}"
            );
        }
        for name in FORWARDED {
            assert_eq!(
                r.headers.iter().filter(|(n, _)| n == name).count(),
                1,
                "{name} repeated"
            );
        }
    }

    // Nothing configured, nothing sent: no organization, project or idempotency key upstream.
    sim.clear_requests();
    let p = proxy_to(&sim, &[("PROXY_API_KEYS", TOKEN_A)]);
    let (resp, id) = invoke(&p, v2("GET", "/v1/models", &client_headers[..1], None)).await;
    assert_eq!(status(&resp), 200);
    let (resp, _) = invoke(
        &p,
        v2(
            "POST",
            "/v1/embeddings",
            &[client_headers[0], client_headers[8]],
            Some("{\"model\":\"e\",\"input\":\"x\"}"),
        ),
    )
    .await;
    assert_eq!(status(&resp), 200);
    let reqs = sim.requests();
    assert_eq!(reqs[0].method, "GET");
    assert_eq!(reqs[0].header("x-client-request-id"), Some(id.as_str()));
    for r in &reqs {
        for name in [
            "openai-organization",
            "openai-project",
            "idempotency-key",
            "cookie",
        ] {
            assert_eq!(r.header(name), None, "{name} went upstream");
        }
    }
}

#[tokio::test]
async fn allowed_models_take_exact_names_and_prefixes() {
    let _logs = logs::check(&[SERVER_KEY, TOKEN_A]);
    let (sim, p) = upstream_and_proxy(&[
        ("PROXY_API_KEYS", TOKEN_A),
        ("ALLOWED_MODELS", "gpt-4o*, text-embedding-3-small"),
    ])
    .await;
    let token = bearer(TOKEN_A);
    let auth = [("authorization", token.as_str())];
    let call = |path: &str, model: &str| v2("POST", path, &auth, Some(&chat_body(model)));
    let mut allowed = 0;
    for (path, model, ok) in [
        ("/v1/chat/completions", "gpt-4o", true),
        ("/v1/chat/completions", "gpt-4o-mini", true),
        ("/v1/responses", "gpt-4o-2024-08-06", true),
        ("/v1/embeddings", "text-embedding-3-small", true),
        ("/v1/chat/completions", "gpt-4", false),
        ("/v1/chat/completions", "GPT-4O-mini", false),
        ("/v1/chat/completions", "o1-gpt-4o", false),
        ("/v1/embeddings", "text-embedding-3-small-v2", false),
        ("/v1/embeddings", "text-embedding-3-large", false),
        ("/v1/chat/completions", "", false),
    ] {
        let (resp, _) = invoke(&p, call(path, model)).await;
        if ok {
            allowed += 1;
            assert_eq!(status(&resp), 200, "{model}: {resp}");
        } else {
            assert_error_naming(&resp, 403, "model_not_allowed", "ALLOWED_MODELS");
        }
    }
    // Moderations without a model are not refused by the allow list.
    let (resp, _) = invoke(
        &p,
        v2("POST", "/v1/moderations", &auth, Some("{\"input\":\"x\"}")),
    )
    .await;
    assert_eq!(status(&resp), 200);
    assert_eq!(sim.requests().len(), allowed + 1);
}

#[tokio::test]
async fn bodies_over_max_body_bytes_are_refused_plain_or_base64() {
    let _logs = logs::check(&[SERVER_KEY, TOKEN_A]);
    let auth = bearer(TOKEN_A);
    let headers = [("authorization", auth.as_str())];
    // A chat body padded with spaces to exactly `len` bytes.
    let sized = |len: usize| {
        let b = chat_body("m");
        assert!(b.len() <= len);
        format!("{b}{}", " ".repeat(len - b.len()))
    };
    let (sim, p) =
        upstream_and_proxy(&[("PROXY_API_KEYS", TOKEN_A), ("MAX_BODY_BYTES", "100")]).await;
    for (len, ok) in [(100, true), (101, false), (5000, false)] {
        let body = sized(len);
        for event in [
            v2("POST", "/v1/chat/completions", &headers, Some(&body)),
            v1("POST", "/v1/chat/completions", &headers, Some(&body)),
            base64_body(v2("POST", "/v1/chat/completions", &headers, Some(&body))),
            base64_body(v1("POST", "/v1/chat/completions", &headers, Some(&body))),
        ] {
            let (resp, _) = invoke(&p, event).await;
            if ok {
                assert_eq!(status(&resp), 200, "{len}: {resp}");
            } else {
                assert_error_naming(&resp, 413, "payload_too_large", "MAX_BODY_BYTES");
            }
        }
    }
    assert_eq!(sim.requests().len(), 4);

    // The default is 1 MiB.
    let p = proxy_to(&sim, &[("PROXY_API_KEYS", TOKEN_A)]);
    let (resp, _) = invoke(
        &p,
        v2(
            "POST",
            "/v1/chat/completions",
            &headers,
            Some(&sized(1024 * 1024 + 1)),
        ),
    )
    .await;
    assert_error(&resp, 413, "payload_too_large");
    let (resp, _) = invoke(
        &p,
        v2(
            "POST",
            "/v1/chat/completions",
            &headers,
            Some(&sized(1024 * 1024)),
        ),
    )
    .await;
    assert_eq!(status(&resp), 200);
}

/// `OPENAI_BASE_URL` set to the proxy's own URL (e.g. its `ProxyBaseUrl` output pasted as the
/// upstream): a request arriving on that very host is refused as a configuration error naming
/// the setting, and nothing is sent (no request loop until the deadline).
#[tokio::test]
async fn an_upstream_that_is_the_proxy_itself_is_a_config_error_not_a_loop() {
    let _logs = logs::check(&[SERVER_KEY, TOKEN_A]);
    let (sim, p) = upstream_and_proxy(&[("PROXY_API_KEYS", TOKEN_A)]).await;
    let own_host = sim.addr().to_string();
    let auth = bearer(TOKEN_A);
    for event in [
        v2(
            "POST",
            "/v1/chat/completions",
            &[
                ("host", own_host.as_str()),
                ("authorization", auth.as_str()),
            ],
            Some(&chat_body("gpt-4o-mini")),
        ),
        function_url(
            "GET",
            "/v1/models",
            &[
                ("Host", own_host.as_str()),
                ("authorization", auth.as_str()),
            ],
            None,
        ),
    ] {
        let (resp, _) = invoke(&p, event).await;
        let msg = assert_error_naming(&resp, 500, "config_error", "OPENAI_BASE_URL");
        assert!(msg.contains("this proxy itself"), "{msg}");
    }
    assert!(sim.requests().is_empty(), "the proxy called itself");

    // The same machine on another port (the simulator next to `cargo lambda watch`) is fine.
    let other = format!("127.0.0.1:{}", sim.addr().port().wrapping_add(1).max(1));
    let event = v2(
        "POST",
        "/v1/chat/completions",
        &[("host", other.as_str()), ("authorization", auth.as_str())],
        Some(&chat_body("gpt-4o-mini")),
    );
    let (resp, _) = invoke(&p, event).await;
    assert_eq!(status(&resp), 200, "{resp}");
    assert_eq!(sim.requests().len(), 1);
}

/// A proxy whose settings were changed after parsing, the way a bug (or a future setting the
/// parser does not check) could leave a value that cannot go in a request.
fn proxy_with_settings(
    sim: &Simulator,
    change: impl FnOnce(&mut openai_lambda_proxy::config::Settings),
) -> Arc<Proxy> {
    let base = sim.base_url();
    let pairs = [
        ("OPENAI_BASE_URL", base.as_str()),
        ("OPENAI_API_KEY", SERVER_KEY),
        ("PROXY_API_KEYS", TOKEN_A),
        ("METRICS_BACKEND", "none"),
    ];
    let mut settings = openai_lambda_proxy::config::Settings::from_lookup(|k| {
        pairs
            .iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| v.to_string())
    })
    .unwrap();
    change(&mut settings);
    Arc::new(Proxy::new(
        Ok(settings),
        openai_lambda_proxy::secrets::Secrets::new(None),
        Box::new(openai_lambda_proxy::telemetry::metrics::NoMetrics),
    ))
}

#[tokio::test]
async fn a_request_that_cannot_be_built_is_a_config_error_naming_the_setting_not_retried() {
    let _logs = logs::check(&[SERVER_KEY, TOKEN_A]);
    let sim = simulator().await;
    let first = |s: &openai_lambda_proxy::config::Settings| match &s.upstreams {
        openai_lambda_proxy::upstreams::UpstreamsSource::List(list) => list[0].clone(),
        _ => unreachable!("a list from the §7 settings"),
    };
    let set_first = |s: &mut openai_lambda_proxy::config::Settings, spec| {
        s.upstreams = openai_lambda_proxy::upstreams::UpstreamsSource::List(vec![spec].into());
    };
    let p = proxy_with_settings(&sim, |s| {
        let mut spec = first(s);
        spec.organization = Some("org-\u{1}broken".into());
        set_first(s, spec);
    });
    let (resp, _) = invoke(&p, chat_event(Some(&bearer(TOKEN_A)))).await;
    assert_error_naming(&resp, 500, "config_error", "OPENAI_ORGANIZATION");
    assert_eq!(header(&resp, "x-upstream-attempts"), None);
    assert_eq!(header(&resp, "x-should-retry"), Some("false"));
    assert!(sim.requests().is_empty(), "nothing was sent");

    let p = proxy_with_settings(&sim, |s| {
        let mut spec = first(s);
        spec.project = Some("proj\nx".into());
        set_first(s, spec);
    });
    let (resp, _) = invoke(&p, chat_event(Some(&bearer(TOKEN_A)))).await;
    assert_error_naming(&resp, 500, "config_error", "OPENAI_PROJECT");
    assert!(sim.requests().is_empty(), "nothing was sent");
}
