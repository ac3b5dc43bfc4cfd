//! Route matching and the parsers next to it, on text the fuzzer shapes line by line:
//!
//! ```text
//! line 1: tunnel_domain ("" for none)
//! line 2: an incoming Host / :authority / SNI value
//! line 3: an upstream value for Upstream::parse
//! line 4: an allowed_ips entry for parse_entry
//! line 5: an address for IpPolicy
//! rest:   route keys
//! ```
//!
//! Besides "no panic", it checks invariants that must hold for every input: case and a
//! port never change the decision, a found route is the exact name or the name under the
//! tunnel domain, and parsed values survive a print-and-parse round trip.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use mcp_tunnel::config::ipset::{IpPolicy, parse_entry};
use mcp_tunnel::config::routes::{Route, RouteTable, Upstream, normalize_host, normalize_name};

fn valid_key(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn name_of(table: &RouteTable, host: &str) -> Option<String> {
    table.lookup(host).map(|r| r.name.clone())
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let domain = lines.next().unwrap_or("");
    let host = lines.next().unwrap_or("");
    let upstream = lines.next().unwrap_or("");
    let entry = lines.next().unwrap_or("");
    let addr = lines.next().unwrap_or("");

    let up = Upstream::parse("http://127.0.0.1:9").expect("static upstream");
    let mut routes: Vec<Route> = Vec::new();
    for key in lines {
        let name = normalize_name(key);
        if valid_key(&name) && !routes.iter().any(|r| r.name == name) {
            routes.push(Route {
                name,
                upstream: up.clone(),
                preserve_host: false,
                mcp: Default::default(),
            });
        }
    }
    let names: Vec<String> = routes.iter().map(|r| r.name.clone()).collect();
    let domain = (!domain.is_empty()).then_some(domain);
    let table = RouteTable::new(routes, domain);

    // The decision.
    let got = name_of(&table, host);
    assert_eq!(
        got,
        name_of(&table, &host.to_ascii_uppercase()),
        "case changed the decision"
    );
    assert_eq!(
        got,
        name_of(&table, &host.to_ascii_lowercase()),
        "case changed the decision"
    );
    let plain = !host.contains([':', '[', ']']) && !host.chars().any(char::is_whitespace);
    if plain {
        assert_eq!(
            got,
            name_of(&table, &format!("{host}:443")),
            "a port changed the decision"
        );
        if !host.ends_with('.') {
            assert_eq!(
                got,
                name_of(&table, &format!("{host}.")),
                "a trailing dot changed it"
            );
        }
    }
    if let Some(name) = &got {
        let n = normalize_host(host);
        let d = domain.map(normalize_name).unwrap_or_default();
        assert!(
            n == *name || (!d.is_empty() && n == format!("{name}.{d}")),
            "{host:?} matched {name:?} by neither rule"
        );
    }
    for name in &names {
        assert_eq!(
            name_of(&table, name).as_deref(),
            Some(name.as_str()),
            "key not found by itself"
        );
    }

    // Upstream values round-trip through their display form.
    if let Ok(u) = Upstream::parse(upstream) {
        assert_eq!(
            Upstream::parse(&u.to_string()),
            Ok(u.clone()),
            "upstream round trip"
        );
        assert!(u.port != 0);
    }

    // allowed_ips entries and the address policy.
    if let Ok(net) = parse_entry(entry) {
        assert_eq!(parse_entry(&net.to_string()), Ok(net), "entry round trip");
        let policy = IpPolicy::Allow(vec![net]);
        // A network allows its own base address, unless that base is a never-legitimate
        // address (0.0.0.0, multicast, ...) that a wider entry does not name explicitly.
        let special = mcp_tunnel::config::ipset::NEVER_LEGITIMATE.iter().any(|r| {
            r.parse::<ipnet::IpNet>()
                .is_ok_and(|r| r.contains(&net.network()) && !r.contains(&net))
        });
        assert!(
            special || policy.allows(net.network()),
            "a network excludes its own base address"
        );
        if let Ok(ip) = addr.trim().parse::<IpAddr>() {
            let allowed = policy.allows(ip);
            assert_eq!(
                allowed,
                policy.allows(ip.to_canonical()),
                "mapped form judged differently"
            );
            assert_eq!(policy.check_all(&[ip]).is_ok(), allowed);
        }
    }
});
