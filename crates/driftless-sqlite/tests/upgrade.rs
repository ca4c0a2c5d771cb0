//! Upgrade in place: a database written by storage format 1 (`tests/fixtures/format1.db`, made
//! at commit cb645db by `examples/format1_fixture.rs`) opens under format 2 without losing a row,
//! a version, a conflict, a dead letter, a held change or a cursor; a peer's cursor keeps its
//! meaning; and a database whose configuration lacks one of its tables is refused unchanged.

use driftless_core::codec::decode_row_state;
use driftless_core::{ColumnKind, ColumnName, NodeId, PrimaryKey, RowState, TableName};
use driftless_sqlite::{SqliteOptions, SqliteStore};
use driftless_store::{LogSeq, PeerLogState, Store, TableConfig};
use rusqlite::Connection;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const HERE: NodeId = NodeId::new(0xa1);
const THERE: NodeId = NodeId::new(0xb2);

fn fixture(dir: &Path) -> PathBuf {
    let path = dir.join("format1.db");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format1.db"),
        &path,
    )
    .unwrap();
    path
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

fn open(path: &Path, with_flags: bool) -> Result<SqliteStore, driftless_sqlite::OpenError> {
    let mut options = SqliteOptions::new(configs(with_flags));
    options.node_id = Some(HERE);
    SqliteStore::open(path, options)
}

type States = BTreeMap<(String, PrimaryKey), RowState>;

fn format1_states(path: &Path) -> States {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT tbl, pk, state FROM _driftless_rows")
        .unwrap();
    stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, Vec<u8>>(2)?,
        ))
    })
    .unwrap()
    .map(|row| {
        let (tbl, pk, state) = row.unwrap();
        (
            (tbl, PrimaryKey::from_bytes(&pk).unwrap()),
            decode_row_state(&state).unwrap(),
        )
    })
    .collect()
}

/// Every row's merge state as the store serves it (a full snapshot of each table).
fn states(store: &mut SqliteStore) -> States {
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

fn count(path: &Path, sql: &str) -> i64 {
    Connection::open(path)
        .unwrap()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

#[test]
fn a_format_1_database_is_converted_in_place_without_losing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture(dir.path());
    let before = format1_states(&path);
    assert!(
        before.len() >= 8,
        "the fixture has live rows, tombstones and flags"
    );
    let counts = |p: &Path| {
        [
            "SELECT count(*) FROM _driftless_conflicts",
            "SELECT count(*) FROM _driftless_dead_letters",
            "SELECT count(*) FROM _driftless_held",
        ]
        .map(|sql| count(p, sql))
    };
    let counts_before = counts(&path);
    assert!(counts_before.iter().all(|n| *n > 0), "{counts_before:?}");

    let mut store = open(&path, true).unwrap();
    assert_eq!(counts(&path), counts_before);
    assert_eq!(
        count(
            &path,
            "SELECT count(*) FROM sqlite_schema WHERE name = '_driftless_log'"
        ),
        0
    );
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
            let name = new.visible().unwrap()[&col("name")].clone();
            assert_eq!(
                name,
                driftless_core::Value::Text("written while stopped".into())
            );
        } else {
            assert_eq!(new, old, "{key:?}");
        }
    }

    // the log still serves what a peer at the old floor lacks, and a replica fed the whole log
    // holds the same rows
    let replica_path = dir.path().join("fresh.db");
    Connection::open(&replica_path)
        .unwrap()
        .execute_batch(
            "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, stock INTEGER, peak INTEGER, low INTEGER);
             CREATE TABLE flags (name TEXT PRIMARY KEY, value TEXT);",
        )
        .unwrap();
    let mut options = SqliteOptions::new(configs(true));
    options.node_id = Some(NodeId::new(0xc3));
    let mut fresh = SqliteStore::open(&replica_path, options).unwrap();
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

    // reopening does not convert again, and changes nothing
    drop(store);
    let mut store = open(&path, true).unwrap();
    assert_eq!(states(&mut store), after);
}

#[test]
fn an_upgrade_that_would_drop_a_table_s_state_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    let err = open(&path, false).unwrap_err().to_string();
    assert!(err.contains("flags") && err.contains("[[tables]]"), "{err}");
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    drop(conn);
    assert_eq!(format1_states(&path).len(), {
        let copy = dir.path().join("orig.db");
        std::fs::write(&copy, &bytes).unwrap();
        format1_states(&copy).len()
    });
    // with the table listed again, it converts
    assert!(open(&path, true).is_ok());
}
