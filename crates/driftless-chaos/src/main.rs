//! `driftless-chaos`: runs many fault-injection histories against a built `driftless` binary and
//! prints progress per history and a final report. History `i` uses seed `S + i`; a failing one
//! prints the command that replays it alone.
//!
//! ```text
//! cargo build --release -p driftless
//! cargo run --release -p driftless-chaos -- --histories 200 --seed 1 --nodes 3 --duration 6s
//! # with PostgreSQL replicas on 2 of the 3 nodes (server: DRIFTLESS_PG_URL, default local)
//! cargo run --release -p driftless-chaos -- --histories 40 --seed 1 --nodes 3 --postgres 2
//! ```

use clap::Parser;
use driftless_chaos::{HistoryOptions, Summary, run_history};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(about = "Fault-injection histories against real driftless processes")]
struct Args {
    /// Number of histories.
    #[arg(long, default_value_t = 1)]
    histories: u64,
    /// Seed of the first history (decimal or 0x hex); history i uses seed + i.
    #[arg(long, default_value = "1", value_parser = parse_seed)]
    seed: u64,
    /// Nodes per history.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// How many nodes of each history (chosen by the seed) keep their replica in a PostgreSQL
    /// database of their own instead of a SQLite file: 0 to --nodes. The server is
    /// DRIFTLESS_PG_URL (a libpq connection string allowed to create databases), default
    /// "host=127.0.0.1 port=5432 user=postgres dbname=test".
    #[arg(long = "postgres", default_value_t = 0)]
    postgres_nodes: usize,
    /// How long faults and client writes last in each history: "8s", "1500ms", "2m".
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    duration: Duration,
    /// The driftless binary to run.
    #[arg(long, default_value = "target/release/driftless")]
    driftless: PathBuf,
    /// Where failing histories are kept.
    #[arg(long, default_value = "target/chaos-failures")]
    keep: PathBuf,
    /// Seconds the replicas get to become quiet after the heal.
    #[arg(long, default_value_t = 120)]
    quiesce_timeout_s: u64,
    /// Extra environment for every node, KEY=VALUE (e.g. DRIFTLESS_FAULT=drop-every-50 with a
    /// binary built with the fault-injection feature).
    #[arg(long = "node-env", value_parser = parse_env)]
    node_env: Vec<(String, String)>,
    /// Keep every history's directory, not only failing ones.
    #[arg(long)]
    keep_all: bool,
}

fn parse_seed(text: &str) -> Result<u64, String> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|e| format!("{text:?} is not a u64: {e}"))
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |i| text.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|e| format!("{text:?} is not a duration: {e}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        other => return Err(format!("unknown unit {other:?} (ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

fn main() {
    let args = Args::parse();
    if !args.driftless.exists() {
        eprintln!(
            "{} does not exist: build it first (cargo build --release -p driftless) or pass --driftless PATH",
            args.driftless.display()
        );
        std::process::exit(2);
    }
    if args.postgres_nodes > args.nodes {
        eprintln!(
            "--postgres {} is more than --nodes {}",
            args.postgres_nodes, args.nodes
        );
        std::process::exit(2);
    }
    if args.postgres_nodes > 0
        && let Err(e) = driftless_chaos::pg::reachable(&driftless_chaos::pg::admin_url())
    {
        eprintln!("{e}");
        std::process::exit(2);
    }
    let driftless = std::fs::canonicalize(&args.driftless).unwrap_or(args.driftless.clone());
    let mut summary = Summary::default();
    let started = Instant::now();
    for i in 0..args.histories {
        let seed = args.seed.wrapping_add(i);
        let mut replay = format!(
            "cargo run --release -p driftless-chaos -- --histories 1 --seed {seed} --nodes {} --duration {}ms",
            args.nodes,
            args.duration.as_millis()
        );
        if args.postgres_nodes > 0 {
            replay.push_str(&format!(" --postgres {}", args.postgres_nodes));
        }
        if args.driftless != std::path::Path::new("target/release/driftless") {
            replay.push_str(&format!(" --driftless {}", args.driftless.display()));
        }
        for (k, v) in &args.node_env {
            replay.push_str(&format!(" --node-env {k}={v}"));
        }
        let options = HistoryOptions {
            seed,
            nodes: args.nodes,
            postgres_nodes: args.postgres_nodes,
            duration: args.duration,
            driftless: driftless.clone(),
            node_env: args.node_env.clone(),
            faults: true,
            keep_failures_in: args.keep.clone(),
            quiesce_timeout: Duration::from_secs(args.quiesce_timeout_s),
            ready_timeout: Duration::from_secs(30),
            replay,
            keep_always: args.keep_all,
        };
        let result = run_history(&options);
        let faults: u64 = result.faults.values().sum();
        println!(
            "[{}/{}] seed {seed} {}{} faults={faults} ops_ok={} failed={} converge={} {} ({:.0?} elapsed)",
            i + 1,
            args.histories,
            result.topology,
            if result.postgres_nodes.is_empty() {
                String::new()
            } else {
                format!(" postgres={:?}", result.postgres_nodes)
            },
            result.ops_ok,
            result.ops_failed,
            result
                .converge_ms
                .map_or("never".to_owned(), |ms| format!("{ms}ms")),
            if result.failed() { "FAILED" } else { "ok" },
            started.elapsed()
        );
        if result.failed() {
            print!("{}", result.failure_text());
            println!("  replay: {}", result.replay);
            if let Some(kept) = &result.kept {
                println!("  kept: {}", kept.display());
            }
        }
        summary.add(&result);
    }
    println!("\n==== report ====");
    print!("{}", summary.render());
    println!("wall time: {:.0?}", started.elapsed());
    if !summary.failed.is_empty() {
        std::process::exit(1);
    }
}
