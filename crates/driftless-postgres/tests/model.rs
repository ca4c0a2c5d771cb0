//! The core's model-based test against real stores: two PostgreSQL replicas and one SQLite
//! replica, random client writes issued with plain SQL through separate connections, random
//! exchange of log pages between any two of them (`read_log` → `apply_batch`, PostgreSQL ↔
//! SQLite both ways), then a full exchange. Every replica's tables, read with plain SQL, must be
//! identical and equal to the oracle, and their reconciliation fingerprints must agree.
//!
//! The workload is the sample one with NUL characters replaced: PostgreSQL text cannot hold
//! them (such values are dead-lettered, see docs/postgres.md).
//!
//! Replay: `DRIFTLESS_SEED=<seed> cargo test -p driftless-postgres --test model`.

mod common;

use common::{PgReplica, TestDb, table_configs, without_nul, workload_without_nul};
use driftless_core::hlc::ManualClock;
use driftless_core::{ColumnName, KeyPart, NodeId, PrimaryKey, TableName, Value};
use driftless_sim::oracle::Expected;
use driftless_sim::rng::{Rng, seeds_from_env};
use driftless_sim::{LocalOp, Oracle, Workload, Written};
use driftless_sqlite::{SqliteOptions, SqliteStore};
use driftless_store::{LogSeq, Store};
use rusqlite::types::{Value as SqlValue, ValueRef};
use std::collections::BTreeMap;
use std::time::Duration;

const SQLITE_DDL: &str = "
    CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL, photo BLOB,
                        stock INTEGER, peak INTEGER, low INTEGER);
    CREATE TABLE flags (name TEXT NOT NULL, n INTEGER NOT NULL, value TEXT, note TEXT,
                        PRIMARY KEY (name, n));
";

fn to_sqlite(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Integer(i) => SqlValue::Integer(*i),
        Value::Real(r) => SqlValue::Real(*r),
        Value::Text(t) => SqlValue::Text(t.clone()),
        Value::Blob(b) => SqlValue::Blob(b.clone()),
        other => panic!("unsupported {other:?}"),
    }
}

fn from_sqlite(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(r) => Value::Real(r),
        ValueRef::Text(t) => Value::Text(String::from_utf8(t.to_vec()).unwrap()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

fn key_value(p: &KeyPart) -> Value {
    match p {
        KeyPart::Integer(i) => Value::Integer(*i),
        KeyPart::Text(t) => Value::Text(t.clone()),
        KeyPart::Blob(b) => Value::Blob(b.clone()),
    }
}

/// A SQLite replica driven by a plain rusqlite connection.
struct LiteReplica {
    store: SqliteStore<ManualClock>,
    clock: ManualClock,
    client: rusqlite::Connection,
    _dir: tempfile::TempDir,
}

fn keys_of(table: &TableName) -> Vec<&'static str> {
    if table.as_str() == "items" {
        vec!["id"]
    } else {
        vec!["name", "n"]
    }
}

impl LiteReplica {
    fn create(node: NodeId, workload: &Workload, wall_ms: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lite.db");
        let client = rusqlite::Connection::open(&path).unwrap();
        client.busy_timeout(Duration::from_secs(10)).unwrap();
        client.execute_batch(SQLITE_DDL).unwrap();
        let clock = ManualClock::new(wall_ms);
        let mut options = SqliteOptions::new(table_configs(workload));
        options.node_id = Some(node);
        options.max_clock_offset = Duration::from_secs(1);
        let store = SqliteStore::open_with_clock(&path, options, clock.clone()).unwrap();
        LiteReplica {
            store,
            clock,
            client,
            _dir: dir,
        }
    }

    fn visible(&self, table: &TableName, key: &PrimaryKey) -> Option<BTreeMap<ColumnName, Value>> {
        let keys = keys_of(table);
        let clause = keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k} = ?{}", i + 1))
            .collect::<Vec<_>>()
            .join(" AND ");
        let mut stmt = self
            .client
            .prepare(&format!("SELECT * FROM {} WHERE {clause}", table.as_str()))
            .unwrap();
        let columns: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
        let params: Vec<SqlValue> = key
            .parts()
            .iter()
            .map(|p| to_sqlite(&key_value(p)))
            .collect();
        let mut rows = stmt.query(rusqlite::params_from_iter(params)).unwrap();
        let row = rows.next().unwrap()?;
        let mut out = BTreeMap::new();
        for (i, c) in columns.iter().enumerate() {
            if !keys.contains(&c.as_str()) {
                out.insert(
                    ColumnName::new(c).unwrap(),
                    from_sqlite(row.get_ref(i).unwrap()),
                );
            }
        }
        Some(out)
    }

    fn perform(&mut self, op: &LocalOp, workload: &Workload) -> Option<Written> {
        let table = op.table();
        let keys = keys_of(table);
        let spec = workload.table(table).unwrap();
        let mut params: Vec<Value> = op.key().parts().iter().map(key_value).collect();
        let clause = keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k} = ?{}", i + 1))
            .collect::<Vec<_>>()
            .join(" AND ");
        let mut counter_deltas = BTreeMap::new();
        let sql = match op {
            LocalOp::Insert { cells, .. } => {
                let mut cols: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
                for (c, v) in cells {
                    cols.push(c.as_str().to_owned());
                    params.push(v.clone());
                    if spec.rules.kind(c) == driftless_core::ColumnKind::Counter {
                        counter_deltas.insert(c.clone(), v.as_integer().unwrap());
                    }
                }
                let ph = (1..=params.len())
                    .map(|i| format!("?{i}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(
                    "INSERT INTO {} ({}) VALUES ({ph})",
                    table.as_str(),
                    cols.join(", ")
                )
            }
            LocalOp::Update { cells, .. } => {
                let before = self.visible(table, op.key()).unwrap_or_default();
                let n = params.len();
                let sets = cells
                    .iter()
                    .enumerate()
                    .map(|(i, (c, _))| format!("{} = ?{}", c.as_str(), n + i + 1))
                    .collect::<Vec<_>>()
                    .join(", ");
                for (c, v) in cells {
                    params.push(v.clone());
                    if spec.rules.kind(c) == driftless_core::ColumnKind::Counter {
                        let old = before.get(c).and_then(Value::as_integer).unwrap_or(0);
                        counter_deltas.insert(c.clone(), v.as_integer().unwrap() - old);
                    }
                }
                format!("UPDATE {} SET {sets} WHERE {clause}", table.as_str())
            }
            LocalOp::Delete { .. } => format!("DELETE FROM {} WHERE {clause}", table.as_str()),
        };
        let params: Vec<SqlValue> = params.iter().map(to_sqlite).collect();
        self.client
            .execute(&sql, rusqlite::params_from_iter(params))
            .unwrap();
        let report = self.store.capture(1000).unwrap();
        assert!(
            report.changes.len() <= 1,
            "one client write, one change: {report:?}"
        );
        let change = report.changes.into_iter().next()?;
        Some(Written {
            change,
            counter_deltas,
        })
    }

    fn contents(&self) -> Expected {
        let mut out = Expected::new();
        for name in ["items", "flags"] {
            let table = TableName::new(name).unwrap();
            let keys = keys_of(&table);
            let mut stmt = self
                .client
                .prepare(&format!("SELECT * FROM {name}"))
                .unwrap();
            let columns: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
            let mut rows = stmt.query([]).unwrap();
            while let Some(row) = rows.next().unwrap() {
                let mut parts = vec![KeyPart::Integer(0); keys.len()];
                let mut cells = BTreeMap::new();
                for (i, c) in columns.iter().enumerate() {
                    let v = from_sqlite(row.get_ref(i).unwrap());
                    if let Some(pos) = keys.iter().position(|k| k == c) {
                        parts[pos] = match v {
                            Value::Integer(i) => KeyPart::Integer(i),
                            Value::Text(t) => KeyPart::Text(t),
                            other => panic!("key {other:?}"),
                        };
                    } else {
                        cells.insert(ColumnName::new(c).unwrap(), v);
                    }
                }
                out.insert(
                    (table.clone(), PrimaryKey::from_parts(&parts).unwrap()),
                    cells,
                );
            }
        }
        out
    }
}

enum Replica {
    Pg(Box<PgReplica>),
    Lite(Box<LiteReplica>),
}

impl Replica {
    fn store(&mut self) -> &mut dyn Store {
        match self {
            Replica::Pg(r) => &mut r.store,
            Replica::Lite(r) => &mut r.store,
        }
    }
    fn clock(&self) -> &ManualClock {
        match self {
            Replica::Pg(r) => &r.clock,
            Replica::Lite(r) => &r.clock,
        }
    }
    fn node(&mut self) -> NodeId {
        self.store().node_id()
    }
    fn visible(
        &mut self,
        table: &TableName,
        key: &PrimaryKey,
    ) -> Option<BTreeMap<ColumnName, Value>> {
        match self {
            Replica::Pg(r) => r.visible(table, key),
            Replica::Lite(r) => r.visible(table, key),
        }
    }
    fn perform(&mut self, op: &LocalOp, workload: &Workload) -> Option<Written> {
        match self {
            Replica::Pg(r) => r.perform(op, workload),
            Replica::Lite(r) => r.perform(op, workload),
        }
    }
    fn contents(&mut self) -> Expected {
        match self {
            Replica::Pg(r) => r.contents(),
            Replica::Lite(r) => r.contents(),
        }
    }
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

fn run_case(seed: u64, ops: u64, dbs: Vec<TestDb>) -> Result<usize, String> {
    let mut rng = Rng::new(seed);
    let nodes: Vec<NodeId> = (0..3u128)
        .map(|i| NodeId::new((u128::from(rng.next_u64()) << 8) | i))
        .collect();
    let workload = workload_without_nul(nodes[0], rng.range(2, 5) as usize);
    let mut replicas: Vec<Replica> = Vec::new();
    let mut dbs = dbs.into_iter();
    for (i, node) in nodes.iter().enumerate() {
        let wall = 1_000_000 + rng.below(300);
        replicas.push(if i < 2 {
            Replica::Pg(Box::new(PgReplica::create(
                dbs.next().unwrap(),
                *node,
                &workload,
                wall,
            )))
        } else {
            Replica::Lite(Box::new(LiteReplica::create(*node, &workload, wall)))
        });
    }
    let mut oracle = Oracle::new();
    let mut writes = 0;
    for _ in 0..ops {
        match rng.below(100) {
            0..=54 => {
                let at = rng.index(3);
                let op = {
                    let view = std::cell::RefCell::new(&mut replicas[at]);
                    workload.next_op(&mut rng, |t, k| view.borrow_mut().visible(t, k))
                };
                let op = without_nul(op);
                if let Some(written) = replicas[at].perform(&op, &workload) {
                    oracle.record(written);
                    writes += 1;
                }
            }
            55..=64 => {
                let at = rng.index(3);
                let clock = replicas[at].clock().clone();
                if rng.percent(20) {
                    let now = driftless_core::Clock::now_ms(&clock);
                    clock.set(now - rng.below(200));
                } else {
                    clock.advance(rng.below(40));
                }
            }
            _ => {
                let from = rng.index(3);
                let to = (from + 1 + rng.index(2)) % 3;
                let head = replicas[from].store().log_head().unwrap().0;
                if head == 0 {
                    continue;
                }
                let after = LogSeq(rng.below(head));
                let page = replicas[from]
                    .store()
                    .read_log(after, 1 + rng.index(8))
                    .unwrap();
                let changes: Vec<_> = page.entries.iter().map(|e| e.change.clone()).collect();
                let sender = replicas[from].node();
                replicas[to]
                    .store()
                    .apply_batch(sender, &changes, page.next)
                    .map_err(|e| format!("apply {from} -> {to}: {e}"))?;
            }
        }
    }
    // Full exchange: every replica's whole log to every other (relays keep origin and version).
    for from in 0..3 {
        for to in 0..3 {
            if from != to {
                let (a, b) = pick_two(&mut replicas, from, to);
                let mut after = LogSeq(0);
                loop {
                    let page = a.store().read_log(after, 1000).unwrap();
                    if page.entries.is_empty() {
                        break;
                    }
                    let changes: Vec<_> = page.entries.iter().map(|e| e.change.clone()).collect();
                    let sender = a.node();
                    b.store()
                        .apply_batch(sender, &changes, page.next)
                        .map_err(|e| e.to_string())?;
                    after = page.next;
                }
            }
        }
    }
    let expected = oracle.expected(&workload);
    let mut fingerprints = Vec::new();
    for (i, replica) in replicas.iter_mut().enumerate() {
        let dead = replica.store().dead_letters(10).unwrap();
        if !dead.is_empty() {
            return Err(format!("replica {i} has dead letters: {dead:?}"));
        }
        let pending = replica.store().capture(1000).unwrap();
        if !pending.changes.is_empty() {
            return Err(format!(
                "replica {i} captured phantom writes: {:?}",
                pending.changes
            ));
        }
        let contents = replica.contents();
        if contents != expected {
            return Err(format!(
                "replica {i} differs from the oracle\n  replica:  {contents:?}\n  expected: {expected:?}"
            ));
        }
        let tables: Vec<TableName> = workload.tables.iter().map(|t| t.name.clone()).collect();
        let fps: Vec<Vec<i64>> = tables
            .iter()
            .map(|t| replica.store().top_fingerprints(t).unwrap())
            .collect();
        fingerprints.push(fps);
    }
    if fingerprints.windows(2).any(|w| w[0] != w[1]) {
        return Err("reconciliation fingerprints differ between replicas".into());
    }
    Ok(writes)
}

#[test]
fn two_postgres_replicas_and_a_sqlite_replica_converge_to_the_oracle() {
    let seeds = seeds_from_env(12);
    let mut writes = 0;
    for seed in &seeds {
        let Some(dbs) = common::databases("model", 2) else {
            return;
        };
        match run_case(*seed, 80, dbs) {
            Ok(n) => writes += n,
            Err(failure) => panic!(
                "seed {seed:#x}: {failure}\nreplay: DRIFTLESS_SEED={seed:#x} cargo test -p driftless-postgres --test model"
            ),
        }
    }
    println!("{} cases, {writes} client writes", seeds.len());
    assert!(writes > 0);
}
