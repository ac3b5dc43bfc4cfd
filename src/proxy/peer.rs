//! The peer check on the listener (`[peer_check]`): before a connection may send its
//! WebSocket upgrade, the kernel names the owner of the socket at its other end
//! ([`sockdiag`]). Only the service's own user, which the supervised cloudflared runs as,
//! and root when `allow_root` is set, are served; any other connection is closed, logged
//! (rate limited) and counted. One lookup per tunnel session, none per request.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::metrics::{PeerRefusal, ProxyMetrics};
use super::sockdiag::{self, SocketOwner};
use crate::telemetry::limiter::LogLimiter;

/// The check cannot work on this host or under this sandbox; `run` refuses to start.
#[derive(Debug, thiserror::Error)]
#[error(
    "peer_check: cannot identify the owner of listener connections through the kernel (NETLINK_SOCK_DIAG): {reason}. Under systemd the unit needs AF_NETLINK in RestrictAddressFamilies=; if cloudflared runs on another host, set [peer_check] enabled = false"
)]
pub struct PeerCheckUnavailable {
    pub reason: String,
}

/// Admits or refuses listener connections by the owner of their peer socket.
pub struct PeerGate {
    own_uid: u32,
    allow_root: bool,
    who: String,
    /// Refusals of other users' connections, the warnings that matter, keep their own budget:
    /// a flood of port probes cannot crowd them out.
    log_other_user: LogLimiter,
    log_unknown: LogLimiter,
}

/// Why a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    OtherUser(SocketOwner),
    /// The peer closed its socket already (a port probe that connects and hangs up): there
    /// is nobody left to serve, so it is logged at info, not as a warning.
    PeerGone(&'static str),
    /// The lookup failed.
    UnknownOwner(String),
}

impl PeerGate {
    /// A gate for this process's user (plus root with `allow_root`). It first proves that the
    /// lookup works here: it connects to itself on `listen_ip` and must find its own socket,
    /// owned by its own UID, the way it will look up cloudflared's.
    pub fn new(allow_root: bool, listen_ip: IpAddr) -> Result<PeerGate, PeerCheckUnavailable> {
        let own_uid = nix::unistd::geteuid().as_raw();
        self_test(own_uid, listen_ip).map_err(|reason| PeerCheckUnavailable { reason })?;
        let name = |uid: u32| {
            nix::unistd::User::from_uid(uid.into())
                .ok()
                .flatten()
                .map_or(format!("uid {uid}"), |u| format!("uid {uid} ({})", u.name))
        };
        let who = if allow_root && own_uid != 0 {
            format!("{} and root", name(own_uid))
        } else {
            format!("{} only", name(own_uid))
        };
        Ok(PeerGate {
            own_uid,
            allow_root,
            who,
            log_other_user: LogLimiter::default(),
            log_unknown: LogLimiter::default(),
        })
    }

    /// Who may connect, e.g. `uid 998 (mcp-tunnel) only`.
    pub fn who(&self) -> &str {
        &self.who
    }

    /// The verdict on a lookup's result. A socket no process holds any more (inode 0:
    /// closed, TIME_WAIT) has no owner to trust, whatever UID the kernel reports for it.
    pub fn judge(&self, owner: io::Result<SocketOwner>) -> Result<SocketOwner, Refused> {
        match owner {
            Ok(o) if o.inode == 0 => Err(Refused::PeerGone(
                "the peer socket is no longer held by any process",
            )),
            Ok(o) if o.uid == self.own_uid || (self.allow_root && o.uid == 0) => Ok(o),
            Ok(o) => Err(Refused::OtherUser(o)),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => {
                Err(Refused::PeerGone("no such socket on this host any more"))
            }
            Err(e) => Err(Refused::UnknownOwner(e.to_string())),
        }
    }

    /// Looks up the owner of `stream`'s peer socket; `false` (logged and counted) means the
    /// caller must close the connection without reading from it.
    pub async fn admit(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
        metrics: &ProxyMetrics,
    ) -> bool {
        // The peer socket is the one whose local address is our peer address.
        let owner = match stream.local_addr() {
            Ok(local) => sockdiag::socket_owner(peer, local).await,
            Err(e) => Err(e),
        };
        match self.judge(owner) {
            Ok(o) => {
                debug!(%peer, peer_uid = o.uid, "listener peer admitted");
                true
            }
            Err(Refused::OtherUser(o)) => {
                metrics.peer_refusal(PeerRefusal::OtherUser);
                if let Some(suppressed) = self.log_other_user.permit() {
                    warn!(
                        %peer,
                        peer_uid = o.uid,
                        peer_inode = o.inode,
                        allowed = %self.who,
                        suppressed,
                        "refused listener connection: its socket belongs to another user ([peer_check]: only the service's own cloudflared may connect)"
                    );
                }
                false
            }
            Err(Refused::PeerGone(why)) => {
                metrics.peer_refusal(PeerRefusal::UnknownOwner);
                if let Some(suppressed) = self.log_unknown.permit() {
                    info!(%peer, error = why, suppressed, "closed listener connection: its peer hung up before the peer check could name its owner ([peer_check])");
                }
                false
            }
            Err(Refused::UnknownOwner(why)) => {
                metrics.peer_refusal(PeerRefusal::UnknownOwner);
                if let Some(suppressed) = self.log_unknown.permit() {
                    warn!(%peer, error = %why, suppressed, "refused listener connection: the owner of its socket cannot be identified ([peer_check])");
                }
                false
            }
        }
    }
}

/// Connects to itself on `ip` and looks the client socket up as a peer would be.
fn self_test(own_uid: u32, ip: IpAddr) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let listener = std::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .map_err(|e| format!("self-test: cannot listen on {ip}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("self-test: {e}"))?;
    let client = std::net::TcpStream::connect(addr)
        .map_err(|e| format!("self-test: cannot connect to {addr}: {e}"))?;
    let (server, peer) = listener
        .accept()
        .map_err(|e| format!("self-test: accept: {e}"))?;
    let local = server.local_addr().map_err(|e| format!("self-test: {e}"))?;
    let owner = sockdiag::socket_owner_blocking(peer, local).map_err(|e| e.to_string())?;
    let inode = std::fs::File::from(std::os::fd::OwnedFd::from(client))
        .metadata()
        .map(|m| m.ino())
        .map_err(|e| format!("self-test: {e}"))?;
    if owner.uid != own_uid || u64::from(owner.inode) != inode {
        return Err(format!(
            "self-test: the kernel names uid {} (socket inode {}) as the owner of this process's own socket, expected uid {own_uid} (inode {inode})",
            owner.uid, owner.inode
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(own_uid: u32, allow_root: bool) -> PeerGate {
        PeerGate {
            own_uid,
            allow_root,
            who: String::new(),
            log_other_user: LogLimiter::default(),
            log_unknown: LogLimiter::default(),
        }
    }

    fn owner(uid: u32, inode: u32) -> io::Result<SocketOwner> {
        Ok(SocketOwner { uid, inode })
    }

    #[test]
    fn own_user_always_root_only_when_allowed() {
        let g = gate(998, false);
        assert!(g.judge(owner(998, 7)).is_ok());
        assert_eq!(
            g.judge(owner(0, 7)),
            Err(Refused::OtherUser(SocketOwner { uid: 0, inode: 7 }))
        );
        assert!(matches!(
            g.judge(owner(65534, 7)),
            Err(Refused::OtherUser(_))
        ));
        let g = gate(998, true);
        assert!(g.judge(owner(0, 7)).is_ok());
        assert!(g.judge(owner(1000, 7)).is_err());
    }

    #[test]
    fn ownerless_and_missing_sockets_are_refused() {
        let g = gate(0, true);
        // A TIME_WAIT socket reads as uid 0, inode 0.
        assert!(matches!(g.judge(owner(0, 0)), Err(Refused::PeerGone(_))));
        let gone = g.judge(Err(io::Error::from_raw_os_error(nix::libc::ENOENT)));
        assert!(
            matches!(&gone, Err(Refused::PeerGone(m)) if m.contains("no such socket")),
            "{gone:?}"
        );
        let failed = g.judge(Err(io::Error::from_raw_os_error(nix::libc::EACCES)));
        assert!(
            matches!(failed, Err(Refused::UnknownOwner(_))),
            "{failed:?}"
        );
    }

    #[test]
    fn the_self_test_passes_here_and_names_the_user() {
        let g = PeerGate::new(false, "127.0.0.1".parse().unwrap()).unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        assert!(g.who().starts_with(&format!("uid {uid}")), "{}", g.who());
        assert!(g.who().ends_with(" only"), "{}", g.who());
    }
}
