//! The load generator. One code path (a hyper HTTP/1.1 client connection per session) over
//! three transports: plain TCP (`http://`, the upstream directly), TLS (`https://`, nginx)
//! and WebSocket with TLS inside it (`ws://`, this proxy, exactly as the edge speaks it).

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use mcp_tunnel::proxy::edge::WsTarget;
use rustls::RootCertStore;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;

use crate::now_us;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Closed-loop tools/call POSTs, one in flight per session.
    Post,
    /// One SSE stream per session; per-event latency from the upstream's timestamp.
    Sse,
    /// Open sessions, one request each, then hold them idle and read the target's RSS.
    Idle,
    /// Closed-loop session set-up: open a session (every handshake), one tools/call, close;
    /// latency is the whole of it, the rate is sessions per second.
    Connect,
}

/// The WebSocket client under ws:// targets' inner TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WsClient {
    /// The bench's own client codec (`ws::WsStream`): masked frames written from one reused
    /// buffer, reads into the caller's buffer.
    Lean,
    /// `mcp_tunnel::proxy::edge::WsTarget` (tungstenite): kept for A/B runs.
    Tungstenite,
}

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// http://HOST:PORT (direct), https://HOST:PORT (TLS) or ws://HOST:PORT (WebSocket + TLS).
    #[arg(long)]
    pub target: String,
    /// Label of the target in the results (direct, nginx, proxy).
    #[arg(long)]
    pub name: String,
    /// Scenario label copied into the results.
    #[arg(long, default_value = "")]
    pub scenario: String,
    #[arg(long, default_value_t = 0)]
    pub round: u32,
    /// Host header; default: the target's host:port.
    #[arg(long)]
    pub host: Option<String>,
    /// TLS server name (https and ws targets).
    #[arg(long)]
    pub server_name: Option<String>,
    /// CA certificate (PEM) trusted for the TLS server certificate.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "post")]
    pub mode: Mode,
    /// Request path in post mode: /mcp (JSON reply) or /mcp-sse (SSE-framed reply).
    #[arg(long, default_value = "/mcp")]
    pub path: String,
    #[arg(long, default_value_t = 1)]
    pub sessions: usize,
    #[arg(long, value_parser = crate::parse_duration, default_value = "1s")]
    pub warmup: Duration,
    #[arg(long, value_parser = crate::parse_duration, default_value = "5s")]
    pub duration: Duration,
    /// Events per second per stream (sse mode).
    #[arg(long, default_value_t = 10)]
    pub rate: u32,
    /// Open a new session after this many requests (0: never), so handshakes happen
    /// throughout the run (the reload and rotation scenario counts their failures).
    #[arg(long, default_value_t = 0)]
    pub reconnect_every: u64,
    /// Idle mode: session counts at which to read RSS, e.g. 1000,10000.
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<usize>,
    /// Process (with its children) whose RSS (idle mode) or CPU time per request (post
    /// mode) is read.
    #[arg(long)]
    pub pid: Option<u32>,
    /// LABEL=PID: also report this one process's CPU time per request (post and sse mode),
    /// without its children, as `cpu_us_per_req.LABEL`; repeatable. This is how the
    /// supervisor (`mcp-tunnel run`) and the cloudflared it spawned are told apart.
    #[arg(long = "cpu", value_parser = parse_cpu_pid)]
    pub cpu: Vec<(String, u32)>,
    /// Idle mode: wait this long after opening sessions before reading RSS.
    #[arg(long, value_parser = crate::parse_duration, default_value = "2s")]
    pub settle: Duration,
    /// Sessions opened concurrently while setting up.
    #[arg(long, default_value_t = 64)]
    pub connect_parallelism: usize,
    /// The WebSocket client for ws:// targets.
    #[arg(long, value_enum, default_value = "lean")]
    pub ws_client: WsClient,
}

fn parse_cpu_pid(s: &str) -> Result<(String, u32), String> {
    let (label, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("expected LABEL=PID, found {s:?}"))?;
    let pid = pid
        .parse()
        .map_err(|e| format!("{s:?}: PID {pid:?} is not a number: {e}"))?;
    if label.is_empty() {
        return Err(format!("{s:?}: empty label"));
    }
    Ok((label.to_owned(), pid))
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

enum Transport {
    Plain {
        addr: String,
    },
    Tls {
        addr: String,
        connector: TlsConnector,
        name: ServerName<'static>,
    },
    Edge {
        target: WsTarget,
        config: Arc<rustls::ClientConfig>,
        name: String,
    },
    LeanEdge {
        addr: String,
        /// Host header and request target of the upgrade.
        authority: String,
        path: String,
        connector: TlsConnector,
        name: ServerName<'static>,
    },
}

fn cert_id(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Option<u64> {
    let first = certs?.first()?;
    let mut h = DefaultHasher::new();
    first.as_ref().hash(&mut h);
    Some(h.finish())
}

impl Transport {
    fn new(args: &LoadArgs) -> anyhow::Result<Transport> {
        let (scheme, rest) = args
            .target
            .split_once("://")
            .ok_or_else(|| anyhow::anyhow!("--target needs a scheme: {}", args.target))?;
        let addr = rest.trim_end_matches('/').to_owned();
        let tls_config = || -> anyhow::Result<Arc<rustls::ClientConfig>> {
            let ca = args
                .ca
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("--ca is required for {scheme}://"))?;
            let mut roots = RootCertStore::empty();
            for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)? {
                roots.add(cert?)?;
            }
            let shared = mcp_tunnel::proxy::tls::client_config(roots, vec![b"http/1.1".to_vec()]);
            // Full handshakes only: a resumed session presents no certificate, so a rotated
            // certificate would go untested, and the edge's resumption behaviour is unknown.
            let mut config = (*shared).clone();
            config.resumption = rustls::client::Resumption::disabled();
            Ok(Arc::new(config))
        };
        let server_name = || {
            args.server_name
                .clone()
                .ok_or_else(|| anyhow::anyhow!("--server-name is required for {scheme}://"))
        };
        Ok(match scheme {
            "http" => Transport::Plain { addr },
            "https" => Transport::Tls {
                addr,
                connector: TlsConnector::from(tls_config()?),
                name: ServerName::try_from(server_name()?)?,
            },
            "ws" if args.ws_client == WsClient::Tungstenite => Transport::Edge {
                target: WsTarget::parse(&args.target).map_err(|e| anyhow::anyhow!(e))?,
                config: tls_config()?,
                name: server_name()?,
            },
            "ws" => {
                let uri: http::Uri = args.target.parse()?;
                let authority = uri
                    .authority()
                    .ok_or_else(|| anyhow::anyhow!("{} has no host", args.target))?;
                let host = authority
                    .host()
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                Transport::LeanEdge {
                    addr: format!("{host}:{}", authority.port_u16().unwrap_or(80)),
                    authority: authority.as_str().to_owned(),
                    path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
                    connector: TlsConnector::from(tls_config()?),
                    name: ServerName::try_from(server_name()?)?,
                }
            }
            other => anyhow::bail!("unsupported scheme {other}://"),
        })
    }

    /// Connects and completes every handshake; returns the stream and, for TLS, an id of
    /// the server certificate presented.
    async fn connect(&self) -> io::Result<(Box<dyn Io>, Option<u64>)> {
        match self {
            Transport::Plain { addr } => {
                let tcp = TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                Ok((Box::new(tcp), None))
            }
            Transport::Tls {
                addr,
                connector,
                name,
            } => {
                let tcp = TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                let tls = connector.connect(name.clone(), tcp).await?;
                let id = cert_id(tls.get_ref().1.peer_certificates());
                Ok((Box::new(tls), id))
            }
            Transport::Edge {
                target,
                config,
                name,
            } => {
                let tls = target.connect_tls(config.clone(), name).await?;
                let id = cert_id(tls.get_ref().1.peer_certificates());
                Ok((Box::new(tls), id))
            }
            Transport::LeanEdge {
                addr,
                authority,
                path,
                connector,
                name,
            } => {
                let tcp = TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                let ws = crate::ws::WsStream::handshake(tcp, authority, path).await?;
                let tls = connector.connect(name.clone(), ws).await?;
                let id = cert_id(tls.get_ref().1.peer_certificates());
                Ok((Box::new(tls), id))
            }
        }
    }
}

type Sender<B> = SendRequest<B>;

/// Opens one session: transport handshakes, then an HTTP/1.1 client connection over it.
async fn open<B>(transport: &Transport) -> io::Result<(Sender<B>, Option<u64>)>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connect = async {
        let (io, cert) = transport.connect().await?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((send, cert))
    };
    tokio::time::timeout(Duration::from_secs(15), connect)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "session setup timed out"))?
}

struct Shared {
    transport: Transport,
    host: String,
    path: String,
    rate: u32,
    reconnect_every: u64,
}

#[derive(Default)]
struct Tally {
    hist: Option<Histogram<u64>>,
    requests: u64,
    errors: u64,
    handshakes: u64,
    handshake_errors: u64,
    certs: HashSet<u64>,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            hist: Some(Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")),
            ..Default::default()
        }
    }

    fn error(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }

    fn handshake(&mut self, r: &io::Result<(Sender<Full<Bytes>>, Option<u64>)>) {
        self.handshakes += 1;
        match r {
            Ok((_, Some(id))) => {
                self.certs.insert(*id);
            }
            Ok(_) => {}
            Err(e) => {
                self.handshake_errors += 1;
                self.first_error.get_or_insert(format!("handshake: {e}"));
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        if let (Some(h), Some(o)) = (self.hist.as_mut(), other.hist.as_ref()) {
            h.add(o).expect("same bounds");
        }
        self.requests += other.requests;
        self.errors += other.errors;
        self.handshakes += other.handshakes;
        self.handshake_errors += other.handshake_errors;
        self.certs.extend(other.certs);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

fn tools_call(shared: &Shared, id: u64) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"echo","arguments":{{"message":"benchmark payload {id}"}}}}}}"#
    );
    Request::post(shared.path.as_str())
        .header(header::HOST, shared.host.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream")
        .body(Full::new(Bytes::from(body)))
        .expect("valid request")
}

/// One request; Ok(()) when the reply is a 200 carrying the answer to `id`.
async fn call(shared: &Shared, send: &mut Sender<Full<Bytes>>, id: u64) -> Result<(), String> {
    send.ready().await.map_err(|e| format!("connection: {e}"))?;
    let resp = send
        .send_request(tools_call(shared, id))
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    if status != StatusCode::OK {
        return Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ));
    }
    let needle = format!("\"id\":{id},");
    if !body.windows(needle.len()).any(|w| w == needle.as_bytes()) {
        return Err("reply does not answer the request id".into());
    }
    Ok(())
}

async fn post_worker(
    shared: Arc<Shared>,
    mut session: Option<Sender<Full<Bytes>>>,
    worker: u64,
    warm_end: Instant,
    end: Instant,
) -> Tally {
    let mut tally = Tally::new();
    let mut on_this = 0u64;
    let mut id = worker << 32;
    while Instant::now() < end {
        if session.is_none() || (shared.reconnect_every > 0 && on_this >= shared.reconnect_every) {
            let r = open(&shared.transport).await;
            tally.handshake(&r);
            match r {
                Ok((s, _)) => {
                    session = Some(s);
                    on_this = 0;
                }
                Err(_) => {
                    session = None;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let send = session.as_mut().expect("session opened above");
        id += 1;
        on_this += 1;
        let t0 = Instant::now();
        let r = call(&shared, send, id).await;
        let took = t0.elapsed();
        match r {
            Ok(()) => {
                if t0 >= warm_end && t0 < end {
                    tally.requests += 1;
                    if let Some(h) = tally.hist.as_mut() {
                        h.saturating_record(took.as_micros() as u64);
                    }
                }
            }
            Err(e) => {
                tally.error(e);
                session = None;
            }
        }
    }
    tally
}

/// New sessions back to back: each one timed from connect to its first answer.
async fn connect_worker(
    shared: Arc<Shared>,
    worker: u64,
    warm_end: Instant,
    end: Instant,
) -> Tally {
    let mut tally = Tally::new();
    let mut id = worker << 32;
    while Instant::now() < end {
        id += 1;
        let t0 = Instant::now();
        let r = open(&shared.transport).await;
        tally.handshake(&r);
        let Ok((mut send, _)) = r else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let r = call(&shared, &mut send, id).await;
        let took = t0.elapsed();
        // Dropping the sender closes the session.
        drop(send);
        match r {
            Ok(()) if t0 >= warm_end && t0 < end => {
                tally.requests += 1;
                if let Some(h) = tally.hist.as_mut() {
                    h.saturating_record(took.as_micros() as u64);
                }
            }
            Ok(()) => {}
            Err(e) => tally.error(e),
        }
    }
    tally
}

async fn sse_worker(
    shared: Arc<Shared>,
    permit: tokio::sync::OwnedSemaphorePermit,
    warm_end: Instant,
    end: Instant,
) -> Tally {
    let mut tally = Tally::new();
    let r = open::<Empty<Bytes>>(&shared.transport).await;
    tally.handshakes += 1;
    let mut send = match r {
        Ok((s, _)) => s,
        Err(e) => {
            tally.handshake_errors += 1;
            tally.first_error = Some(format!("handshake: {e}"));
            return tally;
        }
    };
    let req = Request::get(format!("/events?rate={}", shared.rate))
        .header(header::HOST, shared.host.as_str())
        .header(header::ACCEPT, "text/event-stream")
        .body(Empty::<Bytes>::new())
        .expect("valid request");
    let resp = match send.send_request(req).await {
        Ok(r) if r.status() == StatusCode::OK => r,
        Ok(r) => {
            tally.error(format!("status {}", r.status()));
            return tally;
        }
        Err(e) => {
            tally.error(format!("request: {e}"));
            return tally;
        }
    };
    // Set up: let the next stream open.
    drop(permit);
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = tokio::time::sleep_until(end.into()) => break,
        };
        let now = now_us();
        let at = Instant::now();
        let data = match frame {
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
            Some(Err(e)) => {
                tally.error(format!("stream: {e}"));
                break;
            }
            None => {
                tally.error("stream ended early".into());
                break;
            }
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..pos + 2).collect();
            let Some(t) = event_time(&event) else {
                tally.error("event without t_us".into());
                continue;
            };
            if at >= warm_end {
                tally.requests += 1;
                if let Some(h) = tally.hist.as_mut() {
                    h.saturating_record(now.saturating_sub(t));
                }
            }
        }
    }
    tally
}

fn event_time(event: &[u8]) -> Option<u64> {
    let key = b"\"t_us\":";
    let at = event.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: Vec<u8> = event[at..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// Resident set size in KiB of `pid` and its direct children (nginx's workers).
pub fn rss_tree_kib(pid: u32) -> u64 {
    let rss = |p: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{p}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    };
    let mut total = rss(pid);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // The parent pid is the second field after the parenthesised command name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok());
            if ppid == Some(pid) {
                total += rss(child);
            }
        }
    }
    total
}

/// CPU time (user + system) in clock ticks of `pid` alone (all its threads).
pub fn cpu_ticks(pid: u32) -> u64 {
    stat_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

/// utime + stime of a /proc/PID/stat line.
fn stat_cpu_ticks(stat: &str) -> u64 {
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    // utime and stime are fields 14 and 15 of stat(5); the rest starts at field 3.
    let at = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    at(11) + at(12)
}

/// CPU time (user + system) in clock ticks of `pid` and its direct children.
pub fn cpu_tree_ticks(pid: u32) -> u64 {
    cpu_ticks(pid) + children(pid).into_iter().map(cpu_ticks).sum::<u64>()
}

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // The parent pid is the second field after the parenthesised command name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok());
            if ppid == Some(pid) {
                out.push(child);
            }
        }
    }
    out
}

/// Clock ticks per second of /proc/PID/stat times (USER_HZ; 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// CPU time (user + system) in clock ticks of this process, all its threads. The load
/// generator shares the cores with its target, so what it spends is taken from the target:
/// a reader needs it beside the target's own figure, per target.
fn own_cpu_ticks() -> u64 {
    stat_cpu_ticks(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default())
}

/// CPU used by the target (`pid`, with children) and by this load generator over the
/// measured window, per request, in microseconds.
struct CpuWindow {
    pid: Option<u32>,
    target0: u64,
    own0: u64,
    /// `--cpu` processes: label, pid, ticks at the start.
    each0: Vec<(String, u32, u64)>,
}

impl CpuWindow {
    fn start(pid: Option<u32>, each: &[(String, u32)]) -> CpuWindow {
        let target0 = pid.map_or(0, cpu_tree_ticks);
        let each0 = each
            .iter()
            .map(|(label, p)| (label.clone(), *p, cpu_ticks(*p)))
            .collect();
        // Read last at the start and first at the end, so that the /proc scans for the
        // target's children fall outside the load generator's own window.
        CpuWindow {
            pid,
            target0,
            own0: own_cpu_ticks(),
            each0,
        }
    }

    fn stop(&self) -> CpuUsed {
        let own = own_cpu_ticks().saturating_sub(self.own0);
        CpuUsed {
            target: self
                .pid
                .map(|p| cpu_tree_ticks(p).saturating_sub(self.target0)),
            own,
            each: self
                .each0
                .iter()
                .map(|(label, p, t0)| (label.clone(), cpu_ticks(*p).saturating_sub(*t0)))
                .collect(),
        }
    }
}

struct CpuUsed {
    target: Option<u64>,
    own: u64,
    each: Vec<(String, u64)>,
}

fn per_request(ticks: u64, requests: u64) -> f64 {
    ticks as f64 / TICKS_PER_SEC * 1e6 / requests.max(1) as f64
}

impl CpuUsed {
    fn per_request(&self, requests: u64) -> (Option<f64>, f64) {
        (
            self.target.map(|t| per_request(t, requests)),
            per_request(self.own, requests),
        )
    }

    /// `{"label": µs per request, ...}` for the `--cpu` processes.
    fn each_per_request(&self, requests: u64) -> serde_json::Value {
        self.each
            .iter()
            .map(|(label, t)| (label.clone(), json!(per_request(*t, requests))))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

fn summary(args: &LoadArgs, tally: &Tally, measured: Duration) -> serde_json::Value {
    let h = tally.hist.as_ref().expect("histogram");
    let q = |p: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(p)
        }
    };
    json!({
        "scenario": args.scenario,
        "target": args.name,
        "round": args.round,
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "events_per_stream": args.rate,
        "path": args.path,
        "sessions": args.sessions,
        "seconds": measured.as_secs_f64(),
        "count": tally.requests,
        "rate": tally.requests as f64 / measured.as_secs_f64(),
        "p50_us": q(0.50),
        "p90_us": q(0.90),
        "p99_us": q(0.99),
        "max_us": if h.is_empty() { 0 } else { h.max() },
        "errors": tally.errors,
        "handshakes": tally.handshakes,
        "handshake_errors": tally.handshake_errors,
        "distinct_certs": tally.certs.len(),
        "first_error": tally.first_error,
    })
}

pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let transport = Transport::new(&args)?;
    let host = args.host.clone().unwrap_or_else(|| {
        args.target
            .split_once("://")
            .map_or(args.target.clone(), |(_, a)| {
                a.trim_end_matches('/').to_owned()
            })
    });
    let shared = Arc::new(Shared {
        transport,
        host,
        path: args.path.clone(),
        rate: args.rate,
        reconnect_every: args.reconnect_every,
    });
    match args.mode {
        Mode::Post => run_post(&args, shared).await,
        Mode::Sse => run_sse(&args, shared).await,
        Mode::Idle => run_idle(&args, shared).await,
        Mode::Connect => run_connect(&args, shared).await,
    }
}

/// Opens `n` sessions, `parallelism` at a time, each checked with one request.
async fn open_many(
    shared: &Arc<Shared>,
    n: usize,
    parallelism: usize,
    first_id: u64,
) -> (Vec<Sender<Full<Bytes>>>, Tally) {
    let gate = Arc::new(Semaphore::new(parallelism.max(1)));
    let mut set = JoinSet::new();
    for i in 0..n {
        let shared = shared.clone();
        let gate = gate.clone();
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore open");
            let r = open(&shared.transport).await;
            let mut tally = Tally::new();
            tally.handshake(&r);
            let Ok((mut send, _)) = r else {
                return (None, tally);
            };
            match call(&shared, &mut send, first_id + i as u64).await {
                Ok(()) => (Some(send), tally),
                Err(e) => {
                    tally.error(e);
                    (None, tally)
                }
            }
        });
    }
    let mut sessions = Vec::with_capacity(n);
    let mut tally = Tally::new();
    while let Some(joined) = set.join_next().await {
        let (send, t) = joined.expect("session task");
        sessions.extend(send);
        tally.merge(t);
    }
    (sessions, tally)
}

async fn run_post(args: &LoadArgs, shared: Arc<Shared>) -> anyhow::Result<()> {
    let (sessions, mut tally) =
        open_many(&shared, args.sessions, args.connect_parallelism, 1 << 40).await;
    let start = Instant::now();
    let warm_end = start + args.warmup;
    let end = warm_end + args.duration;
    let mut set = JoinSet::new();
    let mut sessions = sessions.into_iter();
    for worker in 0..args.sessions as u64 {
        let session = sessions.next();
        set.spawn(post_worker(shared.clone(), session, worker, warm_end, end));
    }
    // CPU is read at the ends of the measured window (warm-up excluded).
    tokio::time::sleep_until(warm_end.into()).await;
    let cpu = CpuWindow::start(args.pid, &args.cpu);
    tokio::time::sleep_until(end.into()).await;
    // The setup requests are not timed; their failures count.
    tally.hist = Some(Histogram::new_with_bounds(1, 120_000_000, 3)?);
    tally.requests = 0;
    let used = cpu.stop();
    while let Some(t) = set.join_next().await {
        tally.merge(t?);
    }
    let (target_cpu, own_cpu) = used.per_request(tally.requests);
    let mut out = summary(args, &tally, args.duration);
    out["target_cpu_us_per_req"] = json!(target_cpu);
    out["loadgen_cpu_us_per_req"] = json!(own_cpu);
    out["cpu_us_per_req"] = used.each_per_request(tally.requests);
    println!("{out}");
    Ok(())
}

async fn run_connect(args: &LoadArgs, shared: Arc<Shared>) -> anyhow::Result<()> {
    let start = Instant::now();
    let warm_end = start + args.warmup;
    let end = warm_end + args.duration;
    let mut set = JoinSet::new();
    for worker in 0..args.sessions as u64 {
        set.spawn(connect_worker(shared.clone(), worker, warm_end, end));
    }
    tokio::time::sleep_until(warm_end.into()).await;
    let cpu = CpuWindow::start(args.pid, &args.cpu);
    tokio::time::sleep_until(end.into()).await;
    let used = cpu.stop();
    let mut tally = Tally::new();
    while let Some(t) = set.join_next().await {
        tally.merge(t?);
    }
    let (target_cpu, own_cpu) = used.per_request(tally.requests);
    let mut out = summary(args, &tally, args.duration);
    out["target_cpu_us_per_req"] = json!(target_cpu);
    out["loadgen_cpu_us_per_req"] = json!(own_cpu);
    println!("{out}");
    Ok(())
}

async fn run_sse(args: &LoadArgs, shared: Arc<Shared>) -> anyhow::Result<()> {
    // Streams open during the warm-up; events count once it is over.
    let start = Instant::now();
    let warm_end = start + args.warmup;
    let end = warm_end + args.duration;
    let gate = Arc::new(Semaphore::new(args.connect_parallelism.max(1)));
    let mut set = JoinSet::new();
    for _ in 0..args.sessions {
        let shared = shared.clone();
        let gate = gate.clone();
        set.spawn(async move {
            let permit = gate.acquire_owned().await.expect("semaphore open");
            sse_worker(shared, permit, warm_end, end).await
        });
    }
    tokio::time::sleep_until(warm_end.into()).await;
    let cpu = CpuWindow::start(args.pid, &args.cpu);
    tokio::time::sleep_until(end.into()).await;
    let used = cpu.stop();
    let mut tally = Tally::new();
    while let Some(t) = set.join_next().await {
        tally.merge(t?);
    }
    if Instant::now() > end + Duration::from_secs(1) {
        eprintln!("warning: streams were still opening after the warm-up");
    }
    let (target_cpu, own_cpu) = used.per_request(tally.requests);
    let mut out = summary(args, &tally, args.duration);
    out["target_cpu_us_per_req"] = json!(target_cpu);
    out["loadgen_cpu_us_per_req"] = json!(own_cpu);
    out["cpu_us_per_req"] = used.each_per_request(tally.requests);
    println!("{out}");
    Ok(())
}

async fn run_idle(args: &LoadArgs, shared: Arc<Shared>) -> anyhow::Result<()> {
    let pid = args
        .pid
        .ok_or_else(|| anyhow::anyhow!("idle mode needs --pid"))?;
    let steps = if args.steps.is_empty() {
        vec![args.sessions]
    } else {
        args.steps.clone()
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = rss_tree_kib(pid);
    let mut held = Vec::new();
    let mut tally = Tally::new();
    for step in steps {
        let more = step.saturating_sub(held.len());
        let (sessions, t) = open_many(
            &shared,
            more,
            args.connect_parallelism,
            held.len() as u64 + 1,
        )
        .await;
        held.extend(sessions);
        tally.merge(t);
        tokio::time::sleep(args.settle).await;
        let rss = rss_tree_kib(pid);
        let open = held.len();
        let out = json!({
            "scenario": args.scenario,
            "target": args.name,
            "round": args.round,
            "mode": "idle",
            "sessions": step,
            "open": open,
            "rss_idle_kib": rss_idle,
            "rss_kib": rss,
            "per_session_kib": if open > 0 { (rss.saturating_sub(rss_idle)) as f64 / open as f64 } else { 0.0 },
            "errors": tally.errors,
            "handshakes": tally.handshakes,
            "handshake_errors": tally.handshake_errors,
            "first_error": tally.first_error,
        });
        println!("{out}");
    }
    drop(held);
    Ok(())
}
