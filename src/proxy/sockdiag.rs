//! Who owns a TCP socket on this host: one exact NETLINK_SOCK_DIAG (inet_diag) lookup by
//! the socket's 4-tuple. The kernel answers with the owning UID and the socket's inode, in
//! constant time (a hash lookup), unlike a scan of `/proc/net/tcp`.
//!
//! The kernel serves a sock_diag request inside the `sendto` call, so the answer is queued
//! before `sendto` returns: the lookup never waits, and costs four system calls (socket,
//! sendto, recv, close). The socket is non-blocking anyway, so a late answer could never
//! hold up a runtime worker.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_LISTEN};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};

/// The owner of one socket, as the kernel reports it. `uid` is seen from this process's
/// user namespace: under systemd's `PrivateUsers=yes` every user other than root and the
/// service's own reads as 65534 (the overflow UID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOwner {
    pub uid: u32,
    /// The socket's inode (`ss -e` shows it as `ino:`); 0 when no process holds the socket
    /// any more (closed, or in TIME_WAIT).
    pub inode: u32,
}

/// Enough for the one reply message of an exact lookup (no extensions are asked for).
const RECV_BUFFER: usize = 8192;

/// How long a late answer is awaited; the kernel answers within `sendto`, so this only
/// bounds what should not happen.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Looks up the TCP socket whose local address is `local` and whose remote address is
/// `remote`, and returns its owner. `ENOENT` means no such socket in this network namespace.
pub async fn socket_owner(local: SocketAddr, remote: SocketAddr) -> io::Result<SocketOwner> {
    let socket = send_request(local, remote, true)?;
    let mut buf = Vec::with_capacity(RECV_BUFFER);
    let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    let mut pause = Duration::from_micros(100);
    loop {
        match socket.recv(&mut buf, 0) {
            Ok(_) => return parse_answer(&buf, local, remote),
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            Err(_) if tokio::time::Instant::now() >= deadline => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer from NETLINK_SOCK_DIAG",
                ));
            }
            // Not reached on Linux (see the module comment); polled rather than registered
            // with the reactor, which would cost two more system calls on every lookup.
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
    }
}

/// As [`socket_owner`], blocking: for the start-up self-test and `mcp-tunnel check`.
pub fn socket_owner_blocking(local: SocketAddr, remote: SocketAddr) -> io::Result<SocketOwner> {
    let socket = send_request(local, remote, false)?;
    let mut buf = Vec::with_capacity(RECV_BUFFER);
    socket.recv(&mut buf, 0)?;
    parse_answer(&buf, local, remote)
}

/// Opens a NETLINK_SOCK_DIAG socket and sends the exact-lookup request on it.
fn send_request(local: SocketAddr, remote: SocketAddr, non_blocking: bool) -> io::Result<Socket> {
    let request = encode_request(local, remote)?;
    let socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.set_non_blocking(non_blocking)?;
    // Port 0 is the kernel; the socket is bound automatically on the first send.
    socket.send_to(&request, &NetlinkAddr::new(0, 0), 0)?;
    Ok(socket)
}

/// IPv4-mapped IPv6 addresses (a dual-stack listener) name IPv4 sockets.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// The request bytes: `SOCK_DIAG_BY_FAMILY` without `NLM_F_DUMP` (one socket, found by its
/// 4-tuple), cookie "none" (all ones) so that the kernel does not compare it.
fn encode_request(local: SocketAddr, remote: SocketAddr) -> io::Result<Vec<u8>> {
    let (local, remote) = (unmapped(local), unmapped(remote));
    let family = match (local, remote) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => AF_INET,
        (SocketAddr::V6(_), SocketAddr::V6(_)) => AF_INET6,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{local} and {remote} are of different address families"),
            ));
        }
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: local.port(),
                destination_port: remote.port(),
                source_address: local.ip(),
                destination_address: remote.ip(),
                interface_id: 0,
                cookie: [0xff; 8],
            },
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    Ok(buf)
}

/// The kernel's answer: one inet_diag message, or a netlink error carrying an errno.
///
/// With no connected socket of that 4-tuple, the kernel's lookup falls back to a listening
/// socket on the local half: such an answer (or any other socket's) is not the socket asked
/// about, and reads as `ENOENT`.
fn parse_answer(buf: &[u8], local: SocketAddr, remote: SocketAddr) -> io::Result<SocketOwner> {
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(buf).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed NETLINK_SOCK_DIAG answer: {e}"),
        )
    })?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
            let id = &r.header.socket_id;
            let answered = (
                SocketAddr::new(id.source_address, id.source_port),
                SocketAddr::new(id.destination_address, id.destination_port),
            );
            if r.header.state == TCP_LISTEN || answered != (unmapped(local), unmapped(remote)) {
                return Err(io::Error::from_raw_os_error(nix::libc::ENOENT));
            }
            Ok(SocketOwner {
                uid: r.header.uid,
                inode: r.header.inode,
            })
        }
        NetlinkPayload::Error(e) => Err(e.code.map_or_else(
            || io::Error::other("NETLINK_SOCK_DIAG acknowledged without an answer"),
            |code| io::Error::from_raw_os_error(-code.get()),
        )),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected NETLINK_SOCK_DIAG answer: {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::OwnedFd;
    use std::os::unix::fs::MetadataExt;

    fn inode_of(stream: &TcpStream) -> u64 {
        let fd: OwnedFd = stream.try_clone().unwrap().into();
        std::fs::File::from(fd).metadata().unwrap().ino()
    }

    #[test]
    fn finds_each_end_of_a_loopback_connection_by_its_4_tuple() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let local = server.local_addr().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        // The client's socket: its local address is the server's peer address.
        let owner = socket_owner_blocking(peer, local).unwrap();
        assert_eq!(owner.uid, uid);
        assert_eq!(u64::from(owner.inode), inode_of(&client));
        // The accepted socket is the other orientation: a different inode.
        let accepted = socket_owner_blocking(local, peer).unwrap();
        assert_eq!(u64::from(accepted.inode), inode_of(&server));
        assert_ne!(accepted.inode, owner.inode);
    }

    #[tokio::test]
    async fn a_socket_that_does_not_exist_is_enoent() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
        // Nothing is connected from port 1 to the listener.
        let err = socket_owner(nobody, addr).await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::ENOENT), "{err}");
        // The other way round the kernel falls back to the listening socket on `addr`: that
        // is not the socket asked about, and must not lend it its owner.
        let err = socket_owner(addr, nobody).await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::ENOENT), "{err}");
    }

    #[tokio::test]
    async fn ipv6_and_ipv4_mapped_addresses() {
        // A dual-stack listener sees an IPv4 client as ::ffff:127.0.0.1.
        let listener = TcpListener::bind("[::]:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, peer) = listener.accept().unwrap();
        assert!(matches!(peer, SocketAddr::V6(_)), "{peer}");
        let owner = socket_owner(peer, server.local_addr().unwrap())
            .await
            .unwrap();
        assert_eq!(u64::from(owner.inode), inode_of(&client));

        let listener = TcpListener::bind("[::1]:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let owner = socket_owner(peer, server.local_addr().unwrap())
            .await
            .unwrap();
        assert_eq!(u64::from(owner.inode), inode_of(&client));
    }

    #[test]
    fn mixed_families_are_refused_before_asking() {
        let err =
            encode_request("127.0.0.1:1".parse().unwrap(), "[::1]:2".parse().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
