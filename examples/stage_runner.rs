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
//! Every write is idempotent (deliveries are at least once). It answers 200
//! when the write committed and 500 with the database's reason when it
//! failed, so the worker retries and the error log says why.
//!
//! Like the workflows (n8n Header Auth), it answers only requests that carry
//! the header X-Pipeline-Auth with the token of the environment variable
//! PIPELINE_N8N_WEBHOOK_TOKEN (the one n8n/n8n_webhook_registry.json names);
//! others get 403.
//!
//!   PIPELINE_N8N_WEBHOOK_TOKEN=... cargo run --example stage_runner -- \
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
                     (with PIPELINE_N8N_WEBHOOK_TOKEN, APIFY_TOKEN and MILLIONVERIFIER_API_KEY set; \
                     APIFY_BASE_URL, APIFY_ACTOR and MILLIONVERIFIER_BASE_URL for other places than the services')";

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
    // Each connection serves one request at a time. NB: the pool lives as
    // long as the process: a postgres::Client dropped inside the server's
    // tokio runtime (when the server stops) would panic.
    let pool: &'static Vec<Mutex<Client>> = Box::leak(Box::new(
        (0..connections.max(1))
            .map(|_| {
                Mutex::new(
                    Client::connect(database, NoTls).unwrap_or_else(|e| panic!("connect: {e}")),
                )
            })
            .collect(),
    ));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let database = database.to_string();
    let token = token.to_string();
    http_server::Server::start(listen, None, move |request| {
        let authorized = request
            .headers
            .iter()
            .any(|(name, value)| name.eq_ignore_ascii_case(AUTH_HEADER) && *value == token);
        if !authorized {
            // As n8n answers a Header Auth webhook without the right header.
            return http_server::Response {
                status: 403,
                headers: vec![("content-type", "application/json".into())],
                body: serde_json::json!({ "message": "Authorization data is wrong!" }).to_string(),
                delay: Duration::ZERO,
            };
        }
        let slot = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % pool.len();
        let mut db = pool[slot].lock().unwrap();
        if db.is_closed() {
            if let Ok(fresh) = Client::connect(&database, NoTls) {
                *db = fresh;
            }
        }
        let (status, message) = match handle(&mut db, &services, &request.path, &request.body) {
            Ok(done) => (200, done),
            Err(error) => {
                eprintln!("stage runner: {} failed: {error}", request.path);
                (500, error)
            }
        };
        http_server::Response {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: serde_json::json!({ "message": message }).to_string(),
            delay: Duration::ZERO,
        }
    })
    .unwrap_or_else(|e| panic!("listen on {listen}: {e}"))
}

/// Does one stage's work for one event; returns what it did.
fn handle(db: &mut Client, services: &Services, path: &str, body: &str) -> Result<String, String> {
    let event: Value = serde_json::from_str(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let data = &event["data"];
    let new = &data["new"];
    let done = match path {
        // The rules of these three live in the database (sql/009_stage_work.sql),
        // as the n8n workflows call them too.
        "/webhook/validate-company" => {
            let row = db
                .query_one(
                    "SELECT validation_status, validation_errors FROM pipeline.validate_company($1)",
                    &[&id(new)?],
                )
                .map_err(reason)?;
            let (status, errors): (String, Vec<String>) = (row.get(0), row.get(1));
            return Ok(format!("{path}: {status} {errors:?}"));
        }
        "/webhook/promote-company" => db
            .query_one("SELECT pipeline.promote_company($1)", &[&id(new)?])
            .map(|row| row.get::<_, i64>(0) as u64),
        "/webhook/create-slots" => db
            .query_one("SELECT pipeline.create_slots($1)", &[&id(new)?])
            .map(|row| row.get::<_, i32>(0) as u64),
        "/webhook/enrich-contact" => {
            // slots_created carries every new slot of the company in data.new;
            // each is looked up at Apify (run-sync-get-dataset-items).
            let slots = new.as_array().ok_or("slots_created without slots")?;
            let mut done = 0;
            for slot in slots {
                let domain: String = db
                    .query_one(
                        "SELECT c.domain FROM marketing.company_master c WHERE c.id = $1",
                        &[&slot["company_id"]
                            .as_i64()
                            .ok_or("slot without company_id")?],
                    )
                    .map_err(reason)?
                    .get(0);
                let role = slot["slot_role"].as_str().ok_or("slot without slot_role")?;
                let items = services.find_people(&domain, role)?;
                db.query_one(
                    "SELECT pipeline.record_enrichment($1, $2::text::jsonb)",
                    &[&id(slot)?, &items],
                )
                .map_err(reason)?;
                done += 1;
            }
            Ok(done)
        }
        "/webhook/verify-email" => match new["email"].as_str() {
            // A contact found by name only: nothing to verify.
            None => return Ok(format!("{path}: slot {} has no email", id(new)?)),
            Some(email) => {
                let answer = services.verify(email)?;
                db.query_one(
                    "SELECT pipeline.record_verification($1, $2::text::jsonb)",
                    &[&id(new)?, &answer],
                )
                .map(|_| 1)
            }
        },
        other => return Err(format!("no workflow at {other}")),
    };
    done.map(|rows| format!("{path}: {rows} row(s)"))
        .map_err(reason)
}

/// Where the enrichment and verification steps send their requests: Apify
/// and MillionVerifier, or their stand-ins (examples/outreach_standins.rs).
#[derive(Clone, Debug, Default)]
pub struct Services {
    /// Apify's API origin (https://api.apify.com).
    pub apify_url: String,
    pub apify_token: String,
    /// The people-finder actor, username~actor-name.
    pub apify_actor: String,
    /// MillionVerifier's API origin (https://api.millionverifier.com).
    pub verifier_url: String,
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

impl Services {
    /// From APIFY_BASE_URL, APIFY_TOKEN, APIFY_ACTOR, MILLIONVERIFIER_BASE_URL
    /// and MILLIONVERIFIER_API_KEY (the same names as the n8n variables).
    pub fn from_env() -> Services {
        let var = |name: &str, default: Option<&str>| {
            std::env::var(name)
                .ok()
                .or(default.map(String::from))
                .unwrap_or_else(|| panic!("{name} is not set: {USAGE}"))
        };
        Services {
            apify_url: var("APIFY_BASE_URL", Some("https://api.apify.com")),
            apify_token: var("APIFY_TOKEN", None),
            apify_actor: var("APIFY_ACTOR", Some(DEFAULT_ACTOR)),
            verifier_url: var(
                "MILLIONVERIFIER_BASE_URL",
                Some("https://api.millionverifier.com"),
            ),
            verifier_key: var("MILLIONVERIFIER_API_KEY", None),
            agent: Agent::default(),
        }
    }

    /// Runs the actor for one slot and returns its dataset items (JSON text).
    fn find_people(&self, domain: &str, role: &str) -> Result<String, String> {
        let url = format!(
            "{}/v2/acts/{}/run-sync-get-dataset-items?timeout=60",
            self.apify_url.trim_end_matches('/'),
            self.apify_actor
        );
        let input = serde_json::json!({ "domain": domain, "role": role }).to_string();
        let request = self
            .agent
            .0
            .post(&url)
            .config()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(90)))
            .build()
            .header("authorization", &format!("Bearer {}", self.apify_token))
            .header("content-type", "application/json");
        answer_of("apify", request.send(input.as_bytes()))
    }

    /// Asks about one address and returns MillionVerifier's answer (JSON text).
    fn verify(&self, email: &str) -> Result<String, String> {
        let url = format!("{}/api/v3/", self.verifier_url.trim_end_matches('/'));
        let request = self
            .agent
            .0
            .get(&url)
            .query("api", &self.verifier_key)
            .query("email", email)
            .query("timeout", "20")
            .config()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        answer_of("millionverifier", request.call())
    }
}

/// The actor the workflows and the runner call unless told otherwise.
pub const DEFAULT_ACTOR: &str = "pipeline~people-finder";

/// A 2xx answer's body, or why there is none.
fn answer_of(
    service: &str,
    sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<String, String> {
    let mut response = sent.map_err(|e| format!("{service}: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("{service}: {e}"))?;
    if (200..300).contains(&status) {
        Ok(body)
    } else {
        let body: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
        Err(format!(
            "{service} answered HTTP {status}: {}",
            body.chars().take(300).collect::<String>()
        ))
    }
}

/// What went wrong, as the database said it (its message, without the
/// client library's prefix), for the 500 answer that the error log keeps.
fn reason(error: postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => db.message().to_string(),
        None => error.to_string(),
    }
}

fn id(row: &Value) -> Result<i64, String> {
    row["id"].as_i64().ok_or_else(|| format!("no id in {row}"))
}
