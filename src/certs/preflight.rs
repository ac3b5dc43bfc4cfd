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
    #[error(
        "certificate SAN {sans:?} does not cover {missing}; issue it for *.{domain} (a wildcard covers one label: a deeper route host needs a SAN of its own)"
    )]
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

/// Checks a leaf certificate; returns its facts when it may be presented. The steps are the
/// `check_*` functions below, in this order; `doctor` runs each on its own to report every
/// problem at once.
pub fn check(
    leaf: &CertificateDer<'_>,
    want: &Expectations<'_>,
) -> Result<CertFacts, PreflightError> {
    let f = facts(leaf)?;
    check_validity(&f, want.now)?;
    check_eku(&f)?;
    check_names(&f, want.tunnel_domain, want.route_hosts)?;
    if let Some(ca_der) = want.ca {
        check_chain(leaf, ca_der)?;
    }
    Ok(f)
}

/// Valid at `now`.
pub fn check_validity(f: &CertFacts, now: i64) -> Result<(), PreflightError> {
    if now < f.not_before {
        return Err(PreflightError::NotYetValid(when(f.not_before)));
    }
    if now > f.not_after {
        return Err(PreflightError::Expired(when(f.not_after)));
    }
    Ok(())
}

/// An EKU extension, when present, includes serverAuth.
pub fn check_eku(f: &CertFacts) -> Result<(), PreflightError> {
    if f.eku_server_auth == Some(false) {
        return Err(PreflightError::NoServerAuth);
    }
    Ok(())
}

/// The hosts of `hosts` that no SAN entry covers.
pub fn uncovered(f: &CertFacts, hosts: &[String]) -> Vec<String> {
    hosts
        .iter()
        .filter(|h| !f.dns_names.iter().any(|s| san_covers(s, h)))
        .cloned()
        .collect()
}

/// With a tunnel domain: the SAN covers every routed host. `*.<domain>` is not enough by
/// itself: a route `a.b` is the host `a.b.<domain>`, which the wildcard does not cover, and
/// a client would refuse the handshake.
pub fn check_names(
    f: &CertFacts,
    tunnel_domain: Option<&str>,
    route_hosts: &[String],
) -> Result<(), PreflightError> {
    let Some(domain) = tunnel_domain else {
        return Ok(());
    };
    let missing = uncovered(f, route_hosts);
    if !missing.is_empty() {
        return Err(PreflightError::NameNotCovered {
            sans: f.dns_names.clone(),
            missing: missing[0].clone(),
            domain: domain.to_string(),
        });
    }
    Ok(())
}

/// Signed directly by `ca`: issuer name, AKI = the CA's SKI, and the signature.
pub fn check_chain(
    leaf: &CertificateDer<'_>,
    ca_der: &CertificateDer<'_>,
) -> Result<(), PreflightError> {
    let f = facts(leaf)?;
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
            "authorityKeyIdentifier missing or not equal to the CA's subjectKeyIdentifier".into(),
        ));
    }
    leaf.verify_signature(Some(ca.public_key()))
        .map_err(|e| PreflightError::WrongIssuer(format!("signature does not verify: {e}")))?;
    Ok(())
}

/// The tunnel's rules for an uploaded CA certificate (spec 9.4), as problems found in a PEM
/// file's bytes; empty when the file may be uploaded. A CA that breaks them is refused by the
/// Tunnels API, so no certificate it signs is ever trusted by the edge.
pub fn ca_upload_problems(pem: &[u8], now: i64) -> Vec<String> {
    use rustls::pki_types::pem::PemObject;
    let mut out = Vec::new();
    if pem.len() > 8 * 1024 {
        out.push(format!(
            "the file is {} bytes: expected at most 8 kB",
            pem.len()
        ));
    }
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    match certs.len() {
        0 => {
            out.push("no PEM certificate found".into());
            return out;
        }
        1 => {}
        n => out.push(format!(
            "{n} certificates in the file: expected exactly one"
        )),
    }
    let cert = match parse(&certs[0]) {
        Ok(c) => c,
        Err(e) => {
            out.push(e.to_string());
            return out;
        }
    };
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca && bc.critical => {}
        Ok(Some(bc)) if bc.value.ca => {
            out.push("basicConstraints CA:TRUE is not marked critical".into())
        }
        Ok(Some(_)) => out.push("basicConstraints says CA:FALSE: not a CA certificate".into()),
        Ok(None) => out.push("no basicConstraints extension: not a CA certificate".into()),
        Err(e) => out.push(format!("unreadable basicConstraints: {e}")),
    }
    match cert.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() => {}
        Ok(Some(_)) => out.push("keyUsage lacks keyCertSign".into()),
        Ok(None) => out.push("no keyUsage extension (expected keyCertSign)".into()),
        Err(e) => out.push(format!("unreadable keyUsage: {e}")),
    }
    if let Ok(f) = facts(&certs[0]) {
        if f.subject_key_id.is_none() {
            out.push("no subjectKeyIdentifier extension".into());
        }
        if now < f.not_before {
            out.push(format!("not valid before {}", when(f.not_before)));
        }
        if now > f.not_after {
            out.push(format!("expired at {}", when(f.not_after)));
        }
    }
    match cert.public_key().parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(rsa)) if rsa.key_size() < 2048 => out.push(
            format!("RSA key of {} bits: expected at least 2048", rsa.key_size()),
        ),
        Ok(x509_parser::public_key::PublicKey::EC(ec)) if ec.key_size() < 256 => out.push(format!(
            "EC key of {} bits: expected P-256 or larger",
            ec.key_size()
        )),
        _ => {}
    }
    const WEAK: [(&str, &str); 4] = [
        ("1.2.840.113549.1.1.4", "md5WithRSAEncryption"),
        ("1.2.840.113549.1.1.5", "sha1WithRSAEncryption"),
        ("1.2.840.10045.4.1", "ecdsa-with-SHA1"),
        ("1.2.840.10040.4.3", "dsa-with-sha1"),
    ];
    let alg = cert.signature_algorithm.algorithm.to_id_string();
    if let Some((_, name)) = WEAK.iter().find(|(oid, _)| *oid == alg) {
        out.push(format!("signed with {name}: expected SHA-256 or stronger"));
    }
    out
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
