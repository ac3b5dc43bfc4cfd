//! The `[peer_check]` section: which local users may open connections to `listen_addr`.
//!
//! The inner TLS authenticates the proxy to its caller, not the caller to the proxy, so
//! anyone who can connect to the listener reaches every routed upstream. With cloudflared
//! supervised on a loopback listener, the only legitimate peer is that cloudflared, which
//! runs as the service's own user: the check is on by default there.

use std::net::SocketAddr;

use serde::Deserialize;

use super::Validator;

/// Whether each listener connection's peer socket must belong to the service's user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerCheck {
    /// Only peers owned by the service's own user (and root with `allow_root`) are served.
    On { allow_root: bool },
    /// Any peer that reaches the listener is served.
    Off(PeerCheckOff),
}

/// Why the check is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerCheckOff {
    /// `[peer_check] enabled = false`.
    Disabled,
    /// The default with `[cloudflared] enabled = false`: cloudflared runs elsewhere.
    CloudflaredElsewhere,
    /// The default with a `listen_addr` that is not loopback: remote peers cannot be
    /// identified.
    NotLoopback,
}

impl PeerCheckOff {
    /// Why, for logs, `/readyz` and `status`.
    pub fn reason(self) -> &'static str {
        match self {
            PeerCheckOff::Disabled => "[peer_check] enabled = false",
            PeerCheckOff::CloudflaredElsewhere => {
                "cloudflared is not supervised here: [cloudflared] enabled = false"
            }
            PeerCheckOff::NotLoopback => "listen_addr is not a loopback address",
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeerCheck {
    enabled: Option<bool>,
    allow_root: Option<bool>,
}

pub(super) fn validate(
    raw: RawPeerCheck,
    listen_addr: SocketAddr,
    cloudflared_enabled: bool,
    v: &mut Validator,
) -> PeerCheck {
    let loopback = listen_addr.ip().to_canonical().is_loopback();
    let allow_root = raw.allow_root.unwrap_or(false);
    match raw.enabled {
        Some(false) => PeerCheck::Off(PeerCheckOff::Disabled),
        Some(true) if !loopback => {
            v.push(
                "peer_check.enabled",
                format!(
                    "the peer check identifies processes on this host only, and listen_addr {listen_addr} is not a loopback address (a remote cloudflared could never pass): listen on 127.0.0.1, or set enabled = false"
                ),
            );
            PeerCheck::Off(PeerCheckOff::NotLoopback)
        }
        Some(true) => PeerCheck::On { allow_root },
        None if !loopback => PeerCheck::Off(PeerCheckOff::NotLoopback),
        None if !cloudflared_enabled => PeerCheck::Off(PeerCheckOff::CloudflaredElsewhere),
        None => PeerCheck::On { allow_root },
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    /// `extra`: top-level keys first, then tables.
    fn parse(extra: &str) -> Result<Config, String> {
        let text = format!(
            "tunnel_domain = \"t.example\"\n{extra}\n[tls]\ncert_file = \"c\"\nkey_file = \"k\"\n[routes]\necho = \"http://10.0.0.1:1\"\n"
        );
        Config::parse(Path::new("/etc/mcp-tunnel/mcp-tunnel.toml"), &text)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn on_by_default_with_supervised_cloudflared_on_loopback() {
        assert_eq!(
            parse("").unwrap().peer_check,
            PeerCheck::On { allow_root: false }
        );
        assert_eq!(
            parse("listen_addr = \"[::1]:8080\"\n[peer_check]\nallow_root = true")
                .unwrap()
                .peer_check,
            PeerCheck::On { allow_root: true }
        );
    }

    #[test]
    fn off_by_default_when_cloudflared_runs_elsewhere_or_the_listener_is_not_loopback() {
        assert_eq!(
            parse("[cloudflared]\nenabled = false").unwrap().peer_check,
            PeerCheck::Off(PeerCheckOff::CloudflaredElsewhere)
        );
        assert_eq!(
            parse("listen_addr = \":8080\"").unwrap().peer_check,
            PeerCheck::Off(PeerCheckOff::NotLoopback)
        );
        assert_eq!(
            parse("[peer_check]\nenabled = false").unwrap().peer_check,
            PeerCheck::Off(PeerCheckOff::Disabled)
        );
    }

    #[test]
    fn explicit_on_without_cloudflared_and_refused_off_loopback() {
        assert_eq!(
            parse("[cloudflared]\nenabled = false\n[peer_check]\nenabled = true")
                .unwrap()
                .peer_check,
            PeerCheck::On { allow_root: false }
        );
        let err =
            parse("listen_addr = \"0.0.0.0:8080\"\n[peer_check]\nenabled = true").unwrap_err();
        assert!(
            err.contains("mcp-tunnel.toml: peer_check.enabled: the peer check identifies processes on this host only, and listen_addr 0.0.0.0:8080 is not a loopback address"),
            "{err}"
        );
        let err = parse("[peer_check]\nallow_roots = true").unwrap_err();
        assert!(err.contains("unknown field `allow_roots`"), "{err}");
    }
}
