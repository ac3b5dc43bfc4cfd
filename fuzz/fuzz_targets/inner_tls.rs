//! The inner TLS server (`proxy::inner_tls`, rustls' unbuffered API driven by our own
//! adapter) with arbitrary bytes on the wire: from the first byte, or after a real
//! handshake. It must end (an error or the end of the stream) and never panic or hang; and
//! no byte that is not a record sealed under the session's keys may come out as plaintext.
//!
//! First input byte: bit 0 chooses "after a real handshake"; the second byte sets how many
//! bytes the connection carries per read (1-256), so records arrive cut anywhere.
#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mcp_tunnel::certs::issue;
use mcp_tunnel::proxy::inner_tls::InnerTls;
use mcp_tunnel::proxy::tls::{CertStore, client_config, server_config};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::runtime::Runtime;

const DEADLINE: Duration = Duration::from_secs(5);

struct Harness {
    rt: Runtime,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let pki = issue::generate("tunnel.test", Duration::from_secs(3600), Duration::from_secs(600))
            .expect("pki");
        let store = Arc::new(CertStore::new(issue::certified_key(&pki.server).expect("key")));
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki.ca.cert_pem.as_bytes()).expect("ca"))
            .expect("root");
        Harness {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            server: server_config(store),
            client: client_config(roots, vec![b"http/1.1".to_vec()]),
        }
    })
}

/// The server's end of the connection, `max` bytes per read.
struct Cut {
    io: DuplexStream,
    max: usize,
}

impl AsyncRead for Cut {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let max = self.max.min(buf.remaining());
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(max));
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut part))?;
        let n = part.filled().len();
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Cut {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Accepts, then reads to the end; returns whether the handshake completed and how many
/// plaintext bytes came out.
async fn serve(io: Cut, config: Arc<ServerConfig>) -> (bool, usize) {
    let Ok(mut tls) = InnerTls::accept(io, config).await else {
        return (false, 0);
    };
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while let Ok(n) = tls.read(&mut buf).await {
        if n == 0 {
            break;
        }
        total += n;
    }
    (true, total)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let h = harness();
    let after_handshake = data[0] & 1 == 1;
    let max = 1 + data[1] as usize;
    let wire = data[2..].to_vec();
    h.rt.block_on(async {
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(serve(Cut { io: a, max }, h.server.clone()));
        let client = async {
            if after_handshake {
                let tls = tokio_rustls::TlsConnector::from(h.client.clone())
                    .connect(ServerName::try_from("echo.tunnel.test").expect("name"), b)
                    .await
                    .expect("a real client completes the handshake");
                b = tls.into_inner().0;
            }
            // The server may have failed and closed already: write errors are expected.
            let _ = b.write_all(&wire).await;
            let _ = b.shutdown().await;
            // Whatever the server answers (alerts) is drained so its writes never block.
            let mut sink = Vec::new();
            let _ = b.read_to_end(&mut sink).await;
        };
        let run = async {
            let ((handshake, plaintext), ()) = tokio::join!(
                async { server.await.expect("the server task does not panic") },
                client
            );
            (handshake, plaintext)
        };
        let (handshake, plaintext) = tokio::time::timeout(DEADLINE, run)
            .await
            .expect("the server ends once the client has sent everything and closed");
        assert_eq!(
            handshake, after_handshake,
            "only a real client completes a handshake"
        );
        assert_eq!(plaintext, 0, "bytes not sealed under the session's keys came out as plaintext");
    });
});
