//! No token, key or assertion reaches the logs: one test binary with a process-wide
//! subscriber at TRACE (every crate, every thread) while init, a token rotation, a CA rotation,
//! a refused exchange and the API-key flow run; then the captured text and the error messages
//! are searched for every secret the local Tunnels API handed out or received.

mod fake_tunnels_api;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use fake_tunnels_api::Fake;
use mcp_tunnel::provision::{self, Overrides, RetryPolicy, Settings};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn jwt(sub: &str, exp_offset: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let b = |s: String| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.{}",
        b(r#"{"alg":"ES256"}"#.into()),
        b(format!(
            r#"{{"iss":"https://idp","aud":"api.anthropic.com","sub":"{sub}","iat":{},"exp":{}}}"#,
            now - 10,
            now + exp_offset
        )),
        b(format!("sig-{sub}"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_captured_logs() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let tmp = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    let good = jwt("vm-1", 3600);
    let bad = jwt("vm-bad", -100);
    fake.with(|s| {
        s.accepted_assertions.insert(good.clone());
        s.api_keys.insert("sk-ant-api-logtest".into());
    });
    let token_file = tmp.path().join("token.jwt");
    std::fs::write(&token_file, &good).unwrap();
    let (rule, org) = fake.with(|s| (s.federation_rule_id.clone(), s.organization_id.clone()));
    let vars = vec![
        ("API_URL", fake.url.clone()),
        ("ANTHROPIC_FEDERATION_RULE_ID", rule.clone()),
        ("ANTHROPIC_ORGANIZATION_ID", org.clone()),
        ("ANTHROPIC_IDENTITY_TOKEN", good.clone()),
    ];
    let settings = |vars: &[(&str, String)], version: Option<&str>, out: &str| {
        let flags = Overrides {
            output: Some(format!("dir:{}", tmp.path().join(out).display())),
            token_version: version.map(str::to_string),
            ..Default::default()
        };
        let env = |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        let mut s = Settings::resolve(&flags, &env, None).unwrap();
        s.retry = RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
        };
        s
    };

    let mut errors = Vec::new();
    let s1 = settings(&vars, Some("1"), "state");
    provision::ensure(&s1).await.unwrap();
    fake.with(|s| s.fail_next = 1); // one retried 503 on a GET: the retry warning is logged
    provision::ensure(&settings(&vars, Some("2"), "state"))
        .await
        .unwrap();
    let store = mcp_tunnel::proxy::tls::CertStore::new(provision::load_server(&s1.output).unwrap());
    provision::rotate_ca(&s1, &store, Duration::from_millis(10))
        .await
        .unwrap();
    provision::rotate_token(&s1, "log test").await.unwrap();

    let mut bad_vars = vars.clone();
    bad_vars[3].1 = bad.clone();
    errors.push(
        provision::ensure(&settings(&bad_vars, None, "bad"))
            .await
            .unwrap_err()
            .to_string(),
    );
    let key_vars = vec![
        ("API_URL", fake.url.clone()),
        ("API_TOKEN", "sk-ant-api-logtest".to_string()),
    ];
    provision::ensure(&settings(&key_vars, None, "keyflow"))
        .await
        .unwrap();
    let wrong_key = vec![
        ("API_URL", fake.url.clone()),
        ("API_TOKEN", "sk-ant-api-wrong".to_string()),
    ];
    errors.push(
        provision::ensure(&settings(&wrong_key, None, "wrong"))
            .await
            .unwrap_err()
            .to_string(),
    );

    let mut secrets = fake.with(|s| s.secrets());
    secrets.push(bad.clone());
    secrets.push("sk-ant-api-wrong".into());
    // Every signature part on its own too, and the base64 body of each private key.
    for j in [&good, &bad] {
        secrets.push(j.split('.').nth(2).unwrap().to_string());
    }
    for key_file in ["tls.key", "ca.key"] {
        for dir in ["state", "keyflow"] {
            let pem = std::fs::read_to_string(tmp.path().join(dir).join(key_file)).unwrap();
            secrets.extend(
                pem.lines()
                    .filter(|l| !l.starts_with("-----") && l.len() > 16)
                    .map(str::to_string),
            );
        }
    }
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("registered CA certificate") && logs.contains("rotated tunnel token"),
        "the capture works: {}",
        &logs[..logs.len().min(2000)]
    );
    assert!(logs.contains("retrying"), "the retry path was logged");
    assert!(secrets.len() > 10);
    for secret in &secrets {
        assert!(secret.len() >= 8);
        assert!(
            !logs.contains(secret.as_str()),
            "a secret leaked into the logs"
        );
        for e in &errors {
            assert!(
                !e.contains(secret.as_str()),
                "a secret leaked into an error: {e}"
            );
        }
    }
    eprintln!(
        "searched {} bytes of TRACE logs and {} error messages for {} secrets",
        logs.len(),
        errors.len(),
        secrets.len()
    );
}
