//! Upstream address policy: the SSRF gate between the tunnel and the private network.

use std::net::IpAddr;

use ipnet::IpNet;

/// The three RFC 1918 ranges: the reference proxy's default allowlist.
pub const RFC1918: [&str; 3] = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"];

/// Which resolved upstream addresses may be dialled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpPolicy {
    /// Only addresses inside one of these networks.
    Allow(Vec<IpNet>),
    /// `disable_ip_validation = true`: any address (isolated testing only).
    Disabled,
}

impl Default for IpPolicy {
    fn default() -> Self {
        IpPolicy::Allow(
            RFC1918
                .iter()
                .map(|n| n.parse().expect("static CIDR"))
                .collect(),
        )
    }
}

/// Addresses that are never a legitimate upstream even inside an allowed range, unless an
/// `allowed_ips` entry lies within the range itself (the operator named them on purpose):
/// unspecified, broadcast, link-local (with the cloud metadata address 169.254.169.254) and
/// multicast.
pub const NEVER_LEGITIMATE: [&str; 7] = [
    "0.0.0.0/32",
    "255.255.255.255/32",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "::/128",
    "fe80::/10",
    "ff00::/8",
];

fn never_legitimate() -> &'static [IpNet] {
    static NETS: std::sync::OnceLock<Vec<IpNet>> = std::sync::OnceLock::new();
    NETS.get_or_init(|| {
        NEVER_LEGITIMATE
            .iter()
            .map(|n| n.parse().expect("static CIDR"))
            .collect()
    })
}

/// The rule that decided about one address: the gate's own reasoning, which `allows` reduces
/// to a yes or no and `explain` / `doctor` print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Inside this allowlist entry.
    Allowed(IpNet),
    /// `disable_ip_validation = true`: not checked.
    Unchecked,
    /// Inside no allowlist entry.
    Outside,
    /// Inside this never-legitimate range, and no allowlist entry within the range names it.
    NeverLegitimate(IpNet),
}

impl Verdict {
    /// What `IpPolicy::allows` answers.
    pub fn is_allowed(self) -> bool {
        matches!(self, Verdict::Allowed(_) | Verdict::Unchecked)
    }
}

impl IpPolicy {
    /// Whether `ip` may be dialled; an IPv4-mapped IPv6 address is judged as the IPv4 it maps.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.verdict(ip).is_allowed()
    }

    /// Which rule decides about `ip` (see [`Verdict`]).
    pub fn verdict(&self, ip: IpAddr) -> Verdict {
        match self {
            IpPolicy::Disabled => Verdict::Unchecked,
            IpPolicy::Allow(nets) => {
                let ip = ip.to_canonical();
                match never_legitimate().iter().find(|s| s.contains(&ip)) {
                    // Only an entry inside the special range itself allows such an address:
                    // "0.0.0.0/0" or "169.0.0.0/8" do not reach the metadata service.
                    Some(special) => nets
                        .iter()
                        .find(|n| n.contains(&ip) && special.contains(*n))
                        .map_or(Verdict::NeverLegitimate(*special), |n| Verdict::Allowed(*n)),
                    None => nets
                        .iter()
                        .find(|n| n.contains(&ip))
                        .map_or(Verdict::Outside, |n| Verdict::Allowed(*n)),
                }
            }
        }
    }

    /// Checks a whole DNS answer: every address must be allowed (a mixed answer fails closed).
    /// Returns the first refused address.
    pub fn check_all(&self, ips: &[IpAddr]) -> Result<(), IpAddr> {
        match ips.iter().find(|ip| !self.allows(**ip)) {
            Some(bad) => Err(bad.to_canonical()),
            None => Ok(()),
        }
    }
}

/// An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) as the IPv4 network it maps, since
/// addresses are judged in their IPv4 form; any other network unchanged.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        other => other,
    }
}

/// Parses one `allowed_ips` entry: a CIDR or a single address (taken as /32 or /128).
pub fn parse_entry(entry: &str) -> Result<IpNet, String> {
    let entry = entry.trim();
    if let Ok(net) = entry.parse::<IpNet>() {
        return Ok(canonical_net(net.trunc()));
    }
    entry
        .parse::<IpAddr>()
        .map(|ip| IpNet::from(ip.to_canonical()))
        .map_err(|_| {
            format!("expected a CIDR such as \"10.0.0.0/8\" or a single address, found {entry:?}")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_is_rfc1918() {
        let p = IpPolicy::default();
        for ok in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(p.allows(ip(ok)), "{ok}");
        }
        for bad in [
            "172.32.0.1",
            "127.0.0.1",
            "8.8.8.8",
            "169.254.169.254",
            "::1",
            "fd00::1",
        ] {
            assert!(!p.allows(ip(bad)), "{bad}");
        }
    }

    #[test]
    fn never_legitimate_addresses_need_an_explicit_entry() {
        let all: IpPolicy =
            IpPolicy::Allow(vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]);
        for bad in [
            "169.254.169.254",
            "169.254.1.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "239.1.2.3",
            "::",
            "fe80::1",
            "ff02::1",
            "::ffff:169.254.169.254",
        ] {
            assert!(!all.allows(ip(bad)), "{bad} allowed by a catch-all");
        }
        for ok in ["8.8.8.8", "10.0.0.1", "2001:db8::1", "127.0.0.1"] {
            assert!(all.allows(ip(ok)), "{ok}");
        }
        let explicit = IpPolicy::Allow(vec![
            parse_entry("169.254.169.254").unwrap(),
            parse_entry("fe80::/64").unwrap(),
        ]);
        assert!(explicit.allows(ip("169.254.169.254")));
        assert!(!explicit.allows(ip("169.254.169.253")));
        assert!(explicit.allows(ip("fe80::5")));
        let wide = IpPolicy::Allow(vec![parse_entry("169.0.0.0/8").unwrap()]);
        assert!(
            !wide.allows(ip("169.254.169.254")),
            "a wider range is not an explicit listing"
        );
        assert!(
            IpPolicy::Disabled.allows(ip("169.254.169.254")),
            "disable_ip_validation disables everything"
        );
    }

    #[test]
    fn mixed_answer_fails_closed() {
        let p = IpPolicy::default();
        assert_eq!(
            p.check_all(&[ip("10.0.0.1"), ip("8.8.8.8")]),
            Err(ip("8.8.8.8"))
        );
        assert_eq!(p.check_all(&[ip("10.0.0.1"), ip("192.168.0.1")]), Ok(()));
        assert_eq!(p.check_all(&[ip("::ffff:1.2.3.4")]), Err(ip("1.2.3.4")));
    }

    #[test]
    fn entries() {
        assert_eq!(
            parse_entry("127.0.0.1").unwrap().to_string(),
            "127.0.0.1/32"
        );
        assert_eq!(parse_entry("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert!(parse_entry("10.0.0.0/33").is_err());
        assert_eq!(
            parse_entry("::ffff:10.0.0.0/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_entry("::ffff:192.168.1.7").unwrap().to_string(),
            "192.168.1.7/32"
        );
        assert_eq!(parse_entry("fd00::/8").unwrap().to_string(), "fd00::/8");
        assert!(
            parse_entry("localhost")
                .unwrap_err()
                .contains("expected a CIDR")
        );
    }
}
