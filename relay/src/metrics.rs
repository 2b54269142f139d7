//! /healthz and Prometheus /metrics (--listen).
//!
//! /healthz answers 200 while the relay is connected, or disconnected on
//! purpose (--idle-disconnect), and 503 with the reason while it cannot
//! reach the database. /metrics has deliveries by event type and outcome,
//! request latency, the backlog, requests in flight and the connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use pipeline_delivery::Attempt;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    event_type: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventType {
    event_type: String,
}

/// Where the relay stands with its database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Starting = 0,
    Connected = 1,
    /// Disconnected on purpose (--idle-disconnect) until the next poll.
    Idle = 2,
    /// Lost the connection; reconnecting.
    Reconnecting = 3,
}

pub struct Metrics {
    registry: Registry,
    attempts: Family<Outcome, Counter>,
    latency: Family<EventType, Histogram>,
    backlog: Gauge<i64, AtomicI64>,
    in_flight: Gauge<i64, AtomicI64>,
    connected: Gauge<i64, AtomicI64>,
    state: AtomicU8,
    problem: Mutex<String>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pipeline_relay");
        let attempts = Family::<Outcome, Counter>::default();
        let latency = Family::<EventType, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        });
        let backlog = Gauge::<i64, AtomicI64>::default();
        let in_flight = Gauge::<i64, AtomicI64>::default();
        let connected = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "delivery_attempts",
            "Delivery attempts recorded, by event type and outcome (delivered, retry, failed, gone, rejected, refused)",
            attempts.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from sending a request to its answer, by event type",
            latency.clone(),
        );
        registry.register(
            "backlog",
            "Events waiting to be delivered (pending, failed, processing) with an enabled endpoint, as last seen",
            backlog.clone(),
        );
        registry.register("in_flight", "Requests out now", in_flight.clone());
        registry.register(
            "connected",
            "1 while connected to the database, 0 otherwise",
            connected.clone(),
        );
        Metrics {
            registry,
            attempts,
            latency,
            backlog,
            in_flight,
            connected,
            state: AtomicU8::new(State::Starting as u8),
            problem: Mutex::new(String::new()),
        }
    }

    pub fn recorded(&self, attempts: &[Attempt]) {
        for attempt in attempts {
            self.attempts
                .get_or_create(&Outcome {
                    event_type: attempt.event_type.clone(),
                    outcome: attempt.verdict.as_str().to_string(),
                })
                .inc();
            if attempt.status_code.is_some() {
                self.latency
                    .get_or_create(&EventType {
                        event_type: attempt.event_type.clone(),
                    })
                    .observe(attempt.duration.as_secs_f64());
            }
        }
    }

    pub fn set_backlog(&self, events: i64) {
        self.backlog.set(events);
    }

    pub fn set_in_flight(&self, requests: usize) {
        self.in_flight.set(requests as i64);
    }

    /// Where the relay stands, and why when it is not connected.
    pub fn set_state(&self, state: State, problem: &str) {
        self.state.store(state as u8, Ordering::SeqCst);
        self.connected.set(i64::from(state == State::Connected));
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = problem.to_string();
    }

    fn health(&self) -> (u16, String) {
        let problem = self
            .problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match self.state.load(Ordering::SeqCst) {
            s if s == State::Connected as u8 => (200, "ok: connected\n".into()),
            s if s == State::Idle as u8 => (200, "ok: disconnected while idle\n".into()),
            s if s == State::Starting as u8 => (503, "starting\n".into()),
            _ => (503, format!("not connected: {problem}\n")),
        }
    }

    fn text(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves /healthz and /metrics on `address` until dropped.
pub struct Server {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(address: SocketAddr, metrics: Arc<Metrics>) -> Result<Server, String> {
        let server = Arc::new(
            tiny_http::Server::http(address).map_err(|e| format!("--listen {address}: {e}"))?,
        );
        let thread = {
            let server = server.clone();
            std::thread::Builder::new()
                .name("pipeline-relay metrics".into())
                .spawn(move || serve(&server, &metrics))
                .map_err(|e| format!("--listen: {e}"))?
        };
        Ok(Server {
            server,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(server: &tiny_http::Server, metrics: &Metrics) {
    for request in server.incoming_requests() {
        let path = request.url().split('?').next().unwrap_or("").to_string();
        let (status, body, content_type) = match path.as_str() {
            "/healthz" => {
                let (status, body) = metrics.health();
                (status, body, "text/plain; charset=utf-8")
            }
            "/metrics" => (
                200,
                metrics.text(),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            _ => (
                404,
                "not found: /healthz or /metrics\n".into(),
                "text/plain; charset=utf-8",
            ),
        };
        let header =
            tiny_http::Header::from_bytes("content-type", content_type).expect("a valid header");
        let _ = request.respond(
            tiny_http::Response::from_string(body)
                .with_status_code(status)
                .with_header(header),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline_delivery::Verdict;
    use std::time::Duration;

    #[test]
    fn attempts_are_counted_by_type_and_outcome() {
        let metrics = Metrics::new();
        let mut ok = Attempt::refused(1, 1, "company_created".into(), "u".into(), String::new());
        ok.verdict = Verdict::Delivered;
        ok.status_code = Some(200);
        ok.duration = Duration::from_millis(3);
        let refused = Attempt {
            verdict: Verdict::Refused,
            ..Attempt::refused(2, 1, "company_created".into(), "u".into(), "big".into())
        };
        metrics.recorded(&[ok.clone(), ok, refused]);
        metrics.set_state(State::Connected, "");
        let text = metrics.text();
        assert!(
            text.contains(
                "pipeline_relay_delivery_attempts_total{event_type=\"company_created\",outcome=\"delivered\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("outcome=\"refused\"} 1"), "{text}");
        assert!(text.contains(
            "pipeline_relay_request_duration_seconds_count{event_type=\"company_created\"} 2"
        ));
        assert!(text.contains("pipeline_relay_connected 1"));
        assert_eq!(metrics.health().0, 200);
        metrics.set_state(State::Reconnecting, "connection refused");
        assert_eq!(
            metrics.health(),
            (503, "not connected: connection refused\n".into())
        );
    }
}
