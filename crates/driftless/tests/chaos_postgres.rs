//! The CI-sized fault-injection suite with PostgreSQL replicas (`driftless-chaos`, see
//! docs/reliability.md): three real `driftless run` processes per history, two of them (chosen by
//! the seed) on PostgreSQL databases of their own and one on a SQLite file, behind
//! fault-injecting proxies, with SIGKILLs, SIGSTOPs, partitions, frame faults, clock skew, their
//! database connections terminated (PostgreSQL nodes) and a full disk (the SQLite node); the
//! clients write to each replica through its own connection (a real PostgreSQL connection for
//! PostgreSQL nodes), and the checker reads every replica directly and compares them cell by
//! cell across the two kinds.
//!
//! And the proof that the checker sees PostgreSQL replicas: a hub-and-spoke history whose SQLite
//! hub drops every 50th applied change (the test build's `fault-injection` hook) between two
//! PostgreSQL spokes must be reported as broken, with problems found on a PostgreSQL replica.
//!
//! Needs a PostgreSQL server: `DRIFTLESS_PG_URL` (libpq connection string allowed to create
//! databases; default `host=127.0.0.1 port=5432 user=postgres dbname=test`). Each history creates
//! `chaos_<pid>_<seed>_n<node>` databases and drops them at its end. Without a server the tests
//! are skipped with a printed reason, except under CI (env `CI` set), where they fail.
//!
//! Run: `cargo test -p driftless --test chaos_postgres -- --nocapture`. Replay one seed with
//! `DRIFTLESS_SEED=<seed> cargo test -p driftless --test chaos_postgres -- --nocapture suite`.

mod chaos_support;

use chaos_support::{Suite, line, seeds};
use driftless_chaos::plan::Action;
use driftless_chaos::{FaultKind, Plan, pg, run_history};
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seeds whose plans (3 nodes, 2 on PostgreSQL, 5 s) together put every kind of fault on a
/// PostgreSQL node or its links, and a full disk on the SQLite node (see
/// `cargo run -p driftless-chaos --example plan -- SEED 3 5000 2`; checked by
/// `the_suite_seeds_put_every_fault_on_a_postgres_node`).
const SUITE_SEEDS: [u64; 5] = [5, 23, 42, 44, 52];
const SUITE: Suite = Suite {
    test: "chaos_postgres",
    nodes: 3,
    postgres_nodes: 2,
    duration: Duration::from_secs(5),
};

/// The histories share the machine's two cores and loopback ports: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Whether the PostgreSQL server answers. Under CI an unreachable server fails the test; elsewhere
/// the test is skipped with the reason (the pattern of crates/driftless-postgres/tests/common).
fn postgres_available(test: &str) -> bool {
    match pg::reachable(&pg::admin_url()) {
        Ok(()) => true,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI needs PostgreSQL for {test}: {e}"
            );
            eprintln!("skipped {test}: {e}");
            false
        }
    }
}

/// No database of this process may outlive its history.
fn leftover_databases() -> Vec<String> {
    let mut client = pg::connect(&pg::admin_url()).expect("the server answered a moment ago");
    client
        .query(
            "SELECT datname::text FROM pg_database WHERE datname LIKE $1",
            &[&format!("chaos\\_{}\\_%", std::process::id())],
        )
        .expect("list databases")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The kinds of fault the suite's plans start on a PostgreSQL node (process, clock, connections)
/// or on a link (every link of these histories has a PostgreSQL end), and whether a disk fills.
#[test]
fn the_suite_seeds_put_every_fault_on_a_postgres_node() {
    let mut on_postgres = BTreeSet::new();
    for seed in SUITE_SEEDS {
        let plan = Plan::generate_with_postgres(
            seed,
            SUITE.nodes,
            SUITE.duration.as_millis() as u64,
            true,
            SUITE.postgres_nodes,
        );
        assert!(
            plan.links
                .iter()
                .all(|l| plan.postgres[l.dialer] || plan.postgres[l.listener]),
            "seed {seed}: a link between two SQLite nodes"
        );
        for e in &plan.events {
            let Some(kind) = e.starts else { continue };
            let node = match e.action {
                Action::Kill(n)
                | Action::Pause(n)
                | Action::Skew { node: n, .. }
                | Action::TerminateBackends(n) => Some(n),
                Action::FillDisk(n) => {
                    assert!(
                        !plan.postgres[n],
                        "seed {seed}: disk full on a PostgreSQL node"
                    );
                    on_postgres.insert(kind);
                    None
                }
                _ => None,
            };
            if node.is_none_or(|n| plan.postgres[n]) {
                on_postgres.insert(kind);
            }
        }
    }
    let missing: Vec<FaultKind> = FaultKind::ALL
        .into_iter()
        .filter(|k| !on_postgres.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "no suite seed injects {missing:?} on a PostgreSQL node"
    );
}

#[test]
fn suite_of_seeded_fault_histories_with_postgres_replicas_converges_without_lost_or_phantom_writes()
{
    let test = "chaos_postgres suite";
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if !postgres_available(test) {
        return;
    }
    let mut failures = String::new();
    for seed in seeds(&SUITE_SEEDS) {
        let started = Instant::now();
        let result = run_history(&SUITE.options(seed, Vec::new(), true));
        eprintln!("{}", line(&result, started.elapsed()));
        for note in &result.skipped {
            eprintln!("  note: {}", note.lines().next().unwrap_or_default());
        }
        assert_eq!(
            result.postgres_nodes.len(),
            SUITE.postgres_nodes,
            "seed {seed}: the history did not run with PostgreSQL replicas"
        );
        if result.failed() {
            failures.push_str(&format!(
                "\nseed {seed} FAILED\n{}replay: {}\nkept: {:?}\n",
                result.failure_text(),
                result.replay,
                result.kept
            ));
        }
        let left = leftover_databases();
        assert!(
            left.is_empty(),
            "seed {seed} left databases behind: {left:?}"
        );
    }
    assert!(failures.is_empty(), "chaos histories failed:{failures}");
}

#[test]
fn the_checker_reads_postgres_replicas_and_catches_a_hub_that_drops_changes() {
    let test = "chaos_postgres checker";
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if !postgres_available(test) {
        return;
    }
    let env = vec![("DRIFTLESS_FAULT".to_owned(), "drop-every-50".to_owned())];
    // Seed 121 links the nodes hub-and-spoke with the SQLite node (n1) as the hub and both
    // spokes on PostgreSQL: a change of one spoke that the hub drops never reaches the other
    // spoke, so the spoke that wrote it differs from the rest, and the reference model (built
    // from every node's own captured changes, read from the PostgreSQL logs) disagrees with the
    // replicas that miss it. Both can only be seen by reading the PostgreSQL databases. (The
    // suite above shows the other half: read the same way, PostgreSQL and SQLite replicas of a
    // correct run are equal cell for cell.)
    let mut options = SUITE.options(121, env, false);
    options.replay =
        "cargo test -p driftless --test chaos_postgres -- --nocapture the_checker_reads".into();
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
        v.divergent_replicas > 0 && v.model_mismatches > 0,
        "a hub that silently drops every 50th applied change was not caught with PostgreSQL \
         spokes: {} (is the fault-injection feature of driftless-sqlite compiled into the test build of driftless?)",
        v.counts()
    );
    let about_postgres = v.problems.iter().any(|p| {
        result
            .postgres_nodes
            .iter()
            .any(|n| p.starts_with(&format!("n{n}:")) || p.starts_with(&format!("n{n} ")))
    });
    assert!(
        about_postgres,
        "no problem was found on a PostgreSQL replica ({:?}): {:#?}",
        result.postgres_nodes, v.problems
    );
    if let Some(kept) = &result.kept {
        // Expected failure: do not leave it among real failures.
        let _ = std::fs::remove_dir_all(kept);
    }
    let left = leftover_databases();
    assert!(
        left.is_empty(),
        "a failing history left databases behind: {left:?}"
    );
}
