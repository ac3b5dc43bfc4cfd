//! Certificate facts and the preflight a server pair must pass before it is presented:
//! the rules Anthropic's backend applies (spec section 9.4), checked locally so that a bad
//! pair is refused here instead of failing every handshake at the edge.

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

/// What the appliance needs to know about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// Serial number, hex with colons (as `openssl x509 -serial` groups it).
    pub serial: String,
    pub subject: String,
    /// Validity bounds, seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    pub dns_names: Vec<String>,
    /// `None` when the certificate has no EKU extension (which allows every use).
    pub eku_server_auth: Option<bool>,
    pub authority_key_id: Option<Vec<u8>>,
    pub subject_key_id: Option<Vec<u8>>,
    pub is_ca: bool,
}

/// Why a pair was refused; the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreflightError {
    #[error("cannot parse the certificate: {0}")]
    Parse(String),
    #[error("certificate is not valid yet (notBefore is {0}); check the clock or reissue")]
    NotYetValid(String),
    #[error("certificate expired at {0}; renew it (`mcp-tunnel renew-cert`)")]
    Expired(String),
    #[error("certificate SAN {sans:?} does not cover {missing}; issue it for *.{domain}")]
    NameNotCovered {
        sans: Vec<String>,
        missing: String,
        domain: String,
    },
    #[error("certificate extendedKeyUsage does not include serverAuth")]
    NoServerAuth,
    #[error(
        "certificate is not signed by the configured CA ({0}); the edge only accepts certificates from a CA registered on the tunnel"
    )]
    WrongIssuer(String),
}

fn when(ts: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(ts.max(0) as u64),
    )
    .to_string()
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, PreflightError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| PreflightError::Parse(e.to_string()))
}

/// Reads the facts of a DER certificate.
pub fn facts(der: &[u8]) -> Result<CertFacts, PreflightError> {
    let cert = parse(der)?;
    let mut facts = CertFacts {
        serial: cert.raw_serial_as_string(),
        subject: cert.subject().to_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        dns_names: Vec::new(),
        eku_server_auth: None,
        authority_key_id: None,
        subject_key_id: None,
        is_ca: cert.is_ca(),
    };
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    if let GeneralName::DNSName(n) = name {
                        facts.dns_names.push(n.to_ascii_lowercase());
                    }
                }
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                facts.eku_server_auth = Some(eku.server_auth || eku.any);
            }
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                facts.authority_key_id = aki.key_identifier.as_ref().map(|k| k.0.to_vec());
            }
            ParsedExtension::SubjectKeyIdentifier(ski) => {
                facts.subject_key_id = Some(ski.0.to_vec());
            }
            _ => {}
        }
    }
    Ok(facts)
}

/// Whether a SAN entry covers `host` (exact, or a wildcard for exactly one label).
pub fn san_covers(san: &str, host: &str) -> bool {
    let (san, host) = (san.to_ascii_lowercase(), host.to_ascii_lowercase());
    if let Some(suffix) = san.strip_prefix("*.") {
        host.strip_suffix(suffix)
            .and_then(|l| l.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.'))
    } else {
        san == host
    }
}

/// What the certificate must cover.
pub struct Expectations<'a> {
    /// Unix time to judge validity at (injected so tests control the clock).
    pub now: i64,
    pub tunnel_domain: Option<&'a str>,
    /// Full hostnames of the configured routes.
    pub route_hosts: &'a [String],
    /// The CA that must have signed the certificate, when known.
    pub ca: Option<&'a CertificateDer<'a>>,
}

/// Checks a leaf certificate; returns its facts when it may be presented.
pub fn check(
    leaf: &CertificateDer<'_>,
    want: &Expectations<'_>,
) -> Result<CertFacts, PreflightError> {
    let f = facts(leaf)?;
    if want.now < f.not_before {
        return Err(PreflightError::NotYetValid(when(f.not_before)));
    }
    if want.now > f.not_after {
        return Err(PreflightError::Expired(when(f.not_after)));
    }
    if f.eku_server_auth == Some(false) {
        return Err(PreflightError::NoServerAuth);
    }
    if let Some(domain) = want.tunnel_domain {
        let wildcard = format!("*.{domain}");
        let covers_all = want
            .route_hosts
            .iter()
            .all(|h| f.dns_names.iter().any(|s| san_covers(s, h)));
        if !f.dns_names.contains(&wildcard) && !covers_all {
            let missing = want
                .route_hosts
                .iter()
                .find(|h| !f.dns_names.iter().any(|s| san_covers(s, h)))
                .cloned()
                .unwrap_or(wildcard);
            return Err(PreflightError::NameNotCovered {
                sans: f.dns_names.clone(),
                missing,
                domain: domain.to_string(),
            });
        }
    }
    if let Some(ca_der) = want.ca {
        let ca = parse(ca_der)?;
        let ca_facts = facts(ca_der)?;
        let leaf = parse(leaf)?;
        if leaf.issuer() != ca.subject() {
            return Err(PreflightError::WrongIssuer(format!(
                "issuer is {}, the CA is {}",
                leaf.issuer(),
                ca.subject()
            )));
        }
        if f.authority_key_id.is_none() || f.authority_key_id != ca_facts.subject_key_id {
            return Err(PreflightError::WrongIssuer(
                "authorityKeyIdentifier missing or not equal to the CA's subjectKeyIdentifier"
                    .into(),
            ));
        }
        leaf.verify_signature(Some(ca.public_key()))
            .map_err(|e| PreflightError::WrongIssuer(format!("signature does not verify: {e}")))?;
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_covers_exactly_one_label() {
        assert!(san_covers("*.t.example", "echo.t.example"));
        assert!(san_covers("*.T.example", "ECHO.t.example"));
        assert!(!san_covers("*.t.example", "a.b.t.example"));
        assert!(!san_covers("*.t.example", "t.example"));
        assert!(!san_covers("*.t.example", "echot.example"));
        assert!(san_covers("t.example", "t.example"));
    }
}
