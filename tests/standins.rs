//! The stand-ins for Apify and MillionVerifier (examples/outreach_standins.rs)
//! answer as those services document it, the same way for the same input.

mod support;

// NB: the stand-ins include the tests' HTTP server too; each copy serves its own.
#[path = "../examples/outreach_standins.rs"]
#[allow(dead_code, clippy::duplicate_mod)]
mod standins;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// One request on a connection of its own: (status, JSON body).
fn call(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Value) {
    let (status, body) = support::http_request(port, method, target, headers, body);
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn start() -> (standins::http_server::Server, u16) {
    let server = standins::serve("127.0.0.1:0", "apify-token", "mv-key");
    let port = server.addr.port();
    (server, port)
}

const ACTOR: &str = "/v2/acts/pipeline~people-finder/run-sync-get-dataset-items";

fn apify(port: u16, query: &str, auth: Option<&str>, input: &str) -> (u16, Value) {
    let bearer = auth.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("Authorization", b.as_str()))
        .collect();
    call(port, "POST", &format!("{ACTOR}{query}"), &headers, input)
}

#[test]
fn apify_answers_people_nothing_timeouts_and_refusals() {
    let (_server, port) = start();
    let input = r#"{"domain": "acme.example", "role": "ceo"}"#;
    let (status, items) = apify(port, "", Some("apify-token"), input);
    assert_eq!(status, 200);
    let person = &items[0];
    assert_eq!(person["jobTitle"], "CEO");
    let email = person["email"].as_str().unwrap();
    assert!(email.ends_with("@acme.example"), "{email}");
    // The same input, the same answer; the token as a query parameter too.
    assert_eq!(
        apify(port, "?token=apify-token", None, input),
        (200, items.clone())
    );
    assert_ne!(
        apify(
            port,
            "",
            Some("apify-token"),
            r#"{"domain": "acme.example", "role": "cfo"}"#
        )
        .1,
        items
    );

    let domain = |d: &str| format!(r#"{{"domain": "{d}", "role": "ceo"}}"#);
    assert_eq!(
        apify(port, "", Some("apify-token"), &domain("nobody.example")),
        (200, json!([]))
    );
    let (status, error) = apify(port, "", Some("apify-token"), &domain("throttled.example"));
    assert_eq!(
        (status, error["error"]["type"].as_str()),
        (429, Some("rate-limit-exceeded"))
    );
    let started = Instant::now();
    let (status, error) = apify(
        port,
        "?timeout=0.3",
        Some("apify-token"),
        &domain("slow.example"),
    );
    assert_eq!(
        (status, error["error"]["type"].as_str()),
        (408, Some("run-timeout-exceeded"))
    );
    assert!(started.elapsed() >= Duration::from_millis(300));

    let (status, error) = apify(port, "", Some("wrong"), input);
    assert_eq!(
        (status, error["error"]["type"].as_str()),
        (401, Some("token-not-valid"))
    );
    assert_eq!(apify(port, "", None, input).0, 401);
    let (status, error) = apify(
        port,
        "",
        Some("apify-token"),
        r#"{"domain": "acme.example"}"#,
    );
    assert_eq!(
        (status, error["error"]["type"].as_str()),
        (400, Some("invalid-input"))
    );
    let (status, _) = call(
        port,
        "POST",
        "/v2/acts/no-such-actor/run-sync-get-dataset-items",
        &[("Authorization", "Bearer apify-token")],
        input,
    );
    assert_eq!(status, 404);
}

#[test]
fn millionverifier_answers_each_result_and_its_http_200_errors() {
    let (_server, port) = start();
    let verify = |key: &str, email: &str| {
        call(
            port,
            "GET",
            &format!("/api/v3/?api={key}&email={email}&timeout=10"),
            &[],
            "",
        )
    };
    let (status, ok) = verify("mv-key", "ada%40acme.example");
    assert_eq!(status, 200);
    assert_eq!(ok["email"], "ada@acme.example");
    assert_eq!(
        (
            ok["result"].as_str(),
            ok["quality"].as_str(),
            ok["resultcode"].as_i64()
        ),
        (Some("ok"), Some("good"), Some(1))
    );
    for key in [
        "quality",
        "result",
        "resultcode",
        "subresult",
        "free",
        "role",
        "didyoumean",
        "credits",
        "executiontime",
        "error",
        "livemode",
    ] {
        assert!(ok.get(key).is_some(), "{key} in {ok}");
    }
    for (email, result) in [
        ("x@catchall.example", "catch_all"),
        ("x@disposable.example", "disposable"),
        ("x@unknown.example", "unknown"),
        ("invalid.someone@acme.example", "invalid"),
    ] {
        assert_eq!(verify("mv-key", email).1["result"], result, "{email}");
    }
    // Both traps answer HTTP 200.
    let (status, bad_key) = verify("nope", "ada@acme.example");
    assert_eq!(
        (
            status,
            bad_key["result"].as_str(),
            bad_key["error"].as_str()
        ),
        (200, Some("error"), Some("Apikey not found"))
    );
    let (status, broke) = verify("mv-key", "ada@broke.example");
    assert_eq!(
        (status, broke["error"].as_str()),
        (200, Some("Insufficient credits"))
    );
    // A 429 the first time an address is asked about, then an answer.
    assert_eq!(verify("mv-key", "ada@busy.example").0, 429);
    assert_eq!(verify("mv-key", "ada@busy.example").1["result"], "ok");
}
