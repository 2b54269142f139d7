//! Local stand-ins for the two outside services the outreach workflows call,
//! following their published request and answer shapes
//! (../shared/reference/outreach-apis.md, and n8n/README.md for the actor),
//! so that tests, bin/check-n8n and the stage runner exercise the real
//! request paths without a network:
//!
//!   Apify          POST /v2/acts/{actor}/run-sync-get-dataset-items  (and /v2/actors/...)
//!                  token: Authorization: Bearer ... or ?token=; ?timeout= and ?maxItems=;
//!                  body: the input of Leads Finder (code_crafter~leads-finder):
//!                  {"company_domain": [...], "contact_job_title": [...], "fetch_count": n};
//!                  answer: a JSON array of dataset items (people: full_name, first_name,
//!                  last_name, job_title, email, linkedin, company_domain, company_name)
//!   MillionVerifier GET /api/v3/?api=KEY&email=...&timeout=N
//!                  answer: {email, quality, result, resultcode, subresult, free, role,
//!                  didyoumean, credits, executiontime, error, livemode}
//!   GET /stats     what was called: per domain and title the actor runs started and
//!                  those that returned items; per address the verifications
//!
//! Answers are decided by the input alone (the same input, the same answer),
//! and the domain's first label picks the awkward ones:
//!
//!   nobody.*      Apify finds no one: []
//!   slow.*        Apify's run takes 8 s (longer than pipeline.http_timeout's 5 s), then items
//!   overtime.*    Apify's run outlives the request: 408 after 6 s (the run goes on)
//!   throttled.*   Apify: 429 (Retry-After: 1), every time
//!   unpaid.*      Apify: 402, the account cannot pay for the actor
//!   flaky.*       Apify: 429 (Retry-After: 1) to the first 3 runs for the CFO, then items
//!   catchall.*    MillionVerifier: catch_all;   disposable.*: disposable
//!   unknown.*     MillionVerifier: unknown;     invalid.* (or an invalid.* local part): invalid
//!   broke.*       MillionVerifier: HTTP 200 with "Insufficient credits" (as for a bad key)
//!   busy.*        MillionVerifier: 429 on the first call for an address, then an answer
//!   slowmail.*    MillionVerifier: answers after 6 s
//!
//! With --chaos-seconds N, for N seconds from the first call, every other call
//! to either service answers 429 with Retry-After: 2, as the services do
//! under load.
//!
//! A wrong token answers as each service does: Apify 401, MillionVerifier
//! HTTP 200 with result "error" and "Apikey not found".
//!
//!   cargo run --example outreach_standins -- --listen 127.0.0.1:28790 \
//!       --apify-token T --millionverifier-key K [--chaos-seconds N]

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "../tests/support/http_server.rs"]
#[allow(dead_code)]
pub mod http_server;

use http_server::{Request, Response, Server};

const USAGE: &str = "usage: outreach_standins --listen HOST:PORT --apify-token TOKEN \
                     --millionverifier-key KEY [--chaos-seconds N]";

/// How long a slow.* run takes: longer than the default pipeline.http_timeout.
const SLOW_RUN: Duration = Duration::from_secs(8);
/// How long an overtime.* request waits before its 408.
const OVERTIME: Duration = Duration::from_secs(6);
/// How long a slowmail.* verification takes.
const SLOW_VERIFY: Duration = Duration::from_secs(6);

#[allow(dead_code)] // tests include this file and call serve
fn main() {
    let (mut listen, mut token, mut key, mut chaos) = (None, None, None, 0u64);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next(),
            "--apify-token" => token = args.next(),
            "--millionverifier-key" => key = args.next(),
            "--chaos-seconds" => chaos = args.next().and_then(|n| n.parse().ok()).expect(USAGE),
            _ => panic!("{USAGE}"),
        }
    }
    let listen = listen.expect(USAGE);
    let _server = serve_with(
        &listen,
        &token.expect(USAGE),
        &key.expect(USAGE),
        Duration::from_secs(chaos),
    );
    eprintln!("outreach stand-ins listening on http://{listen}");
    loop {
        std::thread::park();
    }
}

/// Serves both stand-ins on `listen` until the returned server is dropped.
#[allow(dead_code)] // the benchmark calls it
pub fn serve(listen: &str, apify_token: &str, millionverifier_key: &str) -> Server {
    serve_with(listen, apify_token, millionverifier_key, Duration::ZERO)
}

/// What the stand-ins were asked: runs and verifications, for /stats.
#[derive(Default)]
struct Calls {
    /// "domain title" -> [runs started, runs that returned items]
    runs: BTreeMap<String, [u64; 2]>,
    /// address -> [calls answered with a verdict, calls in all]
    verifications: BTreeMap<String, [u64; 2]>,
    /// calls per address, for busy.*; per "domain title", for flaky.*
    seen: HashMap<String, usize>,
}

/// serve, with 429 bursts for `chaos` after the first call.
pub fn serve_with(
    listen: &str,
    apify_token: &str,
    millionverifier_key: &str,
    chaos: Duration,
) -> Server {
    let (token, key) = (apify_token.to_string(), millionverifier_key.to_string());
    let calls: Mutex<Calls> = Mutex::new(Calls::default());
    let first_call: Mutex<Option<Instant>> = Mutex::new(None);
    let counter = AtomicU64::new(0);
    Server::start(listen, None, move |request| {
        let query = query_of(&request.query);
        let path = request.path.trim_end_matches('/');
        if request.method == "GET" && path == "/stats" {
            let calls = calls.lock().unwrap();
            return answer(200, json!({ "apify": calls.runs, "millionverifier": calls.verifications }));
        }
        let apify_call = request.method == "POST"
            && (path.starts_with("/v2/acts/") || path.starts_with("/v2/actors/"))
            && path.ends_with("/run-sync-get-dataset-items");
        let verifier_call = request.method == "GET" && path == "/api/v3";
        if !apify_call && !verifier_call {
            return answer(
                404,
                json!({ "error": { "type": "page-not-found", "message": "no such endpoint" } }),
            );
        }
        // Under load, every other call is turned away for a while.
        let started = *first_call.lock().unwrap().get_or_insert_with(Instant::now);
        if started.elapsed() < chaos && counter.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
            return Response {
                headers: vec![("content-type", "application/json".into()), ("retry-after", "2".into())],
                ..answer(
                    429,
                    json!({ "error": { "type": "rate-limit-exceeded", "message": "You have exceeded the rate limit" } }),
                )
            };
        }
        if apify_call {
            apify(&request, &query, &token, &calls)
        } else {
            millionverifier(&query, &key, &calls)
        }
    })
    .unwrap_or_else(|e| panic!("listen on {listen}: {e}"))
}

fn apify(
    request: &Request,
    query: &HashMap<String, String>,
    token: &str,
    calls: &Mutex<Calls>,
) -> Response {
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
    let (Some(domain), Some(title)) = (
        input["company_domain"][0].as_str(),
        input["contact_job_title"][0].as_str(),
    ) else {
        return answer(
            400,
            json!({ "error": { "type": "invalid-input",
                               "message": "Input must have company_domain and contact_job_title, arrays of strings" } }),
        );
    };
    // What the run returns at most: maxItems, and the actor's own fetch_count.
    let limit = query
        .get("maxItems")
        .and_then(|n| n.parse::<usize>().ok())
        .into_iter()
        .chain(input["fetch_count"].as_u64().map(|n| n as usize))
        .min()
        .unwrap_or(usize::MAX);
    let key = format!("{domain} {title}");
    let label = first_label(domain);
    let refused = |status: u16, kind: &str, message: &str| Response {
        headers: vec![
            ("content-type", "application/json".into()),
            ("retry-after", "1".into()),
        ],
        ..answer(
            status,
            json!({ "error": { "type": kind, "message": message } }),
        )
    };
    match label {
        "throttled" => {
            return refused(
                429,
                "rate-limit-exceeded",
                "You have exceeded the rate limit",
            )
        }
        "unpaid" => {
            return answer(
                402,
                json!({ "error": { "type": "not-enough-usage-to-run-paid-actor",
                                   "message": "You have reached your monthly usage limit: the actor cannot be run" } }),
            )
        }
        "flaky" if title.eq_ignore_ascii_case("CFO") => {
            let mut calls = calls.lock().unwrap();
            let seen = calls.seen.entry(key.clone()).or_default();
            *seen += 1;
            if *seen <= 3 {
                return refused(
                    429,
                    "rate-limit-exceeded",
                    "You have exceeded the rate limit",
                );
            }
        }
        _ => {}
    }
    // A run starts: it is paid for.
    calls.lock().unwrap().runs.entry(key.clone()).or_default()[0] += 1;
    match label {
        "overtime" => {
            return Response {
                delay: OVERTIME,
                ..answer(
                    408,
                    json!({ "error": { "type": "run-timeout-exceeded",
                                       "message": "Actor run did not finish in time; it goes on in the background" } }),
                )
            }
        }
        "slow" => std::thread::sleep(SLOW_RUN),
        _ => {}
    }
    let items = if label == "nobody" {
        json!([])
    } else {
        let (first, last) = person(domain, title);
        json!([{
            "full_name": format!("{first} {last}"),
            "first_name": first,
            "last_name": last,
            "job_title": title,
            "email": format!("{}.{}@{domain}", first.to_lowercase(), last.to_lowercase()),
            "linkedin": format!("https://www.linkedin.com/in/{}-{}", first.to_lowercase(), last.to_lowercase()),
            "company_domain": domain,
            "company_name": domain.split('.').next().unwrap_or_default(),
        }, {
            "full_name": "Second Person",
            "job_title": title,
            "email": format!("second.person@{domain}"),
            "company_domain": domain,
        }])
    };
    let items: Vec<Value> = items
        .as_array()
        .unwrap()
        .iter()
        .take(limit)
        .cloned()
        .collect();
    if !items.is_empty() {
        calls.lock().unwrap().runs.entry(key).or_default()[1] += 1;
    }
    answer(200, Value::Array(items))
}

fn millionverifier(query: &HashMap<String, String>, key: &str, calls: &Mutex<Calls>) -> Response {
    let email = query.get("email").cloned().unwrap_or_default();
    let verdict = |result: &str, quality: &str, code: u8, error: &str, credits: u32| {
        // Real answers differ from call to call in credits and execution time.
        let n = calls
            .lock()
            .unwrap()
            .verifications
            .get(&email)
            .map_or(0, |c| c[1]);
        answer(
            200,
            json!({
                "email": email, "quality": quality, "result": result, "resultcode": code,
                "subresult": result, "free": false, "role": false, "didyoumean": "",
                "credits": credits.saturating_sub(n as u32), "executiontime": 1 + n % 3, "error": error,
                "livemode": true,
            }),
        )
    };
    let counted = |response: Response, paid: bool| {
        let mut calls = calls.lock().unwrap();
        let entry = calls.verifications.entry(email.clone()).or_default();
        entry[1] += 1;
        if paid {
            entry[0] += 1;
        }
        response
    };
    // The trap the docs warn of: a bad key is HTTP 200 too.
    if query.get("api").map(String::as_str) != Some(key) {
        return counted(verdict("error", "", 4, "Apikey not found", 0), false);
    }
    let Some((local, domain)) = email.rsplit_once('@') else {
        return counted(verdict("invalid", "bad", 6, "", 1000), true);
    };
    let label = first_label(domain);
    if label == "slowmail" {
        std::thread::sleep(SLOW_VERIFY);
    }
    let response = match label {
        "broke" => return counted(verdict("error", "", 4, "Insufficient credits", 0), false),
        "busy" => {
            let calls_so_far = {
                let mut calls = calls.lock().unwrap();
                let seen = calls.seen.entry(email.clone()).or_default();
                *seen += 1;
                *seen
            };
            if calls_so_far == 1 {
                return counted(
                    Response {
                        headers: vec![
                            ("content-type", "application/json".into()),
                            ("retry-after", "1".into()),
                        ],
                        ..answer(429, json!({ "error": "Too many requests, slow down" }))
                    },
                    false,
                );
            }
            verdict("ok", "good", 1, "", 1000)
        }
        "catchall" => verdict("catch_all", "risky", 2, "", 1000),
        "disposable" => verdict("disposable", "bad", 6, "", 1000),
        "unknown" => verdict("unknown", "", 3, "", 1000),
        "invalid" => verdict("invalid", "bad", 6, "", 1000),
        _ if local.starts_with("invalid") => verdict("invalid", "bad", 6, "", 1000),
        _ => verdict("ok", "good", 1, "", 1000),
    };
    counted(response, true)
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
