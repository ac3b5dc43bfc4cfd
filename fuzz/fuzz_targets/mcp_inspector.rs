//! The MCP inspector (`mcp_tunnel::mcp`) on bytes shaped by the fuzzer. The first byte picks
//! what the rest is, the second how it is cut into chunks:
//!
//! ```text
//! byte 0 % 3 == 0: a client body   -> jsonrpc::parse, Policy::decide
//! byte 0 % 3 == 1: a server body   -> jsonrpc::parse, Policy::filter_tools_list
//! byte 0 % 3 == 2: an SSE stream   -> sse::Reader (chunks of byte 1 % 17 + 1), then each
//!                                     event's data as a server body
//! ```
//!
//! Besides "no panic", the policy is never bypassed, judged against serde_json's own `Value`
//! (last duplicate wins, as in JavaScript and Python): a body the policy forwards calls no
//! denied tool or method, and a filtered answer lists no hidden tool. The SSE reader hands
//! back every byte exactly once and gives the same events however the stream is cut.
#![no_main]

use libfuzzer_sys::fuzz_target;
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

fuzz_target!(|data: &[u8]| {
    let [mode, split, rest @ ..] = data else {
        return;
    };
    let policy = policy();
    match mode % 3 {
        0 => client_body(rest, &policy),
        1 => {
            server_body(rest, &policy);
        }
        _ => sse_stream(rest, usize::from(*split % 17) + 1, &policy),
    }
});
