//! The database URL and the connections made from it.
//!
//! The URL is libpq's: postgres://user:password@host:port/dbname?params.
//! tokio-postgres reads it, except sslmode (it knows disable, prefer and
//! require only) and sslrootcert, which are taken out and handled by
//! tls.rs. Errors are sorted into what a person must fix (configuration)
//! and what may pass (the database could not be reached).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use postgres::config::SslMode as PgSslMode;
use postgres::Client;

use crate::tls::{self, SslMode};
use crate::tls_stream::MakeRustls;

/// How long one connection attempt may take when the URL does not say.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer that vanished (a suspended compute, a network cut) without
/// closing the connection is noticed after about a minute, unless the URL
/// says otherwise: keepalive probes after 30 s of silence, 10 s apart, 3 of
/// them; and sent data unacknowledged for 30 s.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVES_RETRIES: u32 = 3;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// The URL parameters passed on to tokio-postgres.
const KNOWN_PARAMETERS: [&str; 17] = [
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

/// An error and its causes, in one line.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cause = Some(error);
    while let Some(current) = cause {
        let text = current.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cause = current.source();
    }
    parts.join(": ")
}

/// Why something failed: decides the exit code and whether to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Fix the configuration (exit 2): retrying cannot help.
    Config,
    /// The database could not be reached or the connection broke (exit 3).
    Connection,
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: Kind,
    pub message: String,
}

impl Failure {
    pub fn config(message: impl Into<String>) -> Failure {
        Failure {
            kind: Kind::Config,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A parsed database URL.
#[derive(Clone)]
pub struct Target {
    config: postgres::Config,
    mode: SslMode,
    tls: Option<MakeRustls>,
    /// host:port/database as user, for messages (never the password).
    pub display: String,
}

impl Target {
    pub fn parse(text: &str) -> Result<Target, Failure> {
        let bad = |why: String| Failure::config(format!("--database-url / DATABASE_URL: {why}"));
        let text = text.trim();
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            return Err(bad(
                "not a postgres:// or postgresql:// URL (libpq's form: postgres://user:password@host:port/database?sslmode=verify-full)"
                    .into(),
            ));
        }
        let mut url = url::Url::parse(text).map_err(|e| bad(e.to_string()))?;
        let mut mode = SslMode::Prefer;
        let mut root_cert: Option<PathBuf> = None;
        let mut kept = Vec::new();
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "sslmode" => mode = SslMode::parse(&value).map_err(bad)?,
                "sslrootcert" => root_cert = Some(PathBuf::from(value.as_ref())),
                "sslcert" | "sslkey" | "sslpassword" => {
                    return Err(bad(format!(
                        "{key}: client certificates are not supported; use a password (SCRAM)"
                    )))
                }
                known if KNOWN_PARAMETERS.contains(&known) => {
                    kept.push((key.into_owned(), value.into_owned()))
                }
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?} (known: sslmode, sslrootcert, {})",
                        KNOWN_PARAMETERS.join(", ")
                    )))
                }
            }
        }
        let given = |name: &str| kept.iter().any(|(key, _)| key == name);
        let (idle, interval, retries, user_timeout) = (
            given("keepalives_idle"),
            given("keepalives_interval"),
            given("keepalives_retries"),
            given("tcp_user_timeout"),
        );
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        let mut config =
            postgres::Config::from_str(url.as_str()).map_err(|e| bad(e.to_string()))?;
        if config.get_hosts().is_empty() {
            return Err(bad("no host".into()));
        }
        if config.get_user().is_none() {
            return Err(bad("no user name".into()));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if !idle {
            config.keepalives_idle(KEEPALIVES_IDLE);
        }
        if !interval {
            config.keepalives_interval(KEEPALIVES_INTERVAL);
        }
        if !retries {
            config.keepalives_retries(KEEPALIVES_RETRIES);
        }
        if !user_timeout {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("pipeline-relay");
        }
        config.ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        let tls = match mode {
            SslMode::Disable => None,
            _ => Some(MakeRustls::new(
                tls::client_config(mode, root_cert.as_deref()).map_err(bad)?,
            )),
        };
        let host = match &config.get_hosts()[0] {
            postgres::config::Host::Tcp(name) => name.clone(),
            postgres::config::Host::Unix(path) => path.display().to_string(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let display = format!(
            "{host}:{port}/{} as {}",
            config
                .get_dbname()
                .unwrap_or(config.get_user().unwrap_or("")),
            config.get_user().unwrap_or("")
        );
        Ok(Target {
            config,
            mode,
            tls,
            display,
        })
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }

    /// A new connection.
    pub fn connect(&self) -> Result<Client, Failure> {
        let connected = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(postgres::NoTls),
        };
        connected.map_err(|e| {
            let failure = classify(&e);
            Failure {
                message: format!("cannot connect to {}: {}", self.display, failure.message),
                ..failure
            }
        })
    }
}

/// Sorts a database error and says it in one line, with its causes.
pub fn classify(error: &postgres::Error) -> Failure {
    if let Some(db) = error.as_db_error() {
        let kind = match db.code().code() {
            // The connection is not the problem: the server refuses this
            // role, password or database, or the role's rights.
            "28P01" | "28000" | "3D000" | "42501" | "42P01" | "42883" | "3F000" => Kind::Config,
            _ => Kind::Connection,
        };
        let mut message = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            message.push_str(&format!("; {detail}"));
        }
        if let Some(hint) = db.hint() {
            message.push_str(&format!("; hint: {hint}"));
        }
        return Failure { kind, message };
    }
    let mut kind = Kind::Connection;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if rustls_refusal(current) {
            kind = Kind::Config;
        }
        cause = current.source();
    }
    let message = chain(error);
    if message.contains("server does not support TLS")
        || message.contains("invalid configuration")
        || message.contains("SCRAM")
        || message.contains("channel binding")
        || message.contains("password missing")
    {
        kind = Kind::Config;
    }
    Failure { kind, message }
}

/// Whether an error is rustls refusing the server's certificate.
fn rustls_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    let rustls_error = error.downcast_ref::<rustls::Error>().or_else(|| {
        error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    });
    matches!(
        rustls_error,
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let target =
            Target::parse("postgres://relay:s3cret@db.example:6543/app?sslmode=verify-full&channel_binding=require")
                .unwrap();
        assert_eq!(target.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(target.display, "db.example:6543/app as relay");
        assert!(!target.display.contains("s3cret"));
        assert_eq!(
            target.config.get_channel_binding(),
            postgres::config::ChannelBinding::Require
        );
        assert_eq!(target.config.get_application_name(), Some("pipeline-relay"));
        assert_eq!(target.config.get_connect_timeout(), Some(&CONNECT_TIMEOUT));

        assert_eq!(target.config.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(
            target.config.get_tcp_user_timeout(),
            Some(&TCP_USER_TIMEOUT)
        );

        let target = Target::parse("postgresql://u@h/d?keepalives_idle=5").unwrap();
        assert_eq!(target.ssl_mode(), SslMode::Prefer);
        assert_eq!(target.config.get_keepalives_idle(), Duration::from_secs(5));
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, says) in [
            ("mysql://u@h/d", "not a postgres://"),
            ("postgres://u@h/d?sslmode=verify", "sslmode"),
            ("postgres://u@h/d?sslcert=/c.pem", "client certificates"),
            ("postgres://u@h/d?frobnicate=1", "frobnicate"),
            ("postgres://u@h:99999/d", "--database-url"),
            ("postgres:///d", "no host"),
            (
                "postgres://u@h/d?sslmode=verify-full&sslrootcert=/nonexistent.pem",
                "/nonexistent.pem",
            ),
        ] {
            let failure = Target::parse(url)
                .err()
                .unwrap_or_else(|| panic!("{url} accepted"));
            assert_eq!(failure.kind, Kind::Config, "{url}");
            assert!(failure.message.contains(says), "{url}: {}", failure.message);
            assert!(!failure.message.contains('\n'), "{url}: one line");
        }
    }
}
