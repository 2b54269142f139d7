//! The benchmark's webhook receiver: hyper on a tokio runtime of its own,
//! answering 204 at once and noting, for each request, the event id (the
//! webhook-id header) and the moment the request had fully arrived. A path
//! under /hang is an endpoint that never answers: its requests are held
//! open (and not noted) until the client gives up. Receivers that fail on
//! purpose (the breaker's scenarios) note their deliveries only, and every
//! request with its answer in `answers`:
//!   /flaky     503 to the first two requests of each event, then 204;
//!   /poison    500, for ever, to the events whose id is a multiple of 50;
//!   /throttle  429 with Retry-After: 1 to every 100th request.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

pub type Receipt = (i64, Instant);

/// A request to a failing path: event id, arrival, status answered.
pub type Answered = (i64, Instant, u16);

#[derive(Default)]
struct Misbehaviour {
    tries: std::collections::HashMap<i64, u32>,
    requests: u64,
    answers: Vec<Answered>,
}

impl Misbehaviour {
    /// The status to answer a request for `id` on `path`, and extra headers.
    fn answer(&mut self, path: &str, id: i64, at: Instant) -> (u16, Option<&'static str>) {
        self.requests += 1;
        let (status, retry_after) = if path.starts_with("/flaky") {
            let tries = self.tries.entry(id).or_default();
            *tries += 1;
            (if *tries <= 2 { 503 } else { 204 }, None)
        } else if path.starts_with("/poison") {
            (if id % 50 == 0 { 500 } else { 204 }, None)
        } else if self.requests.is_multiple_of(100) {
            (429, Some("1"))
        } else {
            (204, None)
        };
        self.answers.push((id, at, status));
        (status, retry_after)
    }
}

fn misbehaves(path: &str) -> bool {
    ["/flaky", "/poison", "/throttle"]
        .iter()
        .any(|p| path.starts_with(p))
}

pub struct Receiver {
    pub port: u16,
    log: Arc<Mutex<Vec<Receipt>>>,
    misbehaviour: Arc<Mutex<Misbehaviour>>,
    _runtime: tokio::runtime::Runtime,
}

impl Receiver {
    pub fn start(threads: usize) -> Receiver {
        Receiver::start_on(threads, 0)
    }

    /// A receiver on this port (0: any).
    pub fn start_on(threads: usize, port: u16) -> Receiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .expect("bind the receiver");
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::with_capacity(1 << 20)));
        let misbehaviour = Arc::new(Mutex::new(Misbehaviour::default()));
        let shared = log.clone();
        let shared_misbehaviour = misbehaviour.clone();
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let log = shared.clone();
                let misbehaviour = shared_misbehaviour.clone();
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                            let log = log.clone();
                            let misbehaviour = misbehaviour.clone();
                            async move {
                                if request.uri().path().starts_with("/hang") {
                                    tokio::time::sleep(Duration::from_secs(3600)).await;
                                }
                                let id = request
                                    .headers()
                                    .get("webhook-id")
                                    .and_then(|v| v.to_str().ok())
                                    .and_then(|v| v.parse().ok())
                                    .unwrap_or(-1);
                                let path = request.uri().path().to_string();
                                let _ = request.into_body().collect().await;
                                let at = Instant::now();
                                let (status, retry_after) = if misbehaves(&path) {
                                    misbehaviour.lock().unwrap().answer(&path, id, at)
                                } else {
                                    (204, None)
                                };
                                if status == 204 {
                                    log.lock().unwrap().push((id, at));
                                }
                                let mut response = hyper::Response::builder().status(status);
                                if let Some(wait) = retry_after {
                                    response = response.header("retry-after", wait);
                                }
                                Ok::<_, Infallible>(response.body(Empty::<Bytes>::new()).unwrap())
                            }
                        });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver {
            port,
            log,
            misbehaviour,
            _runtime: runtime,
        }
    }

    /// Every request to a failing path so far, with its answer, leaving
    /// that log empty.
    pub fn take_answers(&self) -> Vec<Answered> {
        let mut misbehaviour = self.misbehaviour.lock().unwrap();
        misbehaviour.tries.clear();
        misbehaviour.requests = 0;
        std::mem::take(&mut misbehaviour.answers)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// The receipts so far, leaving the log empty.
    pub fn take(&self) -> Vec<Receipt> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// Waits until `n` requests have arrived; false after `limit`.
    pub fn wait_for(&self, n: usize, limit: Duration) -> bool {
        let start = Instant::now();
        while self.count() < n {
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }
}

/// Requests per second the receiver answers when `clients` keep-alive
/// clients (ureq, as the worker uses) post a typical body as fast as they can.
pub fn capacity(receiver: &Receiver, clients: usize, seconds: f64) -> f64 {
    let body = format!(
        "{{\"id\": 1, \"data\": {{\"new\": {{\"pad\": \"{}\"}}}}}}",
        "x".repeat(400)
    );
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let url = receiver.url("/capacity");
    let total: usize = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let (url, body) = (url.clone(), body.clone());
                scope.spawn(move || {
                    let agent = ureq::Agent::new_with_defaults();
                    let mut sent = 0;
                    while Instant::now() < deadline {
                        if agent
                            .post(&url)
                            .header("webhook-id", "0")
                            .send(body.as_bytes())
                            .is_ok()
                        {
                            sent += 1;
                        }
                    }
                    sent
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    receiver.take();
    total as f64 / seconds
}
