//! A real HTTP receiver on 127.0.0.1 for the worker tests: it records every
//! request (with the moment it arrived) and answers as the test's script
//! says.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::http_server::{Request, Response, Server};

pub type Received = Request;

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    pub fn event_id(&self) -> i64 {
        self.json()["id"].as_i64().expect("body has an id")
    }
}

/// How to answer one request: status, extra headers, body, delay before
/// answering.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    /// None: n8n's `{"message":"Workflow was started"}` for a 2xx, nothing
    /// otherwise.
    pub body: Option<String>,
    pub delay: Duration,
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            headers: vec![],
            body: None,
            delay: Duration::ZERO,
        }
    }
}

pub struct Receiver {
    pub port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    _server: Server,
}

impl Receiver {
    /// A receiver that answers 200 to everything.
    pub fn ok() -> Receiver {
        Receiver::scripted(|_, _| Answer::status(200))
    }

    /// `script(request, n)` decides the answer; n counts earlier requests to the same path.
    pub fn scripted(
        script: impl Fn(&Received, usize) -> Answer + Send + Sync + 'static,
    ) -> Receiver {
        Receiver::on_port(0, script)
    }

    pub fn on_port(
        port: u16,
        script: impl Fn(&Received, usize) -> Answer + Send + Sync + 'static,
    ) -> Receiver {
        Receiver::serve(&format!("127.0.0.1:{port}"), None, script)
    }

    /// An https receiver with this certificate chain and key, answering 200.
    pub fn https(chain: Vec<Vec<u8>>, private_key_pkcs8: Vec<u8>) -> Receiver {
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                chain.into_iter().map(CertificateDer::from).collect(),
                PrivatePkcs8KeyDer::from(private_key_pkcs8).into(),
            )
            .expect("a certificate and its key");
        Receiver::serve("127.0.0.1:0", Some(Arc::new(config)), |_, _| {
            Answer::status(200)
        })
    }

    fn serve(
        addr: &str,
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
        script: impl Fn(&Received, usize) -> Answer + Send + Sync + 'static,
    ) -> Receiver {
        let received = Arc::new(Mutex::new(Vec::<Received>::new()));
        let log = received.clone();
        let server = Server::start(addr, tls, move |request| {
            let earlier = {
                let mut all = log.lock().unwrap();
                let n = all.iter().filter(|r| r.path == request.path).count();
                all.push(request.clone());
                n
            };
            let answer = script(&request, earlier);
            let body = answer.body.unwrap_or_else(|| match answer.status {
                200..=299 => "{\"message\":\"Workflow was started\"}".into(),
                _ => String::new(),
            });
            Response {
                status: answer.status,
                headers: answer.headers,
                body,
                delay: answer.delay,
            }
        })
        .expect("start the receiver");
        Receiver {
            port: server.addr.port(),
            received,
            _server: server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Connections the deliverer opened to this receiver so far.
    pub fn connections(&self) -> usize {
        self._server.connections()
    }

    /// Waits until `done(requests so far)` holds; panics after `limit`.
    pub fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let all = self.received();
            if done(&all) {
                return all;
            }
            assert!(
                start.elapsed() < limit,
                "waited {limit:?} for {what}; received {} requests",
                all.len()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}
