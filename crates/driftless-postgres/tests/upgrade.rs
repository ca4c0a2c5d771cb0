//! Upgrade in place: a database set up by storage format 1 (`tests/fixtures/format1.sql`, made
//! at commit 7ed7342 by `examples/format1_fixture.rs` and dumped with `pg_dump --inserts`) opens
//! under format 2 without losing a row, a version, a conflict, a dead letter, a held change or a
//! cursor; a peer's cursor keeps its meaning; and a database whose configuration lacks one of
//! its tables is refused unchanged.

mod common;

use common::TestDb;
use driftless_core::codec::decode_row_state;
use driftless_core::{ColumnKind, ColumnName, NodeId, PrimaryKey, RowState, TableName, Value};
use driftless_postgres::{PostgresOptions, PostgresStore};
use driftless_store::{LogSeq, PeerLogState, Store, TableConfig};
use postgres::Client;
use std::collections::BTreeMap;

const HERE: NodeId = NodeId::new(0xa1);
const THERE: NodeId = NodeId::new(0xb2);

/// Loads the fixture's dump (psql meta-commands left out) into `db`.
fn restore_fixture(db: &TestDb) {
    let dump = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format1.sql"),
    )
    .unwrap();
    let sql: String = dump
        .lines()
        .filter(|l| !l.starts_with('\\'))
        .collect::<Vec<_>>()
        .join("\n");
    db.client().batch_execute(&sql).unwrap();
}

fn col(n: &str) -> ColumnName {
    ColumnName::new(n).unwrap()
}

fn configs(with_flags: bool) -> Vec<TableConfig> {
    let mut items = TableConfig::new(TableName::new("items").unwrap());
    items.column_kinds = vec![
        (col("stock"), ColumnKind::Counter),
        (col("peak"), ColumnKind::Max),
        (col("low"), ColumnKind::Min),
    ];
    let mut flags = TableConfig::new(TableName::new("flags").unwrap());
    flags.priority = vec![THERE];
    if with_flags {
        vec![items, flags]
    } else {
        vec![items]
    }
}

fn open(url: &str, with_flags: bool, node: NodeId) -> Result<PostgresStore, String> {
    let mut options = PostgresOptions::new(configs(with_flags));
    options.node_id = Some(node);
    PostgresStore::open(url, options).map_err(|e| e.to_string())
}

type States = BTreeMap<(String, PrimaryKey), RowState>;

fn format1_states(client: &mut Client) -> States {
    client
        .query("SELECT tbl, pk, state FROM driftless.row_states", &[])
        .unwrap()
        .into_iter()
        .map(|r| {
            let pk: Vec<u8> = r.get(1);
            let state: Vec<u8> = r.get(2);
            (
                (r.get::<_, String>(0), PrimaryKey::from_bytes(&pk).unwrap()),
                decode_row_state(&state).unwrap(),
            )
        })
        .collect()
}

/// Every row's merge state as the store serves it (a full snapshot of each table).
fn states(store: &mut PostgresStore) -> States {
    let mut out: States = BTreeMap::new();
    for table in ["items", "flags"] {
        let name = TableName::new(table).unwrap();
        let rules = store
            .schemas()
            .iter()
            .find(|s| s.name == name)
            .unwrap()
            .rules
            .clone();
        let mut after = None;
        loop {
            let chunk = store.snapshot_chunk(&name, after.as_ref(), 3).unwrap();
            for change in &chunk.changes {
                out.entry((table.to_owned(), change.key.clone()))
                    .or_default()
                    .apply(change, &rules)
                    .unwrap();
            }
            match chunk.next {
                Some(k) => after = Some(k),
                None => break,
            }
        }
    }
    out
}

fn counts(client: &mut Client) -> [i64; 3] {
    ["conflicts", "dead_letters", "held"].map(|t| {
        client
            .query_one(&format!("SELECT count(*) FROM driftless.{t}"), &[])
            .unwrap()
            .get(0)
    })
}

fn exists(client: &mut Client, table: &str) -> bool {
    client
        .query_one(
            "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
            &[&format!("driftless.{table}")],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_format_1_database_is_converted_in_place_without_losing_anything() {
    let Some(db) = TestDb::create("upgrade_format1") else {
        return;
    };
    restore_fixture(&db);
    let mut client = db.client();
    let before = format1_states(&mut client);
    assert!(
        before.len() >= 8,
        "the fixture has live rows, tombstones and flags"
    );
    let counts_before = counts(&mut client);
    assert!(counts_before.iter().all(|n| *n > 0), "{counts_before:?}");

    let mut store = open(&db.url, true, HERE).unwrap();
    assert_eq!(counts(&mut client), counts_before);
    assert!(!exists(&mut client, "log") && !exists(&mut client, "row_states"));
    assert_eq!(store.cursor(THERE).unwrap(), LogSeq(42));
    // the peer acknowledged 3, at the old floor: it streams on; one below it re-bootstraps
    assert_eq!(
        store.peer_state(THERE, LogSeq(3)).unwrap(),
        PeerLogState::Stream
    );
    assert!(matches!(
        store.peer_state(THERE, LogSeq(2)).unwrap(),
        PeerLogState::NeedsBootstrap { .. }
    ));

    // every state is carried over; the one local write made while the old node was stopped
    // is stamped now, on top of its row's old state, as a change of that one column
    let after = states(&mut store);
    assert_eq!(after.len(), before.len());
    let written_while_stopped = ("items".to_owned(), PrimaryKey::integer(1));
    for (key, old) in &before {
        let new = &after[key];
        if *key == written_while_stopped {
            assert_eq!(new.causal_length(), old.causal_length());
            for (column, cell) in old.cells() {
                if column.as_str() == "name" {
                    assert_ne!(new.cells()[column], *cell);
                } else {
                    assert_eq!(new.cells()[column], *cell, "{column}");
                }
            }
            assert_eq!(
                new.visible().unwrap()[&col("name")],
                Value::Text("written while stopped".into())
            );
        } else {
            assert_eq!(new, old, "{key:?}");
        }
    }

    // a replica fed the whole log holds the same rows
    let Some(replica) = TestDb::create("upgrade_replica") else {
        return;
    };
    replica
        .client()
        .batch_execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, name text, stock bigint, peak bigint, low bigint);
             CREATE TABLE flags (name text PRIMARY KEY, value text);",
        )
        .unwrap();
    let mut fresh = open(&replica.url, true, NodeId::new(0xc3)).unwrap();
    let mut cursor = LogSeq(0);
    loop {
        let page = store.read_log(cursor, 2).unwrap();
        if page.entries.is_empty() {
            break;
        }
        let changes: Vec<_> = page.entries.into_iter().map(|e| e.change).collect();
        fresh.apply_batch(HERE, &changes, page.next).unwrap();
        cursor = page.next;
    }
    assert_eq!(states(&mut fresh), after);
    assert_eq!(
        store.content_digests().unwrap(),
        fresh.content_digests().unwrap()
    );
    assert_eq!(
        store
            .top_fingerprints(&TableName::new("items").unwrap())
            .unwrap(),
        fresh
            .top_fingerprints(&TableName::new("items").unwrap())
            .unwrap()
    );

    // reopening does not convert again, and changes nothing
    drop(store);
    let mut store = open(&db.url, true, HERE).unwrap();
    assert_eq!(states(&mut store), after);
}

#[test]
fn an_upgrade_that_would_drop_a_table_s_state_is_refused_and_changes_nothing() {
    let Some(db) = TestDb::create("upgrade_refused") else {
        return;
    };
    restore_fixture(&db);
    let mut client = db.client();
    let before = format1_states(&mut client);
    let err = open(&db.url, false, HERE).unwrap_err();
    assert!(err.contains("flags") && err.contains("[[tables]]"), "{err}");
    assert_eq!(format1_states(&mut client), before);
    assert!(exists(&mut client, "log"));
    // with the table listed again, it converts
    assert!(open(&db.url, true, HERE).is_ok());
}

#[test]
fn a_database_from_a_newer_release_is_refused_with_both_versions() {
    let Some(db) = TestDb::create("upgrade_newer") else {
        return;
    };
    restore_fixture(&db);
    drop(open(&db.url, true, HERE).unwrap());
    db.client()
        .batch_execute("UPDATE driftless.meta SET ival = 3 WHERE key = 'format'")
        .unwrap();
    let err = open(&db.url, true, HERE).unwrap_err();
    assert!(
        err.contains("storage format 3") && err.contains("formats 1 and 2"),
        "{err}"
    );
}
