//! `mcp-tunnel audit --since T`: the review of a window, before restoring service after an
//! incident. It reads what the service already wrote: its journal (`journalctl -o json`, the
//! real tool, so journald's own access rules apply) or a file of its JSON log lines
//! (`log_format = "json"`, the same keys). Each entry is read once, as a stream, and folded
//! into counts; only notable events (reloads, rotations, connector changes, refusals, sever)
//! are kept whole, in time order.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

/// At most this many notable events are listed; the rest are counted.
const MAX_EVENTS: usize = 500;

/// What `mcp-tunnel audit` was asked.
pub struct Options {
    /// Passed to `journalctl --since` as written ("2026-12-07 03:00", "2h ago", ...); with
    /// `file`, an RFC 3339 time or `YYYY-MM-DD HH:MM[:SS]` in UTC.
    pub since: String,
    pub until: Option<String>,
    pub unit: String,
    pub file: Option<PathBuf>,
    pub json: bool,
}

/// The review of one window.
#[derive(Debug, Default, serde::Serialize)]
pub struct Review {
    pub entries: u64,
    /// Unix microseconds of the first and last entry read.
    pub first: Option<u64>,
    pub last: Option<u64>,
    /// Requests per route: (requests, 5xx answers).
    pub routes: BTreeMap<String, (u64, u64)>,
    /// Requests and MCP messages per caller (`Cf-Connecting-Ip`).
    pub callers: BTreeMap<String, u64>,
    /// MCP messages by route, method, tool and outcome.
    pub mcp: BTreeMap<String, u64>,
    /// Refusals by what refused: the tool policy's reasons, the allowlist, the peer check,
    /// requests for no route.
    pub refusals: BTreeMap<String, u64>,
    /// Reloads, rotations, connector changes, sever, warnings and errors: time order.
    pub events: Vec<Event>,
    pub events_not_listed: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    /// Unix microseconds.
    pub at: u64,
    pub priority: u8,
    pub message: String,
}

fn field<'a>(e: &'a Value, key: &str) -> Option<&'a str> {
    e.get(key).and_then(Value::as_str)
}

impl Review {
    /// Folds one entry (a `journalctl -o json` object, or a JSON log line).
    pub fn add(&mut self, e: &Value) {
        let at = field(e, "__REALTIME_TIMESTAMP").and_then(|t| t.parse::<u64>().ok());
        self.entries += 1;
        if let Some(at) = at {
            self.first = Some(self.first.map_or(at, |f| f.min(at)));
            self.last = Some(self.last.map_or(at, |l| l.max(at)));
        }
        let message = field(e, "MESSAGE").unwrap_or("");
        let caller = field(e, "F_CALLER");
        match field(e, "TARGET").unwrap_or("") {
            "mcp_tunnel::access" => {
                let route = field(e, "F_ROUTE").unwrap_or("");
                let status: u16 = field(e, "F_STATUS")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let r = self
                    .routes
                    .entry(if route.is_empty() {
                        "(no route)".into()
                    } else {
                        route.into()
                    })
                    .or_default();
                r.0 += 1;
                if status >= 500 {
                    r.1 += 1;
                }
                if let Some(c) = caller {
                    *self.callers.entry(c.into()).or_default() += 1;
                }
                return;
            }
            "mcp_audit" => {
                let key = format!(
                    "{} {} {} {}",
                    field(e, "F_ROUTE").unwrap_or("?"),
                    field(e, "F_METHOD").unwrap_or("?"),
                    field(e, "F_TOOL").unwrap_or("-"),
                    field(e, "F_OUTCOME").unwrap_or("?"),
                );
                *self.mcp.entry(key).or_default() += 1;
                if field(e, "F_OUTCOME") == Some("denied") {
                    let reason = field(e, "F_REASON").unwrap_or("denied");
                    *self
                        .refusals
                        .entry(format!("mcp policy: {reason}"))
                        .or_default() += 1;
                }
                return;
            }
            _ => {}
        }
        let refusal = if message.starts_with("IP validation failed") {
            Some("upstream address not allowed (allowlist)")
        } else if message.starts_with("no route for host") {
            Some("no route for the host")
        } else if message.starts_with("refused listener connection") {
            // Rate-limited lines ("suppressed" counts the rest): a lower bound.
            Some("peer check (listener connections, rate-limited lines)")
        } else if message.starts_with("refused tunnel session") {
            Some("session limit")
        } else {
            None
        };
        if let Some(r) = refusal {
            *self.refusals.entry(r.into()).or_default() += 1;
        }
        let priority: u8 = field(e, "PRIORITY")
            .and_then(|p| p.parse().ok())
            .unwrap_or(6);
        let notable = priority <= 4
            || refusal.is_none()
                && [
                    "config reloaded",
                    "reloading",
                    "rotated",
                    "renewed",
                    "cloudflared connected",
                    "replac",
                    "sever",
                    "SEVER",
                    "shutting down",
                    "proxy listening",
                    "Registered tunnel connection",
                    "Unregistered tunnel connection",
                ]
                .iter()
                .any(|k| message.contains(k));
        if notable && refusal.is_none() {
            if self.events.len() < MAX_EVENTS {
                self.events.push(Event {
                    at: at.unwrap_or(0),
                    priority,
                    message: message.chars().take(300).collect(),
                });
            } else {
                self.events_not_listed += 1;
            }
        }
    }

    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let t = |us: Option<u64>| us.map_or("?".to_string(), time_text);
        let _ = writeln!(
            o,
            "{} entries from {} to {}",
            self.entries,
            t(self.first),
            t(self.last)
        );
        let _ = writeln!(o, "\nrequests per route (5xx):");
        for (route, (n, errors)) in &self.routes {
            let _ = writeln!(o, "  {route:<32} {n:>8} ({errors})");
        }
        let _ = writeln!(o, "\ncallers (Cf-Connecting-Ip):");
        for (caller, n) in &self.callers {
            let _ = writeln!(o, "  {caller:<32} {n:>8}");
        }
        let _ = writeln!(o, "\nMCP messages (route method tool outcome):");
        for (key, n) in &self.mcp {
            let _ = writeln!(o, "  {key:<60} {n:>8}");
        }
        let _ = writeln!(o, "\nrefusals:");
        for (what, n) in &self.refusals {
            let _ = writeln!(o, "  {what:<48} {n:>8}");
        }
        let _ = writeln!(o, "\nevents, in time order:");
        for e in &self.events {
            let _ = writeln!(o, "  {}  {}", time_text(e.at), e.message);
        }
        if self.events_not_listed > 0 {
            let _ = writeln!(o, "  ... and {} more", self.events_not_listed);
        }
        o
    }
}

fn time_text(us: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| us.to_string())
}

/// `--since` / `--until` for a file: RFC 3339, or `YYYY-MM-DD HH:MM[:SS]` in UTC; unix
/// microseconds.
fn parse_time(s: &str) -> Result<u64, String> {
    use time::format_description::well_known::Rfc3339;
    let t = time::OffsetDateTime::parse(s, &Rfc3339)
        .or_else(|_| plain_utc(s).ok_or(()))
        .map_err(|_| format!("{s:?}: expected an RFC 3339 time or YYYY-MM-DD HH:MM[:SS] (UTC)"))?;
    Ok((t.unix_timestamp_nanos() / 1000).max(0) as u64)
}

/// `YYYY-MM-DD HH:MM[:SS]`, read as UTC.
fn plain_utc(s: &str) -> Option<time::OffsetDateTime> {
    let (date, clock) = s.split_once(' ')?;
    let mut d = date.split('-').map(|p| p.parse::<i32>().ok());
    let (y, mo, day) = (d.next()??, d.next()??, d.next()??);
    let mut c = clock.split(':').map(|p| p.parse::<u8>().ok());
    let (h, mi) = (c.next()??, c.next()??);
    let sec = c.next().unwrap_or(Some(0))?;
    let date = time::Date::from_calendar_date(
        y,
        time::Month::try_from(u8::try_from(mo).ok()?).ok()?,
        u8::try_from(day).ok()?,
    )
    .ok()?;
    let clock = time::Time::from_hms(h, mi, sec).ok()?;
    Some(time::PrimitiveDateTime::new(date, clock).assume_utc())
}

/// Exit 0 with a review, 1 when the window holds no entries or the journal cannot be read
/// (the message says which), 2 on bad arguments.
pub fn main(opts: &Options) -> u8 {
    let mut review = Review::default();
    let result = match &opts.file {
        Some(path) => read_file(path, opts, &mut review),
        None => read_journal(opts, &mut review),
    };
    if let Err((code, msg)) = result {
        eprintln!("error: {msg}");
        return code;
    }
    if review.entries == 0 {
        let until = opts
            .until
            .as_deref()
            .map(|u| format!(" until {u}"))
            .unwrap_or_default();
        eprintln!(
            "no entries of {} since {}{until}: nothing was logged in that window (is the window right, and did the service run?)",
            opts.file.as_ref().map_or_else(
                || format!("unit {}", opts.unit),
                |p| p.display().to_string()
            ),
            opts.since
        );
        return 1;
    }
    if opts.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&review).unwrap_or_default()
        );
    } else {
        print!("{}", review.text());
    }
    0
}

fn read_file(
    path: &std::path::Path,
    opts: &Options,
    review: &mut Review,
) -> Result<(), (u8, String)> {
    let since = parse_time(&opts.since).map_err(|e| (2, format!("--since {e}")))?;
    let until = opts
        .until
        .as_deref()
        .map(parse_time)
        .transpose()
        .map_err(|e| (2, format!("--until {e}")))?;
    let f = std::fs::File::open(path).map_err(|e| (1, format!("{}: {e}", path.display())))?;
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| (1, format!("{}: {e}", path.display())))?;
        let Ok(e) = serde_json::from_str::<Value>(&line) else {
            continue; // not a JSON log line
        };
        let at = field(&e, "__REALTIME_TIMESTAMP").and_then(|t| t.parse::<u64>().ok());
        if at.is_some_and(|t| t < since || until.is_some_and(|u| t > u)) {
            continue;
        }
        review.add(&e);
    }
    Ok(())
}

fn read_journal(opts: &Options, review: &mut Review) -> Result<(), (u8, String)> {
    let mut cmd = Command::new("journalctl");
    cmd.args([
        "-u",
        &opts.unit,
        "-o",
        "json",
        "--no-pager",
        "--since",
        &opts.since,
    ]);
    if let Some(u) = &opts.until {
        cmd.args(["--until", u]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            (
                1,
                format!(
                    "cannot run journalctl: {e} (without a journal, read the JSON log with --file)"
                ),
            )
        })?;
    let stdout = child.stdout.take().expect("piped");
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if let Ok(e) = serde_json::from_str::<Value>(&line) {
            review.add(&e);
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| (1, format!("journalctl: {e}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let denied = stderr.contains("not seeing messages")
        || stderr.contains("insufficient permissions")
        || stderr.contains("Permission denied");
    if review.entries == 0 && denied {
        return Err((
            1,
            format!(
                "the journal of {} is not readable by this user: run as root or as a member of the systemd-journal or adm group ({})",
                opts.unit,
                stderr.trim()
            ),
        ));
    }
    if !out.status.success() {
        return Err((
            1,
            format!("journalctl failed ({}): {}", out.status, stderr.trim()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at: u64, target: &str, message: &str, fields: &[(&str, &str)]) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("__REALTIME_TIMESTAMP".into(), at.to_string().into());
        m.insert("TARGET".into(), target.into());
        m.insert("MESSAGE".into(), message.into());
        m.insert("PRIORITY".into(), "5".into());
        for (k, v) in fields {
            m.insert((*k).into(), (*v).into());
        }
        Value::Object(m)
    }

    #[test]
    fn counts_requests_callers_messages_refusals_and_keeps_events_in_order() {
        let mut r = Review::default();
        let access = |at, route, status, caller| {
            entry(
                at,
                "mcp_tunnel::access",
                "request completed",
                &[
                    ("F_ROUTE", route),
                    ("F_STATUS", status),
                    ("F_CALLER", caller),
                ],
            )
        };
        r.add(&entry(10, "mcp_tunnel::supervisor", "proxy listening", &[]));
        r.add(&access(11, "files", "200", "203.0.113.9"));
        r.add(&access(12, "files", "502", "203.0.113.9"));
        r.add(&access(13, "", "502", "198.51.100.2"));
        r.add(&entry(13, "mcp_tunnel::proxy", "no route for host", &[]));
        r.add(&entry(
            14,
            "mcp_audit",
            "mcp message",
            &[
                ("F_ROUTE", "files"),
                ("F_METHOD", "tools/call"),
                ("F_TOOL", "rm"),
                ("F_OUTCOME", "denied"),
                ("F_REASON", "tool_denied"),
            ],
        ));
        r.add(&entry(
            15,
            "mcp_tunnel::supervisor::reload",
            "config reloaded",
            &[],
        ));
        assert_eq!(r.entries, 7);
        assert_eq!((r.first, r.last), (Some(10), Some(15)));
        assert_eq!(r.routes["files"], (2, 1));
        assert_eq!(r.routes["(no route)"], (1, 1));
        assert_eq!(r.callers["203.0.113.9"], 2);
        assert_eq!(r.mcp["files tools/call rm denied"], 1);
        assert_eq!(r.refusals["mcp policy: tool_denied"], 1);
        assert_eq!(r.refusals["no route for the host"], 1);
        let events: Vec<&str> = r.events.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(events, ["proxy listening", "config reloaded"]);
    }

    #[test]
    fn times_for_files() {
        assert_eq!(parse_time("1970-01-01 00:00:10").unwrap(), 10_000_000);
        assert_eq!(parse_time("1970-01-01 00:01").unwrap(), 60_000_000);
        assert_eq!(parse_time("1970-01-01T00:00:01Z").unwrap(), 1_000_000);
        assert!(parse_time("yesterday").is_err());
    }
}
