//! The synced tables of a chaos history, their initial rows, and the same schema as seen by the
//! reference model (`driftless_sim::Oracle`).
//!
//! `items` is an `lww` table with a few hot rows that every node inserts, updates, deletes and
//! re-inserts, plus cold rows each inserted once (a lost cold insert cannot be hidden by a later
//! write). `counters` has a `counter` column of kind `counter`; its rows are inserted once, by
//! node 0 before the nodes start, and never deleted.

use driftless_core::{ColumnKind, ColumnName, SchemaFingerprint, TableName, TableRules};
use driftless_sim::Workload;
use driftless_sim::workload::TableSpec;

/// SQL run on every replica before its node starts.
pub const SCHEMA_SQL: &str = "CREATE TABLE items (id INTEGER PRIMARY KEY, a TEXT, b TEXT);
CREATE TABLE counters (id INTEGER PRIMARY KEY, counter INTEGER NOT NULL DEFAULT 0);";

/// The same tables on a PostgreSQL replica. The types map losslessly to the SQLite ones
/// (docs/postgres.md, "Types"): `bigint` is an `Integer` like SQLite's `INTEGER`, `text` a `Text`
/// like `TEXT`, so a cell read from either kind of replica compares equal value for value.
pub const SCHEMA_SQL_POSTGRES: &str = "CREATE TABLE items (id bigint PRIMARY KEY, a text, b text);
CREATE TABLE counters (id bigint PRIMARY KEY, counter bigint NOT NULL DEFAULT 0);";

/// The `[[tables]]` part of every node's config.
pub const TABLES_TOML: &str = "[[tables]]\nname = \"items\"\n\n\
[[tables]]\nname = \"counters\"\ncolumns = { counter = \"counter\" }\n";

/// Hot `items` rows: ids `0..HOT_ITEMS`, written by every node.
pub const HOT_ITEMS: i64 = 6;
/// `counters` rows: ids `0..COUNTER_ROWS`.
pub const COUNTER_ROWS: i64 = 4;
/// Every counter's value before the workload starts.
pub const COUNTER_INITIAL: i64 = 1000;
/// Cold `items` ids start here; node `n`'s `k`-th cold insert is `COLD_BASE + n * COLD_SPAN + k`.
pub const COLD_BASE: i64 = 1_000_000;
pub const COLD_SPAN: i64 = 1_000_000;

/// The initial value of a hot item's column (`"init:a:3"`).
pub fn initial_value(column: &str, id: i64) -> String {
    format!("init:{column}:{id}")
}

/// SQL inserting the initial rows (run on node 0's replica only, so the counters are seeded
/// once). Plain SQL that SQLite and PostgreSQL both accept.
pub fn initial_rows_sql() -> String {
    let mut sql = String::from("BEGIN;\n");
    for id in 0..HOT_ITEMS {
        sql.push_str(&format!(
            "INSERT INTO items (id, a, b) VALUES ({id}, '{}', '{}');\n",
            initial_value("a", id),
            initial_value("b", id)
        ));
    }
    for id in 0..COUNTER_ROWS {
        sql.push_str(&format!(
            "INSERT INTO counters (id, counter) VALUES ({id}, {COUNTER_INITIAL});\n"
        ));
    }
    sql.push_str("COMMIT;\n");
    sql
}

fn column(name: &str) -> ColumnName {
    ColumnName::new(name).expect("valid column name")
}

/// The tables as the reference model sees them (column kinds are what matter to it).
pub fn oracle_workload() -> Workload {
    let spec = |name: &str, columns: Vec<(ColumnName, &'static str, ColumnKind)>| {
        let name = TableName::new(name).expect("valid table name");
        let mut rules = TableRules::new();
        for (c, _, kind) in &columns {
            if *kind != ColumnKind::Lww {
                rules = rules.with_column(c.clone(), *kind);
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
            keys: Vec::new(),
            fingerprint,
        }
    };
    Workload {
        tables: vec![
            spec(
                "items",
                vec![
                    (column("a"), "TEXT", ColumnKind::Lww),
                    (column("b"), "TEXT", ColumnKind::Lww),
                ],
            ),
            spec(
                "counters",
                vec![(column("counter"), "INTEGER", ColumnKind::Counter)],
            ),
        ],
    }
}
