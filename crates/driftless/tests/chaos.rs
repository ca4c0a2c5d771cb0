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

mod chaos_support;

use chaos_support::{Suite, line, seeds};
use driftless_chaos::run_history;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seeds whose plans together inject every kind of fault (see `--example plan`).
const SUITE_SEEDS: [u64; 12] = [1, 2, 3, 5, 7, 9, 11, 12, 15, 20, 31, 38];
const SUITE: Suite = Suite {
    test: "chaos",
    nodes: 3,
    postgres_nodes: 0,
    duration: Duration::from_secs(6),
};

/// The histories share the machine's two cores and loopback ports: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn suite_of_seeded_fault_histories_converges_without_lost_or_phantom_writes() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut failures = String::new();
    for seed in seeds(&SUITE_SEEDS) {
        let started = Instant::now();
        let result = run_history(&SUITE.options(seed, Vec::new(), true));
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
    let mut options = SUITE.options(100, env, false);
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
         (is the fault-injection feature of driftless-sqlite compiled into the test build of driftless?)",
        v.counts()
    );
    if let Some(kept) = &result.kept {
        // Expected failure: do not leave it among real failures.
        let _ = std::fs::remove_dir_all(kept);
    }
}
