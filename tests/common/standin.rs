//! The path of the cloudflared stand-in (crate `cloudflared-standin`, `standin/`). It is a
//! workspace member of its own, and Cargo hands a package's tests only that package's
//! binaries (`CARGO_BIN_EXE_*`), so it is built here, once per test binary, with the profile
//! and target directory of the test itself: `cargo test --test supervisor` alone works, and
//! a stale copy is never run.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

pub fn path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = Path::new(env!("CARGO_BIN_EXE_mcp-tunnel"))
            .parent()
            .expect("the profile directory of the mcp-tunnel binary");
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args(["build", "--quiet", "--locked", "-p", "cloudflared-standin"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        // What Cargo sets for this test process only: build scripts (ring's) track some of it,
        // and a changed value would rebuild them here and again in the next plain build.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if [
                "CARGO_MANIFEST_",
                "CARGO_PKG_",
                "CARGO_BIN_",
                "CARGO_CRATE_NAME",
            ]
            .iter()
            .any(|p| key.starts_with(p))
                || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR"].contains(&key.as_ref())
            {
                cmd.env_remove(key.as_ref());
            }
        }
        // target/debug serves the dev and test profiles; any other directory is its profile.
        match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => {}
            Some(profile) => {
                cmd.args(["--profile", profile]);
            }
        }
        let out = cmd
            .output()
            .expect("cannot run cargo to build cloudflared-standin");
        assert!(
            out.status.success(),
            "cargo build -p cloudflared-standin failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = dir.join("cloudflared-standin");
        assert!(
            bin.is_file(),
            "{} missing after cargo build -p cloudflared-standin",
            bin.display()
        );
        bin.display().to_string()
    })
}
