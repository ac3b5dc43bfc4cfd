//! The MCP inspector (`mcp_tunnel::mcp`) on bytes shaped by the fuzzer. The first byte picks
//! what the rest is, the second how it is cut into chunks:
//!
//! ```text
//! byte 0 % 4 == 0: a client body   -> jsonrpc::parse, Policy::decide
//! byte 0 % 4 == 1: a server body   -> jsonrpc::parse, Policy::filter_tools_list
//! byte 0 % 4 == 2: an SSE stream   -> sse::Reader (chunks of byte 1 % 17 + 1), then each
//!                                     event's data as a server body
//! byte 0 % 4 == 3: a client body with the 2026-07-28 standard headers -> headers::check
//! ```
//!
//! For the headers: taken from the reference reading of the body, `check` never calls them
//! a disagreement about that name; with `Mcp-Name` naming anything else, `check` never lets
//! the body pass (byte 1 picks the plain or the `=?base64?...?=` form).
//!
//! Besides "no panic", the policy is never bypassed, judged against serde_json's own `Value`
//! (last duplicate wins, as in JavaScript and Python): a body the policy forwards calls no
//! denied tool or method, and a filtered answer lists no hidden tool. The SSE reader hands
//! back every byte exactly once and gives the same events however the stream is cut.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_tunnel::mcp::headers::{self, Problem};
use mcp_tunnel::mcp::jsonrpc::{MAX_LOGGED_LEN, Options, parse};
use mcp_tunnel::mcp::sse::{Piece, Reader, rewrite_event};
use mcp_tunnel::mcp::{Decision, Pattern, Policy};
use serde_json::Value;

fn policy() -> Policy {
    let p = |s: &str| Pattern::parse(s).expect("static pattern");
    Policy {
        tools_allow: None,
        tools_deny: vec![p("get-env"), p("admin*"), p("d?l*")],
        methods_deny: vec![p("resources/*"), p("prompts/get")],
    }
}

fn messages(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        one => vec![one],
    }
}

/// Whether the reference reading of a client body calls something the policy denies.
fn calls_denied(body: &[u8], policy: &Policy) -> Option<bool> {
    let v: Value = serde_json::from_slice(body).ok()?;
    Some(messages(v).iter().any(|m| {
        let Some(method) = m.get("method").and_then(Value::as_str) else {
            return false;
        };
        !policy.allows_method(method)
            || (method == "tools/call"
                && m.get("params")
                    .and_then(|p| p.get("name"))
                    .and_then(Value::as_str)
                    .is_none_or(|n| !policy.allows_tool(n)))
    }))
}

/// Whether the reference reading of a server body lists a tool the policy hides.
fn lists_hidden(body: &[u8], policy: &Policy) -> Option<bool> {
    let v: Value = serde_json::from_slice(body).ok()?;
    Some(messages(v).iter().any(|m| {
        m.is_object()
            && m.get("method").is_none()
            && m.get("result")
                .and_then(|r| r.get("tools"))
                .and_then(Value::as_array)
                .is_some_and(|tools| {
                    tools.iter().any(|t| {
                        t.get("name")
                            .and_then(Value::as_str)
                            .is_none_or(|n| !policy.allows_tool(n))
                    })
                })
    }))
}

fn client_body(body: &[u8], policy: &Policy) {
    let Ok(parsed) = parse(body, Options { arg_names: true }) else {
        return; // refused: fail closed
    };
    for m in &parsed.messages {
        if let Some(id) = &m.id {
            assert!(id.for_log().chars().count() <= MAX_LOGGED_LEN + 5);
        }
        if let Some(names) = &m.params.arg_names {
            assert!(names.len() <= mcp_tunnel::mcp::jsonrpc::MAX_ARG_NAMES);
        }
    }
    if policy.decide(&parsed) == Decision::Forward {
        assert_ne!(
            calls_denied(body, policy),
            Some(true),
            "forwarded a denied call: {:?}",
            String::from_utf8_lossy(body)
        );
    }
}

/// Returns the body the client would get (filtered), if the inspector could read it.
fn server_body(body: &[u8], policy: &Policy) -> Option<Vec<u8>> {
    let parsed = parse(body, Options::default()).ok()?;
    match policy.filter_tools_list(body, &parsed) {
        Ok(Some((out, _hidden))) => {
            assert_eq!(lists_hidden(&out, policy), Some(false), "filtered answer lists a hidden tool");
            Some(out)
        }
        Ok(None) => {
            assert_ne!(
                lists_hidden(body, policy),
                Some(true),
                "unfiltered answer lists a hidden tool: {:?}",
                String::from_utf8_lossy(body)
            );
            Some(body.to_vec())
        }
        // The proxy replaces what it cannot filter.
        Err(_) => None,
    }
}

fn read_sse(data: &[u8], chunk: usize) -> (Vec<Piece>, Vec<u8>) {
    let mut r = Reader::new(256, true);
    let mut out = Vec::new();
    for c in data.chunks(chunk) {
        r.push(c, &mut out);
    }
    assert!(r.pending().len() <= 256 + chunk, "held more than one bounded event");
    let rest = r.take_pending();
    (out, rest)
}

fn sse_stream(data: &[u8], chunk: usize, policy: &Policy) {
    let (pieces, rest) = read_sse(data, chunk);
    let mut again: Vec<u8> = Vec::new();
    for p in &pieces {
        match p {
            Piece::Event(e) => again.extend_from_slice(&e.raw),
            Piece::Uninspected { bytes, .. } => again.extend_from_slice(bytes),
        }
    }
    again.extend_from_slice(&rest);
    assert_eq!(again, data, "every byte handed back exactly once");
    let (whole, _) = read_sse(data, data.len().max(1));
    let events = |ps: &[Piece]| -> Vec<(Vec<u8>, bool)> {
        ps.iter()
            .filter_map(|p| match p {
                Piece::Event(e) => Some((e.data.clone(), e.has_data)),
                Piece::Uninspected { .. } => None,
            })
            .collect()
    };
    assert_eq!(events(&pieces), events(&whole), "events depend on how the stream is cut");
    for p in pieces {
        let Piece::Event(e) = p else { continue };
        if !e.has_data {
            continue;
        }
        let Some(sent) = server_body(&e.data, policy) else {
            continue;
        };
        if sent != e.data && !sent.contains(&b'\n') && !sent.contains(&b'\r') {
            // The rewritten event reads back as exactly the filtered data.
            let rewritten = rewrite_event(&e.raw, &sent);
            let (back, rest) = read_sse(&rewritten, rewritten.len());
            assert!(rest.is_empty());
            let datas: Vec<Vec<u8>> = back
                .into_iter()
                .filter_map(|p| match p {
                    Piece::Event(ev) if ev.has_data => Some(ev.data),
                    _ => None,
                })
                .collect();
            assert_eq!(datas, [sent]);
        }
    }
}

/// The `Mcp-Name` value a client sends for `name`: plain when it may be, else (or when asked)
/// the base64 form.
fn encoded(name: &str, base64: bool) -> String {
    use base64::Engine;
    let plain = !name.is_empty()
        && name.bytes().all(|b| (0x21..=0x7e).contains(&b))
        && !(name.starts_with("=?base64?") && name.ends_with("?="));
    if plain && !base64 {
        name.to_string()
    } else {
        format!("=?base64?{}?=", base64::engine::general_purpose::STANDARD.encode(name))
    }
}

fn with_headers(body: &[u8], base64: bool) {
    let Ok(parsed) = parse(body, Options::default()) else {
        return;
    };
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let Some(method) = m.get("method").and_then(Value::as_str) else {
        return;
    };
    let field = match headers::name_source(method) {
        Some(headers::NameField::Name) => "name",
        Some(headers::NameField::Uri) => "uri",
        Some(headers::NameField::TaskId) => "taskId",
        None => return,
    };
    let params = m.get("params");
    let Some(name) = params.and_then(|p| p.get(field)).and_then(Value::as_str) else {
        return;
    };
    let version = params
        .and_then(|p| p.get("_meta"))
        .and_then(|m| m.get("io.modelcontextprotocol/protocolVersion"))
        .and_then(Value::as_str);
    let build = |name_value: &str| {
        let mut h = http::HeaderMap::new();
        let value = |v: &str| http::HeaderValue::from_str(v).ok();
        if let Some(v) = value(method) {
            h.insert("mcp-method", v);
        }
        if let Some(v) = version.and_then(value) {
            h.insert("mcp-protocol-version", v);
        }
        if let Some(v) = value(&encoded(name_value, base64)) {
            h.insert("mcp-name", v);
        }
        h
    };
    if let Err(e) = headers::check(&build(name), &parsed) {
        assert!(
            !(e.header == "Mcp-Name" && matches!(e.problem, Problem::Differs | Problem::Invalid)),
            "the body's own name called a mismatch: {e:?} for {:?}",
            String::from_utf8_lossy(body)
        );
    }
    let other = format!("{name}x");
    assert!(
        headers::check(&build(&other), &parsed).is_err(),
        "an Mcp-Name other than the body's passed: {:?}",
        String::from_utf8_lossy(body)
    );
}

fuzz_target!(|data: &[u8]| {
    let [mode, split, rest @ ..] = data else {
        return;
    };
    let policy = policy();
    match mode % 4 {
        0 => client_body(rest, &policy),
        1 => {
            server_body(rest, &policy);
        }
        2 => sse_stream(rest, usize::from(*split % 17) + 1, &policy),
        _ => with_headers(rest, split % 2 == 1),
    }
});
