//! BENCHMARKS.md from the JSON lines the runs printed: medians over rounds, ratios against
//! the better of the two baselines (nginx, HAProxy) and direct measured in the same run, and
//! each target marked met or missed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// JSON lines collected from `load`, `churn` and `ready`.
    #[arg(long)]
    results: PathBuf,
    /// Markdown written before the tables (machine, commands, conditions).
    #[arg(long)]
    header: PathBuf,
    /// Markdown written after the tables.
    #[arg(long)]
    footer: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
}

const TARGETS: [&str; 4] = ["direct", "nginx", "haproxy", "proxy"];
/// What the proxy is judged against: each figure against the better of these in the run.
const BASELINES: [&str; 2] = ["nginx", "haproxy"];

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// Median, minimum and maximum over rounds: the spread shows how far one round's figure
/// can be trusted on a shared machine.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Default for Spread {
    fn default() -> Spread {
        Spread {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        }
    }
}

fn spread(xs: Vec<f64>) -> Spread {
    if xs.is_empty() {
        return Spread::default();
    }
    Spread {
        min: xs.iter().copied().fold(f64::INFINITY, f64::min),
        max: xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        median: median(xs),
    }
}

/// `median (min-max)` with `digits` decimals; no range for a single round.
fn with_spread(v: Spread, digits: usize) -> String {
    if v.median.is_nan() {
        "n/a".into()
    } else if v.min == v.max {
        format!("{:.digits$}", v.median)
    } else {
        format!(
            "{:.digits$} ({:.digits$}-{:.digits$})",
            v.median, v.min, v.max
        )
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Medians over rounds of one (scenario, path, sessions, target) group.
#[derive(Debug, Default, Clone)]
struct Agg {
    rounds: usize,
    rate: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    errors: u64,
    handshakes: u64,
    handshake_errors: u64,
    distinct_certs: u64,
    count: u64,
    /// CPU of the target process (nginx with its workers, HAProxy, or the proxy) per
    /// request, in µs.
    cpu: f64,
    rate_spread: Spread,
    cpu_spread: Spread,
    /// The load generator's own CPU per request, in µs.
    loadgen: Spread,
    first_error: Option<String>,
}

fn aggregate(runs: &[&Value]) -> Agg {
    let col = |k: &str| median(runs.iter().map(|r| f(r, k)).collect());
    let opt_col = |k: &str| -> Vec<f64> {
        runs.iter()
            .filter_map(|r| r.get(k).and_then(Value::as_f64))
            .collect()
    };
    Agg {
        rounds: runs.len(),
        rate: col("rate"),
        p50: col("p50_us"),
        p90: col("p90_us"),
        p99: col("p99_us"),
        max: runs.iter().map(|r| f(r, "max_us")).fold(0.0, f64::max),
        errors: runs.iter().map(|r| u(r, "errors")).sum(),
        handshakes: runs.iter().map(|r| u(r, "handshakes")).sum(),
        handshake_errors: runs.iter().map(|r| u(r, "handshake_errors")).sum(),
        distinct_certs: runs
            .iter()
            .map(|r| u(r, "distinct_certs"))
            .max()
            .unwrap_or(0),
        count: runs.iter().map(|r| u(r, "count")).sum(),
        cpu: median(opt_col("target_cpu_us_per_req")),
        rate_spread: spread(runs.iter().map(|r| f(r, "rate")).collect()),
        cpu_spread: spread(opt_col("target_cpu_us_per_req")),
        loadgen: spread(opt_col("loadgen_cpu_us_per_req")),
        first_error: runs.iter().find_map(|r| {
            r.get("first_error")
                .and_then(Value::as_str)
                .map(str::to_owned)
        }),
    }
}

/// Median over rounds of one `--cpu` process's CPU per request (`cpu_us_per_req.LABEL`).
fn cpu_of(runs: &[&Value], label: &str) -> f64 {
    median(
        runs.iter()
            .filter_map(|r| r.get("cpu_us_per_req")?.get(label)?.as_f64())
            .collect(),
    )
}

fn us(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else {
        format!("{v:.1}")
    }
}

/// The better baseline for one figure: the highest (`higher`) or the lowest value of `key`
/// among the baselines that have it, with its name.
fn pick<'a>(
    bases: &[(&'a str, &Agg)],
    key: impl Fn(&Agg) -> f64,
    higher: bool,
) -> Option<(&'a str, f64)> {
    let better = |x: f64, y: f64| if higher { x > y } else { x < y };
    let mut best: Option<(&str, f64)> = None;
    for (name, a) in bases {
        let v = key(a);
        if !v.is_nan() && best.is_none_or(|(_, b)| better(v, b)) {
            best = Some((name, v));
        }
    }
    best
}

fn note_errors(problems: &mut Vec<String>, what: &str, a: &Agg) {
    if a.errors + a.handshake_errors > 0 {
        problems.push(format!(
            "{what}: {} request errors, {} handshake errors (first: {})",
            a.errors,
            a.handshake_errors,
            a.first_error.as_deref().unwrap_or("?")
        ));
    }
}

fn ms(us: f64) -> String {
    if us.is_nan() {
        "n/a".into()
    } else {
        format!("{:.2}", us / 1000.0)
    }
}

fn signed_ms(us: f64) -> String {
    if us.is_nan() {
        "n/a".into()
    } else {
        format!("{:+.2}", us / 1000.0)
    }
}

fn mark(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**missed**" }
}

type Groups<'a> = BTreeMap<(String, usize), BTreeMap<String, Vec<&'a Value>>>;

fn group<'a>(rows: &'a [Value], scenario: &str) -> Groups<'a> {
    let mut g: Groups<'a> = BTreeMap::new();
    for r in rows.iter().filter(|r| s(r, "scenario") == scenario) {
        g.entry((s(r, "path").to_owned(), u(r, "sessions") as usize))
            .or_default()
            .entry(s(r, "target").to_owned())
            .or_default()
            .push(r);
    }
    g
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.results)?;
    let rows: Vec<Value> = text
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let mut md = std::fs::read_to_string(&args.header)?;
    let mut problems: Vec<String> = Vec::new();

    // (a) tools/call throughput and latency.
    let _ = writeln!(
        md,
        "\n## (a) tools/call POSTs, closed loop, one request in flight per session\n\n\
         Medians over rounds (direct, nginx, HAProxy and the proxy interleaved, order rotated \
         each round). Latency in ms. \"added p99\" = p99 through the target minus p99 direct in \
         the same round set. CPU = user + system time of the target (nginx: master and workers; \
         HAProxy: its process and any children) per request over the measured window: less \
         sensitive to the other work on the machine than req/s. Targets (issue 21), against the \
         **better baseline** of nginx and HAProxy for each figure in this run: proxy req/s >= \
         the higher of theirs, proxy CPU per request <= the lower of theirs, proxy added p99 <= \
         the lower of theirs.\n\n\
         | reply | sessions | direct req/s | best baseline req/s | proxy req/s (x best) | lowest baseline CPU µs/req | proxy CPU µs/req (x lowest) | lowest baseline added p99 | proxy added p99 | targets: req/s, CPU, p99 |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    let mut detail = String::from(
        "\nEvery target: median (min-max over rounds) of req/s and of CPU per request. \
         \"req/s per core\" = requests per CPU-second of the target (the comparison that holds \
         on a noisy shared machine). \"load gen CPU\" = the load generator's own user + system \
         time per request over the same window: it runs on the same two cores, so this is CPU \
         the target could not use, and it differs by transport (plain TCP, TLS, WebSocket + \
         TLS).\n\n\
         | reply | sessions | target | rounds | req/s | p50 | p90 | p99 | max | added p99 | CPU µs/req | req/s per core | load gen CPU µs/req | errors |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for ((path, sessions), by) in group(&rows, "a") {
        let agg: Vec<(&str, Agg)> = TARGETS
            .iter()
            .filter_map(|t| by.get(*t).map(|r| (*t, aggregate(r))))
            .collect();
        let get = |t: &str| agg.iter().find(|(n, _)| *n == t).map(|(_, a)| a);
        let reply = if path == "/mcp-sse" {
            "SSE-framed"
        } else {
            "JSON"
        };
        let direct_p99 = get("direct").map_or(f64::NAN, |d| d.p99);
        for (t, a) in &agg {
            note_errors(
                &mut problems,
                &format!("(a) {reply} {sessions} sessions {t}"),
                a,
            );
            let added = if *t == "direct" {
                "".to_owned()
            } else {
                signed_ms(a.p99 - direct_p99)
            };
            let _ = writeln!(
                detail,
                "| {reply} | {sessions} | {t} | {} | {} | {} | {} | {} | {} | {added} | {} | {} | {} | {} |",
                a.rounds,
                with_spread(a.rate_spread, 0),
                ms(a.p50),
                ms(a.p90),
                ms(a.p99),
                ms(a.max),
                with_spread(a.cpu_spread, 1),
                if a.cpu.is_nan() {
                    "n/a".to_owned()
                } else {
                    format!("{:.0}", 1e6 / a.cpu)
                },
                us(a.loadgen.median),
                a.errors + a.handshake_errors
            );
        }
        let (Some(d), Some(p)) = (get("direct"), get("proxy")) else {
            continue;
        };
        let bases: Vec<(&str, &Agg)> = BASELINES
            .iter()
            .filter_map(|b| get(b).map(|a| (*b, a)))
            .collect();
        let (Some(rate), Some(cpu), Some(add)) = (
            pick(&bases, |a| a.rate, true),
            pick(&bases, |a| a.cpu, false),
            pick(&bases, |a| a.p99 - d.p99, false),
        ) else {
            continue;
        };
        let p_add = p.p99 - d.p99;
        let _ = writeln!(
            md,
            "| {reply} | {sessions} | {:.0} | {:.0} ({}) | {:.0} ({:.2}x) | {:.1} ({}) | {:.1} ({:.2}x) | {} ({}) | {} | {}, {}, {} |",
            d.rate,
            rate.1,
            rate.0,
            p.rate,
            p.rate / rate.1,
            cpu.1,
            cpu.0,
            p.cpu,
            p.cpu / cpu.1,
            signed_ms(add.1),
            add.0,
            signed_ms(p_add),
            mark(p.rate >= rate.1),
            mark(p.cpu <= cpu.1),
            mark(p_add <= add.1)
        );
    }
    md.push_str(&detail);

    // (i) MCP inspection cost.
    let _ = writeln!(
        md,
        "\n## (i) tools/call with MCP inspection: off, `inspect = true`, and a tool policy\n\n\
         One proxy, one upstream, three routes that differ only in their MCP settings: `echo` \
         (no inspection: the plain path), `inspect` (audit line per message at log level info, \
         per-method/per-tool metrics, request body teed) and `policy` (`tools_deny`: the body is \
         read whole and judged before it goes upstream; SSE answers pass event by event through \
         the filter). Medians over rounds, interleaved. Ratios are against `off` in the same run.\n\n\
         | reply | sessions | off req/s | inspect req/s (ratio) | policy req/s (ratio) | p99 off / inspect / policy | CPU µs/req off / inspect / policy |\n\
         |---|---:|---:|---:|---:|---|---|"
    );
    for ((path, sessions), by) in group(&rows, "i") {
        let agg: BTreeMap<&str, Agg> = ["proxy", "proxy-inspect", "proxy-policy"]
            .iter()
            .filter_map(|t| by.get(*t).map(|r| (*t, aggregate(r))))
            .collect();
        let reply = if path == "/mcp-sse" {
            "SSE-framed"
        } else {
            "JSON"
        };
        for (t, a) in &agg {
            note_errors(&mut problems, &format!("(i) {reply} {t}"), a);
        }
        let (Some(off), Some(ins), Some(pol)) = (
            agg.get("proxy"),
            agg.get("proxy-inspect"),
            agg.get("proxy-policy"),
        ) else {
            continue;
        };
        let _ = writeln!(
            md,
            "| {reply} | {sessions} | {:.0} | {:.0} ({:.2}x) | {:.0} ({:.2}x) | {} / {} / {} | {:.1} / {:.1} / {:.1} |",
            off.rate,
            ins.rate,
            ins.rate / off.rate,
            pol.rate,
            pol.rate / off.rate,
            ms(off.p99),
            ms(ins.p99),
            ms(pol.p99),
            off.cpu,
            ins.cpu,
            pol.cpu,
        );
    }

    // (b) SSE per-event latency.
    let _ = writeln!(
        md,
        "\n## (b) SSE: per-event latency, upstream timestamp to client receipt\n\n\
         Latency in ms; \"added\" = the target's percentile minus direct's. \"load gen CPU\" = \
         the load generator's own CPU per event received, direct / nginx / HAProxy / proxy. \
         Target (issue 21): the proxy's added p99 at 1,000 streams <= the lower of nginx's and \
         HAProxy's in the same run.\n\n\
         | streams | events/s per stream | direct p50 / p99 | nginx p50 / p99 (added p99) | haproxy p50 / p99 (added p99) | proxy p50 / p99 (added p99) | proxy max | load gen CPU µs/event | target: proxy added p99 <= the lower baseline's |\n\
         |---:|---:|---|---|---|---|---:|---|---|"
    );
    for ((_, sessions), by) in group(&rows, "b") {
        let agg: BTreeMap<&str, Agg> = TARGETS
            .iter()
            .filter_map(|t| by.get(*t).map(|r| (*t, aggregate(r))))
            .collect();
        for (t, a) in &agg {
            note_errors(&mut problems, &format!("(b) {sessions} streams {t}"), a);
        }
        let rate = by
            .values()
            .flatten()
            .next()
            .and_then(|r| r.get("events_per_stream"))
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN);
        let (Some(d), Some(p)) = (agg.get("direct"), agg.get("proxy")) else {
            continue;
        };
        let cell = |t: &str| {
            agg.get(t).map_or("n/a".to_owned(), |a| {
                format!(
                    "{} / {} ({})",
                    ms(a.p50),
                    ms(a.p99),
                    signed_ms(a.p99 - d.p99)
                )
            })
        };
        let bases: Vec<(&str, &Agg)> = BASELINES
            .iter()
            .filter_map(|b| agg.get(b).map(|a| (*b, a)))
            .collect();
        let p_add = p.p99 - d.p99;
        let verdict = match pick(&bases, |a| a.p99 - d.p99, false) {
            Some((name, add)) if sessions >= 1000 => {
                format!("{} ({} {})", mark(p_add <= add), name, signed_ms(add))
            }
            _ => "(reference)".to_owned(),
        };
        let loadgen: Vec<String> = TARGETS
            .iter()
            .map(|t| {
                agg.get(t)
                    .map_or("n/a".to_owned(), |a| us(a.loadgen.median))
            })
            .collect();
        let _ = writeln!(
            md,
            "| {sessions} | {rate:.0} | {} / {} | {} | {} | {} | {} | {} | {verdict} |",
            ms(d.p50),
            ms(d.p99),
            cell("nginx"),
            cell("haproxy"),
            cell("proxy"),
            ms(p.max),
            loadgen.join(" / "),
        );
    }

    // (w) the load generator's WebSocket clients.
    ws_client_section(&mut md, &rows, &mut problems);

    // (c) memory.
    let _ = writeln!(
        md,
        "\n## (c) memory: RSS idle and with open idle sessions\n\n\
         A session: WebSocket + inner TLS (proxy) or TLS (nginx), one tools/call, then idle. \
         nginx's RSS is the master plus its workers. Per session = (RSS with N open - idle RSS) / N.\n\n\
         | target | idle RSS | RSS at 1,000 | KiB/session at 1,000 | RSS at 10,000 | KiB/session at 10,000 |\n\
         |---|---:|---:|---:|---:|---:|"
    );
    let mut mem: BTreeMap<String, BTreeMap<usize, &Value>> = BTreeMap::new();
    for r in rows.iter().filter(|r| s(r, "scenario") == "c") {
        mem.entry(s(r, "target").to_owned())
            .or_default()
            .insert(u(r, "sessions") as usize, r);
        if u(r, "errors") + u(r, "handshake_errors") > 0 || u(r, "open") < u(r, "sessions") {
            problems.push(format!(
                "(c) {} {} sessions: {} open, {} errors, {} handshake errors (first: {})",
                s(r, "target"),
                u(r, "sessions"),
                u(r, "open"),
                u(r, "errors"),
                u(r, "handshake_errors"),
                s(r, "first_error")
            ));
        }
    }
    let mib = |kib: f64| format!("{:.1} MiB", kib / 1024.0);
    let mut mem_verdict = Vec::new();
    for (t, steps) in &mem {
        let idle = steps
            .values()
            .next()
            .map_or(f64::NAN, |r| f(r, "rss_idle_kib"));
        let mut cells = vec![t.clone(), mib(idle)];
        let mut largest = None;
        for (n, r) in steps {
            cells.push(format!("{} ({n})", mib(f(r, "rss_kib"))));
            cells.push(format!("{:.1}", f(r, "per_session_kib")));
            largest = Some((*n, f(r, "per_session_kib")));
        }
        let _ = writeln!(md, "| {} |", cells.join(" | "));
        if t == "proxy" {
            mem_verdict.push(format!(
                "- idle RSS <= 10 MiB: {} ({})",
                mark(idle <= 10.0 * 1024.0),
                mib(idle)
            ));
            if let Some((n, per)) = largest {
                let nginx_per = mem
                    .get("nginx")
                    .and_then(|m| m.get(&n))
                    .map(|r| f(r, "per_session_kib"));
                mem_verdict.push(format!(
                    "- per idle session at {n} <= nginx's per idle TLS connection: {} ({per:.1} KiB{})",
                    mark(n >= 10_000 && nginx_per.is_some_and(|np| per <= np)),
                    nginx_per.map_or(String::new(), |np| format!(
                        "; nginx {np:.1} KiB per connection, ratio {:.2}x",
                        per / np
                    ))
                ));
            }
        }
    }
    if !mem_verdict.is_empty() {
        let _ = writeln!(md, "\nTargets:\n{}", mem_verdict.join("\n"));
    }

    // (d) reload and rotation under load.
    let _ = writeln!(
        md,
        "\n## (d) config rewrite every second and certificate rotation every 5 s, during (a) at 16 sessions\n\n\
         Through the proxy (WebSocket + inner TLS); every session opens a new tunnel session \
         (new handshake) after a fixed number of requests, so handshakes happen throughout.\n\n\
         | requests | failed requests | handshakes | failed handshakes | server certs seen | config rewrites / reloads logged | rotations / swaps logged | refused (cert / config) | req/s | p99 | target: zero failures |\n\
         |---:|---:|---:|---:|---:|---|---|---|---:|---:|---|"
    );
    let load_d: Vec<&Value> = rows
        .iter()
        .filter(|r| s(r, "scenario") == "d" && s(r, "mode") == "post")
        .collect();
    let churn_d = rows
        .iter()
        .find(|r| s(r, "scenario") == "d" && s(r, "mode") == "churn");
    if let (false, Some(c)) = (load_d.is_empty(), churn_d) {
        let a = aggregate(&load_d);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} / {} | {} / {} | {} / {} | {:.0} | {} | {} |",
            a.count,
            a.errors,
            a.handshakes,
            a.handshake_errors,
            a.distinct_certs,
            u(c, "config_rewrites"),
            u(c, "log_reloads"),
            u(c, "cert_rotations"),
            u(c, "log_cert_swaps"),
            u(c, "log_cert_refused"),
            u(c, "log_reload_refused"),
            a.rate,
            ms(a.p99),
            mark(a.errors == 0 && a.handshake_errors == 0)
        );
        note_errors(&mut problems, "(d) under reload and rotation", &a);
    }

    // (e) start-up time.
    let _ = writeln!(
        md,
        "\n## (e) time from start to READY=1 (sd-notify) and to accepting connections\n\n\
         | program | runs | READY=1 median | READY=1 max | listening median | listening max |\n\
         |---|---:|---:|---:|---:|---:|"
    );
    let opt_ms = |r: &Value, k: &str| {
        r.get(k)
            .and_then(Value::as_f64)
            .map_or("not sent".to_owned(), |v| format!("{v:.1} ms"))
    };
    for r in rows.iter().filter(|r| s(r, "scenario") == "e") {
        let ready_cols = if r.get("ready_missing").is_some_and(Value::is_null) {
            ("n/a".to_owned(), "n/a".to_owned())
        } else {
            (opt_ms(r, "ready_ms_median"), opt_ms(r, "ready_ms_max"))
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            s(r, "target"),
            u(r, "runs"),
            ready_cols.0,
            ready_cols.1,
            opt_ms(r, "listen_ms_median"),
            opt_ms(r, "listen_ms_max")
        );
    }

    peer_check_section(&mut md, &rows, &mut problems);
    // (f) through the real cloudflared.
    let f_groups = group(&rows, "f");
    if !f_groups.is_empty() {
        let _ = writeln!(
            md,
            "\n## (f) tools/call through the real cloudflared: fake-edge -> cloudflared 2026.8.2 -> proxy\n\n\
             The load generator speaks WebSocket + inner TLS to fake-edge's eyeball port, as a client \
             of Cloudflare's edge would; fake-edge relays each session as an HTTP/2 stream over one of \
             the 4 tunnel connections of the real cloudflared, spawned and supervised by `mcp-tunnel run`, \
             which hands it to the proxy. \"proxy alone\" is the same load straight to that proxy's \
             listener (as in (a)), interleaved round by round. CPU per request is read from \
             /proc/PID/stat (user + system) for each process on its own: the proxy is `mcp-tunnel run` \
             without its child, cloudflared is that child. \"proxy share\" = proxy / (proxy + \
             cloudflared): the part of the host's per-request cost that is this proxy's (fake-edge \
             stands for Cloudflare's side and is not on the host). Latency in ms.\n\n\
             | sessions | via cloudflared req/s | proxy alone req/s | via cloudflared p50 / p99 | proxy alone p50 / p99 | added p99 | CPU µs/req cloudflared | CPU µs/req proxy (via cloudflared / alone) | fake-edge µs/req | proxy share |\n\
             |---:|---:|---:|---|---|---:|---:|---|---:|---:|"
        );
        for ((_, sessions), by) in &f_groups {
            for (t, runs) in by {
                note_errors(
                    &mut problems,
                    &format!("(f) {sessions} sessions {t}"),
                    &aggregate(runs),
                );
            }
            let (Some(tunnel), Some(alone)) = (by.get("tunnel"), by.get("proxy")) else {
                continue;
            };
            let (a, b) = (aggregate(tunnel), aggregate(alone));
            let (cf, px, edge) = (
                cpu_of(tunnel, "cloudflared"),
                cpu_of(tunnel, "proxy"),
                cpu_of(tunnel, "fake-edge"),
            );
            let _ = writeln!(
                md,
                "| {sessions} | {:.0} | {:.0} | {} / {} | {} / {} | {} | {} | {} / {} | {} | {:.0} % |",
                a.rate,
                b.rate,
                ms(a.p50),
                ms(a.p99),
                ms(b.p50),
                ms(b.p99),
                signed_ms(a.p99 - b.p99),
                us(cf),
                us(px),
                us(cpu_of(alone, "proxy")),
                us(edge),
                100.0 * px / (px + cf),
            );
        }
    }

    if let Some(footer) = &args.footer {
        md.push('\n');
        md.push_str(&std::fs::read_to_string(footer)?);
    }
    if !problems.is_empty() {
        md.push_str("\n## Errors seen during the run\n\n");
        for p in &problems {
            let _ = writeln!(md, "- {p}");
        }
    }
    std::fs::write(&args.out, md)?;
    eprintln!("wrote {}", args.out.display());
    if !problems.is_empty() {
        anyhow::bail!("errors during the run:\n{}", problems.join("\n"));
    }
    Ok(())
}

/// (g) the listener's peer check: two proxies identical but for `[peer_check]`, measured
/// interleaved; the check is one kernel lookup per new listener connection, none per request.
fn peer_check_section(md: &mut String, rows: &[Value], problems: &mut Vec<String>) {
    let in_f: Vec<&Value> = rows.iter().filter(|r| s(r, "scenario") == "g").collect();
    if in_f.is_empty() {
        return;
    }
    let agg = |mode: &str, target: &str| {
        let runs: Vec<&Value> = in_f
            .iter()
            .copied()
            .filter(|r| s(r, "mode") == mode && s(r, "target") == target)
            .collect();
        (!runs.is_empty()).then(|| aggregate(&runs))
    };
    let _ = writeln!(
        md,
        "\n## (g) peer check: session set-up and throughput, check on vs off\n\n\
         Two instances of the proxy, identical but for `[peer_check] enabled`, measured interleaved \
         (order alternated each round), medians over rounds. Session set-up: each worker opens a \
         tunnel session (TCP, WebSocket upgrade, inner TLS handshake), sends one tools/call and \
         closes it, back to back; latency is the whole of it. Throughput: (a)'s tools/call on \
         sessions held open. With the check on, each new listener connection costs one \
         NETLINK_SOCK_DIAG lookup; requests cost nothing more.\n\n\
         | measure | check off | check on | on / off |\n|---|---:|---:|---:|"
    );
    let row = |md: &mut String, what: &str, off: f64, on: f64, fmt: &dyn Fn(f64) -> String| {
        let _ = writeln!(
            md,
            "| {what} | {} | {} | {:.2}x |",
            fmt(off),
            fmt(on),
            on / off
        );
    };
    let n0 = |v: f64| format!("{v:.0}");
    let n1 = |v: f64| format!("{v:.1}");
    let msf = |v: f64| ms(v);
    for (mode, label) in [
        ("connect", "session set-up"),
        ("post", "tools/call on open sessions"),
    ] {
        let (Some(off), Some(on)) = (agg(mode, "off"), agg(mode, "on")) else {
            continue;
        };
        note_errors(problems, &format!("(g) {label}, check off"), &off);
        note_errors(problems, &format!("(g) {label}, check on"), &on);
        let sessions = in_f
            .iter()
            .find(|r| s(r, "mode") == mode)
            .map_or(0, |r| u(r, "sessions"));
        let unit = if mode == "connect" {
            "sessions/s"
        } else {
            "req/s"
        };
        let per = if mode == "connect" {
            "session"
        } else {
            "request"
        };
        row(
            md,
            &format!("{label}, {sessions} in parallel: {unit}"),
            off.rate,
            on.rate,
            &n0,
        );
        row(md, &format!("{label}: p50 ms"), off.p50, on.p50, &msf);
        row(md, &format!("{label}: p99 ms"), off.p99, on.p99, &msf);
        row(
            md,
            &format!("{label}: proxy CPU µs per {per}"),
            off.cpu,
            on.cpu,
            &n1,
        );
    }
    if let Some(l) = in_f.iter().find(|r| s(r, "mode") == "lookup") {
        let _ = writeln!(
            md,
            "\nThe lookup alone (`mcp-tunnel-bench peer-lookup`: `proxy::sockdiag::socket_owner` on one \
             loopback connection, {} times in a row, one task): mean {:.1} µs, p50 {:.1} µs, p99 {:.1} µs.",
            u(l, "count"),
            f(l, "mean_ns") / 1000.0,
            f(l, "p50_ns") / 1000.0,
            f(l, "p99_ns") / 1000.0,
        );
    }
}

/// (w) the load generator's two WebSocket clients against the same proxy: what the client
/// itself costs per request, beside what its TLS client costs against the baselines.
fn ws_client_section(md: &mut String, rows: &[Value], problems: &mut Vec<String>) {
    let runs = |scenario: &str, target: &str, sessions: u64, path: &str| -> Vec<&Value> {
        rows.iter()
            .filter(|r| {
                s(r, "scenario") == scenario
                    && s(r, "target") == target
                    && u(r, "sessions") == sessions
                    && s(r, "path") == path
            })
            .collect()
    };
    let Some(first) = rows.iter().find(|r| s(r, "scenario") == "w") else {
        return;
    };
    let (sessions, path) = (u(first, "sessions"), s(first, "path"));
    let _ = writeln!(
        md,
        "\n## (w) the load generator's WebSocket clients: lean against tungstenite\n\n\
         The same proxy and load ({path}, {sessions} sessions), interleaved: `--ws-client lean` \
         (the bench's own client codec: each write, all its slices, masked into one reused \
         buffer and sent as one frame in one write; reads unframed in the caller's buffer) against `--ws-client tungstenite` (`mcp_tunnel::proxy::edge`, a copy per \
         write). Median (min-max over rounds). The last rows are the load generator's TLS client \
         against the baselines in (a), same sessions and reply: what the lean client should be \
         close to.\n\n\
         | client | rounds | req/s | proxy CPU µs/req | load gen CPU µs/req |\n|---|---:|---:|---:|---:|"
    );
    for (target, label) in [
        ("proxy-lean", "lean (WebSocket + TLS)"),
        ("proxy-tungstenite", "tungstenite (WebSocket + TLS)"),
    ] {
        let r = runs("w", target, sessions, path);
        if r.is_empty() {
            continue;
        }
        let a = aggregate(&r);
        note_errors(problems, &format!("(w) {target}"), &a);
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} |",
            a.rounds,
            with_spread(a.rate_spread, 0),
            with_spread(a.cpu_spread, 1),
            with_spread(a.loadgen, 1)
        );
    }
    for base in BASELINES {
        let r = runs("a", base, sessions, path);
        if r.is_empty() {
            continue;
        }
        let a = aggregate(&r);
        let _ = writeln!(
            md,
            "| TLS to {base}, from (a) | {} | {} | {} | {} |",
            a.rounds,
            with_spread(a.rate_spread, 0),
            with_spread(a.cpu_spread, 1),
            with_spread(a.loadgen, 1)
        );
    }
}
