//! The command line: every flag has an environment variable of the same
//! meaning, so a container or a systemd unit can configure it either way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Delivers pipeline_ext events to their webhooks from outside PostgreSQL.
///
/// For databases that cannot load the pipeline_ext library (Neon, RDS, Cloud
/// SQL, Azure, Supabase): install dist/pipeline_ext_trigger_only.sql, then
/// run this next to your app. It delivers exactly as the extension's worker
/// does (same requests, signatures, retries, attempt log), through the same
/// SQL queue functions, so pipeline.status(), the views and
/// pipeline.replay() work the same.
///
/// Exit codes: 0 stopped (SIGTERM, SIGINT) or --once done; 2 bad
/// configuration (flags, URL, password, TLS certificate, a database without
/// the pipeline); 3 the database could not be reached or the connection was
/// lost (--once); 1 anything else.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "pipeline-relay",
    version,
    about,
    long_about,
    max_term_width = 100
)]
pub struct Options {
    /// PostgreSQL connection URL, libpq style:
    /// postgres://user:password@host:port/database?sslmode=verify-full.
    /// sslmode: disable, prefer (the default), require, verify-ca,
    /// verify-full; sslrootcert: a CA file trusted besides the system's
    /// (with require, it makes require verify the chain as libpq does);
    /// channel_binding: disable, prefer, require. A password given here on
    /// the command line is readable by every user of the machine (ps,
    /// /proc/PID/cmdline): pass the URL in DATABASE_URL or
    /// --database-url-file instead.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        required_unless_present = "database_url_file",
        conflicts_with = "database_url_file"
    )]
    pub database_url: Option<String>,

    /// A file whose first line is the connection URL (read at start), so
    /// that the password is neither on the command line nor in the
    /// environment. Make it readable by the relay's user only.
    #[arg(long, env = "PIPELINE_RELAY_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,

    /// Poll for due events at this interval instead of LISTEN. Needed through
    /// a transaction-mode pooler (Neon's -pooler host, PgBouncer), where
    /// LISTEN does not work. Examples: 1s, 500ms, 5m.
    #[arg(long, env = "PIPELINE_RELAY_POLL", value_parser = duration)]
    pub poll: Option<Duration>,

    /// Disconnect after nothing was due for this long, so a Neon compute
    /// can suspend; the relay then connects again every --poll interval
    /// (default 5m when disconnected), or when a retry is due.
    #[arg(long, env = "PIPELINE_RELAY_IDLE_DISCONNECT", value_parser = duration)]
    pub idle_disconnect: Option<Duration>,

    /// Deliver what is due now, wait for the answers, record them and exit
    /// (for cron and CI). Exits 0 when everything due was attempted.
    #[arg(long, env = "PIPELINE_RELAY_ONCE")]
    pub once: bool,

    /// The name this relay claims under (marketing.pipeline_events.claimed_by).
    /// Give each relay its own stable name: at start, a relay takes back the
    /// events its name still holds from a run that died. Default: host name
    /// and process id (nothing to take back).
    #[arg(long, env = "PIPELINE_RELAY_NAME")]
    pub name: Option<String>,

    /// Events per claim.
    #[arg(long, env = "PIPELINE_RELAY_BATCH_SIZE", default_value_t = 500,
          value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub batch_size: i32,

    /// Requests in flight at once to one endpoint (an endpoint's
    /// max_in_flight overrides it).
    #[arg(long, env = "PIPELINE_RELAY_CONCURRENCY", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,

    /// Time limit of one request (an endpoint's timeout_ms overrides it).
    #[arg(long, env = "PIPELINE_RELAY_HTTP_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub http_timeout: Duration,

    /// Extra CA certificates (PEM) trusted for https webhooks, besides the
    /// system's.
    #[arg(long, env = "PIPELINE_RELAY_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Proxy for webhook requests (http://, https://, socks5://). The
    /// HTTP_PROXY family of variables is not read. A proxy password on the
    /// command line is readable by every user of the machine: give a URL
    /// with user:password@ in PIPELINE_RELAY_HTTP_PROXY instead.
    #[arg(long, env = "PIPELINE_RELAY_HTTP_PROXY")]
    pub http_proxy: Option<String>,

    /// Address ranges never connected to, comma-separated CIDRs; the default
    /// is pipeline.blocked_networks' (link-local and cloud metadata,
    /// multicast, broadcast). An empty value blocks nothing.
    #[arg(long, env = "PIPELINE_RELAY_BLOCKED_NETWORKS")]
    pub blocked_networks: Option<String>,

    /// Largest event sent (bytes of its request body); larger ones are
    /// refused and dead.
    #[arg(long, env = "PIPELINE_RELAY_MAX_EVENT_SIZE", default_value_t = 1 << 20)]
    pub max_event_size: usize,

    /// Bytes of request bodies held at once.
    #[arg(long, env = "PIPELINE_RELAY_MAX_BYTES_IN_FLIGHT", default_value_t = 64 << 20)]
    pub max_bytes_in_flight: usize,

    /// How long SIGTERM waits for requests in flight before handing their
    /// events back to the queue.
    #[arg(long, env = "PIPELINE_RELAY_SHUTDOWN_GRACE", default_value = "10s", value_parser = duration)]
    pub shutdown_grace: Duration,

    /// Serve /healthz and Prometheus /metrics on this address (such as
    /// 127.0.0.1:9187).
    #[arg(long, env = "PIPELINE_RELAY_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Log format: text for people, json for one JSON object per line.
    #[arg(long, env = "PIPELINE_RELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Options {
    /// The connection URL, from --database-url (DATABASE_URL) or the first
    /// line of --database-url-file.
    pub fn connection_url(&self) -> Result<String, String> {
        if let Some(url) = &self.database_url {
            return Ok(url.clone());
        }
        let Some(path) = &self.database_url_file else {
            return Err("--database-url or --database-url-file is needed".into());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--database-url-file {}: {e}", path.display()))?;
        let url = text.lines().next().unwrap_or("").trim();
        if url.is_empty() {
            return Err(format!(
                "--database-url-file {}: the first line is empty",
                path.display()
            ));
        }
        Ok(url.to_string())
    }
}

/// Flags whose value on the command line holds a password, for a warning:
/// any user of the machine reads a process's arguments.
pub fn passwords_on_command_line(matches: &clap::ArgMatches) -> Vec<&'static str> {
    [
        ("database_url", "--database-url"),
        ("http_proxy", "--http-proxy"),
    ]
    .into_iter()
    .filter(|(id, _)| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
    .filter(|(id, _)| {
        matches
            .get_one::<String>(id)
            .and_then(|value| url::Url::parse(value.trim()).ok())
            .is_some_and(|url| url.password().is_some())
    })
    .map(|(_, flag)| flag)
    .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A duration such as 500ms, 1s or 5m.
fn duration(text: &str) -> Result<Duration, String> {
    let value = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{e} (examples: 500ms, 1s, 5m)"))?;
    if value.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Options::command().debug_assert();
    }

    #[test]
    fn help_documents_every_flag_and_its_variable() {
        let help = Options::command().render_long_help().to_string();
        for argument in Options::command().get_arguments() {
            let Some(long) = argument.get_long() else {
                continue;
            };
            if ["help", "version"].contains(&long) {
                continue;
            }
            assert!(help.contains(&format!("--{long}")), "--{long} in the help");
            let variable = argument.get_env().expect("an environment variable");
            assert!(
                help.contains(&format!("[env: {}", variable.to_string_lossy())),
                "{variable:?} in the help"
            );
        }
        assert!(help.contains("Exit codes"));
    }

    #[test]
    fn durations() {
        assert_eq!(duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(duration("0s").unwrap_err().contains("zero"));
        assert!(duration("soon").unwrap_err().contains("examples"));
    }

    #[test]
    fn the_url_comes_from_a_flag_or_a_file_and_a_password_on_the_command_line_is_noticed() {
        use clap::{CommandFactory, FromArgMatches};
        let parse = |args: &[&str]| {
            let matches = Options::command().try_get_matches_from(args).unwrap();
            let options = Options::from_arg_matches(&matches).unwrap();
            (options, passwords_on_command_line(&matches))
        };
        let (options, warned) = parse(&[
            "pipeline-relay",
            "--database-url",
            "postgres://u:pw@h/d",
            "--http-proxy",
            "http://p:secret@proxy:3128",
        ]);
        assert_eq!(options.connection_url().unwrap(), "postgres://u:pw@h/d");
        assert_eq!(warned, ["--database-url", "--http-proxy"]);
        let (_, warned) = parse(&["pipeline-relay", "--database-url", "postgres://u@h/d"]);
        assert!(warned.is_empty());

        let file = std::env::temp_dir().join(format!("relay-url-{}", std::process::id()));
        std::fs::write(&file, "postgres://u:pw@h/d\n").unwrap();
        let (options, warned) = parse(&[
            "pipeline-relay",
            "--database-url-file",
            file.to_str().unwrap(),
        ]);
        assert_eq!(options.connection_url().unwrap(), "postgres://u:pw@h/d");
        assert!(warned.is_empty());
        std::fs::write(&file, "\n").unwrap();
        assert!(options.connection_url().unwrap_err().contains("empty"));
        std::fs::remove_file(&file).unwrap();
        assert!(Options::try_parse_from(["pipeline-relay"])
            .unwrap_err()
            .to_string()
            .contains("--database-url"));
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let error = Options::try_parse_from([
            "pipeline-relay",
            "--database-url",
            "postgres://x",
            "--batch-size",
            "0",
        ])
        .unwrap_err();
        assert!(error.to_string().contains("--batch-size"), "{error}");
    }
}
