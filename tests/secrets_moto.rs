//! Keys and tokens from Secrets Manager (spec §7) through a real local emulator: a moto server
//! started by the test, the real aws-sdk-secretsmanager client pointed at it, the real handler
//! in process and the OpenAI simulator upstream. Needs `make venv` (moto comes from the venv).

mod support;

use std::time::{Duration, Instant};

use openai_lambda_proxy::secrets::Secrets;
use openai_simulator::{Simulator, parse_script};
use serde_json::Value;
use support::events::{
    VirtualClock, assert_error, assert_error_naming, bearer, chat_event, header, invoke,
    invoke_within, proxy_for, proxy_for_with, proxy_with, request_id, simulator, status, v2,
};
use support::logs;
use support::moto::{
    CountingPassThrough, Moto, black_hole, create_secret, free_port, put_secret_value,
    secrets_client,
};

async fn moto() -> Moto {
    tokio::task::spawn_blocking(Moto::start).await.unwrap()
}

fn chat(token: &str) -> Value {
    chat_event(Some(&bearer(token)))
}

fn bearer_seen(sim: &Simulator) -> Vec<String> {
    sim.requests()
        .iter()
        .map(|r| r.header("authorization").unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_and_json_secrets_for_the_key_and_the_tokens() {
    let secrets = [
        "sk-moto-raw-key-0000000001",
        "tok-moto-raw-0000000001",
        "tok-moto-raw-0000000002",
        "sk-moto-json-key-000000001",
        "tok-moto-json-000000000001",
        "tok-moto-array-00000000001",
    ];
    let _logs = logs::check(&secrets);
    let moto = moto().await;
    let sm = secrets_client(&moto.endpoint()).await;
    let sim = simulator().await;

    let raw_key = create_secret(&sm, "raw-key", "sk-moto-raw-key-0000000001\n").await;
    let raw_tokens = create_secret(
        &sm,
        "raw-tokens",
        "tok-moto-raw-0000000001, tok-moto-raw-0000000002",
    )
    .await;
    let json_key = create_secret(
        &sm,
        "json-key",
        r#"{"OPENAI_API_KEY": "sk-moto-json-key-000000001"}"#,
    )
    .await;
    let json_tokens = create_secret(
        &sm,
        "json-tokens",
        r#"{"PROXY_API_KEYS": "tok-moto-json-000000000001"}"#,
    )
    .await;
    let array_tokens =
        create_secret(&sm, "array-tokens", r#"["tok-moto-array-00000000001"]"#).await;

    for (key_arn, tokens_arn, key, token) in [
        (&raw_key, &raw_tokens, secrets[0], secrets[1]),
        (&raw_key, &raw_tokens, secrets[0], secrets[2]),
        (&json_key, &json_tokens, secrets[3], secrets[4]),
        (&json_key, &array_tokens, secrets[3], secrets[5]),
    ] {
        sim.clear_requests();
        let p = proxy_for(
            &sim,
            &[
                ("OPENAI_API_KEY_SECRET_ARN", key_arn),
                ("PROXY_API_KEYS_SECRET_ARN", tokens_arn),
                // Secrets Manager wins over the environment when both are set.
                ("OPENAI_API_KEY", "sk-env-key-should-not-be-used"),
            ],
            Some(sm.clone()),
        );
        let (resp, _) = invoke(&p, chat(token)).await;
        assert_eq!(status(&resp), 200, "{resp}");
        let (resp, _) = invoke(&p, chat("tok-not-in-the-secret-0001")).await;
        assert_error(&resp, 401, "unauthorized");
        assert_eq!(bearer_seen(&sim), [bearer(key)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_fetched_once_and_cached_across_invocations() {
    let (old_key, new_key) = (
        "sk-moto-cached-key-000000001",
        "sk-moto-changed-key-00000002",
    );
    let token = "tok-moto-cached-00000000001";
    let _logs = logs::check(&[old_key, new_key, token, "tok-moto-changed-0000000002"]);
    let moto = moto().await;
    let sm = secrets_client(&moto.endpoint()).await;
    let counting = CountingPassThrough::start(moto.addr()).await;
    let sim = simulator().await;
    let key_arn = create_secret(&sm, "cached-key", old_key).await;
    let tokens_arn = create_secret(&sm, "cached-tokens", token).await;
    let p = proxy_for(
        &sim,
        &[
            ("OPENAI_API_KEY_SECRET_ARN", &key_arn),
            ("PROXY_API_KEYS_SECRET_ARN", &tokens_arn),
        ],
        Some(secrets_client(&counting.endpoint()).await),
    );
    for _ in 0..5 {
        assert_eq!(status(&invoke(&p, chat(token)).await.0), 200);
    }
    // One GetSecretValue for the key, one for the tokens, however many invocations.
    assert_eq!(counting.get_secret_value_calls(), 2);

    // Change both secrets in moto: the warm function keeps using what it read at first.
    put_secret_value(&sm, &key_arn, new_key).await;
    put_secret_value(&sm, &tokens_arn, "tok-moto-changed-0000000002").await;
    for _ in 0..3 {
        assert_eq!(status(&invoke(&p, chat(token)).await.0), 200);
    }
    assert_eq!(counting.get_secret_value_calls(), 2);
    assert!(bearer_seen(&sim).iter().all(|b| *b == bearer(old_key)));

    // Even with Secrets Manager gone, the cached values keep serving.
    drop(moto);
    assert_eq!(status(&invoke(&p, chat(token)).await.0), 200);
    assert_eq!(sim.requests().len(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_tokens_and_keys_take_effect_once_older_than_secrets_ttl_ms() {
    let (old_key, new_key) = ("sk-moto-ttl-old-key-0000001", "sk-moto-ttl-new-key-0000002");
    let (old_token, new_token) = ("tok-moto-ttl-old-000000001", "tok-moto-ttl-new-000000002");
    let _logs = logs::check(&[old_key, new_key, old_token, new_token]);
    let moto = moto().await;
    let sm = secrets_client(&moto.endpoint()).await;
    let counting = CountingPassThrough::start(moto.addr()).await;
    let sim = simulator().await;
    let key_arn = create_secret(&sm, "ttl-key", old_key).await;
    let tokens_arn = create_secret(&sm, "ttl-tokens", old_token).await;
    let clock = VirtualClock::new();
    let secrets =
        Secrets::new(Some(secrets_client(&counting.endpoint()).await)).with_clock(clock.clone());
    let p = proxy_for_with(
        &sim,
        &[
            ("OPENAI_API_KEY_SECRET_ARN", &key_arn),
            ("PROXY_API_KEYS_SECRET_ARN", &tokens_arn),
            ("SECRETS_TTL_MS", "60000"),
        ],
        secrets,
    );
    assert_eq!(status(&invoke(&p, chat(old_token)).await.0), 200);
    assert_eq!(counting.get_secret_value_calls(), 2);

    // Both rotated: the old token is revoked, the new one issued; OpenAI key replaced.
    put_secret_value(&sm, &tokens_arn, new_token).await;
    put_secret_value(&sm, &key_arn, new_key).await;
    clock.advance(59_999);
    assert_eq!(status(&invoke(&p, chat(old_token)).await.0), 200);
    // Unknown tokens (the new one too, not read yet) never trigger a read.
    for i in 0..5 {
        let guess = format!("tok-moto-ttl-guess-{i}-000000");
        assert_error(&invoke(&p, chat(&guess)).await.0, 401, "unauthorized");
    }
    assert_error(&invoke(&p, chat(new_token)).await.0, 401, "unauthorized");
    assert_eq!(counting.get_secret_value_calls(), 2);
    assert!(bearer_seen(&sim).iter().all(|b| *b == bearer(old_key)));

    // Once older than SECRETS_TTL_MS both are read again, once.
    clock.advance(1);
    assert_error(&invoke(&p, chat(old_token)).await.0, 401, "unauthorized");
    assert_eq!(
        counting.get_secret_value_calls(),
        3,
        "the tokens, read again"
    );
    sim.clear_requests();
    assert_eq!(status(&invoke(&p, chat(new_token)).await.0), 200);
    assert_eq!(status(&invoke(&p, chat(new_token)).await.0), 200);
    assert_eq!(counting.get_secret_value_calls(), 4, "then the key, once");
    assert_eq!(bearer_seen(&sim), [bearer(new_key), bearer(new_key)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_401_refetches_the_key_once_and_retries_with_the_rotated_one() {
    let (old_key, new_key) = ("sk-moto-rotate-old-00000001", "sk-moto-rotate-new-00000002");
    let token = "tok-moto-rotate-000000000001";
    let logs = logs::check(&[old_key, new_key, token]);
    let moto = moto().await;
    let sm = secrets_client(&moto.endpoint()).await;
    let counting = CountingPassThrough::start(moto.addr()).await;
    let sim = simulator().await;
    let key_arn = create_secret(&sm, "rotating-key", old_key).await;
    let p = proxy_for(
        &sim,
        &[
            ("OPENAI_API_KEY_SECRET_ARN", &key_arn),
            ("PROXY_API_KEYS", token),
        ],
        Some(secrets_client(&counting.endpoint()).await),
    );
    assert_eq!(status(&invoke(&p, chat(token)).await.0), 200);
    assert_eq!(counting.get_secret_value_calls(), 1);

    // The key is rotated in Secrets Manager; OpenAI now rejects the old one.
    put_secret_value(&sm, &key_arn, new_key).await;
    sim.set_script(parse_script("401,ok").unwrap());
    let (resp, id) = invoke(&p, chat(token)).await;
    assert_eq!(status(&resp), 200, "{resp}");
    assert_eq!(header(&resp, "x-upstream-attempts"), Some("2"));
    let lines = logs.capture().lines_for(&id);
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "WARN" && l["message"].as_str().unwrap_or("").contains("401")),
        "the refetch after a 401 is logged"
    );
    assert_eq!(counting.get_secret_value_calls(), 2);
    let old = bearer(old_key);
    let new = bearer(new_key);
    assert_eq!(bearer_seen(&sim), [old.clone(), old.clone(), new.clone()]);

    // The new key is cached from then on.
    assert_eq!(status(&invoke(&p, chat(token)).await.0), 200);
    assert_eq!(counting.get_secret_value_calls(), 2);
    assert_eq!(bearer_seen(&sim).last(), Some(&new));

    // A 401 while the secret still holds the same key: fetched again once, no pointless retry,
    // and the caller learns the server's key is the problem (not their token).
    sim.clear_requests();
    sim.set_script(parse_script("401").unwrap());
    let (resp, _) = invoke(&p, chat(token)).await;
    let msg = assert_error(&resp, 502, "upstream_auth_failed");
    assert!(!msg.contains(new_key), "{msg}");
    assert_eq!(counting.get_secret_value_calls(), 3);
    assert_eq!(bearer_seen(&sim), [new]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_after_a_key_refresh_spends_from_the_same_attempts() {
    let (old_key, new_key) = ("sk-moto-spend-old-00000001", "sk-moto-spend-new-00000002");
    let token = "tok-moto-spend-000000000001";
    let _logs = logs::check(&[old_key, new_key, token]);
    let moto = moto().await;
    let sm = secrets_client(&moto.endpoint()).await;
    let sim = simulator().await;
    let key_arn = create_secret(&sm, "spending-key", old_key).await;
    let settings = |attempts: &'static str| {
        proxy_for(
            &sim,
            &[
                ("OPENAI_API_KEY_SECRET_ARN", key_arn.as_str()),
                ("PROXY_API_KEYS", token),
                ("RETRY_MAX_ATTEMPTS", attempts),
                ("RETRY_BASE_DELAY_MS", "50"),
            ],
            Some(sm.clone()),
        )
    };
    // Three attempts in all: a 503, the 401, then one with the new key (a 503 again).
    let p = settings("3");
    assert_eq!(status(&invoke(&p, chat(token)).await.0), 200);
    put_secret_value(&sm, &key_arn, new_key).await;
    sim.clear_requests();
    sim.set_script(parse_script("503,401,503,503,503,ok").unwrap());
    let (resp, _) = invoke(&p, chat(token)).await;
    assert_error(&resp, 502, "upstream_unavailable");
    assert_eq!(header(&resp, "x-upstream-attempts"), Some("3"));
    let (old, new) = (bearer(old_key), bearer(new_key));
    assert_eq!(bearer_seen(&sim), [old.clone(), old.clone(), new.clone()]);

    // One attempt in all: the 401 used it; the new key is fetched for the next request only.
    put_secret_value(&sm, &key_arn, old_key).await;
    let p = settings("1");
    sim.clear_requests();
    sim.set_script(parse_script("ok").unwrap());
    assert_eq!(status(&invoke(&p, chat(token)).await.0), 200);
    put_secret_value(&sm, &key_arn, new_key).await;
    sim.set_script(parse_script("401,ok").unwrap());
    let (resp, _) = invoke(&p, chat(token)).await;
    assert_error(&resp, 502, "upstream_auth_failed");
    assert_eq!(header(&resp, "x-upstream-attempts"), Some("1"));
    assert_eq!(status(&invoke(&p, chat(token)).await.0), 200);
    assert_eq!(bearer_seen(&sim), [old.clone(), old, new]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_upstream_but_not_rotated_is_not_read_again_per_request() {
    let (key, rotated) = (
        "sk-moto-revoked-key-0000001",
        "sk-moto-revoked-key-rotated1",
    );
    let token = "tok-moto-revoked-000000001";
    let _logs = logs::check(&[key, rotated, token]);
    let moto = moto().await;
    let sm = secrets_client(&moto.endpoint()).await;
    let counting = CountingPassThrough::start(moto.addr()).await;
    let sim = simulator().await;
    let key_arn = create_secret(&sm, "revoked-key", key).await;
    let clock = VirtualClock::new();
    let secrets =
        Secrets::new(Some(secrets_client(&counting.endpoint()).await)).with_clock(clock.clone());
    let p = proxy_for_with(
        &sim,
        &[
            ("OPENAI_API_KEY_SECRET_ARN", &key_arn),
            ("PROXY_API_KEYS", token),
        ],
        secrets,
    );
    // OpenAI rejects the key from now on; the secret is not rotated.
    let rejected = || parse_script("401").unwrap().remove(0);
    sim.set_default(rejected());
    for _ in 0..10 {
        let (resp, _) = invoke(&p, chat(token)).await;
        assert_error(&resp, 502, "upstream_auth_failed");
    }
    // The first read, one read again after the first 401, then none within the backoff.
    assert_eq!(counting.get_secret_value_calls(), 2);
    clock.advance(1_000);
    assert_error(
        &invoke(&p, chat(token)).await.0,
        502,
        "upstream_auth_failed",
    );
    assert_eq!(counting.get_secret_value_calls(), 3);

    // Rotated during the backoff: the old key keeps being used until it passed (2 s now)...
    put_secret_value(&sm, &key_arn, rotated).await;
    sim.set_default(parse_script("ok").unwrap().remove(0));
    sim.set_script(vec![rejected()]);
    assert_error(
        &invoke(&p, chat(token)).await.0,
        502,
        "upstream_auth_failed",
    );
    assert_eq!(counting.get_secret_value_calls(), 3);
    // ...then the next 401 reads the rotated key and the retry with it works.
    clock.advance(2_000);
    sim.clear_requests();
    sim.set_script(vec![rejected()]);
    assert_eq!(status(&invoke(&p, chat(token)).await.0), 200);
    assert_eq!(counting.get_secret_value_calls(), 4);
    assert_eq!(bearer_seen(&sim), [bearer(key), bearer(rotated)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_unusable_secrets_are_config_errors_naming_the_setting() {
    let values = [
        "sk-moto-good-key-0000000001",
        "tok-moto-good-00000000001",
        "not-a-key-json-value-000001",
        "sk-moto-broken\nkey-value-01",
    ];
    let _logs = logs::check(&values);
    let moto = moto().await;
    let sm = secrets_client(&moto.endpoint()).await;
    let sim = simulator().await;
    let good_key = create_secret(&sm, "good-key", values[0]).await;
    let good_tokens = create_secret(&sm, "good-tokens", values[1]).await;
    let no_field = create_secret(
        &sm,
        "no-field",
        r#"{"other": "not-a-key-json-value-000001"}"#,
    )
    .await;
    let broken = create_secret(&sm, "broken-key", values[3]).await;
    let no_tokens = create_secret(&sm, "no-tokens", r#"{"PROXY_API_KEYS": []}"#).await;
    let absent = "arn:aws:secretsmanager:us-east-1:123456789012:secret:does-not-exist-AbCdEf";

    for (key, tokens, setting) in [
        (absent, good_tokens.as_str(), "OPENAI_API_KEY_SECRET_ARN"),
        (
            no_field.as_str(),
            good_tokens.as_str(),
            "OPENAI_API_KEY_SECRET_ARN",
        ),
        (
            broken.as_str(),
            good_tokens.as_str(),
            "OPENAI_API_KEY_SECRET_ARN",
        ),
        (good_key.as_str(), absent, "PROXY_API_KEYS_SECRET_ARN"),
        (
            good_key.as_str(),
            no_tokens.as_str(),
            "PROXY_API_KEYS_SECRET_ARN",
        ),
    ] {
        let p = proxy_for(
            &sim,
            &[
                ("OPENAI_API_KEY_SECRET_ARN", key),
                ("PROXY_API_KEYS_SECRET_ARN", tokens),
            ],
            Some(sm.clone()),
        );
        let (resp, _) = invoke(&p, chat(values[1])).await;
        let msg = assert_error(&resp, 500, "config_error");
        assert!(msg.contains(setting), "{setting}: {msg}");
        for v in &values {
            assert!(
                !msg.contains(v),
                "{setting}: message leaks a secret value: {msg}"
            );
        }
        assert_no_aws_text(&resp);
        assert_eq!(
            status(&invoke(&p, v2("GET", "/health", &[], None)).await.0),
            200
        );
    }
    assert!(sim.requests().is_empty());

    // A failure is remembered for its backoff (no call meanwhile), not for good: once the
    // secret exists and the backoff passed, the same warm function works.
    let counting = CountingPassThrough::start(moto.addr()).await;
    let clock = VirtualClock::new();
    let secrets =
        Secrets::new(Some(secrets_client(&counting.endpoint()).await)).with_clock(clock.clone());
    let p = proxy_for_with(
        &sim,
        &[
            ("OPENAI_API_KEY_SECRET_ARN", "created-later"),
            ("PROXY_API_KEYS_SECRET_ARN", &good_tokens),
        ],
        secrets,
    );
    assert_error(&invoke(&p, chat(values[1])).await.0, 500, "config_error");
    assert_eq!(
        counting.get_secret_value_calls(),
        2,
        "the tokens, then the key"
    );
    create_secret(&sm, "created-later", values[0]).await;
    clock.advance(999);
    assert_error(&invoke(&p, chat(values[1])).await.0, 500, "config_error");
    assert_eq!(
        counting.get_secret_value_calls(),
        2,
        "no call within the backoff"
    );
    clock.advance(1);
    assert_eq!(status(&invoke(&p, chat(values[1])).await.0), 200);
    assert_eq!(counting.get_secret_value_calls(), 3);
}

/// AWS error text names accounts, roles, users and ARNs: none of it may reach a caller.
fn assert_no_aws_text(resp: &Value) {
    let text = String::from_utf8_lossy(&support::events::body(resp)).into_owned();
    for aws in [
        "arn:",
        "123456789012",
        "Exception",
        "AccessDenied",
        "not authorized",
        "can't find",
        "secretsmanager:",
        "does-not-exist",
        "proxy-fn",
        "service error",
        "unhandled",
        "StatusCode",
    ] {
        assert!(
            !text.contains(aws),
            "the caller sees AWS text ({aws}): {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_denied_reaches_the_log_but_never_the_caller() {
    let token = "tok-moto-denied-00000000001";
    let logs = logs::check(&[token]);
    let moto = moto().await;
    let sm = secrets_client(&moto.endpoint()).await;
    let sim = simulator().await;
    let tokens_arn = create_secret(&sm, "denied-tokens", token).await;
    let user = support::moto::iam_user_without_policies(&moto, "proxy-fn").await;
    support::moto::enforce_iam(&moto).await;
    let secrets = Secrets::new(Some(
        support::moto::secrets_client_as(&moto.endpoint(), user).await,
    ))
    .with_clock(VirtualClock::new());
    let p = proxy_for_with(
        &sim,
        &[
            ("OPENAI_API_KEY", "sk-env-key-denied-00000001"),
            ("PROXY_API_KEYS_SECRET_ARN", &tokens_arn),
        ],
        secrets,
    );
    // An unauthenticated caller (no token at all) and one with the right token alike.
    for event in [chat_event(None), chat(token)] {
        let (resp, _) = invoke(&p, event).await;
        assert_error_naming(&resp, 500, "config_error", "PROXY_API_KEYS_SECRET_ARN");
        assert_no_aws_text(&resp);
    }
    // The operator gets the whole error, once, at ERROR.
    let text = logs.capture().text();
    let denied: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["level"] == "ERROR" && l["setting"] == "PROXY_API_KEYS_SECRET_ARN")
        .filter(|l| l["secret_arn"] == tokens_arn.as_str())
        .collect();
    assert_eq!(
        denied.len(),
        1,
        "one ERROR line per failed read: {denied:?}"
    );
    let error = denied[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("proxy-fn") && error.contains("not authorized"),
        "{error}"
    );
    assert!(sim.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unauthenticated_requests_is_a_handful_of_secrets_manager_calls() {
    let _logs = logs::check(&["tok-moto-flood-000000000001"]);
    let moto = moto().await;
    let counting = CountingPassThrough::start(moto.addr()).await;
    let sim = simulator().await;
    let absent = "arn:aws:secretsmanager:us-east-1:123456789012:secret:flood-tokens-AbCdEf";
    let p = proxy_for(
        &sim,
        &[
            ("OPENAI_API_KEY", "sk-env-key-flood-000000001"),
            ("PROXY_API_KEYS_SECRET_ARN", absent),
        ],
        Some(secrets_client(&counting.endpoint()).await),
    );
    // 20 waves of 10 concurrent requests with made-up tokens, over about 3 s.
    let started = Instant::now();
    let mut answered = 0;
    for wave in 0..20u32 {
        let calls = (0..10).map(|i| {
            let p = p.clone();
            tokio::spawn(async move {
                invoke(&p, chat(&format!("tok-guess-{wave}-{i}-0000000")))
                    .await
                    .0
            })
        });
        for resp in futures_join(calls).await {
            assert_error_naming(&resp, 500, "config_error", "PROXY_API_KEYS_SECRET_ARN");
            assert_no_aws_text(&resp);
            answered += 1;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let elapsed = started.elapsed();
    let calls = counting.get_secret_value_calls();
    // Reads at 0 s, after 1 s, after 3 s, after 7 s …: how many fit in the time the flood took.
    let allowed = match elapsed.as_millis() {
        0..1_000 => 1,
        1_000..3_000 => 2,
        3_000..7_000 => 3,
        7_000..15_000 => 4,
        _ => 5,
    };
    assert_eq!(answered, 200);
    assert!(
        (1..=allowed).contains(&calls),
        "{calls} GetSecretValue calls for 200 requests in {elapsed:?}"
    );
    assert!(sim.requests().is_empty());
}

async fn futures_join(handles: impl Iterator<Item = tokio::task::JoinHandle<Value>>) -> Vec<Value> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await.expect("the handler task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_manager_down_or_hanging_is_a_quick_config_error_within_the_deadline() {
    let _logs = logs::check(&["tok-moto-down-000000000001"]);
    let sim = simulator().await;
    let refused = format!("http://127.0.0.1:{}", free_port());
    let hanging = format!("http://{}", black_hole().await);
    for endpoint in [refused, hanging] {
        let arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:tokens-AbCdEf";
        let p = proxy_for(
            &sim,
            &[
                ("OPENAI_API_KEY", "sk-env-key-down-0000000001"),
                ("PROXY_API_KEYS_SECRET_ARN", arn),
            ],
            Some(secrets_client(&endpoint).await),
        );
        let started = Instant::now();
        let budget_ms = 3_000;
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            invoke_within(
                &p,
                chat("tok-moto-down-000000000001"),
                &request_id("down"),
                budget_ms,
            ),
        )
        .await
        .expect("the handler hung on a Secrets Manager outage");
        let elapsed = started.elapsed();
        assert_error_naming(&resp, 500, "config_error", "PROXY_API_KEYS_SECRET_ARN");
        assert!(
            elapsed < Duration::from_millis(budget_ms),
            "answered after {elapsed:?}, past the {budget_ms} ms Lambda deadline"
        );
    }
    assert!(sim.requests().is_empty());
}

/// §11: the upstream list from `UPSTREAMS_SECRET_ARN`, with one entry's key inline and the
/// other's named by `api_key_secret_arn`; each upstream gets its own key, none is logged, and
/// a malformed list is a `config_error` naming the setting, never echoing the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_list_and_its_keys_come_from_secrets() {
    let (inline_key, named_key, token) = (
        "sk-moto-inline-upstream-01",
        "sk-moto-named-upstream-002",
        "tok-moto-upstreams-000001",
    );
    let _logs = logs::check(&[inline_key, named_key, token]);
    let moto = moto().await;
    let sm = secrets_client(&moto.endpoint()).await;
    let (primary, backup) = (simulator().await, simulator().await);
    primary.set_script(parse_script("503,503").unwrap());
    let named_arn = create_secret(&sm, "backup-key", named_key).await;
    let list = serde_json::json!([
        {"name": "primary", "base_url": primary.base_url(), "api_key": inline_key},
        {"name": "backup", "base_url": backup.base_url(), "api_key_secret_arn": named_arn},
    ])
    .to_string();
    let list_arn = create_secret(&sm, "upstreams", &list).await;
    let p = support::events::proxy(
        &[
            ("UPSTREAMS_SECRET_ARN", list_arn.as_str()),
            ("PROXY_API_KEYS", token),
            ("RETRY_BASE_DELAY_MS", "50"),
        ],
        Some(sm.clone()),
    );
    let (resp, _) = invoke(&p, chat(token)).await;
    assert_eq!(status(&resp), 200, "{resp}");
    assert_eq!(header(&resp, "x-proxy-upstream"), Some("backup"));
    assert_eq!(
        bearer_seen(&primary),
        [bearer(inline_key), bearer(inline_key)]
    );
    assert_eq!(bearer_seen(&backup), [bearer(named_key)]);

    // A malformed list in the secret: config_error naming UPSTREAMS_SECRET_ARN, no value.
    let broken = create_secret(
        &sm,
        "upstreams-broken",
        r#"[{"name": "x", "api_key": "sk-moto-broken-value-01"}]"#,
    )
    .await;
    let p = support::events::proxy(
        &[
            ("UPSTREAMS_SECRET_ARN", broken.as_str()),
            ("PROXY_API_KEYS", token),
        ],
        Some(sm),
    );
    let (resp, _) = invoke(&p, chat(token)).await;
    let msg = assert_error_naming(&resp, 500, "config_error", "UPSTREAMS_SECRET_ARN");
    assert!(msg.contains("base_url"), "{msg}");
    assert!(!resp.to_string().contains("sk-moto-broken"), "{resp}");
}

/// §11 breakers are kept per upstream *name*: a list refreshed from `UPSTREAMS_SECRET_ARN` in a
/// warm environment may reorder upstreams, and an open breaker stays with its upstream, not
/// with its old position; an upstream removed from the list loses its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakers_follow_the_upstream_name_when_the_secret_list_changes() {
    let token = "tok-moto-reorder-0000000001";
    let _logs = logs::check(&[token, "sk-moto-reorder"]);
    let moto = moto().await;
    let sm = secrets_client(&moto.endpoint()).await;
    let (primary, backup) = (simulator().await, simulator().await);
    primary.set_default(parse_script("500").unwrap().remove(0));
    let entry = |name: &str, sim: &Simulator| {
        serde_json::json!({"name": name, "base_url": sim.base_url(),
            "api_key": format!("sk-moto-reorder-{name}-0001")})
    };
    let list = |entries: Vec<Value>| Value::Array(entries).to_string();
    let arn = create_secret(
        &sm,
        "upstreams-reordered",
        &list(vec![entry("primary", &primary), entry("backup", &backup)]),
    )
    .await;
    let clock = VirtualClock::new();
    let p = proxy_with(
        &[
            ("UPSTREAMS_SECRET_ARN", arn.as_str()),
            ("PROXY_API_KEYS", token),
            ("RETRY_BASE_DELAY_MS", "50"),
            ("BREAKER_FAILURES", "2"),
            ("BREAKER_COOLDOWN_MS", "60000"),
            ("SECRETS_TTL_MS", "1000"),
        ],
        Secrets::new(Some(sm.clone())).with_clock(clock.clone()),
    );
    let served_by = |resp: &Value| {
        assert_eq!(status(resp), 200, "{resp}");
        (
            header(resp, "x-proxy-upstream").map(str::to_owned),
            header(resp, "x-upstream-attempts").map(str::to_owned),
        )
    };
    let one = |name: &str| (Some(name.to_owned()), Some("1".to_owned()));
    // Two 500s open the primary's breaker; the backup serves.
    let (resp, _) = invoke(&p, chat(token)).await;
    assert_eq!(served_by(&resp), (Some("backup".into()), Some("3".into())));
    assert_eq!(primary.requests().len(), 2);

    // Reordered: the backup (now first, closed) serves at once; the open primary is not called.
    put_secret_value(
        &sm,
        &arn,
        &list(vec![entry("backup", &backup), entry("primary", &primary)]),
    )
    .await;
    clock.advance(1_000);
    assert_eq!(served_by(&invoke(&p, chat(token)).await.0), one("backup"));
    assert_eq!(primary.requests().len(), 2, "the open primary was called");

    // The primary leaves the list, recovers, and comes back first: it starts closed.
    put_secret_value(&sm, &arn, &list(vec![entry("backup", &backup)])).await;
    clock.advance(1_000);
    assert_eq!(served_by(&invoke(&p, chat(token)).await.0), one("backup"));
    primary.set_default(parse_script("ok").unwrap().remove(0));
    put_secret_value(
        &sm,
        &arn,
        &list(vec![entry("primary", &primary), entry("backup", &backup)]),
    )
    .await;
    clock.advance(1_000);
    assert_eq!(served_by(&invoke(&p, chat(token)).await.0), one("primary"));
    assert_eq!(primary.requests().len(), 3);
}

/// `x-proxy-fallbacks` (§11) counts the switches of the whole request, the run after a key
/// refresh included: primary 429 → backup, whose 401 makes its key be read again (rotated),
/// then the run with the new keys starts over on the primary, which answers. Attempts went
/// primary, backup, primary: two switches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallbacks_count_the_switch_into_the_run_after_a_key_refresh() {
    let (primary_key, old_key, new_key, token) = (
        "sk-moto-switch-primary-01",
        "sk-moto-switch-backup-old1",
        "sk-moto-switch-backup-new2",
        "tok-moto-switch-000000001",
    );
    let _logs = logs::check(&[primary_key, old_key, new_key, token]);
    let moto = moto().await;
    let sm = secrets_client(&moto.endpoint()).await;
    let (primary, backup) = (simulator().await, simulator().await);
    let backup_arn = create_secret(&sm, "switch-backup-key", old_key).await;
    let list = serde_json::json!([
        {"name": "primary", "base_url": primary.base_url(), "api_key": primary_key},
        {"name": "backup", "base_url": backup.base_url(), "api_key_secret_arn": backup_arn},
    ])
    .to_string();
    let p = support::events::proxy(
        &[("UPSTREAMS", list.as_str()), ("PROXY_API_KEYS", token)],
        Some(sm.clone()),
    );
    // Every upstream's key is read (and cached) for the first request.
    assert_eq!(status(&invoke(&p, chat(token)).await.0), 200);
    primary.clear_requests();
    put_secret_value(&sm, &backup_arn, new_key).await;
    primary.set_script(parse_script("429,ok").unwrap());
    backup.set_script(parse_script("401").unwrap());
    let (resp, _) = invoke(&p, chat(token)).await;
    assert_eq!(status(&resp), 200, "{resp}");
    assert_eq!(header(&resp, "x-upstream-attempts"), Some("3"));
    assert_eq!(header(&resp, "x-proxy-upstream"), Some("primary"));
    assert_eq!(header(&resp, "x-proxy-fallbacks"), Some("2"));
    assert_eq!(bearer_seen(&backup), [bearer(old_key)]);
    assert_eq!(primary.requests().len(), 2);
}
