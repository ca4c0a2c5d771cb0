//! Model-based convergence test of the merge core: random replicas, random client writes, random
//! delivery (partial, duplicated, reordered, lost then redelivered), then a full exchange. Every
//! replica must end byte-identical and equal to the oracle computed from the write history.
//!
//! Replay one case: `DRIFTLESS_SEED=<seed> cargo test -p driftless-sim --test convergence`.
//! More cases: `DRIFTLESS_CASES=100000 cargo test --release -p driftless-sim --test convergence`.

use driftless_core::{Change, Clock, Effect, NodeId};
use driftless_sim::replica::ReceiveError;
use driftless_sim::rng::{Rng, seeds_from_env};
use driftless_sim::{MemReplica, Oracle, Workload};
use std::time::Duration;

const CASES: u64 = 10_000;
const MAX_CLOCK_OFFSET: Duration = Duration::from_millis(1_000);

struct Message {
    to: usize,
    changes: Vec<Change>,
}

#[derive(Default, Debug)]
struct Stats {
    writes: usize,
    deliveries: usize,
    duplicated: usize,
    lost: usize,
    conflicts: usize,
}

fn deliver(
    replicas: &mut [MemReplica],
    to: usize,
    changes: &[Change],
    workload: &Workload,
) -> Result<(), String> {
    for change in changes {
        match replicas[to].receive(change, workload) {
            Ok(_) => {}
            // Clocks in this test stay within the offset; a hold would be a bug here.
            Err(ReceiveError::Held(e)) => return Err(format!("unexpected clock hold: {e}")),
            Err(ReceiveError::Invalid(e)) => return Err(format!("valid change refused: {e}")),
        }
    }
    Ok(())
}

fn run_case(seed: u64, stats: &mut Stats) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let replica_count = rng.range(2, 5) as usize;
    let mut replicas: Vec<MemReplica> = (0..replica_count)
        .map(|i| {
            // Random ids, but distinct: the low bits carry the index.
            let node = NodeId::new((u128::from(rng.next_u64()) << 8) | i as u128);
            MemReplica::new(node, 1_000_000 + rng.below(300), MAX_CLOCK_OFFSET)
        })
        .collect();
    let workload = Workload::sample(replicas[0].node, rng.range(1, 6) as usize);
    let mut oracle = Oracle::new();
    let mut network: Vec<Message> = Vec::new();
    let mut lost: Vec<Message> = Vec::new();

    for _ in 0..rng.range(10, 70) {
        match rng.below(100) {
            0..=44 => {
                let at = rng.index(replica_count);
                let op = workload.next_op(&mut rng, |t, k| replicas[at].visible(t, k));
                let written = replicas[at]
                    .perform(&op, &workload)
                    .map_err(|e| format!("local write {op:?} refused: {e}"))?;
                oracle.record(written);
                stats.writes += 1;
            }
            45..=54 => {
                let at = rng.index(replica_count);
                if rng.percent(20) {
                    // wall clock jumps back (NTP step); the HLC must not
                    let now = replicas[at].clock.now_ms();
                    replicas[at].clock.set(now - rng.below(200));
                } else {
                    replicas[at].clock.advance(rng.below(40));
                }
            }
            55..=79 => {
                let from = rng.index(replica_count);
                let to = (from + 1 + rng.index(replica_count - 1)) % replica_count;
                let log = &replicas[from].log;
                if log.is_empty() {
                    continue;
                }
                let mut changes: Vec<Change> = if rng.percent(50) {
                    let start = rng.index(log.len());
                    let end = start + 1 + rng.index(log.len() - start);
                    log[start..end].to_vec()
                } else {
                    log.iter().filter(|_| rng.percent(40)).cloned().collect()
                };
                if rng.percent(30) {
                    rng.shuffle(&mut changes);
                }
                network.push(Message { to, changes });
            }
            _ => {
                if network.is_empty() {
                    continue;
                }
                let pick = rng.index(network.len());
                if rng.percent(10) {
                    lost.push(network.swap_remove(pick));
                    stats.lost += 1;
                    continue;
                }
                let message = if rng.percent(15) {
                    stats.duplicated += 1;
                    let m = &network[pick];
                    Message {
                        to: m.to,
                        changes: m.changes.clone(),
                    }
                } else {
                    network.swap_remove(pick)
                };
                deliver(&mut replicas, message.to, &message.changes, &workload)?;
                stats.deliveries += 1;
            }
        }
    }

    // Heal: the lost and in-flight messages arrive late, then everyone exchanges full logs.
    let mut late: Vec<Message> = lost.into_iter().chain(network).collect();
    rng.shuffle(&mut late);
    for message in late {
        deliver(&mut replicas, message.to, &message.changes, &workload)?;
    }
    let mut pairs: Vec<(usize, usize)> = (0..replica_count)
        .flat_map(|a| (0..replica_count).map(move |b| (a, b)))
        .filter(|(a, b)| a != b)
        .collect();
    rng.shuffle(&mut pairs);
    for (from, to) in pairs {
        let mut changes = replicas[from].log.clone();
        rng.shuffle(&mut changes);
        deliver(&mut replicas, to, &changes, &workload)?;
    }

    let expected = oracle.expected(&workload);
    let reference = replicas[0].canonical_bytes();
    for (i, replica) in replicas.iter().enumerate() {
        if replica.canonical_bytes() != reference {
            return Err(format!(
                "replica {i} state differs from replica 0\n  replica 0: {:?}\n  replica {i}: {:?}",
                replicas[0].contents(),
                replica.contents()
            ));
        }
        if replica.contents() != expected {
            return Err(format!(
                "replica {i} differs from the oracle\n  replica:  {:?}\n  expected: {expected:?}",
                replica.contents()
            ));
        }
    }

    // Exactly-once effect: replaying every log again changes nothing anywhere.
    for from in 0..replica_count {
        let to = rng.index(replica_count);
        let changes = replicas[from].log.clone();
        for change in &changes {
            match replicas[to].receive(change, &workload) {
                Ok(Effect::Applied) => {
                    return Err(format!("replayed change had an effect: {change:?}"));
                }
                Ok(_) => {}
                Err(e) => return Err(format!("replay refused: {e}")),
            }
        }
    }
    if replicas[0].canonical_bytes() != reference {
        return Err("replay changed replica 0".into());
    }
    stats.conflicts += replicas.iter().map(|r| r.conflicts.len()).sum::<usize>();
    Ok(())
}

#[test]
fn replicas_converge_to_the_reference_model() {
    let seeds = seeds_from_env(CASES);
    let mut stats = Stats::default();
    for seed in &seeds {
        if let Err(failure) = run_case(*seed, &mut stats) {
            panic!(
                "convergence failed for seed {seed:#x}: {failure}\n\
                 replay: DRIFTLESS_SEED={seed:#x} cargo test -p driftless-sim --test convergence"
            );
        }
    }
    println!("{} cases: {stats:?}", seeds.len());
    // The workload must actually exercise what it claims to.
    if seeds.len() >= 100 {
        assert!(stats.writes > seeds.len() * 5, "{stats:?}");
        assert!(
            stats.conflicts > 0 && stats.duplicated > 0 && stats.lost > 0,
            "{stats:?}"
        );
    }
}
