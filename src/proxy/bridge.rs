//! `mcp-tunnel bridge`: carries raw TCP connections (a TLS client's bytes) over WebSockets
//! to the listener, one WebSocket per connection, so that curl and the MCP SDKs can reach the
//! proxy locally through the same path the edge uses.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::edge::WsTarget;
use crate::lifecycle::Shutdown;

/// Serves until shutdown starts.
pub async fn serve(listener: TcpListener, target: WsTarget, shutdown: Shutdown) -> io::Result<()> {
    info!(listen = %listener.local_addr()?, "bridge listening");
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.started() => return Ok(()),
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "bridge accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let target = target.clone();
        let sd = shutdown.clone();
        shutdown.spawn(async move {
            tokio::select! {
                r = carry(tcp, &target) => if let Err(e) = r {
                    debug!(%peer, error = %e, "bridged connection ended with an error");
                },
                _ = sd.started() => {}
            }
        });
    }
}

async fn carry(mut tcp: TcpStream, target: &WsTarget) -> io::Result<()> {
    let _ = tcp.set_nodelay(true);
    let mut ws = match target.connect().await {
        Ok(ws) => ws,
        Err(e) => {
            warn!(error = %e, "bridge cannot reach the listener");
            return Err(e);
        }
    };
    tokio::io::copy_bidirectional(&mut tcp, &mut ws).await?;
    Ok(())
}

/// Binds the bridge's TCP listener.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
