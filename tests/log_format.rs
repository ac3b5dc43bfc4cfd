//! `log_format`: the real binary's stderr with `"json"` (one JSON object per line, the
//! journal's field names) and with `"text"`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TestPki;

const BIN: &str = env!("CARGO_BIN_EXE_mcp-tunnel");

/// Runs the appliance with `log_format = FORMAT` until it logs "proxy listening", stops it
/// with SIGTERM and returns every stderr line and the listen address.
fn run_and_stop(format: &str) -> (Vec<String>, String) {
    let pki = TestPki::new();
    // Port 0: the address the listener bound is read from the "proxy listening" line.
    let text = common::config_text(
        &pki,
        &format!("log_format = \"{format}\""),
        "echo = \"http://10.0.0.5:9000\"",
        "",
    );
    let path = pki.path("log.toml");
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            let _ = tx.send(line.clone());
            lines.push(line);
        }
        lines
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let listen = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("no \"proxy listening\" line on stderr");
        if line.contains("proxy listening") {
            break listen_of(&line);
        }
    };
    // The logged address is the one bound: port 0 resolved, and something listens there.
    assert!(!listen.ends_with(":0"), "{listen}");
    std::net::TcpStream::connect(&listen).expect("the logged listen address accepts");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    (reader.join().unwrap(), listen)
}

/// The bound address in a "proxy listening" line: `F_LISTEN` (JSON) or `listen=` (text).
fn listen_of(line: &str) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        return v["F_LISTEN"].as_str().unwrap_or_default().to_string();
    }
    let at = line.find("listen=").expect("a listen= field") + "listen=".len();
    line[at..].split_whitespace().next().unwrap().to_string()
}

#[test]
fn json_logs_are_one_object_per_line_with_the_journal_fields() {
    let (lines, listen) = run_and_stop("json");
    assert!(lines.len() >= 4, "{lines:?}");
    let mut seen = Vec::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        for key in [
            "MESSAGE",
            "PRIORITY",
            "TARGET",
            "SYSLOG_IDENTIFIER",
            "__REALTIME_TIMESTAMP",
        ] {
            assert!(v[key].is_string(), "{key} missing in {line}");
        }
        seen.push(v);
    }
    let listening = seen
        .iter()
        .find(|v| v["MESSAGE"] == "proxy listening")
        .expect("a proxy listening entry");
    assert_eq!(listening["F_LISTEN"], listen.as_str());
    assert_eq!(listening["F_ROUTES"], "1");
    assert_eq!(listening["PRIORITY"], "5");
    let route = seen
        .iter()
        .find(|v| v["MESSAGE"] == "route configured")
        .expect("a route configured entry");
    assert_eq!(route["F_ROUTE"], "echo");
    assert_eq!(route["F_UPSTREAM"], "http://10.0.0.5:9000");
    assert!(
        seen.iter().any(|v| v["MESSAGE"] == "drained cleanly"),
        "{lines:?}"
    );
}

#[test]
fn text_logs_stay_text() {
    let (lines, listen) = run_and_stop("text");
    let listening = lines
        .iter()
        .find(|l| l.contains("proxy listening"))
        .unwrap();
    assert!(
        serde_json::from_str::<serde_json::Value>(listening).is_err(),
        "{listening}"
    );
    assert!(
        listening.contains(&format!("listen={listen}")),
        "{listening}"
    );
}
