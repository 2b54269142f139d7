//! Sending one delivery over HTTP(S).
//!
//! One ureq agent serves every thread and keeps connections alive between
//! requests and batches. https is verified against the system trust store,
//! plus the certificates of `pipeline.ca_file` when set. Redirects are not
//! followed: a 3xx answer is a failed delivery, as Standard Webhooks says.
//! A proxy is used only when `pipeline.http_proxy` names one: the server's
//! environment (HTTP_PROXY, ALL_PROXY, ...) is never read, so that what the
//! worker connects to does not depend on how the server happened to start.
//! Host names resolve through network.rs, which drops the addresses of
//! `pipeline.blocked_networks`.

use std::io::Read;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};
use ureq::unversioned::transport::{Connector, DefaultConnector};
use ureq::Proxy;

use super::network::{Blocked, GuardedResolver, Network};
use super::one_write::OneWrite;

use super::signature::sign;
use super::verdict::{retry_after, Verdict};
use super::{Attempt, Job};

/// How much of a response body is kept in the attempt log.
const EXCERPT_CHARS: usize = 500;
/// How much of a response body is read at most (so the connection can be
/// reused when the body is small, without reading a huge one).
const READ_LIMIT: u64 = 64 * 1024;
/// Idle connections kept, per host and in all. Each sending thread holds
/// one connection at a time and every lane has threads of its own, so
/// endpoints on one host (five n8n workflows, say) may keep as many
/// connections to it as their slots together, not only one endpoint's
/// worth. Idle connections close after 15 s.
const IDLE_CONNECTIONS: usize = 4096;
/// The buffer ureq reads an answer from: it holds a response's headers,
/// which may be as large as ureq's limit (64 KiB).
const INPUT_BUFFER: usize = 64 * 1024;
/// The socket's (and TLS's) own read buffer, which the answer passes
/// through on its way to the one above (one_write.rs).
const SOCKET_INPUT_BUFFER: usize = 16 * 1024;
/// A connection's write buffer (ureq's default is 128 KiB): requests are
/// small, and a large body goes out in several writes.
const OUTPUT_BUFFER: usize = 16 * 1024;

pub struct HttpClient {
    agent: ureq::Agent,
}

/// A refused input of [`HttpClient::new`]; the caller names its setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// The CA file: "<path>: <why>".
    CaFile(String),
    /// The proxy URL.
    Proxy(String),
}

impl ClientError {
    /// The error with the caller's names of the two inputs.
    pub fn named(&self, ca_file: &str, proxy: &str) -> String {
        match self {
            ClientError::CaFile(why) => format!("{ca_file} {why}"),
            ClientError::Proxy(why) => format!("{proxy}: {why}"),
        }
    }
}

impl HttpClient {
    /// `ca_file` adds trusted CAs; `proxy` is the proxy URL, if any;
    /// `blocked` the addresses never to connect to.
    pub fn new(
        ca_file: Option<&str>,
        proxy: Option<&str>,
        blocked: Vec<Network>,
    ) -> Result<HttpClient, ClientError> {
        let roots = trusted_roots(ca_file).map_err(ClientError::CaFile)?;
        let tls = TlsConfig::builder()
            .root_certs(RootCerts::Specific(Arc::new(roots)))
            .build();
        let proxy = proxy
            .map(proxy_of)
            .transpose()
            .map_err(ClientError::Proxy)?;
        let config = ureq::Agent::config_builder()
            .tls_config(tls)
            .proxy(proxy)
            .http_status_as_error(false)
            .max_redirects(0)
            .max_idle_connections(IDLE_CONNECTIONS)
            .max_idle_connections_per_host(IDLE_CONNECTIONS)
            .input_buffer_size(SOCKET_INPUT_BUFFER)
            .output_buffer_size(OUTPUT_BUFFER)
            .user_agent(concat!("pipeline_ext/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(HttpClient {
            agent: ureq::Agent::with_parts(
                config,
                // NB: last, after TLS: a request is one write (and one record).
                DefaultConnector::default().chain(OneWrite {
                    output: OUTPUT_BUFFER,
                    input: INPUT_BUFFER,
                }),
                GuardedResolver::new(blocked),
            ),
        })
    }

    /// Sends one job and says what came of it; never panics on network trouble.
    pub fn send(&self, job: &Job) -> Attempt {
        let started = Instant::now();
        let endpoint = &job.endpoint;
        let id = job.event_id.to_string();
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);

        let request = match endpoint.method.as_str() {
            "PUT" => self.agent.put(&endpoint.url),
            "PATCH" => self.agent.patch(&endpoint.url),
            _ => self.agent.post(&endpoint.url),
        };
        let mut request = request
            .config()
            .timeout_global(Some(endpoint.timeout))
            .build()
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string());
        let mut redactor = endpoint.redactor.clone();
        if let Some(key) = &endpoint.signing_key {
            let signature = sign(key, &id, timestamp, &job.body);
            redactor.add(signature.trim_start_matches("v1,"));
            request = request.header("webhook-signature", signature);
        }
        for (name, value) in &endpoint.headers {
            request = request.header(name, value);
        }

        let mut attempt = Attempt::new(job);
        match request.send(job.body.as_bytes()) {
            Ok(mut response) => {
                let status = response.status().as_u16();
                attempt.status_code = Some(status);
                attempt.verdict = Verdict::of_status(status);
                // A 2xx without the header the receiver confirms with did
                // not come from the receiver's work: retried.
                let unconfirmed = attempt.verdict == Verdict::Delivered
                    && endpoint
                        .confirm_header
                        .as_ref()
                        // NB: header names are looked up whatever their case.
                        .is_some_and(|name| response.headers().get(name.as_str()).is_none());
                if unconfirmed {
                    attempt.verdict = Verdict::Retry;
                }
                attempt.retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry_after(v, SystemTime::now()));
                let mut body = Vec::new();
                let _ = response
                    .body_mut()
                    .as_reader()
                    .take(READ_LIMIT)
                    .read_to_end(&mut body);
                // NB: an error page may echo the request: its headers and
                // signature are masked, in the whole body, before any of it
                // is kept (a cut could split a secret otherwise).
                let body = redactor.apply(&String::from_utf8_lossy(&body));
                attempt.excerpt = excerpt(body.as_bytes());
                if unconfirmed {
                    attempt.error = Some(format!(
                        "HTTP {status} without the {} header the endpoint confirms its work with: not taken as delivered",
                        endpoint.confirm_header.as_deref().unwrap_or_default()
                    ));
                } else if attempt.verdict != Verdict::Delivered {
                    attempt.error = Some(match reason(body.as_bytes()) {
                        Some(reason) => format!("HTTP {status}: {reason}"),
                        None => format!("HTTP {status}"),
                    });
                }
            }
            Err(ureq::Error::Other(cause)) if cause.is::<Blocked>() => {
                // The same address would be refused every time.
                attempt.verdict = Verdict::Refused;
                attempt.error = Some(cause.to_string());
            }
            Err(error) => {
                attempt.verdict = Verdict::Retry;
                attempt.error = Some(describe(&error));
            }
        }
        attempt.duration = started.elapsed();
        attempt
    }
}

/// The proxy a URL names (http, https, socks4, socks5).
pub fn proxy_of(url: &str) -> Result<Proxy, String> {
    Proxy::new(url.trim()).map_err(|e| {
        if proxy_has_credentials(url) {
            // NB: neither the URL nor ureq's words, which may repeat it.
            "the proxy URL (its credentials not shown) is not a proxy URL".to_string()
        } else {
            format!("{url:?} is not a proxy URL: {e}")
        }
    })
}

/// Whether a proxy URL carries credentials (user:password@ or token@).
pub fn proxy_has_credentials(url: &str) -> bool {
    let rest = url.trim().split_once("://").map_or(url, |(_, rest)| rest);
    rest.split(['/', '?', '#'])
        .next()
        .unwrap_or("")
        .contains('@')
}

/// The proxy URL with `credentials` (user:password, written as in a URL)
/// put before its host.
pub fn proxy_with_credentials(url: &str, credentials: &str) -> String {
    match url.trim().split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{credentials}@{rest}"),
        None => format!("{credentials}@{}", url.trim()),
    }
}

/// The start of a response body, as text; None when empty.
fn excerpt(body: &[u8]) -> Option<String> {
    if body.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(body);
    Some(text.chars().take(EXCERPT_CHARS).collect())
}

/// Longest reason taken from a refusal's body into the error message.
const REASON_CHARS: usize = 300;

/// Why a receiver refused, from its answer's body, for the error message a
/// person reads in marketing.pipeline_error_log: the `error` or `message` of
/// a JSON object (`{"error": {"message": ...}}` too), else the body's text
/// with its white space collapsed; None when there is nothing to read.
pub fn reason(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let said = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|json| {
            ["error", "message"]
                .iter()
                .find_map(|key| match &json[*key] {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Object(inner) => inner
                        .get("message")
                        .and_then(|m| m.as_str())
                        .map(String::from),
                    _ => None,
                })
        });
    let words = said
        .as_deref()
        .unwrap_or(&text)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if words.is_empty() {
        return None;
    }
    let mut short: String = words.chars().take(REASON_CHARS).collect();
    if short.len() < words.len() {
        short.push('…');
    }
    Some(short)
}

fn describe(error: &ureq::Error) -> String {
    match error {
        ureq::Error::Timeout(what) => format!("timed out ({what})"),
        ureq::Error::HostNotFound => "host not found".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::Io(e) => format!("connection error: {e}"),
        other => other.to_string(),
    }
}

/// The system's CA certificates, and those of ca_file.
fn trusted_roots(ca_file: Option<&str>) -> Result<Vec<Certificate<'static>>, String> {
    let system = rustls_native_certs::load_native_certs();
    let mut roots: Vec<Certificate<'static>> = system
        .certs
        .iter()
        .map(|der| Certificate::from_der(der.as_ref()).to_owned())
        .collect();
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        let before = roots.len();
        for item in ureq::tls::parse_pem(&pem) {
            if let PemItem::Certificate(cert) = item.map_err(|e| format!("{path}: {e}"))? {
                roots.push(cert);
            }
        }
        if roots.len() == before {
            return Err(format!("{path}: no PEM certificate in it"));
        }
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::{proxy_has_credentials, proxy_of, proxy_with_credentials, reason};

    #[test]
    fn proxy_credentials_are_found_and_never_repeated() {
        assert!(proxy_has_credentials("http://user:pw@proxy:3128"));
        assert!(proxy_has_credentials("socks5://token@proxy:1080/"));
        assert!(!proxy_has_credentials("http://proxy:3128/a@b"));
        assert!(!proxy_has_credentials("http://proxy:3128"));
        let url = proxy_with_credentials("http://proxy:3128", "user:pw");
        assert_eq!(url, "http://user:pw@proxy:3128");
        assert!(proxy_of(&url).is_ok());
        let error = proxy_of("ftp://user:hunter22@proxy:99999").unwrap_err();
        assert!(!error.contains("hunter22"), "{error}");
    }

    #[test]
    fn a_refusal_says_why_in_a_line() {
        let cases: [(&str, Option<&str>); 8] = [
            (
                r#"{"error": "intake row 5 is not valid"}"#,
                Some("intake row 5 is not valid"),
            ),
            (
                r#"{"message": "Error in workflow"}"#,
                Some("Error in workflow"),
            ),
            (
                r#"{"error": {"code": 7, "message": "out of credits"}}"#,
                Some("out of credits"),
            ),
            (r#"{"status": "no"}"#, Some(r#"{"status": "no"}"#)),
            (
                "<html>\n  <h1>Bad   Gateway</h1>\n</html>",
                Some("<html> <h1>Bad Gateway</h1> </html>"),
            ),
            ("", None),
            (" \n\t", None),
            (r#"{"error": "  "}"#, None),
        ];
        for (body, expected) in cases {
            assert_eq!(reason(body.as_bytes()).as_deref(), expected, "{body:?}");
        }
        let long = reason("x ".repeat(400).as_bytes()).unwrap();
        assert_eq!(long.chars().count(), 301, "300 characters and an ellipsis");
        assert!(long.ends_with('…'));
        // Not UTF-8: read as far as it goes, never a panic.
        assert_eq!(
            reason(b"bad \xff byte").as_deref(),
            Some("bad \u{FFFD} byte")
        );
    }
}
