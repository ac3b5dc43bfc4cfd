//! The tunnel token: where it comes from and a local format check, so that a malformed token
//! is a clear configuration error before cloudflared ever runs. The value never appears in
//! `Debug` output or logs.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;

/// State directory default (`setup` writes it there).
pub const STATE_TOKEN_FILE: &str = "/var/lib/mcp-tunnel/tunnel-token";

/// A token whose format checked out. `Debug` prints only the tunnel ID.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    value: String,
    tunnel_id: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(tunnel {}, value redacted)", self.tunnel_id)
    }
}

impl Token {
    pub fn value(&self) -> &str {
        &self.value
    }

    pub fn tunnel_id(&self) -> &str {
        &self.tunnel_id
    }

    /// Checks cloudflared's format: base64 of `{"a": account, "t": tunnel UUID, "s": base64
    /// secret}`. Errors never contain the value.
    pub fn parse(text: &str) -> Result<Token, &'static str> {
        let value = text.trim();
        if value.is_empty() {
            return Err("the file is empty");
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(value)
            .map_err(
                |_| "not base64 (expected the token exactly as the Console or `setup` gave it)",
            )?;
        let json: serde_json::Value = serde_json::from_slice(&raw)
            .map_err(|_| "not a cloudflared tunnel token (no JSON inside)")?;
        let field = |k: &str| {
            json.get(k)
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
        };
        let (Some(_), Some(t), Some(_)) = (field("a"), field("t"), field("s")) else {
            return Err("not a cloudflared tunnel token (expected fields a, t and s)");
        };
        Ok(Token {
            value: value.to_string(),
            tunnel_id: t.to_string(),
        })
    }
}

/// Why no token could be had; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cloudflared.token_file ({}): cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cloudflared.token_file ({}): {why}", path.display())]
    Invalid { path: PathBuf, why: &'static str },
}

/// The token file to use: the configured one, else systemd's credential
/// (`LoadCredential=tunnel-token:...`), else the state directory's.
pub fn token_path(configured: Option<&Path>, credentials_dir: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    if let Some(dir) = credentials_dir {
        return dir.join("tunnel-token");
    }
    PathBuf::from(STATE_TOKEN_FILE)
}

/// Reads and checks the token file.
pub fn read(path: &Path) -> Result<Token, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Token::parse(&text).map_err(|why| TokenError::Invalid {
        path: path.to_path_buf(),
        why,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_redact() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let good = b64(r#"{"a":"acct","t":"0c5f3c51-3c1b-4a9a-9a43-7e4f8b8e9a01","s":"c2VjcmV0"}"#);
        let t = Token::parse(&format!("{good}\n")).unwrap();
        assert_eq!(t.tunnel_id(), "0c5f3c51-3c1b-4a9a-9a43-7e4f8b8e9a01");
        assert!(!format!("{t:?}").contains(&good));
        assert!(Token::parse("").is_err());
        assert!(Token::parse("not base64!").is_err());
        assert!(Token::parse(&b64("[]")).is_err());
        assert!(Token::parse(&b64(r#"{"a":"x","t":"y"}"#)).is_err());
    }

    #[test]
    fn path_precedence() {
        let c = Path::new("/run/credentials/mcp-tunnel.service");
        assert_eq!(token_path(Some(Path::new("/x")), Some(c)), Path::new("/x"));
        assert_eq!(token_path(None, Some(c)), c.join("tunnel-token"));
        assert_eq!(token_path(None, None), Path::new(STATE_TOKEN_FILE));
    }
}
