//! The `[admin]` section: the loopback HTTP endpoint with `/healthz`, `/readyz`, `/metrics`.

use std::net::SocketAddr;

use serde::Deserialize;

use super::Validator;

/// Where the admin endpoint listens; `enabled = false` turns it off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub enabled: bool,
    pub listen_addr: SocketAddr,
}

/// Loopback: the endpoint exposes operational detail and needs no authentication there.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9180";

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    enabled: Option<bool>,
    listen_addr: Option<String>,
}

pub(super) fn validate(raw: RawAdmin, v: &mut Validator) -> AdminConfig {
    let default: SocketAddr = DEFAULT_ADMIN_ADDR.parse().expect("valid default");
    let listen_addr = match raw.listen_addr {
        None => default,
        Some(s) => s.parse().unwrap_or_else(|_| {
            v.push(
                "admin.listen_addr",
                format!(
                    "expected an IP address and port such as \"{DEFAULT_ADMIN_ADDR}\", found {s:?}"
                ),
            );
            default
        }),
    };
    AdminConfig {
        enabled: raw.enabled.unwrap_or(true),
        listen_addr,
    }
}
