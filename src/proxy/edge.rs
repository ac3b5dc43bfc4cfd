//! The edge's side of a tunnel session, for local use: open a WebSocket to the listener and
//! run a TLS client inside it, exactly as the edge and Anthropic's backend do. The bridge,
//! the demo, the self-test, the tests and the benchmarks all reach the proxy this way.

use std::io;
use std::sync::Arc;

use http::Uri;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::ws::{WsByteStream, session_config};

/// A parsed `ws://host:port[/path]` target.
#[derive(Debug, Clone)]
pub struct WsTarget {
    uri: Uri,
    addr: String,
}

impl WsTarget {
    /// Accepts `ws://` only: the listener speaks plain WebSocket (TLS runs inside it).
    pub fn parse(url: &str) -> Result<WsTarget, String> {
        let uri: Uri = url.parse().map_err(|e| {
            format!("expected a URL such as ws://127.0.0.1:8080, found {url:?}: {e}")
        })?;
        if uri.scheme_str() != Some("ws") {
            return Err(format!(
                "expected a ws:// URL (the listener is plain WebSocket; TLS runs inside it), found {url:?}"
            ));
        }
        let host = uri.host().ok_or_else(|| format!("{url:?} has no host"))?;
        let addr = format!(
            "{}:{}",
            host.trim_start_matches('[').trim_end_matches(']'),
            uri.port_u16().unwrap_or(80)
        );
        Ok(WsTarget { uri, addr })
    }

    /// Opens one WebSocket to the listener.
    pub async fn connect(&self) -> io::Result<WsByteStream<TcpStream>> {
        let tcp = TcpStream::connect(&self.addr).await?;
        let _ = tcp.set_nodelay(true);
        let (ws, _resp) = tokio_tungstenite::client_async_with_config(
            self.uri.clone(),
            tcp,
            Some(session_config()),
        )
        .await
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("websocket handshake with {}: {e}", self.uri),
            )
        })?;
        Ok(WsByteStream::new(ws))
    }

    /// Opens a WebSocket and completes an inner TLS handshake for `server_name` over it.
    pub async fn connect_tls(
        &self,
        tls: Arc<ClientConfig>,
        server_name: &str,
    ) -> io::Result<TlsStream<WsByteStream<TcpStream>>> {
        let ws = self.connect().await?;
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        TlsConnector::from(tls).connect(name, ws).await
    }
}
