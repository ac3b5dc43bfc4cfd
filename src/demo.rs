//! `mcp-tunnel demo`: the whole data path on one machine with no setup. A throwaway CA and
//! server certificate, a sample MCP server (rmcp) on loopback, the proxy, and the bridge;
//! then one real call through bridge -> WebSocket -> inner TLS -> proxy -> upstream.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ServerHandler, schemars, tool, tool_handler, tool_router};
use tokio::net::TcpListener;
use tracing::debug;

use crate::certs::issue;
use crate::config::Config;
use crate::lifecycle::{Shutdown, termination_signal};
use crate::proxy::Proxy;
use crate::proxy::bridge;
use crate::proxy::edge::WsTarget;

/// The demo's made-up tunnel domain; curl reaches it with `--resolve`.
pub const DEMO_DOMAIN: &str = "demo.mcp-tunnel.test";

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct HelloArgs {
    /// Who to greet.
    pub name: String,
}

/// The sample upstream: one tool, `hello`.
#[derive(Clone)]
pub struct HelloServer {
    tool_router: ToolRouter<Self>,
}

impl Default for HelloServer {
    fn default() -> Self {
        HelloServer {
            tool_router: Self::tool_router(),
        }
    }
}

#[tool_router]
impl HelloServer {
    #[tool(description = "Greets someone through the tunnel")]
    fn hello(&self, Parameters(HelloArgs { name }): Parameters<HelloArgs>) -> String {
        format!("Hello, {name}! (answered by the sample MCP server behind mcp-tunnel)")
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for HelloServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_instructions("mcp-tunnel demo server")
    }
}

/// Serves the sample MCP server (stateless, JSON responses) on `listener` until shutdown.
pub async fn serve_sample(listener: TcpListener, shutdown: Shutdown) {
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None);
    let service: StreamableHttpService<HelloServer, LocalSessionManager> =
        StreamableHttpService::new(|| Ok(HelloServer::default()), Default::default(), config);
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.started() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        let svc = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                debug!(error = %e, "sample server connection error");
            }
        });
    }
}

/// Config text for the demo; going through the normal parser keeps the demo honest.
fn demo_config(dir: &Path, upstream: SocketAddr) -> String {
    format!(
        r#"listen_addr = "127.0.0.1:0"
tunnel_domain = "{DEMO_DOMAIN}"
[tls]
cert_file = "{dir}/tls.crt"
key_file = "{dir}/tls.key"
[routes]
hello = "http://{upstream}"
[upstream]
allowed_ips = ["127.0.0.0/8"]
[cloudflared]
enabled = false
[admin]
enabled = false
"#,
        dir = dir.display()
    )
}

/// The JSON-RPC body of a `tools/call hello`.
pub const HELLO_CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"hello","arguments":{"name":"tunnel"}}}"#;

/// Runs the demo until Ctrl-C.
pub async fn run(bridge_port: u16, dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("mcp-tunnel-demo-{}", std::process::id()))
    });
    issue::generate(DEMO_DOMAIN, issue::CA_VALIDITY, issue::SERVER_VALIDITY)?
        .write_to(&dir)
        .with_context(|| format!("writing demo certificates to {}", dir.display()))?;

    let shutdown = Shutdown::new();
    let sample = TcpListener::bind("127.0.0.1:0").await?;
    let sample_addr = sample.local_addr()?;
    tokio::spawn(serve_sample(sample, shutdown.clone()));

    let config_path = dir.join("mcp-tunnel.toml");
    let text = demo_config(&dir, sample_addr);
    std::fs::write(&config_path, &text)?;
    let config = Config::parse(&config_path, &text)?;
    let proxy = Proxy::new(&config)?;
    let listener = Proxy::bind(&config).await?;
    let proxy_addr = listener.local_addr()?;
    tokio::spawn(proxy.serve(listener, shutdown.clone()));

    let bridge_listener = bridge::bind(SocketAddr::from(([127, 0, 0, 1], bridge_port)))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{bridge_port} for the bridge (choose another with --port)"))?;
    let bridge_addr = bridge_listener.local_addr()?;
    let target = WsTarget::parse(&format!("ws://{proxy_addr}")).map_err(anyhow::Error::msg)?;
    tokio::spawn(bridge::serve(bridge_listener, target, shutdown.clone()));

    let host = format!("hello.{DEMO_DOMAIN}");
    let port = bridge_addr.port();
    let ca = dir.join("ca.crt");
    println!("mcp-tunnel demo is running:");
    println!("  sample MCP server (tool `hello`)  http://{sample_addr}/mcp");
    println!("  proxy listener (WebSocket)        ws://{proxy_addr}");
    println!("  bridge (TLS clients connect here) 127.0.0.1:{port}");
    println!("  certificates and config           {}", dir.display());
    println!();
    println!("Call `hello` through bridge -> WebSocket -> inner TLS -> proxy -> upstream:");
    println!();
    println!(
        "  curl --resolve {host}:{port}:127.0.0.1 --cacert {} \\",
        ca.display()
    );
    println!(
        "    -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' \\"
    );
    println!("    -d '{HELLO_CALL}' \\");
    println!("    https://{host}:{port}/mcp");
    println!();
    println!("Press Ctrl-C to stop.");

    termination_signal().await?;
    shutdown.drain(config.shutdown_timeout).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Keeps `Arc` in the public surface stable for callers that hold the proxy.
pub type SharedProxy = Arc<Proxy>;
