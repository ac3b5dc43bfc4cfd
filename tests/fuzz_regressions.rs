//! Regressions for what the fuzz targets (fuzz/) found or check, replayed as plain tests so
//! that `cargo test` keeps them fixed without a fuzzing toolchain.

use std::path::Path;

use mcp_tunnel::config::Config;

fn parse(routes: &str) -> Result<Config, mcp_tunnel::config::ConfigError> {
    let text = format!(
        "tunnel_domain = \"tunnel.test\"\n[tls]\ncert_file = \"tls.crt\"\nkey_file = \"tls.key\"\n[routes]\n{routes}"
    );
    Config::parse(Path::new("/etc/mcp-tunnel/mcp-tunnel.toml"), &text)
}

/// config_loader invariant "every route is reached by its hostname": a bare key whose full
/// name is also a key was accepted, and the exact key silently took all its traffic.
#[test]
fn a_bare_key_shadowed_by_its_full_name_is_refused() {
    let err =
        parse("echo = \"http://10.0.0.1:1\"\n\"Echo.Tunnel.Test.\" = \"http://10.0.0.2:1\"\n")
            .unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert_eq!(err.problems[0].field, "routes.echo");
    assert!(err.problems[0].message.contains("unreachable"), "{err}");
    assert!(
        err.problems[0].message.contains("\"echo.tunnel.test\""),
        "{err}"
    );

    // Multi-label keys too: `a.b` is reached as a.b.tunnel.test.
    let err =
        parse("\"a.b\" = \"http://10.0.0.1:1\"\n\"a.b.tunnel.test\" = \"http://10.0.0.2:1\"\n")
            .unwrap_err();
    assert_eq!(err.problems[0].field, "routes.a.b", "{err}");
}

/// config_loader invariant "route hosts lie under the tunnel domain": a key that merely
/// ended with the domain's text (`xtunnel.test`) was taken as already being under it.
#[test]
fn route_hosts_respect_label_boundaries_and_each_reaches_its_route() {
    let config = parse(
        "\"xtunnel.test\" = \"http://10.0.0.1:1\"\n\"tunnel.test\" = \"http://10.0.0.1:2\"\n\"a.tunnel.test\" = \"http://10.0.0.1:3\"\necho = \"http://10.0.0.1:4\"\n\"a.b\" = \"http://10.0.0.1:5\"\n",
    )
    .unwrap();
    let hosts = config.route_hosts();
    let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "a.b",
            "a.tunnel.test",
            "echo",
            "tunnel.test",
            "xtunnel.test"
        ]
    );
    assert_eq!(
        hosts,
        [
            "a.b.tunnel.test",
            "a.tunnel.test",
            "echo.tunnel.test",
            "tunnel.test",
            "xtunnel.test.tunnel.test"
        ]
    );
    let table = config.route_table();
    for (name, host) in names.iter().zip(&hosts) {
        assert_eq!(table.lookup(host).map(|r| r.name.as_str()), Some(*name));
    }
}

/// mcp_inspector invariant "bounded memory": the SSE reader held more than its bound for an
/// event of CRLF lines, because the LF of each CRLF did not count towards the event's size.
#[test]
fn sse_reader_counts_every_byte_towards_its_bound() {
    use mcp_tunnel::mcp::sse::{Piece, Reader};
    let stream = "data: x\r\n".repeat(1000);
    for chunk in [1, 4, 9, 1000] {
        let mut r = Reader::new(256, true);
        let mut out = Vec::new();
        for c in stream.as_bytes().chunks(chunk) {
            r.push(c, &mut out);
            assert!(
                r.pending().len() <= 256,
                "chunk {chunk}: {}",
                r.pending().len()
            );
        }
        assert!(matches!(out[0], Piece::Uninspected { first: true, .. }));
    }
}
