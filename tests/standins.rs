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

const ACTOR: &str = "/v2/acts/code_crafter~leads-finder/run-sync-get-dataset-items";

fn apify(port: u16, query: &str, auth: Option<&str>, input: &str) -> (u16, Value) {
    let bearer = auth.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("Authorization", b.as_str()))
        .collect();
    call(port, "POST", &format!("{ACTOR}{query}"), &headers, input)
}

/// Leads Finder's documented input for one domain and job title.
fn input(domain: &str, title: &str) -> String {
    json!({ "company_domain": [domain], "contact_job_title": [title, "Founder"], "fetch_count": 1 })
        .to_string()
}

#[test]
fn apify_answers_people_nothing_timeouts_and_refusals() {
    let (_server, port) = start();
    let ceo = input("acme.example", "CEO");
    let (status, items) = apify(port, "", Some("apify-token"), &ceo);
    assert_eq!(status, 200);
    // fetch_count 1: one person, in the actor's output shape.
    assert_eq!(items.as_array().unwrap().len(), 1, "{items}");
    let person = &items[0];
    assert_eq!(person["job_title"], "CEO");
    assert_eq!(person["company_domain"], "acme.example");
    for key in ["full_name", "first_name", "last_name", "email", "linkedin"] {
        assert!(person[key].is_string(), "{key} in {person}");
    }
    let email = person["email"].as_str().unwrap();
    assert!(email.ends_with("@acme.example"), "{email}");
    // The same input, the same answer; the token as a query parameter too;
    // maxItems limits what comes back.
    assert_eq!(
        apify(port, "?token=apify-token", None, &ceo),
        (200, items.clone())
    );
    let two = json!({ "company_domain": ["acme.example"], "contact_job_title": ["CEO"], "fetch_count": 5 }).to_string();
    assert_eq!(
        apify(port, "", Some("apify-token"), &two)
            .1
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        apify(port, "?maxItems=1", Some("apify-token"), &two)
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_ne!(
        apify(port, "", Some("apify-token"), &input("acme.example", "CFO")).1,
        items
    );

    assert_eq!(
        apify(
            port,
            "",
            Some("apify-token"),
            &input("nobody.example", "CEO")
        ),
        (200, json!([]))
    );
    let (status, error) = apify(
        port,
        "",
        Some("apify-token"),
        &input("throttled.example", "CEO"),
    );
    assert_eq!(
        (status, error["error"]["type"].as_str()),
        (429, Some("rate-limit-exceeded"))
    );
    let (status, error) = apify(
        port,
        "",
        Some("apify-token"),
        &input("unpaid.example", "CEO"),
    );
    assert_eq!(
        (status, error["error"]["type"].as_str()),
        (402, Some("not-enough-usage-to-run-paid-actor"))
    );
    // A run slower than pipeline.http_timeout's default 5 s, then items.
    let started = Instant::now();
    let (status, slow) = apify(port, "", Some("apify-token"), &input("slow.example", "CEO"));
    assert_eq!((status, slow[0]["job_title"].as_str()), (200, Some("CEO")));
    assert!(started.elapsed() >= Duration::from_secs(8));
    // One that outlives its request: 408, the run goes on.
    let started = Instant::now();
    let (status, error) = apify(
        port,
        "",
        Some("apify-token"),
        &input("overtime.example", "CEO"),
    );
    assert_eq!(
        (status, error["error"]["type"].as_str()),
        (408, Some("run-timeout-exceeded"))
    );
    assert!(started.elapsed() >= Duration::from_secs(6));
    // The CFO of flaky.* is turned away three times, then found.
    for _ in 0..3 {
        assert_eq!(
            apify(
                port,
                "",
                Some("apify-token"),
                &input("flaky.example", "CFO")
            )
            .0,
            429
        );
    }
    assert_eq!(
        apify(
            port,
            "",
            Some("apify-token"),
            &input("flaky.example", "CFO")
        )
        .0,
        200
    );

    let (status, error) = apify(port, "", Some("wrong"), &ceo);
    assert_eq!(
        (status, error["error"]["type"].as_str()),
        (401, Some("token-not-valid"))
    );
    assert_eq!(apify(port, "", None, &ceo).0, 401);
    let (status, error) = apify(
        port,
        "",
        Some("apify-token"),
        r#"{"company_domain": ["acme.example"]}"#,
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
        &ceo,
    );
    assert_eq!(status, 404);

    // What was paid for: runs started, and those with items. 429, 402 and
    // 401 start no run.
    let (status, stats) = call(port, "GET", "/stats", &[], "");
    assert_eq!(status, 200);
    assert_eq!(stats["apify"]["acme.example CEO"], json!([4, 4]));
    assert_eq!(stats["apify"]["nobody.example CEO"], json!([1, 0]));
    assert_eq!(stats["apify"]["overtime.example CEO"], json!([1, 0]));
    assert_eq!(stats["apify"]["flaky.example CFO"], json!([1, 1]));
    assert!(stats["apify"]["throttled.example CEO"].is_null(), "{stats}");
    assert!(stats["apify"]["unpaid.example CEO"].is_null(), "{stats}");
}

#[test]
fn chaos_turns_away_every_other_call_for_a_while() {
    let server = standins::serve_with(
        "127.0.0.1:0",
        "apify-token",
        "mv-key",
        Duration::from_secs(2),
    );
    let port = server.addr.port();
    let statuses: Vec<u16> = (0..4)
        .map(|_| apify(port, "", Some("apify-token"), &input("acme.example", "CEO")).0)
        .collect();
    assert_eq!(statuses, [429, 200, 429, 200]);
    let (status, _) = support::http_request(
        port,
        "GET",
        "/api/v3/?api=mv-key&email=a%40acme.example",
        &[],
        "",
    );
    assert_eq!(status, 429);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        apify(port, "", Some("apify-token"), &input("acme.example", "CEO")).0,
        200
    );
    assert_eq!(
        apify(port, "", Some("apify-token"), &input("acme.example", "CEO")).0,
        200
    );
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
    // Real answers differ in credits and execution time from call to call.
    let again = verify("mv-key", "ada%40acme.example").1;
    assert_eq!(again["result"], ok["result"]);
    assert_ne!(
        (&again["credits"], &again["executiontime"]),
        (&ok["credits"], &ok["executiontime"])
    );
    // A verification slower than pipeline.http_timeout's default 5 s.
    let started = Instant::now();
    assert_eq!(verify("mv-key", "ada@slowmail.example").1["result"], "ok");
    assert!(started.elapsed() >= Duration::from_secs(6));
}
