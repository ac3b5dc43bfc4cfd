//! Reaching upstreams: resolve, check every resolved address against the allowlist, dial
//! only an address that was checked (no second lookup, so no DNS-rebinding window), and
//! wrap in TLS for `https://`. Connections are pooled per worker (`proxy::exchange`); every
//! new connection resolves and checks again, so a changed DNS answer is always judged.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::IpPolicy;

/// Name resolution, injectable so that tests can give answers DNS would (mixed, changing).
pub trait Resolve: Send + Sync + 'static {
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<io::Result<Vec<SocketAddr>>>;
}

/// A boxed future, as the resolver returns it.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The system resolver (getaddrinfo via tokio).
#[derive(Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<io::Result<Vec<SocketAddr>>> {
        let host = host.to_owned();
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// What the connector needs from the current config snapshot.
#[derive(Clone)]
pub struct UpstreamSettings {
    pub resolver: Arc<dyn Resolve>,
    pub ip_policy: IpPolicy,
    pub tls: Option<Arc<ClientConfig>>,
    pub connect_timeout: Duration,
}

/// Why no upstream connection was made. The proxy maps each to a status and a log line.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("IP validation failed: {ip} is not a private address")]
    NotAllowed { host: String, ip: IpAddr },
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
    #[error("dial tcp {addr}: {source}")]
    Dial { addr: SocketAddr, source: io::Error },
    #[error("connecting to {host} timed out after {after:?}")]
    Timeout { host: String, after: Duration },
    #[error("TLS with upstream {host} failed: {source}")]
    Tls { host: String, source: io::Error },
    #[error(
        "https upstream {host} has no trust anchor (set upstream.tls.ca_file or include_system_cas)"
    )]
    NoTrustAnchor { host: String },
    #[error("invalid upstream URI {0}")]
    BadUri(String),
}

/// Resolves `host` and checks the whole answer: what every new upstream connection does.
pub async fn resolve_checked(
    resolver: &dyn Resolve,
    policy: &IpPolicy,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, ConnectError> {
    let addrs = resolve(resolver, host, port).await?;
    let ips: Vec<IpAddr> = addrs.iter().map(|a| a.ip()).collect();
    policy
        .check_all(&ips)
        .map_err(|ip| ConnectError::NotAllowed {
            host: host.to_string(),
            ip,
        })?;
    // Dial the canonical form, so a mapped address goes out as the IPv4 it was judged as.
    Ok(addrs
        .into_iter()
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
        .collect())
}

/// The lookup half of [`resolve_checked`]: an IP literal is used as is, a name is resolved;
/// an empty answer is an error. Nothing is checked here.
pub async fn resolve(
    resolver: &dyn Resolve,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, ConnectError> {
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => resolver
            .resolve(host, port)
            .await
            .map_err(|source| ConnectError::Resolve {
                host: host.to_string(),
                source,
            })?,
    };
    if addrs.is_empty() {
        return Err(ConnectError::NoAddress {
            host: host.to_string(),
        });
    }
    Ok(addrs)
}

/// Connects to the first of `addrs` that answers (the addresses `resolve_checked` returned).
async fn dial(addrs: &[SocketAddr]) -> Result<TcpStream, ConnectError> {
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(source) => {
                last = Some(ConnectError::Dial {
                    addr: *addr,
                    source,
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| ConnectError::NoAddress {
        host: "(empty address list)".into(),
    }))
}

/// Opens upstream connections under one upstream policy (a new policy gets a new plane and
/// idle lists, `proxy::state::UpstreamPlane`).
pub struct Connector;

impl Connector {
    /// One upstream connection for `uri` under `settings`: resolve, check every address,
    /// dial a checked one, TLS for `https://`, all within `connect_timeout`. What the pool
    /// calls for each new connection, and what `doctor` times.
    pub async fn connect(
        settings: Arc<UpstreamSettings>,
        uri: Uri,
    ) -> Result<UpstreamIo, ConnectError> {
        let host = uri
            .host()
            .ok_or_else(|| ConnectError::BadUri(uri.to_string()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let work = async {
            let addrs =
                resolve_checked(settings.resolver.as_ref(), &settings.ip_policy, &host, port)
                    .await?;
            let tcp = dial(&addrs).await?;
            if !https {
                return Ok(UpstreamIo(Stream::Plain(tcp)));
            }
            let tls = settings
                .tls
                .clone()
                .ok_or_else(|| ConnectError::NoTrustAnchor { host: host.clone() })?;
            let name = ServerName::try_from(host.clone()).map_err(|e| ConnectError::Tls {
                host: host.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?;
            let stream = TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|source| ConnectError::Tls {
                    host: host.clone(),
                    source,
                })?;
            Ok(UpstreamIo(Stream::Tls(Box::new(stream))))
        };
        tokio::time::timeout(settings.connect_timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(ConnectError::Timeout {
                    host: host.clone(),
                    after: settings.connect_timeout,
                })
            })
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An upstream connection, plain or TLS.
pub struct UpstreamIo(Stream);

impl UpstreamIo {
    /// The address dialled.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match &self.0 {
            Stream::Plain(s) => s.peer_addr(),
            Stream::Tls(s) => s.get_ref().0.peer_addr(),
        }
    }

    /// Whether TLS runs on it (an `https://` upstream).
    pub fn is_tls(&self) -> bool {
        matches!(self.0, Stream::Tls(_))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Finds the connector's own error inside an exchange's error.
pub fn find_connect_error<'a>(
    mut err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a ConnectError> {
    loop {
        if let Some(c) = err.downcast_ref::<ConnectError>() {
            return Some(c);
        }
        err = err.source()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literal_addresses_are_checked_without_lookup() {
        let policy = IpPolicy::default();
        let ok = resolve_checked(&SystemResolver, &policy, "10.1.2.3", 80)
            .await
            .unwrap();
        assert_eq!(ok, vec!["10.1.2.3:80".parse().unwrap()]);
        let mapped = resolve_checked(&SystemResolver, &policy, "::ffff:192.168.1.2", 80)
            .await
            .unwrap();
        assert_eq!(mapped, vec!["192.168.1.2:80".parse().unwrap()]);
        match resolve_checked(&SystemResolver, &policy, "127.0.0.1", 80).await {
            Err(ConnectError::NotAllowed { ip, .. }) => assert_eq!(ip.to_string(), "127.0.0.1"),
            other => panic!("expected NotAllowed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn hostname_resolving_outside_the_set_is_refused() {
        // "localhost" resolves to loopback, which the RFC 1918 default does not allow.
        let err = resolve_checked(&SystemResolver, &IpPolicy::default(), "localhost", 80)
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::NotAllowed { .. }), "{err:?}");
        assert!(err.to_string().contains("is not a private address"));
    }
}
