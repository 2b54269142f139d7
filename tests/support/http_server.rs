//! A small HTTP/1.1 server (hyper on a tokio runtime of its own) that hands
//! each request, body read, to a plain blocking function. The test
//! receivers and the stage runner (examples/stage_runner.rs) are built on it.
//! Keep-alive connections are served concurrently, each request on a
//! blocking thread of its own, so slow answers overlap.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// A request as the handler sees it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// What follows the ? of the target, as sent ("" when none).
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// When the request (headers and body) had arrived.
    pub at: Instant,
}

/// The handler's answer; `delay` is waited before answering.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    pub delay: Duration,
}

/// A running server; dropping it closes the port and every connection.
pub struct Server {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    connections: Arc<AtomicUsize>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Server {
    /// Serves on `addr` (port 0 for any), over TLS when `tls` is given.
    pub fn start(
        addr: &str,
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
        handler: impl Fn(Request) -> Response + Send + Sync + 'static,
    ) -> std::io::Result<Server> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind(addr))?;
        let addr = listener.local_addr()?;
        let handler = Arc::new(handler);
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let connections = Arc::new(AtomicUsize::new(0));
        let accepted = connections.clone();
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let (handler, acceptor) = (handler.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request| answer(handler.clone(), request));
                    let connection = http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = connection
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                        None => {
                            let _ = connection
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        Ok(Server {
            addr,
            connections,
            runtime: Some(runtime),
        })
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn answer<H>(
    handler: Arc<H>,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible>
where
    H: Fn(Request) -> Response + Send + Sync + 'static,
{
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let request = Request {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.to_string(),
                    value.to_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
        at: Instant::now(),
    };
    let reply = tokio::task::spawn_blocking(move || {
        let reply = handler(request);
        std::thread::sleep(reply.delay);
        reply
    })
    .await
    .unwrap_or_else(|_| Response {
        status: 500,
        headers: vec![],
        body: "handler panicked".into(),
        delay: Duration::ZERO,
    });
    let mut response = hyper::Response::builder().status(reply.status);
    for (name, value) in reply.headers {
        response = response.header(name, value);
    }
    Ok(response
        .body(Full::new(Bytes::from(reply.body)))
        .expect("a valid response"))
}
