//! Logging, metrics and the admin endpoint.
//!
//! Logs go to journald with structured fields when stderr is the journal (systemd sets
//! `JOURNAL_STREAM` to stderr's device:inode), otherwise human-readable to stderr. The level
//! comes from `log_level`; `RUST_LOG` refines it.

pub mod admin;
pub mod metrics;
pub mod page;
pub mod status;

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

/// Installs the global subscriber; a second call is a no-op (tests start several proxies).
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    if stderr_is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref())
        && let Ok(journald) = tracing_journald::layer()
    {
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(journald.with_syslog_identifier("mcp-tunnel".into()))
            .try_init();
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in files or pipes.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
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
