//! `mcp-tunnel run`: starts the parts in order and owns signals and shutdown.

pub mod notify;

use tracing::{info, warn};

use crate::config::Config;
use crate::lifecycle::{Shutdown, termination_signal};
use crate::proxy::Proxy;

/// Errors that end `run` with a non-zero exit.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    #[error(
        "{file}: cloudflared.enabled: cloudflared supervision is not part of this build yet; set [cloudflared] enabled = false and run cloudflared as its own service (`cloudflared tunnel --no-autoupdate run --url http://{listen}`)"
    )]
    CloudflaredUnsupported {
        file: String,
        listen: std::net::SocketAddr,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs the proxy until SIGTERM/SIGINT, then drains for up to `shutdown_timeout`.
pub async fn run(config: Config) -> Result<(), RunError> {
    if config.cloudflared.enabled {
        return Err(RunError::CloudflaredUnsupported {
            file: config.path.display().to_string(),
            listen: config.listen_addr,
        });
    }
    let proxy = Proxy::new(&config)?;
    let listener = Proxy::bind(&config).await?;
    let addr = listener.local_addr().map_err(RunError::Signals)?;
    info!(listen = %addr, routes = config.routes.len(), "proxy listening");
    let shutdown = Shutdown::new();
    tokio::spawn(proxy.serve(listener, shutdown.clone()));
    let notifier = notify::Notifier::new();
    notifier.ready(&format!(
        "{} routes; listening on {addr}",
        config.routes.len()
    ));
    let signal = termination_signal().await.map_err(RunError::Signals)?;
    notifier.stopping("stopping: draining in-flight requests");
    info!(signal, active = shutdown.active(), timeout = ?config.shutdown_timeout, "shutting down: draining in-flight requests");
    let left = shutdown.drain(config.shutdown_timeout).await;
    if left > 0 {
        warn!(
            sessions = left,
            "shutdown_timeout reached: closing the remaining sessions"
        );
    } else {
        info!("drained cleanly");
    }
    Ok(())
}
