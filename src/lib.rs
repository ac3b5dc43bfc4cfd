//! mcp-tunnel: one supervisor process that connects Claude to MCP servers in a private
//! network. The binary (`main.rs`) only parses arguments; everything lives here so that
//! integration tests drive the same code.

#![forbid(unsafe_code)]

pub mod assets;
pub mod certs;
pub mod cli;
pub mod cloudflared;
pub mod config;
pub mod demo;
pub mod doctor;
pub mod import;
pub mod incident;
pub mod lifecycle;
pub mod mcp;
pub mod provision;
pub mod proxy;
pub mod supervisor;
pub mod telemetry;
