//! Property tests: route matching and the upstream address policy agree with reference
//! models written here from the documented rules, for generated hostnames, route tables,
//! addresses and allowlists. `mcp-tunnel explain` is driven with the same inputs and must
//! agree with the data path (`RouteTable::lookup`, `IpPolicy::allows` / `check_all` and
//! `upstream::resolve_checked`) on every case.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use mcp_tunnel::config::ipset::{IpPolicy, parse_entry};
use mcp_tunnel::config::routes::{Route, RouteTable, Upstream};
use mcp_tunnel::doctor::explain::{Explainer, Explanation};
use mcp_tunnel::proxy::upstream::{self, BoxFuture, ConnectError, Resolve};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// `explain`, driven like the data path
// ---------------------------------------------------------------------------------------

/// DNS that answers every name with the same addresses.
struct Fixed(Vec<IpAddr>);

impl Resolve for Fixed {
    fn resolve(&self, _host: &str, port: u16) -> BoxFuture<std::io::Result<Vec<SocketAddr>>> {
        let addrs = self.0.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
        Box::pin(async move { Ok(addrs) })
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn explain(table: &RouteTable, policy: &IpPolicy, dns: &[IpAddr], input: &str) -> Explanation {
    let e = Explainer::new(table.clone(), policy.clone(), Arc::new(Fixed(dns.to_vec())));
    block_on(e.explain(input))
}

/// `explain` for `host` (as a bare Host value, and inside a URL when it forms one) names the
/// route the data path's lookup finds, and would forward exactly when a route matched (the
/// table's upstream is an allowed literal address).
fn explain_agrees_on_route(t: &RouteTable, host: &str) -> Result<(), TestCaseError> {
    let want = t.lookup(host).map(|r| r.name.clone());
    let mut inputs = vec![host.to_string()];
    let url = format!("https://{host}/mcp?x=1");
    if url
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| u.authority().map(|a| a.as_str() == host))
        == Some(true)
    {
        inputs.push(url);
    }
    for input in inputs {
        let e = explain(t, &IpPolicy::default(), &[], &input);
        prop_assert_eq!(&e.route.matched, &want, "explain {:?}", input);
        prop_assert_eq!(e.forwarded, want.is_some(), "explain {:?}", input);
        prop_assert_eq!(e.route.rule == "none", want.is_none());
    }
    Ok(())
}

/// `explain` for a route whose upstream resolves to `ips`: a verdict per address that is
/// `allows`, the refused address `check_all` names, and forwarding exactly when the data
/// path's `resolve_checked` lets the connection through.
fn explain_agrees_on_addresses(policy: &IpPolicy, ips: &[IpAddr]) -> Result<(), TestCaseError> {
    let table = RouteTable::new(
        vec![Route {
            name: "echo".into(),
            upstream: Upstream::parse("http://up.internal:9000").unwrap(),
            preserve_host: false,
            mcp: Default::default(),
        }],
        Some("t.example"),
    );
    let e = explain(&table, policy, ips, "https://echo.t.example/mcp");
    let a = e.addresses.as_ref().expect("a route matched");
    prop_assert_eq!(a.verdicts.len(), ips.len());
    for (v, ip) in a.verdicts.iter().zip(ips) {
        prop_assert_eq!(v.ip, ip.to_canonical());
        prop_assert_eq!(v.allowed, policy.allows(*ip), "{}", ip);
    }
    let data_path = block_on(upstream::resolve_checked(
        &Fixed(ips.to_vec()),
        policy,
        "up.internal",
        9000,
    ));
    match data_path {
        Ok(_) => {
            prop_assert!(e.forwarded);
            prop_assert_eq!(a.refused, None);
        }
        Err(ConnectError::NotAllowed { ip, .. }) => {
            prop_assert!(!e.forwarded);
            prop_assert_eq!(a.refused, Some(ip));
            let log = format!("IP validation failed: {ip} is not a private address");
            prop_assert!(e.outcome.contains(&log), "{}", e.outcome);
        }
        Err(other) => prop_assert!(false, "unexpected {other:?}"),
    }
    prop_assert_eq!(a.refused, policy.check_all(ips).err());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Route matching
// ---------------------------------------------------------------------------------------

/// Labels drawn from a small set, so that generated hostnames, route keys and the tunnel
/// domain overlap often (a random string would almost never hit a route).
fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("echo"),
        Just("wiki"),
        Just("a"),
        Just("b"),
        Just("tunnel"),
        Just("test"),
        Just("x-y"),
        Just("_s"),
        Just("0"),
    ]
    .prop_map(str::to_owned)
}

fn dns_name(max_labels: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 1..=max_labels).prop_map(|l| l.join("."))
}

/// How the caller wrote the name: per-character case, a trailing dot, a port.
#[derive(Debug, Clone)]
struct Decoration {
    upper: Vec<bool>,
    trailing_dot: bool,
    port: Option<u16>,
}

fn decoration() -> impl Strategy<Value = Decoration> {
    (
        prop::collection::vec(any::<bool>(), 0..40),
        any::<bool>(),
        prop::option::of(any::<u16>()),
    )
        .prop_map(|(upper, trailing_dot, port)| Decoration {
            upper,
            trailing_dot,
            port,
        })
}

fn decorate(name: &str, d: &Decoration) -> String {
    let mut out: String = name
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if d.upper.get(i).copied().unwrap_or(false) {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    if d.trailing_dot {
        out.push('.');
    }
    if let Some(p) = d.port {
        out.push_str(&format!(":{p}"));
    }
    out
}

/// The documented rule, on the undecorated name: the exact full hostname first, then the
/// subdomain left after stripping `.<tunnel_domain>`; case-insensitive; the domain as
/// configured may carry capitals and a trailing dot.
fn reference_route(keys: &[String], domain: Option<&str>, name: &str) -> Option<String> {
    let name = name.to_ascii_lowercase();
    if keys.contains(&name) {
        return Some(name);
    }
    let domain = domain?.to_ascii_lowercase();
    let domain = domain.strip_suffix('.').unwrap_or(&domain);
    if domain.is_empty() {
        return None;
    }
    let sub = name.strip_suffix(&format!(".{domain}"))?;
    keys.iter().find(|k| *k == sub).cloned()
}

fn table(keys: &[String], domain: Option<&str>) -> RouteTable {
    let up = Upstream::parse("http://10.0.0.1:9000").unwrap();
    let routes = keys
        .iter()
        .map(|k| Route {
            name: k.clone(),
            upstream: up.clone(),
            preserve_host: false,
            mcp: Default::default(),
        })
        .collect();
    RouteTable::new(routes, domain)
}

/// A tunnel domain as an operator might write it (capitals, trailing dot) or none.
fn domain() -> impl Strategy<Value = Option<String>> {
    prop::option::of((dns_name(3), decoration())).prop_map(|d| {
        d.map(|(name, mut dec)| {
            dec.port = None;
            decorate(&name, &dec)
        })
    })
}

fn keys() -> impl Strategy<Value = Vec<String>> {
    prop::collection::btree_set(dns_name(4), 0..8).prop_map(|s| s.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Any hostname built from the route and domain vocabulary, with any case, trailing
    /// dot and port, selects the route the reference rule selects.
    #[test]
    fn lookup_agrees_with_reference(
        keys in keys(),
        domain in domain(),
        name in dns_name(6),
        dec in decoration(),
    ) {
        let t = table(&keys, domain.as_deref());
        let host = decorate(&name, &dec);
        let got = t.lookup(&host).map(|r| r.name.clone());
        prop_assert_eq!(got, reference_route(&keys, domain.as_deref(), &name), "host {:?}", host);
        explain_agrees_on_route(&t, &host)?;
    }

    /// Hostnames made of a route key joined to the domain (the names the edge sends) are
    /// always found, under any decoration.
    #[test]
    fn configured_names_under_the_domain_are_found(
        keys in keys(),
        domain in dns_name(3),
        pick in any::<prop::sample::Index>(),
        dec in decoration(),
    ) {
        prop_assume!(!keys.is_empty());
        let key = &keys[pick.index(keys.len())];
        let t = table(&keys, Some(&domain));
        let name = format!("{key}.{domain}");
        let host = decorate(&name, &dec);
        let got = t.lookup(&host).map(|r| r.name.clone());
        prop_assert_eq!(&got, &reference_route(&keys, Some(&domain), &name));
        prop_assert!(got.is_some());
        explain_agrees_on_route(&t, &host)?;
    }

    /// IP literals (v4 with a port, bracketed v6 with or without one) never select a route
    /// when no key is written as that literal.
    #[test]
    fn ip_literals_match_no_dns_route(
        keys in keys(),
        domain in domain(),
        ip in any::<IpAddr>(),
        port in prop::option::of(any::<u16>()),
    ) {
        let host = match (ip, port) {
            (IpAddr::V4(v4), Some(p)) => format!("{v4}:{p}"),
            (IpAddr::V4(v4), None) => v4.to_string(),
            (IpAddr::V6(v6), Some(p)) => format!("[{v6}]:{p}"),
            (IpAddr::V6(v6), None) => format!("[{v6}]"),
        };
        let t = table(&keys, domain.as_deref());
        prop_assert!(t.lookup(&host).is_none(), "{:?} matched", host);
        explain_agrees_on_route(&t, &host)?;
    }
}

// ---------------------------------------------------------------------------------------
// Upstream address policy (the SSRF gate)
// ---------------------------------------------------------------------------------------

/// A v4 address as a v4-mapped v6 address (`::ffff:a.b.c.d`).
fn mapped(v4: Ipv4Addr) -> IpAddr {
    IpAddr::V6(v4.to_ipv6_mapped())
}

/// The reference decision for one address against an allowlist, from the rules as
/// documented: the address is judged as the IPv4 it maps when it is v4-mapped v6; it is
/// allowed when its first `len` bits equal those of a listed network of the same family.
/// (An entry written in v4-mapped form therefore matches nothing: addresses are judged as
/// v4 before the comparison.)
///
/// This is the one function to extend when the policy grows rules (for example addresses
/// refused unless listed explicitly).
/// Whether `a` lies in `net/len` (same family only).
fn in_net(net: IpAddr, len: u8, a: IpAddr) -> bool {
    match (net, a) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            len == 0 || (u32::from(n) ^ u32::from(a)) >> (32 - u32::from(len)) == 0
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            len == 0 || (u128::from(n) ^ u128::from(a)) >> (128 - u32::from(len)) == 0
        }
        _ => false,
    }
}

/// An address (or an entry's base) in its IPv4 form when it is IPv4-mapped.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.octets() {
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d] => {
                IpAddr::V4(Ipv4Addr::new(a, b, c, d))
            }
            _ => ip,
        },
        v4 => v4,
    }
}

/// Ranges never dialled unless an entry inside them names them (issue 8).
fn special_ranges() -> Vec<(IpAddr, u8)> {
    [
        "0.0.0.0/32",
        "255.255.255.255/32",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "::/128",
        "fe80::/10",
        "ff00::/8",
    ]
    .iter()
    .map(|s| {
        let (a, l) = s.split_once('/').unwrap();
        (a.parse().unwrap(), l.parse().unwrap())
    })
    .collect()
}

fn reference_allows(allowlist: Option<&[(IpAddr, u8)]>, ip: IpAddr) -> bool {
    let Some(list) = allowlist else {
        return true; // disable_ip_validation
    };
    let ip = unmap(ip);
    // Entries written as IPv4-mapped IPv6 networks count as the IPv4 networks they map.
    let entries: Vec<(IpAddr, u8)> = list
        .iter()
        .map(|&(net, len)| match (net, unmap(net)) {
            (IpAddr::V6(_), v4 @ IpAddr::V4(_)) if len >= 96 => (v4, len - 96),
            _ => (net, len),
        })
        .collect();
    let containing = |&&(net, len): &&(IpAddr, u8)| in_net(net, len, ip);
    match special_ranges()
        .into_iter()
        .find(|&(s, sl)| in_net(s, sl, ip))
    {
        Some((s, sl)) => entries
            .iter()
            .filter(containing)
            .any(|&(net, len)| len >= sl && in_net(s, sl, net)),
        None => entries.iter().any(|e| containing(&e)),
    }
}

fn reference_check_all(allowlist: Option<&[(IpAddr, u8)]>, ips: &[IpAddr]) -> Result<(), IpAddr> {
    match ips.iter().find(|ip| !reference_allows(allowlist, **ip)) {
        None => Ok(()),
        Some(&IpAddr::V6(v6)) => Err(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)),
        Some(&ip) => Err(ip),
    }
}

/// One allowlist entry: an address (host bits possibly set) and a prefix length valid for
/// its family; sometimes v4 networks written in v4-mapped v6 form.
fn entry() -> impl Strategy<Value = (IpAddr, u8)> {
    prop_oneof![
        4 => (any::<Ipv4Addr>(), 0u8..=32).prop_map(|(a, l)| (IpAddr::V4(a), l)),
        3 => (any::<Ipv6Addr>(), 0u8..=128).prop_map(|(a, l)| (IpAddr::V6(a), l)),
        1 => (any::<Ipv4Addr>(), 96u8..=128).prop_map(|(a, l)| (mapped(a), l)),
    ]
}

fn written((addr, len): (IpAddr, u8), bare: bool) -> String {
    let full = if addr.is_ipv4() { 32 } else { 128 };
    if bare && len == full {
        addr.to_string()
    } else {
        format!("{addr}/{len}")
    }
}

/// An address near an allowlist entry (same high bits, random low bits), or anywhere, in
/// v4, v6 or v4-mapped form.
fn address_near(list: &[(IpAddr, u8)]) -> impl Strategy<Value = IpAddr> + use<> {
    let list = list.to_vec();
    (
        any::<prop::sample::Index>(),
        any::<u128>(),
        0u8..=130,
        0u8..4,
    )
        .prop_map(move |(pick, noise, flip, form)| {
            let base = if list.is_empty() || form == 3 {
                IpAddr::V6(Ipv6Addr::from(noise))
            } else {
                list[pick.index(list.len())].0
            };
            // Randomise the bits below `flip` (counted from the end).
            let ip = match base {
                IpAddr::V4(a) => {
                    let mask = if flip >= 32 {
                        u32::MAX
                    } else {
                        (1u32 << flip) - 1
                    };
                    IpAddr::V4(Ipv4Addr::from(
                        (u32::from(a) & !mask) | (noise as u32 & mask),
                    ))
                }
                IpAddr::V6(a) => {
                    let mask = if flip >= 128 {
                        u128::MAX
                    } else {
                        (1u128 << flip) - 1
                    };
                    IpAddr::V6(Ipv6Addr::from((u128::from(a) & !mask) | (noise & mask)))
                }
            };
            match (ip, form) {
                (IpAddr::V4(v4), 1) => mapped(v4),
                _ => ip,
            }
        })
}

fn policy_case() -> impl Strategy<Value = (Vec<(IpAddr, u8)>, Vec<bool>, Vec<IpAddr>)> {
    prop::collection::vec(entry(), 1..6).prop_flat_map(|list| {
        let n = list.len();
        (
            Just(list.clone()),
            prop::collection::vec(any::<bool>(), n),
            prop::collection::vec(address_near(&list), 1..5),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// `allows` and `check_all` agree with the reference for any allowlist written as
    /// `allowed_ips` entries (CIDRs, with host bits or not, and single addresses) and any
    /// address, v4, v6 or v4-mapped.
    #[test]
    fn policy_agrees_with_reference((list, bare, ips) in policy_case()) {
        let nets = list
            .iter()
            .zip(&bare)
            .map(|(e, b)| parse_entry(&written(*e, *b)).expect("generated entries are valid"))
            .collect();
        let policy = IpPolicy::Allow(nets);
        for ip in &ips {
            prop_assert_eq!(policy.allows(*ip), reference_allows(Some(&list), *ip), "{}", ip);
        }
        prop_assert_eq!(policy.check_all(&ips), reference_check_all(Some(&list), &ips));
        explain_agrees_on_addresses(&policy, &ips)?;
    }

    /// A v4 address and its v4-mapped v6 form always get the same decision.
    #[test]
    fn mapped_form_is_judged_as_v4((list, bare, _ips) in policy_case(), v4 in any::<Ipv4Addr>()) {
        let nets = list
            .iter()
            .zip(&bare)
            .map(|(e, b)| parse_entry(&written(*e, *b)).unwrap())
            .collect();
        let policy = IpPolicy::Allow(nets);
        prop_assert_eq!(policy.allows(IpAddr::V4(v4)), policy.allows(mapped(v4)));
        prop_assert_eq!(policy.allows(mapped(v4)), reference_allows(Some(&list), mapped(v4)));
        explain_agrees_on_addresses(&policy, &[IpAddr::V4(v4), mapped(v4)])?;
    }

    /// The default (RFC 1918) and the disabled policy agree with the reference too.
    #[test]
    fn default_and_disabled_policies(ip in any::<IpAddr>(), v4 in any::<Ipv4Addr>(), form in any::<bool>()) {
        let rfc1918: Vec<(IpAddr, u8)> = vec![
            (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 8),
            (IpAddr::V4(Ipv4Addr::new(172, 16, 0, 0)), 12),
            (IpAddr::V4(Ipv4Addr::new(192, 168, 0, 0)), 16),
        ];
        for ip in [ip, if form { mapped(v4) } else { IpAddr::V4(v4) }] {
            prop_assert_eq!(IpPolicy::default().allows(ip), reference_allows(Some(&rfc1918), ip), "{}", ip);
            prop_assert_eq!(IpPolicy::Disabled.allows(ip), reference_allows(None, ip));
            explain_agrees_on_addresses(&IpPolicy::default(), &[ip])?;
            explain_agrees_on_addresses(&IpPolicy::Disabled, &[ip])?;
        }
    }
}

/// The reference model itself, on hand-picked cases, so that a wrong model cannot make
/// the properties vacuous.
#[test]
fn reference_models_on_known_cases() {
    let keys = vec!["echo".to_owned(), "wiki.internal.example.org".to_owned()];
    let d = Some("Tunnel.Example.COM.");
    assert_eq!(
        reference_route(&keys, d, "ECHO.tunnel.example.com").as_deref(),
        Some("echo")
    );
    assert_eq!(reference_route(&keys, d, "xecho.tunnel.example.com"), None);
    assert_eq!(reference_route(&keys, d, "tunnel.example.com"), None);
    assert_eq!(
        reference_route(&keys, None, "wiki.internal.example.org").as_deref(),
        Some("wiki.internal.example.org")
    );

    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let list = [
        (ip("10.1.2.3"), 8),
        (ip("fd00::"), 8),
        (ip("192.168.1.1"), 32),
    ];
    for (addr, want) in [
        ("10.255.0.1", true),
        ("11.0.0.1", false),
        ("::ffff:10.0.0.1", true),
        ("fdff::1", true),
        ("fe00::1", false),
        ("192.168.1.1", true),
        ("192.168.1.2", false),
    ] {
        assert_eq!(reference_allows(Some(&list), ip(addr)), want, "{addr}");
    }
    // An IPv4-mapped entry is the IPv4 network it maps.
    assert!(reference_allows(
        Some(&[(ip("::ffff:10.0.0.0"), 104)]),
        ip("10.0.0.1")
    ));
    // Never-legitimate addresses: refused by a catch-all, allowed by an entry inside them.
    let all = [(ip("0.0.0.0"), 0), (ip("::"), 0)];
    for special in [
        "169.254.169.254",
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",
        "::",
        "fe80::1",
        "ff02::1",
    ] {
        assert!(!reference_allows(Some(&all), ip(special)), "{special}");
    }
    assert!(reference_allows(
        Some(&[(ip("169.254.169.254"), 32)]),
        ip("169.254.169.254")
    ));
    assert!(!reference_allows(
        Some(&[(ip("169.0.0.0"), 8)]),
        ip("169.254.169.254")
    ));
    assert!(reference_allows(
        Some(&[(ip("0.0.0.0"), 0)]),
        ip("::ffff:1.2.3.4")
    ));
}

/// `explain` on hand-picked inputs, so that the URL form and the rule names cannot pass the
/// properties vacuously.
#[test]
fn explain_on_known_cases() {
    let keys = vec!["echo".to_owned(), "wiki.internal.example.org".to_owned()];
    let t = table(&keys, Some("Tunnel.Example.COM."));
    let e = explain(
        &t,
        &IpPolicy::default(),
        &[],
        "https://ECHO.Tunnel.Example.COM.:8443/mcp?x=1",
    );
    assert_eq!(e.host, "ECHO.Tunnel.Example.COM.:8443");
    assert_eq!(e.path, "/mcp?x=1");
    assert_eq!(e.route.matched.as_deref(), Some("echo"));
    assert_eq!(e.route.rule, "subdomain");
    let up = e.upstream.as_ref().unwrap();
    assert_eq!(up.url, "http://10.0.0.1:9000/mcp?x=1");
    assert_eq!(up.host_header, "10.0.0.1:9000");
    assert!(e.forwarded);
    let e = explain(
        &t,
        &IpPolicy::default(),
        &[],
        "https://wiki.internal.example.org/",
    );
    assert_eq!(e.route.rule, "exact");
    let e = explain(
        &t,
        &IpPolicy::default(),
        &[],
        "https://ecoh.tunnel.example.com/mcp",
    );
    assert_eq!(e.route.rule, "none");
    assert_eq!(e.route.near_misses, ["echo (echo.tunnel.example.com)"]);
    assert!(!e.forwarded);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let e = explain(
        &t,
        &IpPolicy::default(),
        &[ip("10.0.0.1")],
        "https://echo.tunnel.example.com/mcp",
    );
    assert!(e.forwarded, "a literal upstream address needs no lookup");
    let policy = IpPolicy::Allow(vec![parse_entry("0.0.0.0/0").unwrap()]);
    let named = RouteTable::new(
        vec![Route {
            name: "m".into(),
            upstream: Upstream::parse("http://meta.internal:80").unwrap(),
            preserve_host: false,
            mcp: Default::default(),
        }],
        None,
    );
    let e = explain(
        &named,
        &policy,
        &[ip("10.1.1.1"), ip("169.254.169.254")],
        "m",
    );
    let a = e.addresses.unwrap();
    assert_eq!(a.refused, Some(ip("169.254.169.254")));
    assert!(a.verdicts[0].allowed && a.verdicts[0].rule == "inside 0.0.0.0/0");
    assert!(
        a.verdicts[1]
            .rule
            .starts_with("in 169.254.0.0/16, never a legitimate upstream")
    );
}
