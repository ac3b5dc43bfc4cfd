//! Logging, metrics and the admin endpoint.
//!
//! Logs (`log_format = "auto"`, the default) go to journald with structured fields when stderr
//! is the journal (systemd sets `JOURNAL_STREAM` to stderr's device:inode), otherwise
//! human-readable to stderr; `"text"` forces the latter, `"json"` writes one JSON object per
//! line to stderr with the journal's field names ([`json`]). The level comes from
//! `log_level`; `RUST_LOG` refines it.

pub mod admin;
pub mod json;
pub mod metrics;
pub mod page;
pub mod restart_connector;
pub mod status;
pub mod writer;

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use tracing_subscriber::prelude::*;

/// Installs the global subscriber (`log_format = "auto"`) writing straight to stderr; a
/// second call is a no-op (tests start several proxies). For short-lived commands.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// The service's subscriber, in the configured format. Lines to stderr go through a
/// [`writer::BatchWriter`] (one write per batch, never a request thread waiting on stderr);
/// the returned guard writes out what is queued when dropped, so hold it until exit.
pub fn init_with(level: &str, format: LogFormat) -> Option<writer::LogGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    if format == LogFormat::Json {
        let (w, guard) = writer::BatchWriter::new(std::io::stderr());
        let layer = json::JsonLayer::new(move || Box::new(w.line()) as Box<dyn std::io::Write>);
        return tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .try_init()
            .ok()
            .map(|()| guard);
    }
    if format == LogFormat::Auto
        && stderr_is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref())
        && let Ok(journald) = tracing_journald::layer()
    {
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(journald.with_syslog_identifier("mcp-tunnel".into()))
            .try_init();
        return None;
    }
    let (w, guard) = writer::BatchWriter::new(std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(w)
        // Colour codes only for a person at a terminal, not in files or pipes.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init()
        .ok()
        .map(|()| guard)
}

/// `JOURNAL_STREAM=<dev>:<ino>` names the stream systemd connected; it only counts if
/// stderr is still that stream (not redirected by a wrapper).
fn stderr_is_journal(var: Option<&str>) -> bool {
    let Some((dev, ino)) = var.and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}
