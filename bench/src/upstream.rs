//! The benchmark upstream: a JSON-RPC echo answering like an MCP `tools/call`, and an SSE
//! endpoint emitting timestamped events at a set rate. Plain HTTP/1.1 with keep-alive.
//!
//! - `POST /mcp`: the reply as `application/json`.
//! - `POST /mcp-sse`: the same reply framed as one SSE `message` event (how a streamable-HTTP
//!   server answers when it chooses `text/event-stream`).
//! - `GET /events?rate=N`: an endless SSE stream, N events a second, each carrying the
//!   wall-clock time (microseconds since the Unix epoch) at which it was emitted.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::time::{Interval, MissedTickBehavior};

use crate::now_us;

pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!("bench upstream listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(handle))
                .await;
        });
    }
}

type UpBody = Either<Full<Bytes>, Events>;

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<UpBody> {
    let mut resp = Response::new(Either::Left(Full::new(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

async fn handle(req: Request<Incoming>) -> Result<Response<UpBody>, Infallible> {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::POST, "/mcp" | "/mcp-sse") => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return Ok(reply(StatusCode::BAD_REQUEST, "text/plain", Bytes::new())),
            };
            let Some(result) = tools_call_result(&body) else {
                return Ok(reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    Bytes::from_static(b"expected a JSON-RPC request\n"),
                ));
            };
            if path == "/mcp" {
                Ok(reply(StatusCode::OK, "application/json", result.into()))
            } else {
                let mut framed = Vec::with_capacity(result.len() + 24);
                framed.extend_from_slice(b"event: message\ndata: ");
                framed.extend_from_slice(&result);
                framed.extend_from_slice(b"\n\n");
                Ok(reply(StatusCode::OK, "text/event-stream", framed.into()))
            }
        }
        (Method::GET, "/events") => {
            let rate = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("rate=")))
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(10)
                .clamp(1, 10_000);
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut resp = Response::new(Either::Right(Events { tick, seq: 0 }));
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/event-stream"),
            );
            h.insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-cache"),
            );
            Ok(resp)
        }
        _ => Ok(reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"bench upstream: POST /mcp, POST /mcp-sse, GET /events\n"),
        )),
    }
}

/// The JSON-RPC result of a `tools/call` that echoes `params.arguments.message`.
fn tools_call_result(body: &[u8]) -> Option<Vec<u8>> {
    let req: serde_json::Value = serde_json::from_slice(body).ok()?;
    let id = req.get("id")?.clone();
    let message = req
        .pointer("/params/arguments/message")
        .cloned()
        .unwrap_or(serde_json::Value::String(String::new()));
    let text = match message {
        serde_json::Value::String(s) => format!("Echo: {s}"),
        other => format!("Echo: {other}"),
    };
    serde_json::to_vec(&serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "result": { "content": [{ "type": "text", "text": text }], "isError": false }
    }))
    .ok()
}

/// An endless SSE body: one event per tick, stamped when it is emitted.
pub struct Events {
    tick: Interval,
    seq: u64,
}

impl Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        ready!(self.tick.poll_tick(cx));
        self.seq += 1;
        let event = format!(
            "id: {seq}\nevent: message\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{{\"seq\":{seq},\"t_us\":{t}}}}}\n\n",
            seq = self.seq,
            t = now_us()
        );
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
    }
}
