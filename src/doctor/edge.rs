//! Can cloudflared reach the edge from here? The SRV lookup cloudflared starts with
//! (`_v2-origintunneld._tcp.argotunnel.com`), then a TCP connect to port 7844 of the edge
//! addresses; with a static edge in `[cloudflared.env] TUNNEL_EDGE`, those addresses instead.
//! Reported, never required (egress may go through a proxy this check does not know), and
//! skipped under `--offline`.
//!
//! The SRV query is a minimal DNS client over UDP to the first `nameserver` of
//! `/etc/resolv.conf` (getaddrinfo cannot ask for SRV records); its parser is bounds-checked.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::Check;
use crate::config::CloudflaredConfig;

/// The record cloudflared resolves to find the edge.
pub const EDGE_SRV: &str = "_v2-origintunneld._tcp.argotunnel.com";

/// One SRV answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
}

/// The first `nameserver` of a resolv.conf text (port 53).
pub fn nameserver(resolv_conf: &str) -> Option<SocketAddr> {
    resolv_conf.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next()? == "nameserver")
            .then(|| words.next()?.parse::<std::net::IpAddr>().ok())
            .flatten()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

/// A DNS query for the SRV records of `name` (recursion desired).
pub fn srv_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len().min(63) as u8);
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.extend_from_slice(&[0, 0, 33, 0, 1]);
    q
}

/// Reads a (possibly compressed) name at `pos`; returns it and the position after it.
fn read_name(msg: &[u8], mut pos: usize) -> Result<(String, usize), String> {
    let mut labels = Vec::new();
    let mut end = None;
    for _ in 0..64 {
        let len = *msg.get(pos).ok_or("name runs past the message")? as usize;
        match len {
            0 => {
                return Ok((labels.join("."), end.unwrap_or(pos + 1)));
            }
            l if l & 0xc0 == 0xc0 => {
                let lo = *msg.get(pos + 1).ok_or("truncated name pointer")? as usize;
                end.get_or_insert(pos + 2);
                pos = ((l & 0x3f) << 8) | lo;
            }
            l if l <= 63 => {
                let label = msg
                    .get(pos + 1..pos + 1 + l)
                    .ok_or("label runs past the message")?;
                labels.push(String::from_utf8_lossy(label).into_owned());
                pos += 1 + l;
            }
            _ => return Err("invalid label length".into()),
        }
    }
    Err("name with too many labels or a pointer loop".into())
}

fn u16_at(msg: &[u8], pos: usize) -> Result<u16, String> {
    msg.get(pos..pos + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| "message too short".to_string())
}

/// The SRV records in the answer section of a response to query `id`.
pub fn parse_srv(msg: &[u8], id: u16) -> Result<Vec<Srv>, String> {
    if u16_at(msg, 0)? != id {
        return Err("answer to another query".into());
    }
    let flags = u16_at(msg, 2)?;
    if flags & 0x8000 == 0 {
        return Err("not a response".into());
    }
    match flags & 0x000f {
        0 => {}
        3 => return Err("no such name (NXDOMAIN)".into()),
        rcode => return Err(format!("the resolver answered rcode {rcode}")),
    }
    let (qd, an) = (u16_at(msg, 4)?, u16_at(msg, 6)?);
    let mut pos = 12;
    for _ in 0..qd {
        pos = read_name(msg, pos)?.1 + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        pos = read_name(msg, pos)?.1;
        let (rtype, len) = (u16_at(msg, pos)?, u16_at(msg, pos + 8)? as usize);
        let data = pos + 10;
        if msg.len() < data + len {
            return Err("record runs past the message".into());
        }
        if rtype == 33 && len >= 7 {
            out.push(Srv {
                priority: u16_at(msg, data)?,
                weight: u16_at(msg, data + 2)?,
                port: u16_at(msg, data + 4)?,
                target: read_name(msg, data + 6)?.0,
            });
        }
        pos = data + len;
    }
    Ok(out)
}

/// Asks `ns` for the SRV records of `name` over UDP.
pub async fn lookup_srv(ns: SocketAddr, name: &str, timeout: Duration) -> Result<Vec<Srv>, String> {
    let bind: SocketAddr = if ns.is_ipv4() {
        "0.0.0.0:0".parse().expect("static")
    } else {
        "[::]:0".parse().expect("static")
    };
    let sock = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| e.to_string())?;
    sock.connect(ns)
        .await
        .map_err(|e| format!("resolver {ns}: {e}"))?;
    let id = fastrand::u16(..);
    sock.send(&srv_query(id, name))
        .await
        .map_err(|e| format!("resolver {ns}: {e}"))?;
    let mut buf = vec![0u8; 4096];
    let work = async {
        loop {
            let n = sock
                .recv(&mut buf)
                .await
                .map_err(|e| format!("resolver {ns}: {e}"))?;
            match parse_srv(&buf[..n], id) {
                Err(e) if e == "answer to another query" => continue,
                other => return other,
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(format!("resolver {ns} did not answer within {timeout:?}")))
}

/// TCP connect to the first address that answers; (address, milliseconds).
async fn connect_any(addrs: &[SocketAddr], timeout: Duration) -> Result<(SocketAddr, f64), String> {
    let mut last = "no address".to_string();
    for a in addrs {
        let start = Instant::now();
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(a)).await {
            Ok(Ok(_)) => return Ok((*a, start.elapsed().as_secs_f64() * 1000.0)),
            Ok(Err(e)) => last = format!("{a}: {e}"),
            Err(_) => last = format!("{a}: no answer within {timeout:?}"),
        }
    }
    Err(last)
}

const EGRESS_FIX: &str = "allow outbound TCP and UDP 7844 to the Cloudflare edge (cloudflared's only connection; no inbound port is needed), and DNS for argotunnel.com";

/// The `cloudflared.edge` check.
pub async fn check(cfg: &CloudflaredConfig, offline: bool, timeout: Duration) -> Check {
    let name = "cloudflared.edge";
    if offline {
        return Check::skip(
            name,
            format!(
                "--offline: edge reachability (DNS SRV {EDGE_SRV}, TCP 7844) not checked; cloudflared needs outbound TCP/UDP 7844"
            ),
        );
    }
    let step = timeout.min(Duration::from_secs(3));
    if let Some(list) = cfg.env.get("TUNNEL_EDGE") {
        let mut addrs = Vec::new();
        for a in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            if let Ok(Ok(found)) = tokio::time::timeout(step, tokio::net::lookup_host(a)).await {
                addrs.extend(found);
            }
        }
        return match connect_any(&addrs, step).await {
            Ok((a, ms)) => Check::ok(
                name,
                format!(
                    "static edge from [cloudflared.env] TUNNEL_EDGE: {a} accepts TCP in {ms:.1} ms"
                ),
            ),
            Err(e) => Check::warn(
                name,
                format!(
                    "static edge from [cloudflared.env] TUNNEL_EDGE ({list}) not reachable: {e}"
                ),
                "start the edge those addresses name, or remove TUNNEL_EDGE",
            ),
        };
    }
    let ns = std::fs::read_to_string("/etc/resolv.conf")
        .ok()
        .and_then(|t| nameserver(&t));
    let Some(ns) = ns else {
        return Check::warn(
            name,
            "no nameserver in /etc/resolv.conf: cloudflared cannot find the edge by DNS",
            "configure a resolver",
        );
    };
    let records = match lookup_srv(ns, EDGE_SRV, step).await {
        Ok(r) if !r.is_empty() => r,
        Ok(_) => {
            return Check::warn(
                name,
                format!("{ns} returned no SRV record for {EDGE_SRV}"),
                EGRESS_FIX,
            );
        }
        Err(e) => {
            return Check::warn(
                name,
                format!(
                    "DNS SRV {EDGE_SRV} failed: {e} (cloudflared then tries DNS-over-TLS to 1.1.1.1:853, and exits if that fails too)"
                ),
                EGRESS_FIX,
            );
        }
    };
    let targets: Vec<String> = records
        .iter()
        .map(|r| format!("{}:{}", r.target, r.port))
        .collect();
    let mut addrs = Vec::new();
    for t in &targets {
        if let Ok(found) = tokio::time::timeout(step, tokio::net::lookup_host(t.as_str())).await
            && let Ok(found) = found
        {
            addrs.extend(found.take(2));
        }
    }
    match connect_any(&addrs, step).await {
        Ok((a, ms)) => Check::ok(
            name,
            format!(
                "{EDGE_SRV} -> {}; {a} accepts TCP in {ms:.1} ms",
                targets.join(", ")
            ),
        ),
        Err(e) => Check::warn(
            name,
            format!(
                "{EDGE_SRV} -> {}, but TCP 7844 is not reachable: {e}",
                targets.join(", ")
            ),
            EGRESS_FIX,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response as a resolver sends it: the question, then two SRV answers whose owner
    /// names point at the question and whose second target is compressed.
    fn response(id: u16) -> Vec<u8> {
        let mut m = srv_query(id, EDGE_SRV);
        m[2] = 0x81;
        m[3] = 0x80;
        m[7] = 2;
        let srv = |m: &mut Vec<u8>, port: u16, target: &[u8]| {
            m.extend_from_slice(&[0xc0, 12, 0, 33, 0, 1, 0, 0, 0, 60]);
            m.extend_from_slice(&((6 + target.len()) as u16).to_be_bytes());
            m.extend_from_slice(&[0, 1, 0, 1]);
            m.extend_from_slice(&port.to_be_bytes());
            m.extend_from_slice(target);
        };
        let first = b"\x07region1\x02v2\x0aargotunnel\x03com\x00";
        srv(&mut m, 7844, first);
        // "region2" + pointer to "v2.argotunnel.com" inside the first target.
        let v2 = (m.len() - first.len() + 8) as u8;
        srv(
            &mut m,
            7844,
            &[7, b'r', b'e', b'g', b'i', b'o', b'n', b'2', 0xc0, v2],
        );
        m
    }

    #[test]
    fn parses_srv_answers_with_compression() {
        let got = parse_srv(&response(7), 7).unwrap();
        let targets: Vec<&str> = got.iter().map(|s| s.target.as_str()).collect();
        assert_eq!(
            targets,
            ["region1.v2.argotunnel.com", "region2.v2.argotunnel.com"]
        );
        assert!(got.iter().all(|s| s.port == 7844));
        assert_eq!(
            parse_srv(&response(7), 8).unwrap_err(),
            "answer to another query"
        );
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        let good = response(1);
        for cut in 0..good.len() {
            let _ = parse_srv(&good[..cut], 1);
        }
        let mut loop_ = good.clone();
        let at = loop_.len() - 2;
        loop_[at] = 0xc0;
        loop_[at + 1] = (at) as u8;
        assert!(parse_srv(&loop_, 1).is_err());
        let mut nx = srv_query(1, "x.test");
        nx[2] = 0x81;
        nx[3] = 0x83;
        assert!(parse_srv(&nx, 1).unwrap_err().contains("NXDOMAIN"));
    }

    #[test]
    fn resolv_conf() {
        assert_eq!(
            nameserver("# x\nsearch a\nnameserver 10.255.255.53\nnameserver 1.1.1.1\n"),
            Some("10.255.255.53:53".parse().unwrap())
        );
        assert_eq!(nameserver("search a\n"), None);
    }

    proptest::proptest! {
        /// Whatever a resolver sends back, parsing ends with records or an error, never a
        /// panic or a hang: random bytes, and a valid answer with bytes flipped.
        #[test]
        fn parser_survives_any_answer(
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            flips in proptest::collection::vec((0usize..200, proptest::prelude::any::<u8>()), 0..6),
        ) {
            let _ = parse_srv(&noise, u16::from_be_bytes([noise.first().copied().unwrap_or(0), noise.get(1).copied().unwrap_or(0)]));
            let mut m = response(9);
            for (at, byte) in flips {
                let at = at % m.len();
                m[at] = byte;
            }
            let _ = parse_srv(&m, 9);
        }
    }

    /// The query goes out and the answer comes back over real UDP (a responder on loopback).
    #[tokio::test]
    async fn lookup_against_a_local_resolver() {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, peer) = server.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[2..n], &srv_query(0, EDGE_SRV)[2..]);
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            server.send_to(&response(id), peer).await.unwrap();
        });
        let got = lookup_srv(addr, EDGE_SRV, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].target, "region1.v2.argotunnel.com");
    }
}
