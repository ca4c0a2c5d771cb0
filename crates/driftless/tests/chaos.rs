//! The CI-sized fault-injection suite (`driftless-chaos`, see docs/reliability.md): a fixed list
//! of seeds, each a short history of three real `driftless run` processes behind fault-injecting
//! proxies, with SIGKILLs, SIGSTOPs, partitions (one-way and flapping), frame duplication,
//! reordering, delay and truncation, clock skew beyond `max_clock_offset`, and a full disk; then
//! the checker (identical replicas, no lost acknowledged write, no phantom, exact counters).
//!
//! And the proof that the checker can fail: a history whose nodes run with
//! `DRIFTLESS_FAULT=drop-every-50` (the test build's binary has the `fault-injection` hook of
//! `driftless-sqlite`; a release build does not) must be reported as broken.
//!
//! Run: `cargo test -p driftless --test chaos -- --nocapture`. Replay one seed of the suite with
//! `DRIFTLESS_SEED=<seed> cargo test -p driftless --test chaos -- --nocapture suite`. A failing
//! history is kept under `target/chaos-failures/<seed>/` (databases, node logs, plan, client
//! history, report).

use driftless_chaos::{HistoryOptions, HistoryResult, run_history};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_driftless");
/// Seeds whose plans together inject every kind of fault (see `--example plan`).
const SUITE_SEEDS: [u64; 12] = [1, 2, 3, 5, 7, 9, 11, 12, 15, 20, 31, 38];
const NODES: usize = 3;
/// Faults and client writes last this long per history (debug build, 2 shared cores).
const DURATION: Duration = Duration::from_secs(6);

/// The histories share the machine's two cores and loopback ports: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn keep_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/chaos-failures")
}

fn options(seed: u64, node_env: Vec<(String, String)>, faults: bool) -> HistoryOptions {
    HistoryOptions {
        seed,
        nodes: NODES,
        postgres_nodes: 0,
        duration: DURATION,
        driftless: PathBuf::from(BIN),
        node_env,
        faults,
        keep_failures_in: keep_dir(),
        quiesce_timeout: Duration::from_secs(120),
        ready_timeout: Duration::from_secs(60),
        replay: format!(
            "DRIFTLESS_SEED={seed} cargo test -p driftless --test chaos -- --nocapture suite"
        ),
        keep_always: false,
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("DRIFTLESS_SEED") {
        Ok(text) => vec![
            text.parse()
                .unwrap_or_else(|_| panic!("DRIFTLESS_SEED={text:?} is not a u64")),
        ],
        Err(_) => SUITE_SEEDS.to_vec(),
    }
}

fn line(result: &HistoryResult, took: Duration) -> String {
    format!(
        "seed {} {}: faults {:?}, {} ok / {} failed client writes, converged {} after the heal, {} ({took:.1?})",
        result.seed,
        result.topology,
        result
            .faults
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect::<Vec<_>>(),
        result.ops_ok,
        result.ops_failed,
        result
            .converge_ms
            .map_or("never".to_owned(), |ms| format!("{ms} ms")),
        if result.failed() { "FAILED" } else { "ok" },
    )
}

#[test]
fn suite_of_seeded_fault_histories_converges_without_lost_or_phantom_writes() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut failures = String::new();
    for seed in seeds() {
        let started = Instant::now();
        let result = run_history(&options(seed, Vec::new(), true));
        eprintln!("{}", line(&result, started.elapsed()));
        for note in &result.skipped {
            eprintln!("  note: {}", note.lines().next().unwrap_or_default());
        }
        if result.failed() {
            failures.push_str(&format!(
                "\nseed {seed} FAILED\n{}replay: {}\nkept: {:?}\n",
                result.failure_text(),
                result.replay,
                result.kept
            ));
        }
    }
    assert!(failures.is_empty(), "chaos histories failed:{failures}");
}

#[test]
fn the_checker_catches_a_build_that_drops_every_fiftieth_applied_change() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let env = vec![("DRIFTLESS_FAULT".to_owned(), "drop-every-50".to_owned())];
    // Seed 100 links the nodes hub-and-spoke: a change dropped by the hub has no other path to
    // the spokes. (In a full mesh the third node relays every change too, which repairs most
    // single drops: the harness would still catch some, but not reliably.)
    let mut options = options(100, env, false);
    options.replay =
        "cargo test -p driftless --test chaos -- --nocapture the_checker_catches".into();
    let started = Instant::now();
    let result = run_history(&options);
    eprintln!("{}", line(&result, started.elapsed()));
    eprintln!("{}", result.failure_text());
    assert!(
        result.harness_error.is_none(),
        "the harness itself failed: {:?}",
        result.harness_error
    );
    let v = &result.verdict;
    assert!(
        v.divergent_replicas > 0 || v.lost_acked_writes > 0 || v.model_mismatches > 0,
        "nodes that silently drop every 50th applied change were not caught: {} \
         (is the fault-injection feature of driftless-sqlite compiled into {BIN}?)",
        v.counts()
    );
    if let Some(kept) = &result.kept {
        // Expected failure: do not leave it among real failures.
        let _ = std::fs::remove_dir_all(kept);
    }
}
