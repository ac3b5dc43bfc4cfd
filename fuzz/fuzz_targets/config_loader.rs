//! Config loader: any text must give either a config or a list of problems, never a panic.
//! An accepted config must also be self-consistent: every route is reached by the hostname
//! its certificate has to cover, and by nothing that shadows it.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mcp_tunnel::config::Config;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Config::parse(Path::new("/etc/mcp-tunnel/mcp-tunnel.toml"), &text) {
        Ok(config) => {
            let table = config.route_table();
            assert_eq!(table.len(), config.routes.len(), "routes lost in the table");
            for (route, host) in config.routes.iter().zip(config.route_hosts()) {
                if let Some(domain) = &config.tunnel_domain {
                    assert!(
                        host == *domain || host.ends_with(&format!(".{domain}")),
                        "route host {host:?} is outside the tunnel domain {domain:?}"
                    );
                }
                let found = table.lookup(&host).map(|r| r.name.as_str());
                assert_eq!(
                    found,
                    Some(route.name.as_str()),
                    "route {:?} is not reached by its hostname {host:?}",
                    route.name
                );
            }
        }
        Err(e) => {
            assert!(!e.problems.is_empty(), "an error without a problem");
            assert!(!e.to_string().is_empty());
        }
    }
});
