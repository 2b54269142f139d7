//! Delivery: turning claimed events into HTTP requests and their answers into
//! verdicts. Nothing here calls into PostgreSQL, so it runs on plain threads
//! and is tested on its own; src/queue.rs hands it jobs and stores what
//! comes back.
//!
//! engine: the turn of a deliverer (record, claim, deliver, wait);
//! queue: the SQL both deliverers run and the rows it reads and writes;
//! dispatch: lanes per endpoint, threads, handing outcomes back as they
//! come; health: probing an endpoint that fails; http: one request;
//! network: addresses never to connect to; one_write: a request's head and
//! body sent together; redact: an endpoint's secrets
//! kept out of what is stored of its answers; signature: Standard
//! Webhooks; verdict: what an answer means.

mod dispatch;
mod engine;
mod health;
mod http;
mod network;
mod one_write;
pub mod queue;
mod redact;
mod signature;
mod verdict;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use dispatch::{Dispatcher, Sender};
pub use engine::{Engine, Host, Level};
pub use health::{Change, PROBE_LONGEST};
pub use http::{proxy_has_credentials, proxy_of, proxy_with_credentials, ClientError, HttpClient};
pub use network::{parse_networks, DEFAULT_BLOCKED};
pub use redact::{Redactor, REDACTED};
pub use signature::key_of;
pub use verdict::Verdict;

/// Where and how one event type is delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub event_type: String,
    pub url: String,
    pub method: String,
    pub headers: Vec<(String, String)>,
    pub signing_key: Option<Vec<u8>>,
    pub timeout: Duration,
    pub max_in_flight: usize,
    /// A response header the receiver sets when its work is done: a 2xx
    /// without it (a proxy's page, n8n answering 200 while it starts up) is
    /// not taken as delivered.
    pub confirm_header: Option<String>,
    /// Masks its header values and secret in what is stored of answers.
    pub redactor: Redactor,
}

impl Endpoint {
    /// Builds an endpoint from a row of pipeline.webhooks; NULL timeout and
    /// max_in_flight take the global settings.
    #[allow(clippy::too_many_arguments)]
    pub fn from_row(
        event_type: &str,
        url: &str,
        method: &str,
        headers_json: &str,
        secret: Option<&str>,
        timeout_ms: Option<i32>,
        max_in_flight: Option<i32>,
        confirm_header: Option<&str>,
        default_timeout: Duration,
        default_in_flight: usize,
    ) -> Result<Endpoint, String> {
        let headers: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(headers_json)
                .map_err(|_| format!("headers of {event_type} are not a JSON object"))?;
        let headers = headers
            .into_iter()
            .map(|(name, value)| match value {
                serde_json::Value::String(value) => Ok((name, value)),
                // NB: the value is not repeated: it may be a secret.
                other => Err(format!(
                    "header {name} of {event_type} is not a string but {}",
                    json_type(&other)
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Endpoint {
            event_type: event_type.to_string(),
            url: url.to_string(),
            method: method.to_ascii_uppercase(),
            redactor: Redactor::new(headers.iter().map(|(_, value)| value.as_str()), secret),
            headers,
            signing_key: secret.map(key_of).transpose()?,
            timeout: timeout_ms.map_or(default_timeout, |ms| {
                Duration::from_millis(ms.max(1) as u64)
            }),
            max_in_flight: max_in_flight.map_or(default_in_flight, |n| n.max(1) as usize),
            confirm_header: confirm_header.map(String::from),
        })
    }
}

/// The JSON type of a value, as jsonb_typeof names it.
fn json_type(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// One event to send.
#[derive(Debug, Clone)]
pub struct Job {
    pub event_id: i64,
    pub attempt: i32,
    pub endpoint: Arc<Endpoint>,
    pub body: String,
    /// Latest start that still ends before the claim's lease does.
    pub deadline: Instant,
}

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub event_id: i64,
    pub attempt: i32,
    pub event_type: String,
    pub url: String,
    pub verdict: Verdict,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub retry_after: Option<Duration>,
    pub duration: Duration,
    pub excerpt: Option<String>,
}

impl Attempt {
    /// An attempt of `job` that has not happened yet (a retry, until told otherwise).
    pub fn new(job: &Job) -> Attempt {
        Attempt {
            verdict: Verdict::Retry,
            error: None,
            ..Attempt::refused(
                job.event_id,
                job.attempt,
                job.endpoint.event_type.clone(),
                job.endpoint.url.clone(),
                String::new(),
            )
        }
    }

    /// An event that could not even be sent (its endpoint row is unusable).
    pub fn refused(
        event_id: i64,
        attempt: i32,
        event_type: String,
        url: String,
        error: String,
    ) -> Attempt {
        Attempt {
            event_id,
            attempt,
            event_type,
            url,
            verdict: Verdict::Failed,
            status_code: None,
            error: Some(error),
            retry_after: None,
            duration: Duration::ZERO,
            excerpt: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_from_row() {
        let endpoint = Endpoint::from_row(
            "company_created",
            "https://n8n.example/webhook/validate-company",
            "post",
            r#"{"Authorization": "Basic dTpw", "X-Team": "growth"}"#,
            Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            None,
            Some(4),
            Some("X-Pipeline-Done"),
            Duration::from_secs(5),
            16,
        )
        .unwrap();
        assert_eq!(endpoint.confirm_header.as_deref(), Some("X-Pipeline-Done"));
        assert_eq!(endpoint.method, "POST");
        assert_eq!(endpoint.headers.len(), 2);
        assert_eq!(endpoint.timeout, Duration::from_secs(5));
        assert_eq!(endpoint.max_in_flight, 4);
        assert_eq!(endpoint.signing_key.as_deref().map(<[u8]>::len), Some(24));

        let err = Endpoint::from_row(
            "x",
            "http://a",
            "POST",
            r#"{"A": 918273645}"#,
            None,
            None,
            None,
            None,
            Duration::ZERO,
            1,
        );
        let err = err.unwrap_err();
        assert!(err.contains("not a string but number"), "{err}");
        assert!(
            !err.contains("918273645"),
            "the value is not repeated: {err}"
        );
        let err = Endpoint::from_row(
            "x",
            "http://a",
            "POST",
            "{}",
            Some("whsec_!!"),
            None,
            None,
            None,
            Duration::ZERO,
            1,
        );
        assert!(err.unwrap_err().contains("base64"));
    }
}
