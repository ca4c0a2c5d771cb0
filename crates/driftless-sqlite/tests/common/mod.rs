//! Helpers shared by the SQLite adapter's integration tests: a replica driven by plain SQL
//! client connections (as a user's app would), with the sample schema of `driftless-sim`.

#![allow(dead_code)]

use driftless_core::hlc::ManualClock;
use driftless_core::{ColumnKind, ColumnName, KeyPart, NodeId, PrimaryKey, TableName, Value};
use driftless_sim::oracle::Expected;
use driftless_sim::{LocalOp, Workload, Written};
use driftless_sqlite::{SqliteOptions, SqliteStore, quote_ident};
use driftless_store::{Store, TableConfig};
use rusqlite::Connection;
use rusqlite::types::{Value as SqlValue, ValueRef};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const SAMPLE_DDL: &str = "
    CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL, photo BLOB,
                        stock INTEGER, peak INTEGER, low INTEGER);
    CREATE TABLE flags (name TEXT NOT NULL, n INTEGER NOT NULL, value TEXT, note TEXT,
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

pub fn value_from_sql(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(r) => Value::Real(r),
        ValueRef::Text(t) => Value::Text(String::from_utf8(t.to_vec()).unwrap()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

pub fn value_to_sql(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Integer(i) => SqlValue::Integer(*i),
        Value::Real(r) => SqlValue::Real(*r),
        Value::Text(t) => SqlValue::Text(t.clone()),
        Value::Blob(b) => SqlValue::Blob(b.clone()),
        other => panic!("unsupported {other:?}"),
    }
}

/// A SQL literal for the `sqlite3` shell (text through a hex cast, so NULs and quotes survive).
pub fn literal(v: &Value) -> String {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    match v {
        Value::Null => "NULL".into(),
        Value::Integer(i) => i.to_string(),
        Value::Real(r) => format!("{r:?}"),
        Value::Text(t) => format!("CAST(X'{}' AS TEXT)", hex(t.as_bytes())),
        Value::Blob(b) => format!("X'{}'", hex(b)),
        other => panic!("unsupported {other:?}"),
    }
}

fn key_part_literal(p: &KeyPart) -> Value {
    match p {
        KeyPart::Integer(i) => Value::Integer(*i),
        KeyPart::Text(t) => Value::Text(t.clone()),
        KeyPart::Blob(b) => Value::Blob(b.clone()),
    }
}

/// How client writes reach the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// A separate rusqlite connection in this process.
    Connection,
    /// The `sqlite3` command-line shell, a separate OS process.
    Shell,
}

pub struct SqliteReplica {
    pub store: SqliteStore<ManualClock>,
    pub clock: ManualClock,
    pub client: Connection,
    pub path: PathBuf,
    pub client_kind: Client,
}

impl SqliteReplica {
    pub fn create(
        dir: &Path,
        name: &str,
        node: NodeId,
        workload: &Workload,
        client_kind: Client,
        wall_ms: u64,
    ) -> Self {
        let path = dir.join(format!("{name}.db"));
        let client = Connection::open(&path).unwrap();
        client.busy_timeout(Duration::from_secs(10)).unwrap();
        client.execute_batch(SAMPLE_DDL).unwrap();
        let clock = ManualClock::new(wall_ms);
        let mut options = SqliteOptions::new(table_configs(workload));
        options.node_id = Some(node);
        options.max_clock_offset = Duration::from_secs(1);
        let store = SqliteStore::open_with_clock(&path, options, clock.clone()).unwrap();
        SqliteReplica {
            store,
            clock,
            client,
            path,
            client_kind,
        }
    }

    pub fn node(&self) -> NodeId {
        self.store.node_id()
    }

    fn key_where(&self, table: &TableName) -> (Vec<String>, String) {
        let schema = self
            .store
            .schemas()
            .iter()
            .find(|s| &s.name == table)
            .unwrap();
        let names: Vec<String> = schema
            .key_columns()
            .iter()
            .map(|c| c.name.as_str().to_owned())
            .collect();
        let clause = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{} = ?{}", quote_ident(n), i + 1))
            .collect::<Vec<_>>()
            .join(" AND ");
        (names, clause)
    }

    /// The row as the client sees it (non-key columns), read with plain SQL.
    pub fn visible(
        &self,
        table: &TableName,
        key: &PrimaryKey,
    ) -> Option<BTreeMap<ColumnName, Value>> {
        let (names, clause) = self.key_where(table);
        let sql = format!(
            "SELECT * FROM {} WHERE {clause}",
            quote_ident(table.as_str())
        );
        let mut stmt = self.client.prepare(&sql).unwrap();
        let columns: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
        let params: Vec<SqlValue> = key
            .parts()
            .iter()
            .map(|p| value_to_sql(&key_part_literal(p)))
            .collect();
        let mut rows = stmt.query(rusqlite::params_from_iter(params)).unwrap();
        let row = rows.next().unwrap()?;
        let mut out = BTreeMap::new();
        for (i, c) in columns.iter().enumerate() {
            if !names.contains(c) {
                out.insert(
                    ColumnName::new(c).unwrap(),
                    value_from_sql(row.get_ref(i).unwrap()),
                );
            }
        }
        Some(out)
    }

    /// Runs a client write with plain SQL (no driftless API), then stamps it. Returns what the
    /// oracle needs, or `None` if the write changed nothing.
    pub fn perform(&mut self, op: &LocalOp, workload: &Workload) -> Option<Written> {
        let table = op.table();
        let (names, clause) = self.key_where(table);
        let key_values: Vec<Value> = op.key().parts().iter().map(key_part_literal).collect();
        let qt = quote_ident(table.as_str());
        let spec = workload.table(table).unwrap();
        let mut counter_deltas = BTreeMap::new();
        let (sql, params): (String, Vec<Value>) = match op {
            LocalOp::Insert { cells, .. } => {
                let mut cols: Vec<String> = names.iter().map(|n| quote_ident(n)).collect();
                let mut vals = key_values.clone();
                for (c, v) in cells {
                    cols.push(quote_ident(c.as_str()));
                    vals.push(v.clone());
                    if spec.rules.kind(c) == ColumnKind::Counter {
                        counter_deltas.insert(c.clone(), v.as_integer().unwrap());
                    }
                }
                let ph = (1..=vals.len())
                    .map(|i| format!("?{i}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                (
                    format!("INSERT INTO {qt} ({}) VALUES ({ph})", cols.join(", ")),
                    vals,
                )
            }
            LocalOp::Update { cells, .. } => {
                let before = self.visible(table, op.key()).unwrap_or_default();
                let n = key_values.len();
                let sets = cells
                    .iter()
                    .enumerate()
                    .map(|(i, (c, _))| format!("{} = ?{}", quote_ident(c.as_str()), n + i + 1))
                    .collect::<Vec<_>>()
                    .join(", ");
                for (c, v) in cells {
                    if spec.rules.kind(c) == ColumnKind::Counter {
                        let old = before.get(c).and_then(Value::as_integer).unwrap_or(0);
                        counter_deltas.insert(c.clone(), v.as_integer().unwrap() - old);
                    }
                }
                let mut vals = key_values.clone();
                vals.extend(cells.iter().map(|(_, v)| v.clone()));
                (format!("UPDATE {qt} SET {sets} WHERE {clause}"), vals)
            }
            LocalOp::Delete { .. } => (
                format!("DELETE FROM {qt} WHERE {clause}"),
                key_values.clone(),
            ),
        };
        match self.client_kind {
            Client::Connection => {
                let params: Vec<SqlValue> = params.iter().map(value_to_sql).collect();
                self.client
                    .execute(&sql, rusqlite::params_from_iter(params))
                    .unwrap();
            }
            Client::Shell => {
                // substitute ?N from the highest index down so ?1 does not clobber ?10
                let mut text = sql.clone();
                for (i, v) in params.iter().enumerate().rev() {
                    text = text.replace(&format!("?{}", i + 1), &literal(v));
                }
                let out = Command::new("sqlite3")
                    .args(["-bail", "-cmd", ".timeout 10000"])
                    .arg(&self.path)
                    .arg(format!("{text};"))
                    .output()
                    .expect("the sqlite3 shell is installed");
                assert!(
                    out.status.success(),
                    "sqlite3 failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
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

    /// Every live row of the synced tables, read directly from the SQLite file.
    pub fn contents(&self) -> Expected {
        let mut out = Expected::new();
        for schema in self.store.schemas() {
            let keys: Vec<String> = schema
                .key_columns()
                .iter()
                .map(|c| c.name.as_str().to_owned())
                .collect();
            let sql = format!("SELECT * FROM {}", quote_ident(schema.name.as_str()));
            let mut stmt = self.client.prepare(&sql).unwrap();
            let columns: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
            let mut rows = stmt.query([]).unwrap();
            while let Some(row) = rows.next().unwrap() {
                let mut parts = vec![KeyPart::Integer(0); keys.len()];
                let mut cells = BTreeMap::new();
                for (i, c) in columns.iter().enumerate() {
                    let v = value_from_sql(row.get_ref(i).unwrap());
                    if let Some(pos) = keys.iter().position(|k| k == c) {
                        parts[pos] = match v {
                            Value::Integer(i) => KeyPart::Integer(i),
                            Value::Text(t) => KeyPart::Text(t),
                            Value::Blob(b) => KeyPart::Blob(b),
                            other => panic!("key {other:?}"),
                        };
                    } else {
                        cells.insert(ColumnName::new(c).unwrap(), v);
                    }
                }
                out.insert(
                    (schema.name.clone(), PrimaryKey::from_parts(&parts).unwrap()),
                    cells,
                );
            }
        }
        out
    }

    /// Ships this replica's whole log (from `after`) to `to`, in pages.
    pub fn send_all(&mut self, to: &mut SqliteReplica) {
        let mut after = to.store.cursor(self.node()).unwrap();
        loop {
            let page = self.store.read_log(after, 500).unwrap();
            if page.entries.is_empty() {
                break;
            }
            let changes: Vec<_> = page.entries.iter().map(|e| e.change.clone()).collect();
            to.store
                .apply_batch(self.node(), &changes, page.next)
                .unwrap();
            after = page.next;
        }
    }
}
