//! The proxy's swappable state, one [`Generation`]: routes with their stream leases, the
//! upstream plane (policy, trust, connection pool) and the presented certificate. A live
//! change builds the whole next generation, then swaps it in one store.
//!
//! Each route holds a lease (a cancellation token) that every response streaming on it
//! watches. A reload carries a route's lease over when the route still means the same thing
//! (same upstream, still allowed), so its streams are never touched; otherwise the old lease
//! is cancelled and the route's streams close (a removed route or a narrowed allowlist:
//! security wins over continuity).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use super::exchange::IdlePools;
use super::tls;
use super::upstream::{ConnectError, Resolve, UpstreamSettings, resolve_checked};
use crate::certs::CertError;
use crate::config::{Config, McpConfig, Route, RouteTable, UpstreamConfig};

/// Everything a live change swaps, as one value. A request, a handshake and `/status` each
/// load one generation, so none of them can see the routes of one reload with the upstream
/// plane or the certificate of another.
#[derive(Clone)]
pub struct Generation {
    /// 1 at start, +1 per applied change (a reload that changed something, or a certificate
    /// installed by provisioning).
    pub number: u64,
    pub snapshot: Arc<Snapshot>,
    pub plane: Arc<UpstreamPlane>,
    /// What new inner-TLS handshakes are given; sessions set up before keep theirs.
    pub cert: Arc<CertifiedKey>,
}

/// The one store of the current [`Generation`]. It is also the inner-TLS certificate
/// resolver (`proxy::tls`), so a handshake reads the same store as the request after it.
pub struct Store {
    current: ArcSwap<Generation>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("generation", &self.current.load().number)
            .finish()
    }
}

impl Store {
    pub fn new(first: Generation) -> Store {
        Store {
            current: ArcSwap::from_pointee(first),
        }
    }

    pub fn load(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Stores `next` as the following generation of whatever is current when it lands, so
    /// a certificate installed between a reload's load and its store is never lost.
    pub(super) fn publish(&self, next: impl Fn(&Generation) -> Generation) -> Arc<Generation> {
        self.current.rcu(|cur| Arc::new(next(cur)));
        self.current.load_full()
    }
}

/// Routes and per-route leases.
pub struct Snapshot {
    pub routes: RouteTable,
    pub leases: HashMap<String, CancellationToken>,
    pub response_header_timeout: Duration,
    /// Bounds of MCP inspection (`[mcp]`).
    pub mcp: McpConfig,
}

/// Upstream policy and the connection pool built for it. A new policy gets a new pool, so
/// that no idle connection checked under the old policy is ever reused under the new one.
pub struct UpstreamPlane {
    pub config: UpstreamConfig,
    pub settings: Arc<UpstreamSettings>,
    /// Idle connections requests gave back (`proxy::exchange`), one list per
    /// worker: a session takes and returns connections on its own worker's only.
    pub idle: IdlePools,
}

impl UpstreamPlane {
    /// `workers`: how many data-plane workers take connections from it (one idle list each).
    pub fn new(
        config: &UpstreamConfig,
        resolver: &Arc<dyn Resolve>,
        workers: usize,
    ) -> Result<UpstreamPlane, CertError> {
        let settings = Arc::new(UpstreamSettings {
            resolver: resolver.clone(),
            ip_policy: config.ip_policy.clone(),
            tls: tls::upstream_client_config(config)?,
            connect_timeout: config.connect_timeout,
        });
        Ok(UpstreamPlane {
            config: config.clone(),
            settings,
            idle: IdlePools::new(workers),
        })
    }
}

impl Snapshot {
    /// A fresh snapshot: every route gets a new lease.
    pub fn new(config: &Config) -> Snapshot {
        let routes = config.route_table();
        let leases = routes
            .iter()
            .map(|r| (r.name.clone(), CancellationToken::new()))
            .collect();
        Snapshot {
            routes,
            leases,
            response_header_timeout: config.upstream.response_header_timeout,
            mcp: config.mcp.clone(),
        }
    }
}

/// Why a route's streams were closed by a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedRoute {
    pub route: String,
    pub reason: String,
}

/// What a reload changed in the proxy.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub closed: Vec<ClosedRoute>,
    pub upstream_policy_changed: bool,
}

impl ApplyReport {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && !self.upstream_policy_changed
    }
}

fn same_target(a: &Route, b: &Route) -> bool {
    a.upstream == b.upstream && a.preserve_host == b.preserve_host
}

/// Builds the next snapshot from `config`, carrying leases over where the route is unchanged
/// and still allowed under `plane`'s policy. Returns the snapshot, the leases to cancel once
/// it is published, and the report.
pub async fn next_snapshot(
    old: &Snapshot,
    config: &Config,
    plane: &UpstreamPlane,
    policy_changed: bool,
) -> (Snapshot, Vec<CancellationToken>, ApplyReport) {
    let mut next = Snapshot::new(config);
    let mut report = ApplyReport {
        upstream_policy_changed: policy_changed,
        ..ApplyReport::default()
    };
    let mut cancel = Vec::new();
    for route in next.routes.iter() {
        let Some(old_route) = old.routes.iter().find(|r| r.name == route.name) else {
            report.added.push(route.name.clone());
            continue;
        };
        let old_lease = old.leases.get(&route.name).cloned().unwrap_or_default();
        if !same_target(old_route, route) {
            report.changed.push(route.name.clone());
            report.closed.push(ClosedRoute {
                route: route.name.clone(),
                reason: format!(
                    "upstream changed from {} to {}",
                    old_route.upstream, route.upstream
                ),
            });
            cancel.push(old_lease);
            continue;
        }
        // Open streams were filtered under the old policy: a stream listing tools the new
        // policy hides must not keep flowing.
        if old_route.mcp.policy != route.mcp.policy {
            report.changed.push(route.name.clone());
            report.closed.push(ClosedRoute {
                route: route.name.clone(),
                reason: "MCP tool policy changed".into(),
            });
            cancel.push(old_lease);
            continue;
        }
        if old_route.mcp != route.mcp {
            report.changed.push(route.name.clone());
        }
        if policy_changed {
            let u = &route.upstream;
            // A lookup failure is not a policy decision: only a refusal closes streams.
            if let Err(e @ ConnectError::NotAllowed { .. }) = resolve_checked(
                plane.settings.resolver.as_ref(),
                &plane.settings.ip_policy,
                &u.host,
                u.port,
            )
            .await
            {
                report.closed.push(ClosedRoute {
                    route: route.name.clone(),
                    reason: format!("no longer allowed by upstream.allowed_ips ({e})"),
                });
                cancel.push(old_lease);
                continue;
            }
        }
        next.leases.insert(route.name.clone(), old_lease);
    }
    for old_route in old.routes.iter() {
        if next.routes.iter().all(|r| r.name != old_route.name) {
            report.removed.push(old_route.name.clone());
            report.closed.push(ClosedRoute {
                route: old_route.name.clone(),
                reason: "route removed".into(),
            });
            cancel.push(old.leases.get(&old_route.name).cloned().unwrap_or_default());
        }
    }
    report.added.sort();
    report.removed.sort();
    report.changed.sort();
    (next, cancel, report)
}
