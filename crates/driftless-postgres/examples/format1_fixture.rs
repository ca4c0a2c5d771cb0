//! Builds a PostgreSQL database with the storage-format-1 code (commit 7ed7342) holding every
//! kind of state an upgrade must carry over: rows present before install, live rows, tombstones
//! and a re-inserted row, counter / max / min cells, a priority table, a conflict, a dead letter,
//! a held change, a stored cursor, a peer acknowledgement, a compacted log with a floor, and a
//! local write not yet stamped. `tests/fixtures/format1.sql` is this database dumped with
//! `pg_dump --inserts --no-owner --no-privileges --no-comments`. Run at that commit:
//! `cargo run -p driftless-postgres --example format1_fixture -- "host=127.0.0.1 user=postgres dbname=NAME"`
//! on an empty database. Kept for the record; at later commits it writes the newer format.

use driftless_core::{
    CausalLength, CellWrite, Change, ChangeOp, ColumnKind, ColumnName, KeyPart, NodeId, PrimaryKey,
    TableName, Timestamp, Value, Version,
};
use driftless_postgres::{PostgresOptions, PostgresStore};
use driftless_store::{CompactionPolicy, LogSeq, Store, TableConfig};
use postgres::{Client, NoTls};

fn main() {
    let url = std::env::args()
        .nth(1)
        .expect("usage: format1_fixture URL-of-an-empty-database");
    let here = NodeId::new(0xa1);
    let there = NodeId::new(0xb2);
    let mut client = Client::connect(&url, NoTls).unwrap();
    client
        .batch_execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, name text, stock bigint, peak bigint, low bigint);
             CREATE TABLE flags (name text PRIMARY KEY, value text);
             INSERT INTO items VALUES (1, 'existing before install', 5, 1, 1);",
        )
        .unwrap();
    let col = |n: &str| ColumnName::new(n).unwrap();
    let mut items = TableConfig::new(TableName::new("items").unwrap());
    items.column_kinds = vec![
        (col("stock"), ColumnKind::Counter),
        (col("peak"), ColumnKind::Max),
        (col("low"), ColumnKind::Min),
    ];
    let mut flags = TableConfig::new(TableName::new("flags").unwrap());
    flags.priority = vec![there];
    let mut options = PostgresOptions::new(vec![items, flags]);
    options.node_id = Some(here);
    let mut store = PostgresStore::open(&url, options).unwrap();
    client
        .batch_execute(
            "INSERT INTO items VALUES (2, 'two', 10, 5, 5), (3, 'three', 0, 0, 0), (4, 'four', 1, 1, 1);
             INSERT INTO flags VALUES ('dark_mode', 'off'), ('beta', 'no');",
        )
        .unwrap();
    store.capture(10_000).unwrap();
    client
        .batch_execute(
            "UPDATE items SET name = 'two v2', stock = 12 WHERE id = 2;
             DELETE FROM items WHERE id = 3;
             DELETE FROM items WHERE id = 4;
             INSERT INTO items VALUES (4, 'four again', 2, 2, 2);",
        )
        .unwrap();
    store.capture(10_000).unwrap();

    let now = Timestamp::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
        0,
    );
    let v = |ms_offset: u64| Version::new(Timestamp::new(now.physical_ms() + ms_offset, 0), there);
    let cell = |c: &str, value: Value| CellWrite {
        column: col(c),
        value,
        base: None,
    };
    let change = |table: &str, key: PrimaryKey, version, cl, op| Change {
        table: TableName::new(table).unwrap(),
        key,
        version,
        causal_length: CausalLength(cl),
        op,
        schema: Default::default(),
    };
    let batch = vec![
        change(
            "items",
            PrimaryKey::integer(2),
            v(1_000),
            1,
            ChangeOp::Upsert(vec![
                cell("name", Value::Text("two from b".into())),
                cell("stock", Value::Integer(3)),
                cell("peak", Value::Integer(9)),
                cell("low", Value::Integer(1)),
            ]),
        ),
        change(
            "items",
            PrimaryKey::integer(9),
            v(1_001),
            1,
            ChangeOp::Upsert(vec![
                cell("name", Value::Text("nine".into())),
                cell("stock", Value::Integer(7)),
            ]),
        ),
        change(
            "flags",
            PrimaryKey::from_parts(&[KeyPart::Text("dark_mode".into())]).unwrap(),
            v(1_002),
            1,
            ChangeOp::Upsert(vec![cell("value", Value::Text("on".into()))]),
        ),
        change(
            "items",
            PrimaryKey::integer(9),
            v(1_003),
            1,
            ChangeOp::Upsert(vec![cell("color", Value::Text("red".into()))]),
        ),
        change(
            "items",
            PrimaryKey::integer(10),
            v(3_600_000),
            1,
            ChangeOp::Upsert(vec![cell("name", Value::Text("from the future".into()))]),
        ),
        change(
            "items",
            PrimaryKey::integer(11),
            v(1_004),
            2,
            ChangeOp::Delete { base: None },
        ),
    ];
    let report = store.apply_batch(there, &batch, LogSeq(42)).unwrap();
    eprintln!("{report:?}");
    store.record_ack(there, LogSeq(3)).unwrap();
    let compacted = store
        .compact(&CompactionPolicy {
            retain_entries_min: 2,
            ..CompactionPolicy::default()
        })
        .unwrap();
    eprintln!("{compacted:?}");
    // a local write left unstamped: the upgrade must capture it
    client
        .batch_execute("UPDATE items SET name = 'written while stopped' WHERE id = 1;")
        .unwrap();
    drop(store);
}
