//! The stage runner: a stand-in for the five n8n workflows of the outreach
//! pipeline. It receives the pipeline's webhooks on the same paths n8n
//! serves (so n8n/n8n_webhook_registry.json works with only base_url
//! changed) and writes back to the database as the workflows do, which fires
//! the next stage's trigger:
//!
//!   POST /webhook/validate-company  company_created    -> validated / invalid
//!   POST /webhook/promote-company   company_validated  -> marketing.company_master
//!   POST /webhook/create-slots      company_promoted   -> ceo and cfo slots
//!   POST /webhook/enrich-contact    slots_created      -> Apify's people-finder, contacts enriched
//!   POST /webhook/verify-email      contact_enriched   -> MillionVerifier, marketing.email_verification
//!
//! The decisions and the mapping of the services' answers are the database's
//! (sql/009_stage_work.sql), as in the n8n workflows; the services are the
//! real ones or their stand-ins (examples/outreach_standins.rs), by URL.
//!
//! Every write is idempotent (deliveries are at least once), and a delivery
//! answers 2xx only when all of its work is recorded. Enrichment and
//! verification go through the database's service calls
//! (sql/010_service_calls.sql): a slot filled or an address verified is not
//! sent to the service again, a slot another delivery is calling for waits,
//! and a failed part answers with the service's meaning (429 with its
//! Retry-After, 503/504, 424 for a key or credits it refuses) so that the
//! deliverer retries the right way. The first three stages answer 422 with
//! the database's reason when the input cannot be used, and 503 when the
//! database could not be reached.
//!
//! Like the workflows (n8n Header Auth), it answers only requests that carry
//! the header X-Pipeline-Auth with the token of the environment variable
//! PIPELINE_N8N_WEBHOOK_TOKEN (the one n8n/n8n_webhook_registry.json names);
//! others get 403. The services' keys come from APIFY_TOKEN and
//! MILLIONVERIFIER_API_KEY; where the services are, and which actor, is the
//! database's pipeline.services_in_effect.
//!
//!   PIPELINE_N8N_WEBHOOK_TOKEN=... APIFY_TOKEN=... MILLIONVERIFIER_API_KEY=... \
//!       cargo run --example stage_runner -- \
//!       --listen 127.0.0.1:28901 --database "host=127.0.0.1 port=28815 user=postgres dbname=postgres"

use std::sync::Mutex;
use std::time::Duration;

use postgres::{Client, NoTls};
use serde_json::Value;

// The HTTP server the tests' receivers use too (not all of it is used here).
#[path = "../tests/support/http_server.rs"]
#[allow(dead_code)]
mod http_server;

const USAGE: &str = "usage: stage_runner --listen HOST:PORT --database CONNINFO [--connections N] \
                     (with PIPELINE_N8N_WEBHOOK_TOKEN, APIFY_TOKEN and MILLIONVERIFIER_API_KEY set)";

/// The header the workflows' Header Auth checks, as the registry sends it.
pub const AUTH_HEADER: &str = "X-Pipeline-Auth";
/// The environment variable that holds its value.
pub const AUTH_TOKEN_VARIABLE: &str = "PIPELINE_N8N_WEBHOOK_TOKEN";

#[allow(dead_code)] // the benchmark (bench/) includes this file and calls serve
fn main() {
    let mut listen = None;
    let mut database = None;
    let mut connections = 4;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next(),
            "--database" => database = args.next(),
            "--connections" => connections = args.next().and_then(|n| n.parse().ok()).expect(USAGE),
            _ => panic!("{USAGE}"),
        }
    }
    let (listen, database) = (listen.expect(USAGE), database.expect(USAGE));
    let token = std::env::var(AUTH_TOKEN_VARIABLE)
        .ok()
        .filter(|t| !t.trim().is_empty())
        .unwrap_or_else(|| panic!("{AUTH_TOKEN_VARIABLE} is not set: {USAGE}"));
    let _server = serve(
        &listen,
        &database,
        connections,
        &token,
        Services::from_env(),
    );
    eprintln!("stage runner listening on http://{listen}");
    loop {
        std::thread::park();
    }
}

/// A pool of database connections, each used for one statement at a time
/// (never held across a call to a service).
struct Pool {
    database: String,
    clients: Vec<Mutex<Client>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Pool {
    /// Runs `work` on the next connection, connecting again if it was lost.
    fn with<R>(&self, work: impl FnOnce(&mut Client) -> R) -> R {
        let slot =
            self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.clients.len();
        let mut client = self.clients[slot].lock().unwrap_or_else(|e| e.into_inner());
        if client.is_closed() {
            if let Ok(fresh) = Client::connect(&self.database, NoTls) {
                *client = fresh;
            }
        }
        work(&mut client)
    }
}

/// Serves the five workflows on `listen`, writing through `connections`
/// database connections, to requests whose AUTH_HEADER is `token`, until
/// the returned server is dropped.
pub fn serve(
    listen: &str,
    database: &str,
    connections: usize,
    token: &str,
    services: Services,
) -> http_server::Server {
    // NB: the pool lives as long as the process: a postgres::Client dropped
    // inside the server's tokio runtime (when the server stops) would panic.
    let pool: &'static Pool = Box::leak(Box::new(Pool {
        database: database.to_string(),
        clients: (0..connections.max(1))
            .map(|_| {
                Mutex::new(
                    Client::connect(database, NoTls).unwrap_or_else(|e| panic!("connect: {e}")),
                )
            })
            .collect(),
        next: Default::default(),
    }));
    let token = token.to_string();
    http_server::Server::start(listen, None, move |request| {
        let authorized = request
            .headers
            .iter()
            .any(|(name, value)| name.eq_ignore_ascii_case(AUTH_HEADER) && *value == token);
        if !authorized {
            // As n8n answers a Header Auth webhook without the right header.
            return json_response(
                403,
                None,
                serde_json::json!({ "message": "Authorization data is wrong!" }),
            );
        }
        let answer = handle(pool, &services, &request.path, &request.body);
        if !(200..300).contains(&answer.status) {
            // The reason only: the parts are in the answer, and in the
            // attempt log that keeps it.
            let reason = answer.body["error"].as_str().unwrap_or_default();
            eprintln!(
                "stage runner: {} answered {}: {}",
                request.path,
                answer.status,
                reason.chars().take(300).collect::<String>()
            );
        }
        json_response(answer.status, answer.retry_after, answer.body)
    })
    .unwrap_or_else(|e| panic!("listen on {listen}: {e}"))
}

/// What a delivery is answered.
struct Answer {
    status: u16,
    retry_after: Option<i32>,
    body: Value,
}

impl Answer {
    fn ok(message: String) -> Answer {
        Answer {
            status: 200,
            retry_after: None,
            body: serde_json::json!({ "message": message }),
        }
    }

    fn error(status: u16, error: String) -> Answer {
        Answer {
            status,
            retry_after: None,
            body: serde_json::json!({ "error": error }),
        }
    }

    /// A database error: 422 when the input cannot be used (the database
    /// refused it: no such row, a rule, a constraint), else 503.
    fn of_database(error: postgres::Error) -> Answer {
        let input = error.code().is_some_and(|code| {
            let code = code.code();
            code.starts_with("22") || code.starts_with("23") || code == "P0002" || code == "42501"
        });
        Answer::error(if input { 422 } else { 503 }, reason(error))
    }
}

/// The header every answer carries, as the workflows' Respond nodes set it:
/// the registry's confirm_header, so a 2xx from anything else (n8n starting
/// up, a proxy) is not taken as the stage's work done.
pub const CONFIRM_HEADER: &str = "X-Pipeline-Done";

fn json_response(status: u16, retry_after: Option<i32>, body: Value) -> http_server::Response {
    let mut headers = vec![
        ("content-type", "application/json".to_string()),
        (CONFIRM_HEADER, "true".to_string()),
    ];
    if let Some(wait) = retry_after {
        headers.push(("retry-after", wait.to_string()));
    }
    http_server::Response {
        status,
        headers,
        body: body.to_string(),
        delay: Duration::ZERO,
    }
}

/// Does one stage's work for one event.
fn handle(pool: &Pool, services: &Services, path: &str, body: &str) -> Answer {
    let event: Value = match serde_json::from_str(body) {
        Ok(event) => event,
        Err(e) => return Answer::error(422, format!("body is not JSON: {e}")),
    };
    let new = &event["data"]["new"];
    let outcome = match path {
        // The rules of these three live in the database (sql/009_stage_work.sql),
        // as the n8n workflows call them too.
        "/webhook/validate-company" => id(new).map(|id| {
            pool.with(|db| {
                db.query_one(
                    "SELECT validation_status, validation_errors FROM pipeline.validate_company($1)",
                    &[&id],
                )
            })
            .map(|row| {
                let (status, errors): (String, Vec<String>) = (row.get(0), row.get(1));
                format!("{path}: {status} {errors:?}")
            })
        }),
        "/webhook/promote-company" => id(new).map(|id| {
            pool.with(|db| db.query_one("SELECT pipeline.promote_company($1)", &[&id]))
                .map(|row| format!("{path}: company {}", row.get::<_, i64>(0)))
        }),
        "/webhook/create-slots" => id(new).map(|id| {
            pool.with(|db| db.query_one("SELECT pipeline.create_slots($1)", &[&id]))
                .map(|row| format!("{path}: {} slot(s) created", row.get::<_, i32>(0)))
        }),
        // slots_created carries every new slot of the company in data.new.
        "/webhook/enrich-contact" => match new.as_array() {
            Some(slots) => {
                let ids: Vec<i64> = slots.iter().filter_map(|slot| slot["id"].as_i64()).collect();
                return calls(pool, services, "enrichment", &ids);
            }
            None => Err("slots_created without slots in data.new".to_string()),
        },
        "/webhook/verify-email" => match id(new) {
            Ok(slot) => return calls(pool, services, "verification", &[slot]),
            Err(e) => Err(e),
        },
        other => Err(format!("no workflow at {other}")),
    };
    match outcome {
        Ok(Ok(done)) => Answer::ok(done),
        Ok(Err(error)) => Answer::of_database(error),
        Err(input) => Answer::error(422, input),
    }
}

/// A stage whose work calls a service for each slot: the calls to make
/// (the database leases them, and says which slots are done or busy), each
/// sent at once, each answer recorded, and the one answer of them all.
fn calls(pool: &Pool, services: &Services, stage: &str, slots: &[i64]) -> Answer {
    let list = if stage == "enrichment" {
        "SELECT slot_id, action, method, url, query::text AS query, body::text AS body, detail
         FROM pipeline.enrichment_calls($1)"
    } else {
        "SELECT slot_id, action, method, url, query::text AS query, body::text AS body, detail
         FROM pipeline.verification_calls($1)"
    };
    let rows = match pool.with(|db| db.query(list, &[&slots])) {
        Ok(rows) => rows,
        Err(error) => return Answer::of_database(error),
    };
    let to_call: Vec<Call> = rows
        .iter()
        .filter(|row| row.get::<_, String>("action") == "call")
        .map(|row| Call {
            slot: row.get("slot_id"),
            method: row.get("method"),
            url: row.get("url"),
            query: json_of(row.get("query")),
            body: row
                .get::<_, Option<String>>("body")
                .map(|b| json_of(Some(b))),
        })
        .collect();
    // The calls of one delivery overlap: a company's slots wait for one
    // service run, not for one after the other.
    let answers: Vec<(i64, Sent)> = std::thread::scope(|scope| {
        let running: Vec<_> = to_call
            .iter()
            .map(|call| scope.spawn(move || (call.slot, services.send(stage, call))))
            .collect();
        running
            .into_iter()
            .map(|done| done.join().expect("service call"))
            .collect()
    });
    for (slot, sent) in answers {
        let recorded = pool.with(|db| {
            db.execute(
                "SELECT pipeline.finish_call($1, $2, $3, $4, $5, $6)",
                &[
                    &stage,
                    &slot,
                    &sent.status,
                    &sent.body,
                    &sent.retry_after,
                    &sent.error,
                ],
            )
        });
        if let Err(error) = recorded {
            // The answer below names the slot as not recorded.
            eprintln!("stage runner: recording slot {slot}: {}", reason(error));
        }
    }
    // The one answer, from what the database holds for every slot of the
    // event (the ones done before, or being called by another delivery, too).
    let answer = pool.with(|db| {
        db.query_one(
            "SELECT status, retry_after, body::text FROM pipeline.stage_answer($1, $2)",
            &[&stage, &slots],
        )
    });
    match answer {
        Ok(row) => Answer {
            status: row.get::<_, i32>(0) as u16,
            retry_after: row.get(1),
            body: json_of(row.get(2)),
        },
        Err(error) => Answer::of_database(error),
    }
}

/// One request the database asked for.
struct Call {
    slot: i64,
    method: String,
    url: String,
    query: Value,
    body: Option<Value>,
}

/// What a service answered (status and body), or why nothing came.
struct Sent {
    status: Option<i32>,
    body: Option<String>,
    retry_after: Option<String>,
    error: Option<String>,
}

/// The keys of the services the enrichment and verification steps call
/// (where they are is the database's: pipeline.services_in_effect).
#[derive(Clone, Debug, Default)]
pub struct Services {
    pub apify_token: String,
    pub verifier_key: String,
    /// Keeps connections to the services open between calls.
    pub agent: Agent,
}

/// A ureq agent with its default pool, so that calls reuse connections.
#[derive(Clone, Debug)]
pub struct Agent(ureq::Agent);

impl Default for Agent {
    fn default() -> Agent {
        Agent(ureq::Agent::new_with_defaults())
    }
}

/// Longest wait for Apify: its run-sync endpoint answers within 300 s.
const APIFY_TIMEOUT: Duration = Duration::from_secs(320);
/// Longest wait for MillionVerifier: its own timeout is at most 60 s.
const VERIFIER_TIMEOUT: Duration = Duration::from_secs(75);

impl Services {
    /// From APIFY_TOKEN and MILLIONVERIFIER_API_KEY.
    pub fn from_env() -> Services {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(|| panic!("{name} is not set: {USAGE}"))
        };
        Services {
            apify_token: var("APIFY_TOKEN"),
            verifier_key: var("MILLIONVERIFIER_API_KEY"),
            agent: Agent::default(),
        }
    }

    /// Sends one call with the stage's key: Apify's token as a bearer
    /// header, MillionVerifier's key as its api query parameter.
    fn send(&self, stage: &str, call: &Call) -> Sent {
        let mut query: Vec<(String, String)> = call
            .query
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            v.as_str().map_or_else(|| v.to_string(), String::from),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let sent = if stage == "enrichment" {
            let mut request = self.agent.0.post(&call.url);
            for (name, value) in &query {
                request = request.query(name, value);
            }
            request
                .config()
                .http_status_as_error(false)
                .timeout_global(Some(APIFY_TIMEOUT))
                .build()
                .header("authorization", &format!("Bearer {}", self.apify_token))
                .header("content-type", "application/json")
                .send(
                    call.body
                        .clone()
                        .unwrap_or(Value::Null)
                        .to_string()
                        .as_bytes(),
                )
        } else {
            query.push(("api".into(), self.verifier_key.clone()));
            let mut request = self.agent.0.get(&call.url);
            for (name, value) in &query {
                request = request.query(name, value);
            }
            debug_assert_eq!(call.method, "GET");
            request
                .config()
                .http_status_as_error(false)
                .timeout_global(Some(VERIFIER_TIMEOUT))
                .build()
                .call()
        };
        match sent {
            Ok(mut response) => Sent {
                status: Some(response.status().as_u16() as i32),
                retry_after: response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from),
                body: response.body_mut().read_to_string().ok(),
                error: None,
            },
            // NB: ureq's words about a failed call name no query string, so
            // the key does not reach the database (which masks it anyway).
            Err(error) => Sent {
                status: None,
                body: None,
                retry_after: None,
                error: Some(error.to_string()),
            },
        }
    }
}

/// What went wrong, as the database said it (its message, without the
/// client library's prefix), for the answer that the error log keeps.
fn reason(error: postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => db.message().to_string(),
        None => error.to_string(),
    }
}

/// JSON text from the database as a value (NULL as null).
fn json_of(text: Option<String>) -> Value {
    text.and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn id(row: &Value) -> Result<i64, String> {
    row["id"].as_i64().ok_or_else(|| format!("no id in {row}"))
}
