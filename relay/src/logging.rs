//! Log lines on standard error: for people by default, or one JSON object
//! per line (--log-format json) with timestamp, level and message fields.

use std::io::IsTerminal;

use tracing::Level;

use crate::cli::LogFormat;

pub fn init(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(Level::INFO)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}
