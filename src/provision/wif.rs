//! Workload Identity Federation (spec section 11): trade an OIDC JWT for a short-lived
//! access token at `POST {api_url}/v1/oauth/token` (RFC 7523 jwt-bearer grant).

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Method, StatusCode};
use serde::Deserialize;

use super::api::{ANTHROPIC_VERSION, ApiClient, Repeat, Sent};
use super::{ProvisionError, Secret};

pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// How the client authenticates to the Tunnels API.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// WIF: exchange an identity token for an access token.
    Wif(WifSettings),
    /// A Tunnels API key sent as the bearer (the claude.ai flow, `API_TOKEN`).
    ApiToken(Secret),
}

/// The exchange's fixed fields and where the identity token comes from.
#[derive(Debug, Clone)]
pub struct WifSettings {
    pub federation_rule_id: String,
    pub organization_id: String,
    pub service_account_id: Option<String>,
    pub workspace_id: Option<String>,
    pub identity: IdentitySource,
}

/// Where the OIDC JWT comes from.
#[derive(Debug, Clone)]
pub enum IdentitySource {
    /// Read again at every exchange, so a rotated projected token is always current.
    File(PathBuf),
    /// A literal JWT (`ANTHROPIC_IDENTITY_TOKEN`).
    Literal(Secret),
}

impl IdentitySource {
    fn load(&self) -> Result<Secret, ProvisionError> {
        match self {
            IdentitySource::Literal(s) => Ok(s.clone()),
            IdentitySource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ProvisionError::Config(format!(
                        "ANTHROPIC_IDENTITY_TOKEN_FILE ({}): cannot read the identity token: {e}",
                        path.display()
                    ))
                })?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(ProvisionError::Config(format!(
                        "ANTHROPIC_IDENTITY_TOKEN_FILE ({}): the file is empty; expected an OIDC JWT from the host's identity provider",
                        path.display()
                    )));
                }
                Ok(Secret::new(token))
            }
        }
    }
}

/// An access token and how long it lives.
pub struct Exchanged {
    pub access_token: Secret,
    pub expires_in: Duration,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Secret,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Performs one exchange, reading the identity token now.
pub(super) async fn exchange(
    client: &ApiClient,
    wif: &WifSettings,
) -> Result<Exchanged, ProvisionError> {
    let assertion = wif.identity.load()?;
    let mut body = serde_json::json!({
        "grant_type": GRANT_TYPE,
        "assertion": assertion.expose(),
        "federation_rule_id": wif.federation_rule_id,
        "organization_id": wif.organization_id,
    });
    if let Some(s) = &wif.service_account_id {
        body["service_account_id"] = s.clone().into();
    }
    if let Some(w) = &wif.workspace_id {
        body["workspace_id"] = w.clone().into();
    }
    let sent = client
        .send(
            Method::POST,
            "/v1/oauth/token",
            Some(Bytes::from(body.to_string())),
            Repeat::Safe,
            |r| r.header("anthropic-version", ANTHROPIC_VERSION),
        )
        .await;
    let bytes = match sent {
        Ok(b) => b,
        Err(Sent::Unreachable(e)) => return Err(e),
        Err(Sent::Status(f)) => {
            let code = format!("{} {}", f.kind, f.message);
            if code.contains("invalid_grant") {
                return Err(ProvisionError::InvalidGrant {
                    facts: jwt_facts(assertion.expose(), time::OffsetDateTime::now_utc()),
                    rule: wif.federation_rule_id.clone(),
                });
            }
            if code.contains("workspace_id_required") {
                return Err(ProvisionError::Config(
                    "the federation rule is enabled for several workspaces: set ANTHROPIC_WORKSPACE_ID (wrkspc_... or \"default\") to pick one".into(),
                ));
            }
            if f.status == StatusCode::BAD_REQUEST {
                return Err(ProvisionError::Config(format!(
                    "the token exchange was refused as malformed ({}): check ANTHROPIC_FEDERATION_RULE_ID (fdrl_...), ANTHROPIC_ORGANIZATION_ID (the organization UUID) and ANTHROPIC_SERVICE_ACCOUNT_ID; server said: {}",
                    if f.kind.is_empty() {
                        "HTTP 400"
                    } else {
                        &f.kind
                    },
                    f.message
                )));
            }
            return Err(ProvisionError::Api {
                what: "POST /v1/oauth/token".into(),
                status: f.status.as_u16(),
                kind: f.kind,
                message: f.message,
                request_id: f.request_id,
            });
        }
    };
    let parsed: TokenResponse = serde_json::from_slice(&bytes).map_err(|e| {
        ProvisionError::Protocol(format!("POST /v1/oauth/token: unexpected response: {e}"))
    })?;
    Ok(Exchanged {
        access_token: parsed.access_token,
        expires_in: Duration::from_secs(parsed.expires_in.unwrap_or(3600)),
    })
}

/// The JWT's non-secret claims (`iss`, `aud`, `sub`, `exp`, `iat`) read without verifying
/// the signature, to show the operator what the server compared against the rule. The
/// signature, which is what makes the JWT a credential, is never decoded or shown.
pub fn jwt_facts(jwt: &str, now: time::OffsetDateTime) -> String {
    let Some(payload) = jwt.split('.').nth(1) else {
        return "the identity token is not a JWT (expected three dot-separated parts)".into();
    };
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let Some(claims) = decoded else {
        return "the identity token's payload is not base64url JSON".into();
    };
    let text = |k: &str| match claims.get(k) {
        Some(serde_json::Value::String(s)) => format!("{s:?}"),
        Some(v) => v.to_string(),
        None => "(missing)".into(),
    };
    let mut out = format!(
        "token claims: iss={} aud={} sub={}",
        text("iss"),
        text("aud"),
        text("sub")
    );
    let now_s = now.unix_timestamp();
    if let Some(exp) = claims.get("exp").and_then(|v| v.as_i64()) {
        if exp <= now_s {
            out.push_str(&format!(" exp: EXPIRED {}s ago", now_s - exp));
        } else {
            out.push_str(&format!(" exp: in {}s", exp - now_s));
        }
        if let Some(iat) = claims.get("iat").and_then(|v| v.as_i64()) {
            out.push_str(&format!(" lifetime={}s", exp - iat));
        }
    } else {
        out.push_str(" exp=(missing)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2lnbmF0dXJl", b(r#"{"alg":"ES256"}"#), b(claims))
    }

    #[test]
    fn facts_name_the_claims_and_expiry() {
        let now = time::OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        let facts = jwt_facts(
            &jwt(
                r#"{"iss":"https://idp","aud":["api.anthropic.com"],"sub":"vm-1","iat":996000,"exp":999000}"#,
            ),
            now,
        );
        assert_eq!(
            facts,
            "token claims: iss=\"https://idp\" aud=[\"api.anthropic.com\"] sub=\"vm-1\" exp: EXPIRED 1000s ago lifetime=3000s"
        );
        assert!(!facts.contains("c2lnbmF0dXJl"));
        assert!(jwt_facts("opaque", now).contains("not a JWT"));
    }
}
