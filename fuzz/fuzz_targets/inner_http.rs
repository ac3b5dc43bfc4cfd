//! The inner request path with arbitrary bytes after a valid handshake: an in-process proxy
//! (built once per fuzzing process), a WebSocket and a real inner TLS handshake per input,
//! then the input as raw plaintext inside TLS (HTTP/1.1 requests, an h2 preface and frames,
//! or garbage), then whatever the proxy answers until it closes or goes quiet. The proxy must answer or close, never panic, and keep
//! serving a valid request afterwards (checked every `ALIVE_EVERY` inputs).
//!
//! First input byte: bit 0 offers ALPN h2 instead of http/1.1; bits 1-2 pick the TLS server
//! name (a route, the bare domain, another route, an unknown name).
//!
//! The session runs over an in-memory pipe (`Proxy::serve_websocket`) rather than TCP, so
//! that hundreds of sessions a second do not exhaust loopback ports.
#![no_main]

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use mcp_tunnel::certs::issue;
use mcp_tunnel::config::Config;
use mcp_tunnel::lifecycle::Shutdown;
use mcp_tunnel::proxy::Proxy;
use mcp_tunnel::proxy::ws::{WsByteStream, session_config};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

const DOMAIN: &str = "tunnel.test";
const SNI: [&str; 4] = [
    "echo.tunnel.test",
    "tunnel.test",
    "other.tunnel.test",
    "nothing.tunnel.test",
];
/// Longest a session may take once the input is written; past it the session is dropped
/// and counted (the proxy's own timeouts are what end a trickle, not this harness).
const SESSION_DEADLINE: Duration = Duration::from_secs(3);
const ALIVE_EVERY: u64 = 64;
/// A session that sent nothing for this long is done with (the proxy keeps it open for
/// more requests; ending it by closing would cut an answer in flight, see `session`).
const IDLE: Duration = Duration::from_millis(25);

struct Harness {
    rt: Runtime,
    proxy: Arc<Proxy>,
    shutdown: Shutdown,
    /// [http/1.1 only, h2 only]
    tls: [Arc<ClientConfig>; 2],
    runs: AtomicU64,
    overdue: AtomicU64,
    _pki: tempfile::TempDir,
}

/// An upstream that reads the request (tolerating a broken body) and answers with a small
/// body naming what it got.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let line = format!("{} {}\n", req.method(), req.uri());
                    let n = req
                        .into_body()
                        .collect()
                        .await
                        .map_or(0, |b| b.to_bytes().len());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                        "{line}{n} body bytes\n"
                    )))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let pki = tempfile::tempdir().expect("temp dir");
        issue::generate(DOMAIN, issue::CA_VALIDITY, issue::SERVER_VALIDITY)
            .expect("test PKI")
            .write_to(pki.path())
            .expect("write PKI");
        let (proxy, shutdown) = rt.block_on(async {
            let up = upstream().await;
            let port = up.port();
            let text = format!(
                r#"listen_addr = "127.0.0.1:0"
tunnel_domain = "{DOMAIN}"
[cloudflared]
enabled = false
[admin]
enabled = false
[tls]
cert_file = "{dir}/tls.crt"
key_file = "{dir}/tls.key"
[routes]
echo = "http://127.0.0.1:{port}"
other = {{ upstream = "http://127.0.0.1:{port}", preserve_host = true }}
denied = "http://127.0.0.2:{port}"
named = "http://localhost:{port}"
"full.example.org" = "http://127.0.0.1:{port}"
[upstream]
allowed_ips = ["127.0.0.1"]
connect_timeout = "1s"
response_header_timeout = "2s"
"#,
                dir = pki.path().display()
            );
            let config = Config::parse(&pki.path().join("mcp-tunnel.toml"), &text)
                .expect("valid harness config");
            let proxy = Proxy::new(&config).expect("proxy");
            (proxy, Shutdown::new())
        });
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(pki.path().join("ca.crt")).expect("ca.crt") {
            roots.add(c.expect("CA cert")).expect("CA root");
        }
        let client =
            |alpn: &[u8]| mcp_tunnel::proxy::tls::client_config(roots.clone(), vec![alpn.to_vec()]);
        Harness {
            rt,
            proxy,
            shutdown,
            tls: [client(b"http/1.1"), client(b"h2")],
            runs: AtomicU64::new(0),
            overdue: AtomicU64::new(0),
            _pki: pki,
        }
    })
}

impl Harness {
    /// One tunnel session: handshake, `input` as plaintext, then read the answer until the
    /// proxy closes or stays quiet for `idle`; then a TLS close_notify and a last read.
    /// Returns what came back, or `None` past the deadline.
    ///
    /// The session is not ended by closing the WebSocket right after the input: a WebSocket
    /// close is a full close (no half-close), so the proxy could not answer any more.
    async fn session(
        &self,
        tls: usize,
        sni: &str,
        input: &[u8],
        idle: Duration,
    ) -> Option<Vec<u8>> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let client_ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
        tokio::spawn(
            self.proxy
                .clone()
                .serve_websocket(server, client_ip, self.shutdown.clone()),
        );
        let ws =
            WebSocketStream::from_raw_socket(client, Role::Client, Some(session_config())).await;
        let name = ServerName::try_from(sni.to_owned()).expect("server name");
        let mut stream = TlsConnector::from(self.tls[tls].clone())
            .connect(name, WsByteStream::new(ws))
            .await
            .expect("inner TLS handshake with a fresh session");
        let exchange = async {
            let mut back = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            let (mut rx, mut tx) = tokio::io::split(&mut stream);
            let write = async {
                let _ = tx.write_all(input).await;
                let _ = tx.flush().await;
            };
            let read = async {
                while let Ok(Ok(n)) = tokio::time::timeout(idle, rx.read(&mut buf)).await {
                    if n == 0 {
                        return true;
                    }
                    back.extend_from_slice(&buf[..n]);
                }
                false
            };
            let ((), closed) = tokio::join!(write, read);
            if !closed {
                stream.get_mut().1.send_close_notify();
                let _ = stream.flush().await;
                let _ = tokio::time::timeout(idle, async {
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        back.extend_from_slice(&buf[..n]);
                    }
                })
                .await;
            }
            back
        };
        tokio::time::timeout(SESSION_DEADLINE, exchange).await.ok()
    }

    fn check_alive(&self) {
        let req = b"GET /alive HTTP/1.1\r\nHost: echo.tunnel.test\r\nConnection: close\r\n\r\n";
        let back = self
            .rt
            .block_on(self.session(0, SNI[0], req, SESSION_DEADLINE))
            .expect("a valid request after fuzz input got no answer in time");
        let text = String::from_utf8_lossy(&back);
        assert!(
            text.starts_with("HTTP/1.1 200 OK") && text.ends_with("GET /alive\n0 body bytes\n"),
            "the proxy stopped serving valid requests: {text:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let [flags, input @ ..] = data else {
        return;
    };
    let h = harness();
    let run = h.runs.fetch_add(1, Ordering::Relaxed);
    if run == 0 {
        h.check_alive();
    }
    let tls = usize::from(flags & 1);
    let sni = SNI[usize::from((flags >> 1) & 3)];
    if h.rt.block_on(h.session(tls, sni, input, IDLE)).is_none() {
        let n = h.overdue.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            eprintln!(
                "inner_http: {n} sessions past the {SESSION_DEADLINE:?} deadline in {} runs",
                run + 1
            );
        }
    }
    if (run + 1) % ALIVE_EVERY == 0 {
        h.check_alive();
    }
});
