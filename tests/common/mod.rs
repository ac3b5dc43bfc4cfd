//! Shared harness: a test PKI, upstream servers, the proxy, and an edge-side client that
//! reaches the proxy through WebSocket + inner TLS exactly as the edge does.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mcp_tunnel::certs::issue;
use mcp_tunnel::config::Config;
use mcp_tunnel::lifecycle::Shutdown;
use mcp_tunnel::proxy::Proxy;
use mcp_tunnel::proxy::edge::WsTarget;
use mcp_tunnel::proxy::upstream::Resolve;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpListener;

pub const DOMAIN: &str = "tunnel.test";

pub type Body = BoxBody<Bytes, hyper::Error>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A CA and server certificate for `*.tunnel.test`, written to a temp dir.
pub struct TestPki {
    pub dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().unwrap();
        issue::generate(DOMAIN, issue::CA_VALIDITY, issue::SERVER_VALIDITY)
            .unwrap()
            .write_to(dir.path())
            .unwrap();
        TestPki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn roots(&self) -> RootCertStore {
        roots_from(&self.path("ca.crt"))
    }

    /// The CA's pair, to issue further server certificates from.
    pub fn ca(&self) -> issue::IssuedPair {
        issue::IssuedPair {
            cert_pem: std::fs::read_to_string(self.path("ca.crt")).unwrap(),
            key_pem: std::fs::read_to_string(self.path("ca.key")).unwrap(),
        }
    }
}

pub fn roots_from(ca: &Path) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

/// Config text with the test PKI, listening on an ephemeral loopback port.
pub fn config_text(pki: &TestPki, extra_top: &str, routes: &str, upstream: &str) -> String {
    format!(
        "listen_addr = \"127.0.0.1:0\"\ntunnel_domain = \"{DOMAIN}\"\nshutdown_timeout = \"5s\"\n{extra_top}\n[cloudflared]\nenabled = false\n[admin]\nenabled = false\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[routes]\n{routes}\n[upstream]\n{upstream}\n",
        pki.path("tls.crt").display(),
        pki.path("tls.key").display(),
    )
}

/// A running in-process proxy.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub shutdown: Shutdown,
    pub proxy: Arc<Proxy>,
    pub config: Config,
}

impl TestProxy {
    pub async fn start(pki: &TestPki, text: &str) -> TestProxy {
        Self::start_with(pki, text, None).await
    }

    pub async fn start_with(
        pki: &TestPki,
        text: &str,
        resolver: Option<Arc<dyn Resolve>>,
    ) -> TestProxy {
        mcp_tunnel::telemetry::init("debug");
        let config = Config::parse(&pki.path("mcp-tunnel.toml"), text).expect("valid test config");
        let proxy = match resolver {
            Some(r) => Proxy::with_resolver(&config, r).unwrap(),
            None => Proxy::new(&config).unwrap(),
        };
        let listener = Proxy::bind(&config).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        tokio::spawn(proxy.clone().serve(listener, shutdown.clone()));
        TestProxy {
            addr,
            shutdown,
            proxy,
            config,
        }
    }

    pub fn target(&self) -> WsTarget {
        WsTarget::parse(&format!("ws://{}", self.addr)).unwrap()
    }
}

/// An edge-side HTTP client over one tunnel session.
pub enum Edge {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl Edge {
    /// Opens a session with SNI `sni`, offering HTTP/1.1 only, or h2 only.
    pub async fn connect(proxy: &TestProxy, pki: &TestPki, sni: &str, h2: bool) -> Edge {
        Self::try_connect(proxy, pki.roots(), sni, h2)
            .await
            .expect("tunnel session")
    }

    pub async fn try_connect(
        proxy: &TestProxy,
        roots: RootCertStore,
        sni: &str,
        h2: bool,
    ) -> std::io::Result<Edge> {
        let alpn = if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        };
        let tls = mcp_tunnel::proxy::tls::client_config(roots, vec![alpn]);
        let stream = proxy.target().connect_tls(tls, sni).await?;
        let io = TokioIo::new(stream);
        Ok(if h2 {
            let (send, conn) = http2::handshake(TokioExecutor::new(), io).await.unwrap();
            tokio::spawn(conn);
            Edge::H2(send)
        } else {
            let (send, conn) = http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Edge::H1(send)
        })
    }

    pub async fn send(&mut self, req: Request<Body>) -> Response<Incoming> {
        match self {
            Edge::H1(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
            Edge::H2(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
        }
    }

    /// GET `path` with `Host: host`; returns status and body text.
    pub async fn get(&mut self, host: &str, path: &str) -> (u16, String) {
        let req = request("GET", host, path, full(""), matches!(self, Edge::H2(_)));
        let resp = self.send(req).await;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// Builds a request; for h2 the host goes into `:authority`.
pub fn request(method: &str, host: &str, path: &str, body: Body, h2: bool) -> Request<Body> {
    let b = Request::builder().method(method);
    if h2 {
        b.uri(format!("https://{host}{path}")).body(body).unwrap()
    } else {
        b.uri(path).header("host", host).body(body).unwrap()
    }
}

/// Serves `handler` over plain HTTP/1.1 on an ephemeral loopback port.
pub async fn upstream<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let h = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let h = h.clone();
                    async move { Ok::<_, Infallible>(h(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// An upstream that answers with a JSON echo of what it received.
pub async fn echo_upstream() -> SocketAddr {
    upstream(|req: Request<Incoming>| async move {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let headers: serde_json::Map<String, serde_json::Value> = parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    serde_json::Value::from(v.to_str().unwrap_or("")),
                )
            })
            .collect();
        let json = serde_json::json!({
            "method": parts.method.as_str(),
            "uri": parts.uri.to_string(),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        });
        Response::builder()
            .header("content-type", "application/json")
            .body(full(json.to_string()))
            .unwrap()
    })
    .await
}

/// The address in field `field` of the first line of the log file `log` that contains
/// `message` (the service logs what it bound, e.g. `proxy listening listen=127.0.0.1:40123`):
/// a test starts processes on port 0 and reads their addresses here, instead of binding a
/// port, releasing it and handing it over (another process may take it in between).
#[allow(dead_code)]
pub async fn logged_addr(log: &std::path::Path, message: &str, field: &str) -> SocketAddr {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(message)) {
            let at = line
                .find(&format!("{field}="))
                .unwrap_or_else(|| panic!("no {field}= in {line:?}"))
                + field.len()
                + 1;
            return line[at..]
                .split([' ', '"'])
                .find(|s| !s.is_empty())
                .unwrap()
                .parse()
                .unwrap_or_else(|e| panic!("{line:?}: {e}"));
        }
        assert!(
            std::time::Instant::now() < end,
            "no {message:?} line in {}:\n{text}",
            log.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
