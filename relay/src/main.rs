//! pipeline-relay: delivers pipeline_ext events from outside PostgreSQL,
//! for databases that cannot load the extension's library.
//!
//! cli: the flags; connection: the database URL, connecting, sorting
//! errors; tls: sslmode by rustls; tls_stream: rustls under the client,
//! with SCRAM channel binding; store: the queue's SQL over a
//! connection; listener: LISTEN on a connection of its own; relay: the
//! loop; metrics: /healthz and /metrics; logging: text or JSON lines.

mod cli;
mod connection;
mod listener;
mod logging;
mod metrics;
mod relay;
mod store;
mod tls;
mod tls_stream;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use connection::Kind;

/// Exit codes (also in --help).
const EXIT_CONFIG: u8 = 2;
const EXIT_CONNECTION: u8 = 3;

fn main() -> ExitCode {
    let matches = cli::Options::command().get_matches();
    let options = cli::Options::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    logging::init(options.log_format);
    for flag in cli::passwords_on_command_line(&matches) {
        tracing::warn!(
            "{flag} holds a password on the command line, where every user of this machine reads it; \
             give it in the environment or a file instead (pipeline-relay --help)"
        );
    }
    match relay::run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            tracing::error!("{}", failure.message);
            ExitCode::from(match failure.kind {
                Kind::Config => EXIT_CONFIG,
                Kind::Connection => EXIT_CONNECTION,
            })
        }
    }
}
