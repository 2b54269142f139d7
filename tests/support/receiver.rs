//! A real HTTP receiver on 127.0.0.1 for the worker tests: it records every
//! request (with the moment it arrived) and answers as the test's script
//! says, each request on a thread of its own so slow answers overlap.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub at: Instant,
}

impl Received {
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

/// How to answer one request: status, extra headers, delay before answering.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub delay: Duration,
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            headers: vec![],
            delay: Duration::ZERO,
        }
    }
}

type Script = dyn Fn(&Received, usize) -> Answer + Send + Sync;

pub struct Receiver {
    pub port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    server: Arc<tiny_http::Server>,
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
        Receiver::serve(
            tiny_http::Server::http(("127.0.0.1", port)).expect("start receiver"),
            script,
        )
    }

    /// An https receiver with this certificate chain and key (PEM), answering 200.
    pub fn https(certificate: &str, private_key: &str) -> Receiver {
        let config = tiny_http::SslConfig {
            certificate: certificate.as_bytes().to_vec(),
            private_key: private_key.as_bytes().to_vec(),
        };
        let server = tiny_http::Server::https("127.0.0.1:0", config).expect("start https receiver");
        Receiver::serve(server, |_, _| Answer::status(200))
    }

    fn serve(
        server: tiny_http::Server,
        script: impl Fn(&Received, usize) -> Answer + Send + Sync + 'static,
    ) -> Receiver {
        let server = Arc::new(server);
        let port = server.server_addr().to_ip().expect("ip address").port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        {
            let (server, received) = (server.clone(), received.clone());
            thread::spawn(move || {
                for mut request in server.incoming_requests() {
                    let at = Instant::now();
                    let mut body = String::new();
                    let _ = request.as_reader().read_to_string(&mut body);
                    let got = Received {
                        path: request.url().to_string(),
                        headers: request
                            .headers()
                            .iter()
                            .map(|h| (h.field.to_string(), h.value.to_string()))
                            .collect(),
                        body,
                        at,
                    };
                    let earlier = {
                        let mut all = received.lock().unwrap();
                        let n = all
                            .iter()
                            .filter(|r: &&Received| r.path == got.path)
                            .count();
                        all.push(got.clone());
                        n
                    };
                    let script = script.clone();
                    thread::spawn(move || {
                        let answer = script(&got, earlier);
                        thread::sleep(answer.delay);
                        let mut response = tiny_http::Response::from_string(
                            "{\"message\":\"Workflow was started\"}",
                        )
                        .with_status_code(answer.status);
                        for (name, value) in answer.headers {
                            response
                                .add_header(tiny_http::Header::from_bytes(name, value).unwrap());
                        }
                        let _ = request.respond(response);
                    });
                }
            });
        }
        Receiver {
            port,
            received,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
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

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.unblock();
    }
}
