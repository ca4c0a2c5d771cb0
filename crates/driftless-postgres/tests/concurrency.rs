//! Concurrent client writers on hot rows while remote changes apply (the race of issue 8).
//!
//! Two PostgreSQL replicas, each with 8 client connections hammering the same 6 rows (counter
//! increments and last-writer-wins overwrites, single-row and two-row transactions), while a
//! driver thread per replica stamps local writes and applies the other replica's log, batch
//! after batch. After everything is exchanged:
//!
//! - both replicas hold identical rows, equal to the oracle computed from the changes each one
//!   captured (`driftless_sim::Oracle`, independent of the merge code);
//! - no acknowledged write was lost: every counter equals its initial value plus every
//!   increment any client committed on either side. A remote value overwriting a client write
//!   that was never compared with it (the race) would lose increments here.
//!
//! Replay: `DRIFTLESS_SEED=<seed> cargo test -p driftless-postgres --test concurrency`.

mod common;

use common::TestDb;
use driftless_core::{
    ChangeOp, ColumnKind, ColumnName, NodeId, PrimaryKey, SchemaFingerprint, TableName, TableRules,
    Value,
};
use driftless_postgres::{PostgresOptions, PostgresStore};
use driftless_sim::rng::{Rng, seeds_from_env};
use driftless_sim::workload::TableSpec;
use driftless_sim::{Oracle, Workload, Written};
use driftless_store::{LogSeq, Store, TableConfig};
use postgres::{Client, NoTls};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS_PER_REPLICA: usize = 8;
const WRITES_PER_CLIENT: usize = 120;
const HOT_ROWS: i64 = 6;
const DDL: &str =
    "CREATE TABLE hot (id bigint PRIMARY KEY, owner text, stock bigint NOT NULL DEFAULT 0);";

fn table() -> TableName {
    TableName::new("hot").unwrap()
}

fn options(node: u128) -> PostgresOptions {
    let mut config = TableConfig::new(table());
    config.column_kinds = vec![(ColumnName::new("stock").unwrap(), ColumnKind::Counter)];
    let mut options = PostgresOptions::new(vec![config]);
    options.node_id = Some(NodeId::new(node));
    options
}

fn workload() -> Workload {
    let columns = vec![
        (ColumnName::new("owner").unwrap(), "text", ColumnKind::Lww),
        (
            ColumnName::new("stock").unwrap(),
            "bigint",
            ColumnKind::Counter,
        ),
    ];
    let rules =
        TableRules::new().with_column(ColumnName::new("stock").unwrap(), ColumnKind::Counter);
    Workload {
        tables: vec![TableSpec {
            name: table(),
            columns,
            rules,
            keys: (0..HOT_ROWS).map(PrimaryKey::integer).collect(),
            fingerprint: SchemaFingerprint::default(),
        }],
    }
}

/// One client connection's run: returns the increments it committed, per row.
fn client_run(
    url: String,
    seed: u64,
    tag: String,
    stop_early: Arc<AtomicBool>,
) -> BTreeMap<i64, i64> {
    let mut rng = Rng::new(seed);
    let mut client = Client::connect(&url, NoTls).unwrap();
    let mut committed: BTreeMap<i64, i64> = BTreeMap::new();
    for n in 0..WRITES_PER_CLIENT {
        if stop_early.load(Ordering::Relaxed) {
            break;
        }
        let mut keys = vec![rng.below(HOT_ROWS as u64) as i64];
        if rng.percent(30) {
            keys.push(rng.below(HOT_ROWS as u64) as i64);
            keys.sort();
            keys.dedup();
        }
        let deltas: Vec<i64> = keys.iter().map(|_| 1 + rng.below(5) as i64).collect();
        let owner = format!("{tag}-{n}");
        let result = (|| -> Result<(), postgres::Error> {
            let mut tx = client.transaction()?;
            for (k, d) in keys.iter().zip(&deltas) {
                tx.execute(
                    "UPDATE hot SET stock = stock + $1, owner = $2 WHERE id = $3",
                    &[d, &owner, k],
                )?;
            }
            tx.commit()
        })();
        match result {
            Ok(()) => {
                for (k, d) in keys.iter().zip(&deltas) {
                    *committed.entry(*k).or_default() += d;
                }
            }
            // a deadlock with another writer: the transaction rolled back, nothing to count
            Err(e) if e.code().is_some() => {}
            Err(e) => panic!("client {tag}: {e}"),
        }
    }
    committed
}

/// The local changes a replica captured, as the oracle's writes: counter deltas are the
/// differences between this origin's successive totals (one life: there are no deletes).
fn written_from_log(store: &mut PostgresStore) -> Vec<Written> {
    let node = store.node_id();
    let mut out = Vec::new();
    let mut totals: BTreeMap<(PrimaryKey, ColumnName), i64> = BTreeMap::new();
    let mut after = LogSeq(0);
    loop {
        let page = store.read_log(after, 1000).unwrap();
        if page.entries.is_empty() {
            return out;
        }
        after = page.next;
        for entry in page.entries {
            if entry.change.origin() != node {
                continue;
            }
            let mut deltas = BTreeMap::new();
            if let ChangeOp::Upsert(cells) = &entry.change.op {
                for cell in cells.iter().filter(|c| c.column.as_str() == "stock") {
                    let total = cell.value.as_integer().unwrap();
                    let before = totals
                        .insert((entry.change.key.clone(), cell.column.clone()), total)
                        .unwrap_or(0);
                    deltas.insert(cell.column.clone(), total - before);
                }
            }
            out.push(Written {
                change: entry.change,
                counter_deltas: deltas,
            });
        }
    }
}

fn contents(client: &mut Client) -> Vec<(i64, Option<String>, i64)> {
    client
        .query("SELECT id, owner, stock FROM hot ORDER BY id", &[])
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// One replica's driftless: stamps local writes and applies the peer's log, until told to stop
/// and nothing is left to exchange.
fn driver(
    mut store: PostgresStore,
    mut peer_log: PostgresStore,
    clients_done: Arc<AtomicBool>,
    peer_done: Arc<AtomicBool>,
    batches: Arc<Mutex<u64>>,
) -> PostgresStore {
    let peer = peer_log.node_id();
    let mut idle_rounds = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        assert!(Instant::now() < deadline, "the exchange did not finish");
        let captured = store.capture(1000).unwrap().changes.len();
        let after = store.cursor(peer).unwrap();
        let page = peer_log.read_log(after, 50).unwrap();
        let applied = page.entries.len();
        if applied > 0 {
            let changes: Vec<_> = page.entries.iter().map(|e| e.change.clone()).collect();
            store.apply_batch(peer, &changes, page.next).unwrap();
            *batches.lock().unwrap() += 1;
        }
        let quiet = captured == 0 && applied == 0 && store.pending_local_writes().unwrap() == 0;
        if clients_done.load(Ordering::Relaxed) && peer_done.load(Ordering::Relaxed) && quiet {
            idle_rounds += 1;
            if idle_rounds > 20 {
                return store;
            }
        } else {
            idle_rounds = 0;
        }
        if applied == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn run_case(seed: u64, a_db: TestDb, b_db: TestDb) {
    let mut rng = Rng::new(seed);
    let mut ca = a_db.client();
    let mut cb = b_db.client();
    ca.batch_execute(DDL).unwrap();
    cb.batch_execute(DDL).unwrap();
    let initial: Vec<i64> = (0..HOT_ROWS).map(|_| rng.below(100) as i64).collect();
    for (id, stock) in initial.iter().enumerate() {
        ca.execute(
            "INSERT INTO hot (id, owner, stock) VALUES ($1, 'seed', $2)",
            &[&(id as i64), stock],
        )
        .unwrap();
    }
    let mut a = PostgresStore::open(&a_db.url, options(1)).unwrap();
    let mut b = PostgresStore::open(&b_db.url, options(2)).unwrap();
    // seed B from A before the storm
    a.capture(1000).unwrap();
    common::sync(&mut a, &mut b);
    assert_eq!(contents(&mut ca), contents(&mut cb));

    let a_reader = PostgresStore::open(&a_db.url, options(1)).unwrap();
    let b_reader = PostgresStore::open(&b_db.url, options(2)).unwrap();
    let a_clients_done = Arc::new(AtomicBool::new(false));
    let b_clients_done = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let batches = Arc::new(Mutex::new(0u64));
    let started = Instant::now();
    let a_driver = {
        let (done, peer_done, batches) = (
            a_clients_done.clone(),
            b_clients_done.clone(),
            batches.clone(),
        );
        std::thread::spawn(move || driver(a, b_reader, done, peer_done, batches))
    };
    let b_driver = {
        let (done, peer_done, batches) = (
            b_clients_done.clone(),
            a_clients_done.clone(),
            batches.clone(),
        );
        std::thread::spawn(move || driver(b, a_reader, done, peer_done, batches))
    };
    let mut client_threads = Vec::new();
    for (side, url) in [("a", a_db.url.clone()), ("b", b_db.url.clone())] {
        for i in 0..CLIENTS_PER_REPLICA {
            let (url, stop) = (url.clone(), stop.clone());
            let client_seed = rng.next_u64();
            let tag = format!("{side}{i}");
            client_threads.push((
                side,
                std::thread::spawn(move || client_run(url, client_seed, tag, stop)),
            ));
        }
    }
    let mut increments: BTreeMap<i64, i64> = BTreeMap::new();
    let mut a_left = CLIENTS_PER_REPLICA;
    let mut b_left = CLIENTS_PER_REPLICA;
    for (side, thread) in client_threads {
        for (k, d) in thread.join().unwrap() {
            *increments.entry(k).or_default() += d;
        }
        if side == "a" {
            a_left -= 1;
            if a_left == 0 {
                a_clients_done.store(true, Ordering::Relaxed);
            }
        } else {
            b_left -= 1;
            if b_left == 0 {
                b_clients_done.store(true, Ordering::Relaxed);
            }
        }
    }
    let mut a = a_driver.join().unwrap();
    let mut b = b_driver.join().unwrap();
    let retries = a.transaction_retries() + b.transaction_retries();

    let rows_a = contents(&mut ca);
    let rows_b = contents(&mut cb);
    assert_eq!(rows_a, rows_b, "seed {seed:#x}: the replicas differ");
    // no acknowledged write lost: every committed increment is in the counters
    for (id, _, stock) in &rows_a {
        let expected = initial[*id as usize] + increments.get(id).copied().unwrap_or(0);
        assert_eq!(*stock, expected, "seed {seed:#x}: row {id} lost increments");
    }
    // the merge result is what the rules say for the changes captured on both sides
    let mut oracle = Oracle::new();
    for written in written_from_log(&mut a)
        .into_iter()
        .chain(written_from_log(&mut b))
    {
        oracle.record(written);
    }
    let expected = oracle.expected(&workload());
    let got: BTreeMap<_, _> = rows_a
        .iter()
        .map(|(id, owner, stock)| {
            (
                (table(), PrimaryKey::integer(*id)),
                BTreeMap::from([
                    (
                        ColumnName::new("owner").unwrap(),
                        owner.clone().map_or(Value::Null, Value::Text),
                    ),
                    (ColumnName::new("stock").unwrap(), Value::Integer(*stock)),
                ]),
            )
        })
        .collect();
    assert_eq!(
        got, expected,
        "seed {seed:#x}: the replicas differ from the oracle"
    );
    assert!(a.dead_letters(10).unwrap().is_empty() && b.dead_letters(10).unwrap().is_empty());
    let total: i64 = increments.values().sum();
    println!(
        "seed {seed:#x}: {} clients, increments {total}, {} applied batches, {retries} transactions \
         retried after conflicting with a client, {:?}",
        2 * CLIENTS_PER_REPLICA,
        batches.lock().unwrap(),
        started.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn concurrent_clients_on_hot_rows_while_applying_lose_no_write_and_converge() {
    for seed in seeds_from_env(2) {
        let Some(mut dbs) = common::databases("concurrency", 2) else {
            return;
        };
        let b = dbs.pop().unwrap();
        let a = dbs.pop().unwrap();
        run_case(seed, a, b);
    }
}
