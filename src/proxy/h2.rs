//! The start of a session whose ALPN agreed `h2`: the client's connection preface is
//! checked here before hyper sees the stream.
//!
//! Once `h2` is agreed, the connection speaks HTTP/2 only (RFC 9113 section 3.3). hyper's
//! auto server would sniff the first bytes and fall back to HTTP/1.1, serving a request
//! that the TLS layer said would not come; h2's own server refuses a bad preface but closes
//! without a word. Here a bad preface is a connection error of type PROTOCOL_ERROR (RFC 9113
//! section 3.4): the server's preface (an empty SETTINGS frame), then a GOAWAY, then the end.

use std::io;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::prefixed::Prefixed;

/// The client connection preface (RFC 9113 section 3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Why a session that agreed `h2` was not served.
#[derive(Debug)]
pub enum PrefaceError {
    /// The first bytes were not the preface; the GOAWAY was sent (best effort).
    Invalid,
    /// The stream ended or failed before the whole preface arrived.
    Io(io::Error),
}

impl std::fmt::Display for PrefaceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrefaceError::Invalid => {
                f.write_str("ALPN agreed h2 but the client did not send the HTTP/2 preface")
            }
            PrefaceError::Io(e) => write!(f, "before the HTTP/2 preface: {e}"),
        }
    }
}

impl std::error::Error for PrefaceError {}

/// Reads the preface from `io`, byte runs compared as they arrive (a wrong first byte is
/// answered at once, without waiting for 24), and gives back a stream that replays it for
/// hyper's HTTP/2 server.
pub async fn read_preface<I>(mut io: I) -> Result<Prefixed<I>, PrefaceError>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut got = [0u8; PREFACE.len()];
    let mut have = 0;
    while have < got.len() {
        let n = io.read(&mut got[have..]).await.map_err(PrefaceError::Io)?;
        if n == 0 {
            return Err(PrefaceError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        if got[have..have + n] != PREFACE[have..have + n] {
            // Best effort: the peer may be gone already.
            let _ = io.write_all(&goaway_protocol_error()).await;
            let _ = io.shutdown().await;
            return Err(PrefaceError::Invalid);
        }
        have += n;
    }
    Ok(Prefixed::new(io, Bytes::from_static(PREFACE)))
}

/// The server's preface (an empty SETTINGS frame: it must be the first frame the server
/// sends), then GOAWAY with last stream 0 and PROTOCOL_ERROR, its debug data saying why.
fn goaway_protocol_error() -> Vec<u8> {
    const WHY: &[u8] = b"invalid connection preface";
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const PROTOCOL_ERROR: u32 = 0x1;
    let frame = |out: &mut Vec<u8>, kind: u8, payload: &[u8]| {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, 0]);
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(payload);
    };
    let mut goaway = Vec::with_capacity(8 + WHY.len());
    goaway.extend_from_slice(&0u32.to_be_bytes());
    goaway.extend_from_slice(&PROTOCOL_ERROR.to_be_bytes());
    goaway.extend_from_slice(WHY);
    let mut out = Vec::with_capacity(2 * 9 + goaway.len());
    frame(&mut out, SETTINGS, &[]);
    frame(&mut out, GOAWAY, &goaway);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `read_preface` on what a client sends in `parts` (with pauses between them);
    /// returns its result and every byte the server wrote back.
    async fn feed(parts: Vec<Vec<u8>>) -> (Result<Vec<u8>, String>, Vec<u8>) {
        let (server, mut client) = tokio::io::duplex(4096);
        let run = tokio::spawn(async move {
            match read_preface(server).await {
                Ok(mut io) => {
                    let mut first = vec![0u8; PREFACE.len()];
                    io.read_exact(&mut first).await.unwrap();
                    Ok(first)
                }
                Err(e) => Err(e.to_string()),
            }
        });
        for p in parts {
            client.write_all(&p).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let result = run.await.unwrap();
        let mut back = Vec::new();
        if result.is_err() {
            client.read_to_end(&mut back).await.unwrap();
        }
        (result, back)
    }

    #[tokio::test]
    async fn the_preface_is_replayed_however_it_is_cut() {
        for cut in 0..PREFACE.len() {
            let (result, _) = feed(vec![PREFACE[..cut].to_vec(), PREFACE[cut..].to_vec()]).await;
            assert_eq!(result.unwrap(), PREFACE.to_vec(), "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn an_http1_request_gets_settings_then_goaway_protocol_error() {
        let (result, back) = feed(vec![b"GET / HTTP/1.1\r\nhost: a\r\n\r\n".to_vec()]).await;
        assert!(
            result
                .unwrap_err()
                .contains("did not send the HTTP/2 preface")
        );
        // SETTINGS: length 0, type 4, no flags, stream 0.
        assert_eq!(back[..9], [0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let goaway = &back[9..];
        let len = u32::from_be_bytes([0, goaway[0], goaway[1], goaway[2]]) as usize;
        assert_eq!(goaway[3], 7, "a GOAWAY frame");
        assert_eq!(goaway[5..9], [0, 0, 0, 0], "on stream 0");
        assert_eq!(goaway.len(), 9 + len, "and nothing after it");
        assert_eq!(goaway[9..13], [0, 0, 0, 0], "last stream 0");
        assert_eq!(goaway[13..17], [0, 0, 0, 1], "PROTOCOL_ERROR");
    }

    #[tokio::test]
    async fn a_wrong_byte_late_in_the_preface_is_refused() {
        let mut bad = PREFACE.to_vec();
        bad[20] = b'X';
        let (result, back) = feed(vec![bad[..20].to_vec(), bad[20..].to_vec()]).await;
        assert!(result.is_err());
        assert_eq!(back[9 + 3], 7, "GOAWAY");
    }
}
