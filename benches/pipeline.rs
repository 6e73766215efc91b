//! The pipeline benchmark: runs the service binary against a local broker and
//! the provider simulator (both child processes) through seven scenarios
//! (throughput, backlog, memory, rate limit, timeliness, recovery, brown-out),
//! plus a decode-speed one without them (parse) and the service beside a
//! Python program doing the same work (peer), and prints their figures. `scripts/bench.sh` is the way in; docs/benchmarks.md explains the
//! figures.
//!
//! Usage: `pipeline [--full|--smoke] [--out FILE] [scenario...]`, with
//! KAFKA_BOOTSTRAP set. Full sizes run under `cargo bench` (or with
//! `--full`); otherwise, as under `cargo test --bench pipeline`, and always
//! with `BENCH_SMOKE=1`, it is the smoke run: tiny sizes, no timing goals.
//! Wrong counts fail either way.

mod support;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use support::{Ctx, Report};

const SCENARIOS: &[&str] = &[
    "throughput",
    "backlog",
    "memory",
    "ratelimit",
    "timeliness",
    "recovery",
    "brownout",
    "parse",
    "burst",
    "peer",
];

async fn run_one(ctx: &Ctx, name: &str) -> Result<Report> {
    match name {
        "throughput" => support::throughput::run(ctx).await,
        "backlog" => support::backlog::run(ctx).await,
        "memory" => support::memory::run(ctx).await,
        "ratelimit" => support::ratelimit::run(ctx).await,
        "timeliness" => support::timeliness::run(ctx).await,
        "recovery" => support::recovery::run(ctx).await,
        "brownout" => support::brownout::run(ctx).await,
        "parse" => support::parse::run(ctx).await,
        "burst" => support::burst::run(ctx).await,
        "peer" => support::peer::run(ctx).await,
        other => bail!("unknown scenario {other} (known: {})", SCENARIOS.join(", ")),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("bench failed: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    // Full sizes only when asked for (`cargo bench` passes --bench): under
    // `cargo test` (which runs every bench target) this is the smoke run.
    let mut forced_smoke = std::env::var("BENCH_SMOKE").is_ok_and(|v| v == "1");
    let mut full = false;
    let mut out: Option<PathBuf> = None;
    let mut chosen = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--smoke" => forced_smoke = true,
            "--bench" | "--full" => full = true,
            "--out" => out = args.next().map(PathBuf::from),
            // Test-runner options that take a value (`cargo test -- --skip X`
            // reaches every target, this one included): not scenario names.
            "--skip" | "--test-threads" | "--format" | "--color" => {
                let _ = args.next();
            }
            // Flags cargo's test and bench runners pass; nothing to do.
            s if s.starts_with("--") => {}
            s => chosen.push(s.to_string()),
        }
    }
    let smoke = forced_smoke || !full;
    if chosen.is_empty() {
        chosen = SCENARIOS.iter().map(|s| s.to_string()).collect();
    }
    let logs = match std::env::var_os("BENCH_LOG_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir().join(format!("insights-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&logs)?;
    let ctx = Ctx {
        smoke,
        logs: logs.clone(),
        http: reqwest::Client::new(),
        perf_data: std::env::var_os("BENCH_PERF_DATA").map(PathBuf::from),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "pipeline bench: {} mode, {} answers, scenarios {}, logs in {}",
        if smoke { "smoke" } else { "full" },
        support::answers::answers().name(),
        chosen.join(","),
        logs.display()
    );
    let mut results = serde_json::Map::new();
    let mut failed = Vec::new();
    for name in &chosen {
        let load_before = load_average();
        let started = Instant::now();
        println!("\n== {name} (load average {load_before})");
        let res = rt.block_on(run_one(&ctx, name));
        let took = support::secs(started.elapsed());
        let load_after = load_average();
        match res {
            Ok(report) => {
                print_report(&report);
                println!("   took {took} s, load average after {load_after}");
                let mut v = serde_json::to_value(&report)?;
                v["took_s"] = json!(took);
                v["load_before"] = json!(load_before);
                v["load_after"] = json!(load_after);
                results.insert(name.clone(), v);
            }
            Err(e) => {
                println!("   FAILED after {took} s: {e:#}");
                results.insert(name.clone(), json!({"error": format!("{e:#}")}));
                failed.push(name.clone());
            }
        }
    }
    let doc = json!({
        "mode": if smoke { "smoke" } else { "full" },
        "answers": support::answers::answers().name(),
        "at": chrono::Utc::now().to_rfc3339(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "service_bin": support::procs::service_bin().display().to_string(),
        "scenarios": Value::Object(results),
    });
    if let Some(path) = out {
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
        println!("\nfigures written to {}", path.display());
    }
    let unmet: Vec<String> = doc["scenarios"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.iter())
        .flat_map(|(s, v)| {
            v["goals"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|g| g["met"] == json!(false))
                .map(move |g| format!("{s}: {}", g["goal"].as_str().unwrap_or("")))
        })
        .collect();
    if !unmet.is_empty() {
        println!("\ngoals not met:\n  {}", unmet.join("\n  "));
    }
    if !failed.is_empty() {
        bail!("scenarios failed: {}", failed.join(", "));
    }
    Ok(())
}

fn print_report(r: &Report) {
    for (k, v) in &r.figures {
        println!("   {k:<40} {v}");
    }
    for g in &r.goals {
        println!(
            "   goal {:<35} {}",
            g.goal,
            if g.met { "met" } else { "NOT MET" }
        );
    }
}
