//! Local stand-ins for the two outside services the outreach workflows call,
//! following their published request and answer shapes
//! (../shared/reference/outreach-apis.md), so that tests, bin/check-n8n and
//! the stage runner exercise the real request paths without a network:
//!
//!   Apify          POST /v2/acts/{actor}/run-sync-get-dataset-items  (and /v2/actors/...)
//!                  token: Authorization: Bearer ... or ?token=; body: the actor's input,
//!                  {"domain": ..., "role": ...}; answer: a JSON array of dataset items
//!   MillionVerifier GET /api/v3/?api=KEY&email=...&timeout=N
//!                  answer: {email, quality, result, resultcode, subresult, free, role,
//!                  didyoumean, credits, executiontime, error, livemode}
//!
//! Answers are decided by the input alone (the same input, the same answer),
//! and the domain's first label picks the awkward ones:
//!
//!   nobody.*      Apify finds no one: []
//!   slow.*        Apify's run outlives the request: 408 after the call's ?timeout (at most 2 s)
//!   throttled.*   Apify: 429, every time
//!   catchall.*    MillionVerifier: catch_all;   disposable.*: disposable
//!   unknown.*     MillionVerifier: unknown;     invalid.* (or an invalid.* local part): invalid
//!   broke.*       MillionVerifier: HTTP 200 with "Insufficient credits" (as for a bad key)
//!   busy.*        MillionVerifier: 429 on the first call for an address, then an answer
//!
//! A wrong token answers as each service does: Apify 401, MillionVerifier
//! HTTP 200 with result "error" and "Apikey not found".
//!
//!   cargo run --example outreach_standins -- --listen 127.0.0.1:28790 \
//!       --apify-token T --millionverifier-key K

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

#[path = "../tests/support/http_server.rs"]
#[allow(dead_code)]
pub mod http_server;

use http_server::{Request, Response, Server};

const USAGE: &str =
    "usage: outreach_standins --listen HOST:PORT --apify-token TOKEN --millionverifier-key KEY";

#[allow(dead_code)] // tests include this file and call serve
fn main() {
    let (mut listen, mut token, mut key) = (None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next(),
            "--apify-token" => token = args.next(),
            "--millionverifier-key" => key = args.next(),
            _ => panic!("{USAGE}"),
        }
    }
    let listen = listen.expect(USAGE);
    let _server = serve(&listen, &token.expect(USAGE), &key.expect(USAGE));
    eprintln!("outreach stand-ins listening on http://{listen}");
    loop {
        std::thread::park();
    }
}

/// Serves both stand-ins on `listen` until the returned server is dropped.
pub fn serve(listen: &str, apify_token: &str, millionverifier_key: &str) -> Server {
    let (token, key) = (apify_token.to_string(), millionverifier_key.to_string());
    // Calls so far per address, for busy.* (429 first, then an answer).
    let seen: Mutex<HashMap<String, usize>> = Mutex::new(HashMap::new());
    Server::start(listen, None, move |request| {
        let query = query_of(&request.query);
        let path = request.path.trim_end_matches('/');
        if request.method == "POST"
            && (path.starts_with("/v2/acts/") || path.starts_with("/v2/actors/"))
            && path.ends_with("/run-sync-get-dataset-items")
        {
            apify(&request, &query, &token)
        } else if request.method == "GET" && path == "/api/v3" {
            millionverifier(&query, &key, &seen)
        } else {
            answer(
                404,
                json!({ "error": { "type": "page-not-found", "message": "no such endpoint" } }),
            )
        }
    })
    .unwrap_or_else(|e| panic!("listen on {listen}: {e}"))
}

fn apify(request: &Request, query: &HashMap<String, String>, token: &str) -> Response {
    let bearer = request
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("authorization"))
        .and_then(|(_, value)| value.strip_prefix("Bearer "));
    if bearer.or(query.get("token").map(String::as_str)) != Some(token) {
        return answer(
            401,
            json!({ "error": { "type": "token-not-valid", "message": "Authentication token is not valid." } }),
        );
    }
    let actor = request.path.split('/').nth(3).unwrap_or_default();
    if !actor.contains('~') {
        return answer(
            404,
            json!({ "error": { "type": "record-not-found", "message": format!("Actor {actor} was not found") } }),
        );
    }
    let input: Value = serde_json::from_str(&request.body).unwrap_or(Value::Null);
    let (Some(domain), Some(role)) = (input["domain"].as_str(), input["role"].as_str()) else {
        return answer(
            400,
            json!({ "error": { "type": "invalid-input", "message": "Input must be a JSON object with domain and role" } }),
        );
    };
    match first_label(domain) {
        "nobody" => answer(200, json!([])),
        "slow" => {
            let wait = query
                .get("timeout")
                .and_then(|t| t.parse::<f64>().ok())
                .unwrap_or(1.0)
                .clamp(0.0, 2.0);
            Response {
                delay: Duration::from_secs_f64(wait),
                ..answer(
                    408,
                    json!({ "error": { "type": "run-timeout-exceeded",
                                       "message": "Actor run did not finish in time; it goes on in the background" } }),
                )
            }
        }
        "throttled" => answer(
            429,
            json!({ "error": { "type": "rate-limit-exceeded", "message": "You have exceeded the rate limit" } }),
        ),
        _ => {
            let (first, last) = person(domain, role);
            answer(
                200,
                json!([{
                    "fullName": format!("{first} {last}"),
                    "jobTitle": role.to_uppercase(),
                    "email": format!("{}.{}@{domain}", first.to_lowercase(), last.to_lowercase()),
                    "linkedinUrl": format!("https://www.linkedin.com/in/{}-{}", first.to_lowercase(), last.to_lowercase()),
                    "companyDomain": domain,
                }]),
            )
        }
    }
}

fn millionverifier(
    query: &HashMap<String, String>,
    key: &str,
    seen: &Mutex<HashMap<String, usize>>,
) -> Response {
    let email = query.get("email").cloned().unwrap_or_default();
    let verdict = |result: &str, quality: &str, code: u8, error: &str, credits: u32| {
        answer(
            200,
            json!({
                "email": email, "quality": quality, "result": result, "resultcode": code,
                "subresult": result, "free": false, "role": false, "didyoumean": "",
                "credits": credits, "executiontime": 1, "error": error, "livemode": true,
            }),
        )
    };
    // The trap the docs warn of: a bad key is HTTP 200 too.
    if query.get("api").map(String::as_str) != Some(key) {
        return verdict("error", "", 4, "Apikey not found", 0);
    }
    let Some((local, domain)) = email.rsplit_once('@') else {
        return verdict("invalid", "bad", 6, "", 1000);
    };
    match first_label(domain) {
        "broke" => verdict("error", "", 4, "Insufficient credits", 0),
        "busy" => {
            let calls = {
                let mut seen = seen.lock().unwrap();
                let calls = seen.entry(email.clone()).or_default();
                *calls += 1;
                *calls
            };
            if calls == 1 {
                answer(429, json!({ "error": "Too many requests, slow down" }))
            } else {
                verdict("ok", "good", 1, "", 1000)
            }
        }
        "catchall" => verdict("catch_all", "risky", 2, "", 1000),
        "disposable" => verdict("disposable", "bad", 6, "", 1000),
        "unknown" => verdict("unknown", "", 3, "", 1000),
        "invalid" => verdict("invalid", "bad", 6, "", 1000),
        _ if local.starts_with("invalid") => verdict("invalid", "bad", 6, "", 1000),
        _ => verdict("ok", "good", 1, "", 1000),
    }
}

/// A name made from the domain and the role: the same input, the same name.
fn person(domain: &str, role: &str) -> (&'static str, &'static str) {
    const FIRST: [&str; 8] = [
        "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken",
    ];
    const LAST: [&str; 8] = [
        "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson",
    ];
    // FNV-1a: stable across runs and platforms, unlike std's hasher.
    let hash = format!("{domain}/{role}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
    (FIRST[(hash % 8) as usize], LAST[((hash >> 8) % 8) as usize])
}

fn first_label(domain: &str) -> &str {
    domain.split('.').next().unwrap_or_default()
}

fn answer(status: u16, body: Value) -> Response {
    Response {
        status,
        headers: vec![("content-type", "application/json".into())],
        body: body.to_string(),
        delay: Duration::ZERO,
    }
}

/// The query string as a map, decoded as a form (+ is a space).
fn query_of(query: &str) -> HashMap<String, String> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}
