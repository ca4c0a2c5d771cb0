//! Helpers shared by the PostgreSQL adapter's integration tests: a throwaway database per test
//! (created on the server named by `DRIFTLESS_PG_URL`, default the machine's local server, and
//! dropped at the end even when the test fails), and replicas driven by plain SQL client
//! connections with the sample schema of `driftless-sim`.
//!
//! When the server is unreachable, a test is skipped with a printed reason, except under CI
//! (env `CI` set), where it fails.

#![allow(dead_code)]

use driftless_core::hlc::ManualClock;
use driftless_core::{ColumnKind, ColumnName, KeyPart, NodeId, PrimaryKey, TableName, Value};
use driftless_postgres::{PostgresOptions, PostgresStore, quote_ident};
use driftless_sim::oracle::Expected;
use driftless_sim::{LocalOp, Workload, Written};
use driftless_store::{Store, TableConfig};
use postgres::types::ToSql;
use postgres::{Client, NoTls};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The server tests use: `DRIFTLESS_PG_URL`, or the machine's local server.
pub fn admin_url() -> String {
    std::env::var("DRIFTLESS_PG_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

/// Replaces the `dbname=` of a connection string.
pub fn with_dbname(url: &str, dbname: &str) -> String {
    let mut parts: Vec<String> = url
        .split_whitespace()
        .filter(|p| !p.starts_with("dbname="))
        .map(str::to_owned)
        .collect();
    parts.push(format!("dbname={dbname}"));
    parts.join(" ")
}

/// A database created for one test and dropped (with its connections) when dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin: String,
}

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

impl TestDb {
    /// A fresh empty database, or `None` (test skipped, reason printed) when no server is
    /// reachable outside CI.
    pub fn create(test: &str) -> Option<TestDb> {
        let admin = admin_url();
        let mut client = match Client::connect(&admin, NoTls) {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI needs PostgreSQL for {test}: cannot connect with {admin:?}: {e}"
                );
                eprintln!("skipped {test}: PostgreSQL unreachable at {admin:?}: {e}");
                return None;
            }
        };
        // (only on a server of this machine: elsewhere a pid says nothing about liveness)
        if ["127.0.0.1", "localhost", "host=/"]
            .iter()
            .any(|local| admin.contains(local))
        {
            drop_abandoned_databases(&mut client);
        }
        let n = NEXT_DB.fetch_add(1, Ordering::Relaxed);
        let name = format!("driftless_test_{}_{n}", std::process::id());
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&name)
            ))
            .expect("drop a leftover test database");
        client
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .expect("create the test database");
        Some(TestDb {
            url: with_dbname(&admin, &name),
            name,
            admin,
        })
    }

    pub fn client(&self) -> Client {
        let mut client = Client::connect(&self.url, NoTls).expect("connect to the test database");
        client
            .batch_execute("SET TimeZone = 'UTC'")
            .expect("session settings");
        client
    }
}

/// Drops test databases left by test processes that no longer run (e.g. killed or aborted, so
/// their drops never ran).
fn drop_abandoned_databases(client: &mut Client) {
    let Ok(rows) = client.query(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'driftless\\_test\\_%'",
        &[],
    ) else {
        return;
    };
    for row in rows {
        let name: String = row.get(0);
        let pid = name.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_none_or(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = client.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&name)
            ));
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut client) = Client::connect(&self.admin, NoTls) {
            let _ = client.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&self.name)
            ));
        }
    }
}

/// Several test databases at once, or `None` (skipped).
pub fn databases(test: &str, n: usize) -> Option<Vec<TestDb>> {
    (0..n).map(|_| TestDb::create(test)).collect()
}

pub const SAMPLE_DDL: &str = "
    CREATE TABLE items (id bigint PRIMARY KEY, name text, price double precision, photo bytea,
                        stock bigint, peak bigint, low bigint);
    CREATE TABLE flags (name text NOT NULL, n bigint NOT NULL, value text, note text,
                        PRIMARY KEY (name, n));
";

/// The sample schema's table configs (merge rules from the workload).
pub fn table_configs(workload: &Workload) -> Vec<TableConfig> {
    workload
        .tables
        .iter()
        .map(|t| {
            let mut config = TableConfig::new(t.name.clone());
            config.column_kinds = t
                .columns
                .iter()
                .filter(|(_, _, k)| *k != ColumnKind::Lww)
                .map(|(c, _, k)| (c.clone(), *k))
                .collect();
            config.priority = t.rules.priority_nodes().collect();
            config
        })
        .collect()
}

/// The sample workload without NUL characters (PostgreSQL text cannot hold them: such values
/// are refused with a dead letter, see docs/postgres.md).
pub fn workload_without_nul(authority: NodeId, hot_keys: usize) -> Workload {
    let mut workload = Workload::sample(authority, hot_keys);
    for table in &mut workload.tables {
        for key in &mut table.keys {
            let parts: Vec<KeyPart> = key
                .parts()
                .into_iter()
                .map(|p| match p {
                    KeyPart::Text(t) => KeyPart::Text(t.replace('\0', " ")),
                    other => other,
                })
                .collect();
            *key = PrimaryKey::from_parts(&parts).unwrap();
        }
    }
    workload
}

/// The same write with values every store keeps exactly: NUL characters in text replaced
/// (PostgreSQL text cannot hold them) and negative zero made positive (SQLite's REAL columns do
/// not keep its sign; a known limit of the SQLite adapter, see docs/postgres.md).
pub fn without_nul(op: LocalOp) -> LocalOp {
    let fix = |cells: Vec<(ColumnName, Value)>| {
        cells
            .into_iter()
            .map(|(c, v)| match v {
                Value::Text(t) => (c, Value::Text(t.replace('\0', "0"))),
                Value::Real(0.0) => (c, Value::Real(0.0)),
                other => (c, other),
            })
            .collect()
    };
    match op {
        LocalOp::Insert { table, key, cells } => LocalOp::Insert {
            table,
            key,
            cells: fix(cells),
        },
        LocalOp::Update { table, key, cells } => LocalOp::Update {
            table,
            key,
            cells: fix(cells),
        },
        other => other,
    }
}

/// The PostgreSQL type of a sample-schema column.
fn sample_type(column: &str) -> &'static str {
    match column {
        "price" => "float8",
        "photo" => "bytea",
        "name" | "value" | "note" => "text",
        _ => "int8",
    }
}

/// A value bound as a parameter of the given PostgreSQL type.
pub fn param(value: &Value, pg_type: &str) -> Box<dyn ToSql + Sync> {
    match (pg_type, value) {
        ("float8", Value::Null) => Box::new(Option::<f64>::None),
        ("float8", Value::Real(r)) => Box::new(*r),
        ("float8", Value::Integer(i)) => Box::new(*i as f64),
        ("bytea", Value::Null) => Box::new(Option::<Vec<u8>>::None),
        ("bytea", Value::Blob(b)) => Box::new(b.clone()),
        ("text", Value::Null) => Box::new(Option::<String>::None),
        ("text", Value::Text(t)) => Box::new(t.clone()),
        ("int8", Value::Null) => Box::new(Option::<i64>::None),
        ("int8", Value::Integer(i)) => Box::new(*i),
        (ty, v) => panic!("cannot bind {v:?} as {ty}"),
    }
}

fn key_param(part: &KeyPart) -> Box<dyn ToSql + Sync> {
    match part {
        KeyPart::Integer(i) => Box::new(*i),
        KeyPart::Text(t) => Box::new(t.clone()),
        KeyPart::Blob(b) => Box::new(b.clone()),
    }
}

pub fn value_from_row(row: &postgres::Row, i: usize, pg_type: &str) -> Value {
    match pg_type {
        "float8" => row
            .get::<_, Option<f64>>(i)
            .map_or(Value::Null, Value::Real),
        "bytea" => row
            .get::<_, Option<Vec<u8>>>(i)
            .map_or(Value::Null, Value::Blob),
        "text" => row
            .get::<_, Option<String>>(i)
            .map_or(Value::Null, Value::Text),
        _ => row
            .get::<_, Option<i64>>(i)
            .map_or(Value::Null, Value::Integer),
    }
}

/// A PostgreSQL replica of the sample schema driven by a plain client connection.
pub struct PgReplica {
    pub store: PostgresStore<ManualClock>,
    pub clock: ManualClock,
    pub client: Client,
    pub db: TestDb,
}

pub fn sample_options(workload: &Workload, node: NodeId) -> PostgresOptions {
    let mut options = PostgresOptions::new(table_configs(workload));
    options.node_id = Some(node);
    options.max_clock_offset = Duration::from_secs(1);
    options
}

impl PgReplica {
    pub fn create(db: TestDb, node: NodeId, workload: &Workload, wall_ms: u64) -> Self {
        let mut client = db.client();
        client.batch_execute(SAMPLE_DDL).unwrap();
        let clock = ManualClock::new(wall_ms);
        let store =
            PostgresStore::open_with_clock(&db.url, sample_options(workload, node), clock.clone())
                .unwrap();
        PgReplica {
            store,
            clock,
            client,
            db,
        }
    }

    pub fn node(&self) -> NodeId {
        self.store.node_id()
    }

    /// The row as the client sees it (non-key columns), read with plain SQL.
    pub fn visible(
        &mut self,
        table: &TableName,
        key: &PrimaryKey,
    ) -> Option<BTreeMap<ColumnName, Value>> {
        visible(&mut self.client, table, key)
    }

    /// Runs a client write with plain SQL, then stamps it. Returns what the oracle needs, or
    /// `None` if the write changed nothing.
    pub fn perform(&mut self, op: &LocalOp, workload: &Workload) -> Option<Written> {
        let counter_deltas = perform(&mut self.client, op, workload);
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

    pub fn contents(&mut self) -> Expected {
        contents(&mut self.client)
    }
}

fn key_columns(table: &TableName) -> Vec<&'static str> {
    match table.as_str() {
        "items" => vec!["id"],
        _ => vec!["name", "n"],
    }
}

fn value_columns(table: &TableName) -> Vec<&'static str> {
    match table.as_str() {
        "items" => vec!["name", "price", "photo", "stock", "peak", "low"],
        _ => vec!["value", "note"],
    }
}

pub fn visible(
    client: &mut Client,
    table: &TableName,
    key: &PrimaryKey,
) -> Option<BTreeMap<ColumnName, Value>> {
    let keys = key_columns(table);
    let values = value_columns(table);
    let clause = keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} = ${}", quote_ident(k), i + 1))
        .collect::<Vec<_>>()
        .join(" AND ");
    let sql = format!(
        "SELECT {} FROM {} WHERE {clause}",
        values.join(", "),
        quote_ident(table.as_str())
    );
    let params: Vec<Box<dyn ToSql + Sync>> = key.parts().iter().map(key_param).collect();
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
    let row = client.query_opt(&sql, &refs).unwrap()?;
    Some(
        values
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    ColumnName::new(c).unwrap(),
                    value_from_row(&row, i, sample_type(c)),
                )
            })
            .collect(),
    )
}

/// Runs one client write with plain SQL. Returns the counter increments it made.
pub fn perform(
    client: &mut Client,
    op: &LocalOp,
    workload: &Workload,
) -> BTreeMap<ColumnName, i64> {
    let table = op.table();
    let keys = key_columns(table);
    let spec = workload.table(table).unwrap();
    let qt = quote_ident(table.as_str());
    let mut params: Vec<Box<dyn ToSql + Sync>> = op.key().parts().iter().map(key_param).collect();
    let clause = keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} = ${}", quote_ident(k), i + 1))
        .collect::<Vec<_>>()
        .join(" AND ");
    let mut counter_deltas = BTreeMap::new();
    let sql = match op {
        LocalOp::Insert { cells, .. } => {
            let mut cols: Vec<String> = keys.iter().map(|k| quote_ident(k)).collect();
            for (c, v) in cells {
                cols.push(quote_ident(c.as_str()));
                params.push(param(v, sample_type(c.as_str())));
                if spec.rules.kind(c) == ColumnKind::Counter {
                    counter_deltas.insert(c.clone(), v.as_integer().unwrap());
                }
            }
            let ph = (1..=params.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ");
            format!("INSERT INTO {qt} ({}) VALUES ({ph})", cols.join(", "))
        }
        LocalOp::Update { cells, .. } => {
            let before = visible(client, table, op.key()).unwrap_or_default();
            let n = params.len();
            let sets = cells
                .iter()
                .enumerate()
                .map(|(i, (c, _))| format!("{} = ${}", quote_ident(c.as_str()), n + i + 1))
                .collect::<Vec<_>>()
                .join(", ");
            for (c, v) in cells {
                params.push(param(v, sample_type(c.as_str())));
                if spec.rules.kind(c) == ColumnKind::Counter {
                    let old = before.get(c).and_then(Value::as_integer).unwrap_or(0);
                    counter_deltas.insert(c.clone(), v.as_integer().unwrap() - old);
                }
            }
            format!("UPDATE {qt} SET {sets} WHERE {clause}")
        }
        LocalOp::Delete { .. } => format!("DELETE FROM {qt} WHERE {clause}"),
    };
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
    client.execute(&sql, &refs).unwrap();
    counter_deltas
}

/// Every live row of the sample tables, read with plain SQL.
pub fn contents(client: &mut Client) -> Expected {
    let mut out = Expected::new();
    for name in ["items", "flags"] {
        let table = TableName::new(name).unwrap();
        let keys = key_columns(&table);
        let values = value_columns(&table);
        let sql = format!(
            "SELECT {}, {} FROM {}",
            keys.join(", "),
            values.join(", "),
            quote_ident(name)
        );
        for row in client.query(&sql, &[]).unwrap() {
            let parts: Vec<KeyPart> = keys
                .iter()
                .enumerate()
                .map(|(i, k)| match *k {
                    "name" => KeyPart::Text(row.get(i)),
                    _ => KeyPart::Integer(row.get(i)),
                })
                .collect();
            let cells = values
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    (
                        ColumnName::new(c).unwrap(),
                        value_from_row(&row, keys.len() + i, sample_type(c)),
                    )
                })
                .collect();
            out.insert(
                (table.clone(), PrimaryKey::from_parts(&parts).unwrap()),
                cells,
            );
        }
    }
    out
}

/// Ships `from`'s log after `to`'s cursor for it, in pages.
pub fn sync(from: &mut dyn Store, to: &mut dyn Store) -> driftless_store::ApplyReport {
    let mut total = driftless_store::ApplyReport::default();
    loop {
        let after = to.cursor(from.node_id()).unwrap();
        let page = from.read_log(after, 500).unwrap();
        if page.entries.is_empty() {
            return total;
        }
        let changes: Vec<_> = page.entries.iter().map(|e| e.change.clone()).collect();
        total.add(&to.apply_batch(from.node_id(), &changes, page.next).unwrap());
    }
}
