//! The core's model-based test, run against real SQLite files: three replicas, random client
//! writes issued with plain SQL through separate connections (or the `sqlite3` shell, a separate
//! OS process), random exchange of log pages, then a full exchange. Every replica's tables,
//! read directly from the files, must be identical and equal to the oracle.
//!
//! Replay: `DRIFTLESS_SEED=<seed> cargo test -p driftless-sqlite --test model`.

mod common;

use common::{Client, SqliteReplica};
use driftless_core::{Clock, NodeId};
use driftless_sim::rng::{Rng, seeds_from_env};
use driftless_sim::{Oracle, Workload};
use driftless_store::{LogSeq, Store};

fn run_case(seed: u64, client: Client, ops: u64) -> Result<usize, String> {
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<NodeId> = (0..3u128)
        .map(|i| NodeId::new((u128::from(rng.next_u64()) << 8) | i))
        .collect();
    let workload = Workload::sample(nodes[0], rng.range(2, 5) as usize);
    let mut replicas: Vec<SqliteReplica> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            SqliteReplica::create(
                dir.path(),
                &format!("r{i}"),
                *node,
                &workload,
                client,
                1_000_000 + rng.below(300),
            )
        })
        .collect();
    let mut oracle = Oracle::new();
    let mut writes = 0;
    for _ in 0..ops {
        match rng.below(100) {
            0..=54 => {
                let at = rng.index(3);
                let op = workload.next_op(&mut rng, |t, k| replicas[at].visible(t, k));
                if let Some(written) = replicas[at].perform(&op, &workload) {
                    oracle.record(written);
                    writes += 1;
                }
            }
            55..=64 => {
                let at = rng.index(3);
                if rng.percent(20) {
                    let now = replicas[at].clock.now_ms();
                    replicas[at].clock.set(now - rng.below(200));
                } else {
                    replicas[at].clock.advance(rng.below(40));
                }
            }
            _ => {
                // a random page of a random replica's log, possibly out of order or repeated
                let from = rng.index(3);
                let to = (from + 1 + rng.index(2)) % 3;
                let head = replicas[from].store.log_head().unwrap().0;
                if head == 0 {
                    continue;
                }
                let after = LogSeq(rng.below(head));
                let page = replicas[from]
                    .store
                    .read_log(after, 1 + rng.index(8))
                    .unwrap();
                let changes: Vec<_> = page.entries.iter().map(|e| e.change.clone()).collect();
                let sender = replicas[from].node();
                replicas[to]
                    .store
                    .apply_batch(sender, &changes, page.next)
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    // Full exchange: every replica's whole log to every other (relays keep origin and version).
    for from in 0..3 {
        for to in 0..3 {
            if from != to {
                let (a, b) = pick_two(&mut replicas, from, to);
                let mut cursorless = LogSeq(0);
                loop {
                    let page = a.store.read_log(cursorless, 1000).unwrap();
                    if page.entries.is_empty() {
                        break;
                    }
                    let changes: Vec<_> = page.entries.iter().map(|e| e.change.clone()).collect();
                    b.store
                        .apply_batch(a.node(), &changes, page.next)
                        .map_err(|e| e.to_string())?;
                    cursorless = page.next;
                }
            }
        }
    }
    let expected = oracle.expected(&workload);
    for (i, replica) in replicas.iter_mut().enumerate() {
        let dead = replica.store.dead_letters(10).unwrap();
        if !dead.is_empty() {
            return Err(format!("replica {i} has dead letters: {dead:?}"));
        }
        let contents = replica.contents();
        if contents != expected {
            return Err(format!(
                "replica {i} differs from the oracle\n  sqlite:   {contents:?}\n  expected: {expected:?}"
            ));
        }
    }
    Ok(writes)
}

fn pick_two<T>(items: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert_ne!(a, b);
    if a < b {
        let (left, right) = items.split_at_mut(b);
        (&mut left[a], &mut right[0])
    } else {
        let (left, right) = items.split_at_mut(a);
        (&mut right[0], &mut left[b])
    }
}

fn run(cases: u64, client: Client, ops: u64) {
    let seeds = seeds_from_env(cases);
    let mut writes = 0;
    for seed in &seeds {
        match run_case(*seed, client, ops) {
            Ok(n) => writes += n,
            Err(failure) => panic!(
                "seed {seed:#x}: {failure}\nreplay: DRIFTLESS_SEED={seed:#x} cargo test -p driftless-sqlite --test model"
            ),
        }
    }
    println!("{} cases, {writes} client writes", seeds.len());
    assert!(writes > 0);
}

#[test]
fn three_sqlite_replicas_converge_to_the_oracle() {
    run(60, Client::Connection, 80);
}

#[test]
fn writes_from_another_os_process_are_captured_and_converge() {
    if std::process::Command::new("sqlite3")
        .arg("-version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs the sqlite3 shell for this test"
        );
        eprintln!("skipped: the sqlite3 shell is not installed");
        return;
    }
    run(4, Client::Shell, 40);
}
