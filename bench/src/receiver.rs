//! The benchmark's webhook receiver: hyper on a tokio runtime of its own,
//! answering 204 at once and noting, for each request, the event id (the
//! webhook-id header) and the moment the request had fully arrived. A path
//! under /hang is an endpoint that never answers: its requests are held
//! open (and not noted) until the client gives up.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

pub type Receipt = (i64, Instant);

pub struct Receiver {
    pub port: u16,
    log: Arc<Mutex<Vec<Receipt>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Receiver {
    pub fn start(threads: usize) -> Receiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the receiver");
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::with_capacity(1 << 20)));
        let shared = log.clone();
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let log = shared.clone();
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                            let log = log.clone();
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
                                let _ = request.into_body().collect().await;
                                log.lock().unwrap().push((id, Instant::now()));
                                Ok::<_, Infallible>(
                                    hyper::Response::builder()
                                        .status(204)
                                        .body(Empty::<Bytes>::new())
                                        .unwrap(),
                                )
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
            _runtime: runtime,
        }
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
