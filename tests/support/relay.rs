//! pipeline-relay as the tests run it: built once per test binary, started
//! as a child process whose log is kept (and echoed), killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The relay's binary, built (debug) on first use.
pub fn binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| super::cargo_build(&["-p", "pipeline-relay"], "pipeline-relay"))
        .clone()
}

pub struct Relay {
    child: Child,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Starts the relay with these arguments (and no DATABASE_URL or proxy
    /// variables from the environment).
    pub fn start(args: &[&str]) -> Relay {
        let mut child = Command::new(binary())
            .args(args)
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pipeline-relay");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("[relay {}] {line}", std::process::id());
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            })
        };
        Relay {
            child,
            log,
            reader: Some(reader),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for it to exit; panics after `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "pipeline-relay still runs after {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        // SAFETY: kill(2) on the pid of our own child, not yet waited for.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        self.wait(limit)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the relay to its end; its exit code and log.
pub fn run(args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let mut relay = Relay::start(args);
    let status = relay.wait(limit);
    (status.code(), relay.log())
}
