//! The embedded proxy: WebSocket listener, inner TLS, routing and forwarding to upstreams.
//!
//! A request walks one way: `listener` (accept, peer check, WebSocket upgrade) -> `session`
//! (the worker's session: inner TLS, HTTP/1.1 or h2) -> `forward` (route, policy, upstream
//! request) -> `body` (what streams each way), `answer` (the proxy's own answers),
//! `exchange` (the upstream HTTP/1.1 exchange) and `upstream` (resolve, check, connect).
//! `state` holds what a reload swaps; `Proxy`, here, owns it all.

pub mod activity;
pub mod answer;
pub mod body;
pub mod bridge;
pub mod edge;
pub mod exchange;
mod forward;
pub mod h2;
pub mod inner_tls;
pub mod keepalive;
mod listener;
pub mod mcp;
pub mod metrics;
pub mod peer;
mod prefixed;
pub mod session;
pub mod sockdiag;
pub mod state;
pub mod tls;
pub mod upstream;
pub mod workers;
pub mod ws;

/// What the data path sends upstream and answers itself, for `explain` and `doctor`.
pub use answer::Answer;
pub use forward::{upstream_host, upstream_uri};

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{info, warn};

use crate::certs::{self, CertError};
use crate::config::{Config, Limits, PeerCheck};
use state::{ApplyReport, Generation, Snapshot, Store, UpstreamPlane};
use upstream::{Resolve, SystemResolver};

/// Errors that stop the proxy from starting.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("cannot listen on {addr} (listen_addr): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    PeerCheck(#[from] peer::PeerCheckUnavailable),
}

/// Shared proxy state. Readers on the request path load snapshots without locking.
pub struct Proxy {
    resolver: Arc<dyn Resolve>,
    /// The current generation: routes, upstream plane, certificate.
    store: Arc<Store>,
    /// Inner TLS: the certificate comes from `store` at each handshake.
    server_tls: Arc<rustls::ServerConfig>,
    /// Serialises reloads so two never interleave their lease bookkeeping.
    apply_lock: tokio::sync::Mutex<()>,
    /// `[limits]`, fixed at start (changing them needs a restart).
    limits: Limits,
    /// One permit per open tunnel connection (`limits.max_sessions`).
    session_permits: Arc<tokio::sync::Semaphore>,
    metrics: Arc<metrics::ProxyMetrics>,
    /// `[peer_check]` on: who may connect to the listener (fixed at start).
    peer_gate: Option<peer::PeerGate>,
    /// Failed accepts come in floods (out of descriptors): their log lines are sampled.
    accept_log: crate::telemetry::limiter::LogLimiter,
    /// How many data-plane workers `serve` starts (`workers`, fixed at start).
    worker_count: usize,
    /// The data-plane workers, once `serve` has started them.
    workers: std::sync::OnceLock<Arc<workers::Workers>>,
}

impl Proxy {
    /// Builds the proxy from a validated config: loads the server pair and upstream trust.
    pub fn new(config: &Config) -> Result<Arc<Proxy>, ProxyError> {
        Proxy::with_resolver(config, Arc::new(SystemResolver))
    }

    /// As `new`, with a chosen resolver (tests use it to play DNS).
    pub fn with_resolver(
        config: &Config,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Arc<Proxy>, ProxyError> {
        let pair = certs::load_server_pair(&config.tls)?;
        Proxy::with_pair(config, pair, resolver)
    }

    /// As `with_resolver`, presenting a pair the caller already loaded and checked (`run`
    /// preflights it), so the file is read once and what is presented is what was checked.
    pub fn with_pair(
        config: &Config,
        pair: Arc<rustls::sign::CertifiedKey>,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Arc<Proxy>, ProxyError> {
        let peer_gate = match config.peer_check {
            PeerCheck::On { allow_root } => {
                Some(peer::PeerGate::new(allow_root, config.listen_addr.ip())?)
            }
            PeerCheck::Off(_) => None,
        };
        let worker_count = workers::count(config.workers);
        let store = Arc::new(Store::new(Generation {
            number: 1,
            snapshot: Arc::new(Snapshot::new(config)),
            plane: Arc::new(UpstreamPlane::new(
                &config.upstream,
                &resolver,
                worker_count,
            )?),
            cert: pair,
        }));
        let proxy = Proxy {
            resolver,
            server_tls: tls::server_config(store.clone()),
            store,
            apply_lock: tokio::sync::Mutex::new(()),
            limits: config.limits.clone(),
            session_permits: Arc::new(tokio::sync::Semaphore::new(config.limits.max_sessions)),
            metrics: Arc::default(),
            peer_gate,
            accept_log: Default::default(),
            worker_count,
            workers: std::sync::OnceLock::new(),
        };
        for route in config.route_table().iter() {
            info!(route = %route.name, upstream = %route.upstream, preserve_host = route.preserve_host, "route configured");
        }
        Ok(Arc::new(proxy))
    }

    /// Builds the next generation from `config` (and `cert`, when the reload brings a new
    /// one) and stores it whole; `changed` says whether it counts as a new generation.
    /// Requests in flight keep the generation they started with; streams on routes that were
    /// removed, changed, or are no longer allowed are closed once it is stored, each logged;
    /// every other stream is untouched. Nothing is stored when building fails.
    pub async fn apply(
        &self,
        config: &Config,
        cert: Option<Arc<rustls::sign::CertifiedKey>>,
        changed: bool,
    ) -> Result<ApplyReport, ProxyError> {
        let _serial = self.apply_lock.lock().await;
        let current = self.store.load();
        let old_plane = current.plane.clone();
        let policy_changed = old_plane.config != config.upstream;
        let plane = if policy_changed {
            Arc::new(UpstreamPlane::new(
                &config.upstream,
                &self.resolver,
                self.worker_count,
            )?)
        } else {
            old_plane
        };
        let (next, cancel, report) =
            state::next_snapshot(&current.snapshot, config, &plane, policy_changed).await;
        let next = Arc::new(next);
        self.store.publish(|cur| Generation {
            number: cur.number + u64::from(changed),
            snapshot: next.clone(),
            plane: plane.clone(),
            cert: cert.clone().unwrap_or_else(|| cur.cert.clone()),
        });
        for closed in &report.closed {
            warn!(route = %closed.route, reason = %closed.reason, "closing the route's open streams");
        }
        for lease in cancel {
            lease.cancel();
        }
        for name in &report.added {
            info!(route = %name, "route configured");
        }
        for name in &report.removed {
            info!(route = %name, "route removed");
        }
        Ok(report)
    }

    /// The routes served now (after the last applied reload), for the status page.
    pub fn routes(&self) -> Vec<Arc<crate::config::Route>> {
        let mut routes: Vec<_> = self.store.load().snapshot.routes.iter().cloned().collect();
        routes.sort_by(|a, b| a.name.cmp(&b.name));
        routes
    }

    /// Request, refusal and session counters (for `/metrics` and the watchdog).
    pub fn metrics(&self) -> &Arc<metrics::ProxyMetrics> {
        &self.metrics
    }

    /// The peer check, when `[peer_check]` is on: who may connect to the listener.
    pub fn peer_gate(&self) -> Option<&peer::PeerGate> {
        self.peer_gate.as_ref()
    }

    /// The current generation.
    pub fn generation(&self) -> Arc<Generation> {
        self.store.load()
    }

    /// Presents `cert` to new handshakes from now on, as a new generation with the same
    /// routes and upstream plane (provisioning's renewals and CA rotation).
    pub fn install_cert(&self, cert: Arc<rustls::sign::CertifiedKey>) -> u64 {
        self.store
            .publish(|cur| Generation {
                number: cur.number + 1,
                cert: cert.clone(),
                ..cur.clone()
            })
            .number
    }

    /// The data-plane workers, once serving (for the watchdog and `/metrics`).
    pub fn workers(&self) -> Option<&Arc<workers::Workers>> {
        self.workers.get()
    }
}
