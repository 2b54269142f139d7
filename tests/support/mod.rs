//! A throwaway PostgreSQL cluster for the tests that `#[pg_test]` cannot
//! run: committed transactions, several sessions, a role that is not a
//! superuser. Each cluster runs as the postgres user (PostgreSQL refuses
//! root) on a free port of 127.0.0.1, with trust authentication, and is
//! stopped and removed when dropped.
//!
//! It uses the PostgreSQL named by PG_CONFIG (default: Debian's 15) and the
//! pipeline_ext installed into it (`cargo pgrx install`, which bin/test runs).

#![allow(dead_code)]

pub mod behaviours;
pub mod cascade;
pub mod faults;
pub mod http_server;
pub mod pgbouncer;
pub mod receiver;
pub mod relay;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct Cluster {
    pub port: u16,
    dir: PathBuf,
    bindir: PathBuf,
}

impl Cluster {
    /// Starts a new cluster; `settings` go into its postgresql.conf.
    pub fn start(name: &str, settings: &[(&str, &str)]) -> Cluster {
        let bindir = pg_bindir();
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let nth = STARTED.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("pipeline_ext-{name}-{}-{nth}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create cluster directory");
        if running_as_root() {
            run_checked(Command::new("chown").arg("postgres:postgres").arg(&dir));
        }
        let data = dir.join("data");
        let mut initdb = as_postgres(&bindir.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run_checked(&mut initdb);

        let port = free_port();
        let mut conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n",
            dir.display()
        );
        for (key, value) in settings {
            conf.push_str(&format!("{key} = '{value}'\n"));
        }
        append(&data.join("postgresql.conf"), &conf);

        let cluster = Cluster { port, dir, bindir };
        cluster.pg_ctl(
            &["start", "-w", "-t", "60", "-l"],
            Some(&cluster.dir.join("server.log")),
        );
        cluster
    }

    /// A cluster with the extension preloaded (so the delivery worker runs in
    /// database postgres) and created there; waits for the worker to start.
    pub fn with_worker(name: &str, settings: &[(&str, &str)]) -> Cluster {
        let mut all = vec![
            ("shared_preload_libraries", "pipeline_ext"),
            ("pipeline.database", "postgres"),
        ];
        all.extend_from_slice(settings);
        let cluster = Cluster::start(name, &all);
        let mut client = cluster.connect("postgres", "postgres");
        client
            .batch_execute("CREATE EXTENSION pipeline_ext")
            .unwrap();
        cluster.worker_pid(&mut client);
        cluster
    }

    /// The pid of the worker of the client's database, once it has made
    /// its first turn there (a worker the launcher started before CREATE
    /// EXTENSION may still be about to end).
    pub fn worker_pid(&self, client: &mut postgres::Client) -> i32 {
        let mut pid = None;
        eventually(Duration::from_secs(20), "the worker to start", || {
            pid = client
                .query_opt(
                    "SELECT pid FROM pg_stat_activity
                     WHERE backend_type = 'pipeline_ext worker' AND datname = current_database()
                       AND query IN ('waiting', 'delivering events')",
                    &[],
                )
                .ok()
                .flatten()
                .map(|row| row.get(0));
            pid.is_some()
        });
        pid.unwrap()
    }

    /// After the worker `old` died: waits, through the postmaster's crash
    /// restart (which drops every connection), for a worker with another
    /// pid; returns a fresh connection and that pid.
    pub fn new_worker(&self, old: i32) -> (postgres::Client, i32) {
        let mut found = None;
        eventually(
            Duration::from_secs(30),
            "a new worker after the crash",
            || {
                let connected = postgres::Config::new()
                    .host("127.0.0.1")
                    .port(self.port)
                    .user("postgres")
                    .dbname("postgres")
                    .connect(postgres::NoTls);
                let Ok(mut client) = connected else {
                    return false;
                };
                let pid: Option<i32> = client
                .query_opt("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pipeline_ext worker'", &[])
                .ok()
                .flatten()
                .map(|row| row.get(0));
                match pid {
                    Some(pid) if pid != old => {
                        found = Some((client, pid));
                        true
                    }
                    _ => false,
                }
            },
        );
        found.unwrap()
    }

    pub fn connect(&self, database: &str, user: &str) -> postgres::Client {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .dbname(database)
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to {database} as {user}: {e}\n{}", self.log()))
    }

    /// A client program (psql, pg_dump, ...) pointed at this cluster as `user`.
    pub fn client(&self, program: &str, user: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", user]);
        cmd
    }

    /// Runs psql against a database; returns its output whatever happened.
    pub fn psql(&self, database: &str, user: &str, args: &[&str]) -> Output {
        self.client("psql", user)
            .args(["-X", "-d", database])
            .args(args)
            .output()
            .expect("run psql")
    }

    /// pg_dump of a database, as postgres (plain SQL).
    pub fn dump(&self, database: &str) -> Vec<u8> {
        let dump = self
            .client("pg_dump", "postgres")
            .arg(database)
            .output()
            .unwrap();
        assert!(
            dump.status.success(),
            "{}",
            String::from_utf8_lossy(&dump.stderr)
        );
        dump.stdout
    }

    /// Restores a dump into an empty database, stopping at the first error.
    /// Its rows go into tables whose stage triggers already exist: replica
    /// mode keeps them from emitting the restored rows a second time.
    pub fn restore(&self, database: &str, dump: &[u8]) {
        let file = std::env::temp_dir().join(format!(
            "pipeline_ext-dump-{}-{database}.sql",
            std::process::id()
        ));
        fs::write(&file, dump).unwrap();
        let restore = self
            .client("psql", "postgres")
            .env("PGOPTIONS", "-c session_replication_role=replica")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", database, "-f"])
            .arg(&file)
            .output()
            .unwrap();
        fs::remove_file(&file).ok();
        assert!(
            restore.status.success(),
            "{}",
            String::from_utf8_lossy(&restore.stderr)
        );
    }

    /// A cluster with ssl on (the certificate of `authority`) where every
    /// role but postgres must log in with a SCRAM password over TLS;
    /// postgres itself is trusted from 127.0.0.1, for the tests' own
    /// connections.
    pub fn with_tls(name: &str, authority: &Authority, settings: &[(&str, &str)]) -> Cluster {
        let cert = authority.cert_file.display().to_string();
        let key = authority.key_file.display().to_string();
        let mut all = vec![
            ("ssl", "on"),
            ("ssl_cert_file", cert.as_str()),
            ("ssl_key_file", key.as_str()),
            ("password_encryption", "scram-sha-256"),
        ];
        all.extend_from_slice(settings);
        let cluster = Cluster::start(name, &all);
        cluster.set_hba(
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostssl all all ::1/128 scram-sha-256\n",
        );
        cluster
    }

    /// Replaces pg_hba.conf and reloads it.
    pub fn set_hba(&self, lines: &str) {
        fs::write(self.dir.join("data/pg_hba.conf"), lines).expect("write pg_hba.conf");
        self.pg_ctl(&["reload"], None);
    }

    /// Stops the server without a clean shutdown (every connection drops
    /// at once) and starts it again.
    pub fn restart_immediate(&self) {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"], None);
        self.pg_ctl(
            &["start", "-w", "-t", "60", "-l"],
            Some(&self.dir.join("server.log")),
        );
    }

    /// Stops the server (fast shutdown).
    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "fast", "-w"], None);
    }

    /// Starts a stopped server again.
    pub fn start_again(&self) {
        self.pg_ctl(
            &["start", "-w", "-t", "60", "-l"],
            Some(&self.dir.join("server.log")),
        );
    }

    /// The server log so far, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn pg_ctl(&self, args: &[&str], log: Option<&Path>) {
        let mut cmd = as_postgres(&self.bindir.join("pg_ctl"));
        cmd.arg("-D").arg(self.dir.join("data")).args(args);
        if let Some(log) = log {
            cmd.arg(log);
        }
        run_checked(&mut cmd);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-m", "immediate", "-w"])
            .output();
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Kills the child process when dropped.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request on a connection of its own to 127.0.0.1:`port`:
/// (status, body). For checking what a server answers, raw.
pub fn http_request(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut request = format!("{method} {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    (status, body.to_string())
}

/// Builds the stand-ins for Apify and MillionVerifier and returns their path.
pub fn outreach_standins() -> std::path::PathBuf {
    let features = if cfg!(feature = "pg_test") {
        "pg15 pg_test"
    } else {
        "pg15"
    };
    cargo_build(
        &["--example", "outreach_standins", "--features", features],
        "examples/outreach_standins",
    )
}

/// Builds the stage runner (with this test's features, so the library is not
/// rebuilt) and returns its path.
pub fn stage_runner() -> std::path::PathBuf {
    let features = if cfg!(feature = "pg_test") {
        "pg15 pg_test"
    } else {
        "pg15"
    };
    cargo_build(
        &["--example", "stage_runner", "--features", features],
        "examples/stage_runner",
    )
}

/// Runs `cargo build --quiet` with `args` in the repository and returns the
/// path of `output`, relative to the target profile directory of this test.
pub fn cargo_build(args: &[&str], output: &str) -> PathBuf {
    let mut build = Command::new(env!("CARGO"));
    // NB: without the variables cargo set for this test process: build
    // scripts that watch them (ring's) would otherwise rebuild every run.
    for (name, _) in std::env::vars() {
        if name.starts_with("CARGO_") && name != "CARGO_HOME" && name != "CARGO_TARGET_DIR" {
            build.env_remove(name);
        }
    }
    let status = build
        .args(["build", "--quiet"])
        .args(args)
        .current_dir(repo_root())
        .status()
        .unwrap_or_else(|e| panic!("cargo build {args:?}: {e}"));
    assert!(status.success(), "cargo build {args:?} failed");
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join(output)
}

/// Polls `done` every few milliseconds until it holds; panics after `limit`.
pub fn eventually(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Rows of a query whose only column is text, in order.
pub fn texts(client: &mut postgres::Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|row| row.get::<_, String>(0))
        .collect()
}

/// The one value of a query returning one row and column.
pub fn one<T: for<'a> postgres::types::FromSql<'a>>(client: &mut postgres::Client, sql: &str) -> T {
    client
        .query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A CA made for one test, and a server certificate it signed.
pub struct Authority {
    /// The CA certificate (PEM), readable by everyone.
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    /// The server's key, owned by postgres with mode 0600 as PostgreSQL wants.
    pub key_file: PathBuf,
    dir: PathBuf,
}

impl Authority {
    /// A CA and a server certificate for these DNS names.
    pub fn new(names: &[&str]) -> Authority {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        // NB: distinct subject names: OpenSSL (psql) takes a certificate
        // whose subject is its issuer's for a self-signed one.
        let ca = CertifiedIssuer::self_signed(
            {
                let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
                params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                params
                    .distinguished_name
                    .push(DnType::CommonName, "pipeline_ext test CA");
                params
            },
            KeyPair::generate().unwrap(),
        )
        .unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        let cert = params.signed_by(&key, &ca).unwrap();
        static MADE: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pipeline_ext-ca-{}-{}",
            std::process::id(),
            MADE.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&dir).unwrap();
        let authority = Authority {
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join("server.crt"),
            key_file: dir.join("server.key"),
            dir,
        };
        fs::write(&authority.ca_file, ca.pem()).unwrap();
        fs::write(&authority.cert_file, cert.pem()).unwrap();
        fs::write(&authority.key_file, key.serialize_pem()).unwrap();
        run_checked(Command::new("chmod").arg("0600").arg(&authority.key_file));
        run_checked(Command::new("chmod").arg("0755").arg(&authority.dir));
        if running_as_root() {
            run_checked(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&authority.cert_file)
                    .arg(&authority.key_file),
            );
        }
        authority
    }
}

impl Drop for Authority {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn pg_bindir() -> PathBuf {
    pg_config("--bindir")
}

/// What pg_config says for one flag (--bindir, --sharedir, --pkglibdir),
/// of $PG_CONFIG or Debian's PostgreSQL 15.
pub fn pg_config(flag: &str) -> PathBuf {
    let pg_config = std::env::var("PG_CONFIG")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
    let out = Command::new(&pg_config)
        .arg(flag)
        .output()
        .unwrap_or_else(|e| panic!("{pg_config}: {e}"));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub(crate) fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A command that runs as the postgres user when we are root.
fn as_postgres(program: &Path) -> Command {
    if running_as_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn run_checked(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A port of 127.0.0.1 that nothing listened on a moment ago (never 5432).
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port != 5432 {
            return port;
        }
    }
}

fn append(path: &Path, text: &str) {
    let mut content = fs::read_to_string(path).expect("read postgresql.conf");
    content.push_str(text);
    fs::write(path, content).expect("write postgresql.conf");
}
