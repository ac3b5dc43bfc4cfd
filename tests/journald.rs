//! The real binary logging to journald (`log_format = "auto"`, stderr the journal stream)
//! with a journal socket of the test's own, bind-mounted at /run/systemd/journal in a private
//! mount namespace (`unshare -m`; as root). The socket is not read while requests run: a
//! journal that stopped reading must not stop the tunnel. Then it is read, and every audit
//! record the service made is accounted for.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use mcp_tunnel::proxy::edge::WsTarget;

use common::{TestPki, full};

const BIN: &str = env!("CARGO_BIN_EXE_mcp-tunnel");

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A journal entry in the native protocol, as (name, value) pairs.
fn fields(mut e: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Some(nl) = e.iter().position(|b| *b == b'\n') {
        let line = &e[..nl];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            out.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            e = &e[nl + 1..];
        } else {
            let len = u64::from_le_bytes(e[nl + 1..nl + 9].try_into().unwrap()) as usize;
            out.push((
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(&e[nl + 9..nl + 9 + len]).into_owned(),
            ));
            e = &e[nl + 10 + len..];
        }
    }
    out
}

fn field<'a>(f: &'a [(String, String)], name: &str) -> Option<&'a str> {
    f.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// Reads entries until one has MESSAGE starting with `message`; returns it.
fn wait_for(journal: &UnixDatagram, message: &str) -> Vec<(String, String)> {
    let mut buf = vec![0u8; 256 * 1024];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        journal
            .set_read_timeout(Some(
                deadline
                    .checked_duration_since(Instant::now())
                    .expect("the entry never arrived"),
            ))
            .unwrap();
        let n = journal.recv(&mut buf).unwrap_or_else(|e| {
            panic!("no journal entry starting {message:?}: {e}");
        });
        let f = fields(&buf[..n]);
        if field(&f, "MESSAGE").is_some_and(|m| m.starts_with(message)) {
            return f;
        }
    }
}

async fn metrics(admin: &str) -> String {
    let stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    let (mut send, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/metrics")
        .header("host", admin)
        .body(full(""))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} not in /metrics"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_that_stops_reading_stalls_no_request_and_every_audit_record_is_counted() {
    let pki = TestPki::new();
    let up = common::upstream(|req: Request<Incoming>| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let answer =
            serde_json::json!({"jsonrpc": "2.0", "id": v["id"], "result": {"content": []}});
        Response::builder()
            .header("content-type", "application/json")
            .body(full(answer.to_string()))
            .unwrap()
    })
    .await;
    let text = common::config_text(
        &pki,
        "",
        &format!("audited = {{ upstream = \"http://{up}\", inspect = true }}\n"),
        "allowed_ips = [\"127.0.0.0/8\"]",
    )
    .replace(
        "[admin]\nenabled = false",
        "[admin]\nenabled = true\nlisten_addr = \"127.0.0.1:0\"",
    );
    let config = pki.path("journald.toml");
    std::fs::write(&config, text).unwrap();
    let dir = pki.path("journal");
    std::fs::create_dir(&dir).unwrap();
    let journal = UnixDatagram::bind(dir.join("socket")).unwrap();
    let stderr_path = pki.path("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = std::fs::metadata(&stderr_path).unwrap();
    // The journal socket at its real path, in a mount namespace of the child's own: a tmpfs
    // over /run (nothing of the host's /run is touched) with the test's folder bound in.
    let script = format!(
        "set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/systemd/journal; mount --bind '{}' /run/systemd/journal; exec \"$0\" \"$@\"",
        dir.display()
    );
    let child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script, BIN])
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(stderr)
        .stdout(Stdio::null())
        .spawn()
        .expect("unshare (util-linux) runs the service in a mount namespace of its own");
    let _running = Running(child);
    let listening = wait_for(&journal, "proxy listening");
    let listen = field(&listening, "F_LISTEN").unwrap().to_string();
    let admin_entry = wait_for(&journal, "admin endpoint listening");
    let admin = field(&admin_entry, "F_LISTEN").unwrap().to_string();
    assert_eq!(field(&listening, "SYSLOG_IDENTIFIER"), Some("mcp-tunnel"));
    assert_eq!(field(&listening, "PRIORITY"), Some("5"));

    // From here the journal is not read: its socket queue (net.unix.max_dgram_qlen) fills
    // after a few entries, and every further send would block a blocking sender.
    let target = WsTarget::parse(&format!("ws://{listen}")).unwrap();
    let host = "audited.tunnel.test";
    const SESSIONS: usize = 4;
    const CALLS: usize = 250;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..SESSIONS {
        let tls = mcp_tunnel::proxy::tls::client_config(pki.roots(), vec![b"http/1.1".to_vec()]);
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let stream = target.connect_tls(tls, host).await.unwrap();
            let (mut send, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
            tokio::spawn(conn);
            for i in 0..CALLS {
                let id = s * CALLS + i;
                let body = format!(
                    r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"echo","arguments":{{}}}}}}"#
                );
                let req = Request::post("/mcp")
                    .header("host", host)
                    .header("content-type", "application/json")
                    .header("accept", "application/json, text/event-stream")
                    .body(full(Bytes::from(body)))
                    .unwrap();
                send.ready().await.unwrap();
                let resp = send.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.unwrap();
            }
        }));
    }
    let all = async {
        for t in tasks {
            t.await.unwrap();
        }
    };
    // Generous: a service that blocks on the journal never finishes while it is unread.
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("requests stalled while the journal was not read");
    let took = started.elapsed();
    let before = metrics(&admin).await;
    eprintln!(
        "{} tools/call in {took:?} with the journal unread; journald written/dropped while unread: audit {}/{}, access {}/{}",
        SESSIONS * CALLS,
        sample(
            &before,
            r#"mcp_tunnel_log_lines_written_total{sink="journald",kind="audit"}"#
        ),
        sample(
            &before,
            r#"mcp_tunnel_log_lines_dropped_total{sink="journald",kind="audit"}"#
        ),
        sample(
            &before,
            r#"mcp_tunnel_log_lines_written_total{sink="journald",kind="access"}"#
        ),
        sample(
            &before,
            r#"mcp_tunnel_log_lines_dropped_total{sink="journald",kind="access"}"#
        ),
    );

    // The journal reads again: everything held arrives. Count what arrives per target.
    let mut buf = vec![0u8; 256 * 1024];
    let (mut audit, mut access) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(30);
    let expected = (SESSIONS * CALLS) as u64;
    journal
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // Read until both counts are whole (or 30 s), then whatever else comes: each is exact.
    loop {
        let whole = audit >= expected && access >= expected;
        if !whole && Instant::now() >= deadline {
            break;
        }
        match journal.recv(&mut buf) {
            Ok(n) => match field(&fields(&buf[..n]), "TARGET") {
                Some("mcp_audit") => audit += 1,
                Some("mcp_tunnel::access") => access += 1,
                _ => {}
            },
            Err(_) if whole => break,
            Err(_) => {}
        }
    }
    let m = metrics(&admin).await;
    let records = sample(&m, "mcp_tunnel_audit_records_total");
    let written = sample(
        &m,
        r#"mcp_tunnel_log_lines_written_total{sink="journald",kind="audit"}"#,
    );
    let dropped = sample(
        &m,
        r#"mcp_tunnel_log_lines_dropped_total{sink="journald",kind="audit"}"#,
    );
    assert_eq!(records, expected, "one audit record per tools/call");
    assert_eq!(
        records,
        written + dropped,
        "every audit record is written or counted as dropped"
    );
    assert_eq!(
        audit, written,
        "what the journal got is what was counted written"
    );
    // 1,000 requests' entries fit in the queue (8 MiB): none was dropped, all were held.
    assert_eq!((dropped, audit, access), (0, expected, expected));
}
