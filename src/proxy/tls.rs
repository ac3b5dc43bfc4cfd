//! Inner TLS (the proxy as TLS server inside the WebSocket) and upstream TLS (the proxy as
//! client of `https://` upstreams).

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::certs::{self, CertError};
use crate::config::UpstreamConfig;

/// A certificate store on its own, for a TLS server that has no proxy generation behind it
/// (the inner-TLS tests, a provisioning run outside the service). The proxy presents the
/// certificate of its current [`super::state::Generation`] instead. Swapping affects new
/// handshakes only, so established sessions continue undisturbed.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
}

impl CertStore {
    pub fn new(initial: Arc<CertifiedKey>) -> CertStore {
        CertStore {
            current: ArcSwap::new(initial),
        }
    }

    pub fn swap(&self, next: Arc<CertifiedKey>) {
        self.current.store(next);
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        HELLO_SNI.set(hello.server_name().map(Into::into));
        Some(self.current.load_full())
    }
}

impl ResolvesServerCert for super::state::Store {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        HELLO_SNI.set(hello.server_name().map(Into::into));
        Some(self.load().cert.clone())
    }
}

thread_local! {
    /// The SNI of the ClientHello this thread resolved last, for [`super::inner_tls`]
    /// (rustls' unbuffered server does not expose it). rustls asks the resolver on every
    /// full and resumed handshake, with the name it keeps as the connection's.
    static HELLO_SNI: std::cell::Cell<Option<Box<str>>> = const { std::cell::Cell::new(None) };
}

/// Takes (and clears) the SNI the resolver saw last on this thread.
pub(crate) fn take_hello_sni() -> Option<Box<str>> {
    HELLO_SNI.take()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server config for inner TLS: ALPN h2 and http/1.1, certificate from the store.
pub fn server_config(store: Arc<dyn ResolvesServerCert>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Client config for `https://` upstreams: trusts `ca_file` and, only when asked, the system
/// store (as the reference does: no implicit system trust). `None` when neither is set.
pub fn upstream_client_config(up: &UpstreamConfig) -> Result<Option<Arc<ClientConfig>>, CertError> {
    if up.ca_file.is_none() && !up.include_system_cas {
        return Ok(None);
    }
    let mut roots = RootCertStore::empty();
    if let Some(ca_file) = &up.ca_file {
        for cert in certs::load_certs("upstream.tls.ca_file", ca_file)? {
            roots.add(cert).map_err(|e| CertError::Invalid {
                field: "upstream.tls.ca_file",
                path: ca_file.clone(),
                what: format!("not a usable CA certificate: {e}"),
            })?;
        }
    }
    if up.include_system_cas {
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
    }
    Ok(Some(client_config(roots, vec![b"http/1.1".to_vec()])))
}

/// A client config trusting `roots`, with the given ALPN list.
pub fn client_config(roots: RootCertStore, alpn: Vec<Vec<u8>>) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    Arc::new(config)
}
