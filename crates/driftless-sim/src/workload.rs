//! A sample schema and a random workload of client writes over it.
//!
//! The schema covers every merge rule: `items` (integer key) has `lww`, `counter`, `max` and `min`
//! columns; `flags` (composite text+integer key) uses the priority rule. Keys come from a small
//! hot set so concurrent writes to the same cells (conflicts) are frequent.

use crate::rng::Rng;
use driftless_core::{
    ColumnKind, ColumnName, KeyPart, NodeId, PrimaryKey, SchemaFingerprint, TableName, TableRules,
    Value,
};
use std::collections::BTreeMap;

/// One client write, expressed the way a SQL client would make it.
#[derive(Debug, Clone, PartialEq)]
pub enum LocalOp {
    /// Insert a row that does not exist (or re-insert a deleted one); lists every column.
    Insert {
        table: TableName,
        key: PrimaryKey,
        cells: Vec<(ColumnName, Value)>,
    },
    /// Set some columns of an existing row to new visible values (a counter increment is an
    /// update of the counter column to `old + delta`).
    Update {
        table: TableName,
        key: PrimaryKey,
        cells: Vec<(ColumnName, Value)>,
    },
    Delete {
        table: TableName,
        key: PrimaryKey,
    },
}

impl LocalOp {
    pub fn table(&self) -> &TableName {
        match self {
            LocalOp::Insert { table, .. }
            | LocalOp::Update { table, .. }
            | LocalOp::Delete { table, .. } => table,
        }
    }
    pub fn key(&self) -> &PrimaryKey {
        match self {
            LocalOp::Insert { key, .. }
            | LocalOp::Update { key, .. }
            | LocalOp::Delete { key, .. } => key,
        }
    }
}

/// A table of the sample schema.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub name: TableName,
    /// `(column, declared SQL type, kind)`, in declaration order.
    pub columns: Vec<(ColumnName, &'static str, ColumnKind)>,
    pub rules: TableRules,
    pub keys: Vec<PrimaryKey>,
    pub fingerprint: SchemaFingerprint,
}

/// The sample schema and the knobs of the random workload.
#[derive(Debug, Clone)]
pub struct Workload {
    pub tables: Vec<TableSpec>,
}

fn col(name: &str) -> ColumnName {
    ColumnName::new(name).expect("valid column name")
}

impl Workload {
    /// The sample schema. `authority` is the node whose writes win on the `flags` table.
    pub fn sample(authority: NodeId, hot_keys: usize) -> Self {
        let items = TableName::new("items").expect("valid");
        let item_columns = vec![
            (col("name"), "TEXT", ColumnKind::Lww),
            (col("price"), "REAL", ColumnKind::Lww),
            (col("photo"), "BLOB", ColumnKind::Lww),
            (col("stock"), "INTEGER", ColumnKind::Counter),
            (col("peak"), "INTEGER", ColumnKind::Max),
            (col("low"), "INTEGER", ColumnKind::Min),
        ];
        let flags = TableName::new("flags").expect("valid");
        let flag_columns = vec![
            (col("value"), "TEXT", ColumnKind::Lww),
            (col("note"), "TEXT", ColumnKind::Lww),
        ];
        let spec = |name: TableName,
                    columns: Vec<(ColumnName, &'static str, ColumnKind)>,
                    keys: Vec<PrimaryKey>,
                    priority: Vec<NodeId>| {
            let mut rules = TableRules::new().with_priority(priority);
            for (column, _, kind) in &columns {
                if *kind != ColumnKind::Lww {
                    rules = rules.with_column(column.clone(), *kind);
                }
            }
            let fingerprint = SchemaFingerprint::compute(
                &name,
                columns
                    .iter()
                    .map(|(c, _, k)| (c.as_str(), None, k.as_str())),
            );
            TableSpec {
                name,
                columns,
                rules,
                keys,
                fingerprint,
            }
        };
        let item_keys = (0..hot_keys as i64).map(PrimaryKey::integer).collect();
        let flag_keys = (0..hot_keys.div_ceil(2) as i64)
            .flat_map(|i| {
                ["beta", "gamma\0x"].map(|name| {
                    PrimaryKey::from_parts(&[KeyPart::Text(name.into()), KeyPart::Integer(i)])
                        .expect("valid key")
                })
            })
            .collect();
        Workload {
            tables: vec![
                spec(items, item_columns, item_keys, vec![]),
                spec(flags, flag_columns, flag_keys, vec![authority]),
            ],
        }
    }

    pub fn table(&self, name: &TableName) -> Option<&TableSpec> {
        self.tables.iter().find(|t| &t.name == name)
    }

    pub fn rules(&self, name: &TableName) -> &TableRules {
        &self.table(name).expect("table of the sample schema").rules
    }

    /// A random value for a column: small domains so equal values and ties happen.
    pub fn value(rng: &mut Rng, declared_type: &str, kind: ColumnKind) -> Value {
        if kind != ColumnKind::Lww {
            return Value::Integer(rng.range(0, 20) as i64 - 5);
        }
        if rng.percent(10) {
            return Value::Null;
        }
        match declared_type {
            "REAL" => match rng.below(3) {
                0 => Value::Real(rng.below(4) as f64 * 0.25),
                1 => Value::Integer(rng.below(4) as i64),
                _ => Value::Real(-(rng.below(3) as f64)),
            },
            "BLOB" => Value::Blob((0..rng.below(4)).map(|_| rng.below(3) as u8).collect()),
            _ => Value::Text(["", "a", "b", "it's", "ü", "z\0z"][rng.index(6)].to_owned()),
        }
    }

    /// The next client write, chosen against the replica's current view of the row: an insert
    /// where the row is absent, otherwise an update, a counter increment or a delete.
    pub fn next_op(
        &self,
        rng: &mut Rng,
        visible: impl Fn(&TableName, &PrimaryKey) -> Option<BTreeMap<ColumnName, Value>>,
    ) -> LocalOp {
        let spec = rng.pick(&self.tables);
        let key = rng.pick(&spec.keys).clone();
        let table = spec.name.clone();
        let Some(row) = visible(&table, &key) else {
            let cells = spec
                .columns
                .iter()
                .map(|(c, t, k)| (c.clone(), Self::value(rng, t, *k)))
                .collect();
            return LocalOp::Insert { table, key, cells };
        };
        if rng.percent(12) {
            return LocalOp::Delete { table, key };
        }
        let counters: Vec<_> = spec
            .columns
            .iter()
            .filter(|(_, _, k)| *k == ColumnKind::Counter)
            .collect();
        if !counters.is_empty() && rng.percent(30) {
            let (column, _, _) = rng.pick(&counters);
            let current = row.get(column).and_then(Value::as_integer).unwrap_or(0);
            let delta = rng.range(0, 10) as i64 - 3;
            return LocalOp::Update {
                table,
                key,
                cells: vec![(column.clone(), Value::Integer(current + delta))],
            };
        }
        let mut cells = Vec::new();
        for (column, declared, kind) in &spec.columns {
            if rng.percent(40) {
                let value = if *kind == ColumnKind::Counter {
                    let current = row.get(column).and_then(Value::as_integer).unwrap_or(0);
                    Value::Integer(current + rng.range(0, 6) as i64 - 2)
                } else {
                    Self::value(rng, declared, *kind)
                };
                cells.push((column.clone(), value));
            }
        }
        if cells.is_empty() {
            let (column, declared, kind) = rng.pick(&spec.columns);
            cells.push((column.clone(), Self::value(rng, declared, *kind)));
            if *kind == ColumnKind::Counter {
                let current = row.get(column).and_then(Value::as_integer).unwrap_or(0);
                cells[0].1 = Value::Integer(current + 1);
            }
        }
        LocalOp::Update { table, key, cells }
    }
}
