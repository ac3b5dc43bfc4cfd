//! The WebSocket-to-byte-stream adapter, two ways (first input byte, even or odd):
//!
//! - raw: the rest of the input is what a client sent on the socket (any bytes, so broken
//!   frames, bad masks, oversized lengths, control frames anywhere). The adapter must end
//!   with data, end-of-file or an error, never panic or hang.
//! - messages: the rest of the input describes WebSocket messages (text, binary, ping, pong)
//!   that a real client sends; the adapter must yield exactly the data payloads in order,
//!   and the bytes it writes back must reach the client unchanged.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use libfuzzer_sys::fuzz_target;
use mcp_tunnel::proxy::ws::{WsByteStream, session_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A hang is a bug here: every path ends once the client side is closed.
const DEADLINE: Duration = Duration::from_secs(10);

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// Server side: read everything, echoing each chunk back; returns what was read.
async fn serve<S>(mut stream: WsByteStream<S>, chunk: usize) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut got = Vec::new();
    let mut buf = vec![0u8; chunk.max(1)];
    let mut echo = true;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if echo
                    && (stream.write_all(&buf[..n]).await.is_err() || stream.flush().await.is_err())
                {
                    echo = false;
                }
            }
        }
    }
    let _ = stream.shutdown().await;
    got
}

async fn raw(input: &[u8], chunk: usize) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let ws = WebSocketStream::from_raw_socket(server, Role::Server, Some(session_config())).await;
    let (mut rx, mut tx) = tokio::io::split(client);
    let feed = async move {
        let _ = tx.write_all(input).await;
        let _ = tx.shutdown().await;
    };
    let drain = async move {
        let mut sink = Vec::new();
        let _ = rx.read_to_end(&mut sink).await;
    };
    let server = async move {
        serve(WsByteStream::new(ws), chunk).await;
    };
    tokio::join!(feed, drain, server);
}

async fn messages(input: &[u8], chunk: usize) {
    // Each message: a kind byte, a length byte, then that many payload bytes.
    let mut msgs = Vec::new();
    let mut expected = Vec::new();
    let mut rest = input;
    while let [kind, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let (payload, next) = tail.split_at(n);
        rest = next;
        match kind % 4 {
            0 => {
                expected.extend_from_slice(payload);
                msgs.push(Message::binary(payload.to_vec()));
            }
            1 => {
                let text = String::from_utf8_lossy(payload).into_owned();
                expected.extend_from_slice(text.as_bytes());
                msgs.push(Message::text(text));
            }
            2 => msgs.push(Message::Ping(payload[..n.min(125)].to_vec().into())),
            _ => msgs.push(Message::Pong(payload[..n.min(125)].to_vec().into())),
        }
    }
    let (client, server) = tokio::io::duplex(64 * 1024);
    let ws = WebSocketStream::from_raw_socket(server, Role::Server, Some(session_config())).await;
    let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    let (mut sink, mut stream) = client.split();
    let send = async move {
        for m in msgs {
            sink.send(m).await.expect("client send");
        }
        sink.close().await.expect("client close");
    };
    let receive = async move {
        let mut back = Vec::new();
        while let Some(m) = stream.next().await {
            match m {
                Ok(Message::Binary(b)) => back.extend_from_slice(&b),
                Ok(Message::Text(t)) => back.extend_from_slice(t.as_bytes()),
                Ok(Message::Close(_)) => break,
                Ok(_) => {}
                Err(e) => panic!("client saw an error: {e}"),
            }
        }
        back
    };
    let server = serve(WsByteStream::new(ws), chunk);
    let ((), back, got) = tokio::join!(send, receive, server);
    assert_eq!(
        got, expected,
        "adapter read other bytes than the messages carried"
    );
    assert_eq!(
        back, expected,
        "bytes written through the adapter changed on the way"
    );
}

fuzz_target!(|data: &[u8]| {
    let [mode, size, input @ ..] = data else {
        return;
    };
    let chunk = 1 + (*size as usize) * 67;
    runtime().block_on(async {
        let run = async {
            if mode % 2 == 0 {
                raw(input, chunk).await
            } else {
                messages(input, chunk).await
            }
        };
        tokio::time::timeout(DEADLINE, run)
            .await
            .expect("adapter hung");
    });
});
