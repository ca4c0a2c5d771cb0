//! Behaviour of the SQLite adapter, one property per test: echo suppression and relaying,
//! dead letters and their retry, schema handling, bootstrap, compaction, snapshots, clock holds.

use driftless_core::hlc::ManualClock;
use driftless_core::{ColumnKind, ColumnName, NodeId, TableName};
use driftless_sqlite::{OpenError, SqliteOptions, SqliteStore};
use driftless_store::{CompactionPolicy, LogSeq, PeerLogState, Store, StoreError, TableConfig};
use rusqlite::Connection;
use std::path::Path;
use std::time::Duration;

const T0: u64 = 1_700_000_000_000;

fn items() -> TableName {
    TableName::new("items").unwrap()
}

fn open(
    path: &Path,
    node: u128,
    clock: &ManualClock,
    ddl: &str,
) -> (SqliteStore<ManualClock>, Connection) {
    let client = Connection::open(path).unwrap();
    client.execute_batch(ddl).unwrap();
    let mut options = SqliteOptions::new(vec![TableConfig::new(items())]);
    options.node_id = Some(NodeId::new(node));
    options.max_clock_offset = Duration::from_secs(5);
    let store = SqliteStore::open_with_clock(path, options, clock.clone()).unwrap();
    (store, client)
}

const DDL: &str =
    "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER);";

fn rows(conn: &Connection) -> Vec<(i64, Option<String>, Option<i64>)> {
    let mut stmt = conn
        .prepare("SELECT id, name, qty FROM items ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Ships `from`'s log after the receiver's cursor.
fn sync(
    from: &mut SqliteStore<ManualClock>,
    to: &mut SqliteStore<ManualClock>,
) -> driftless_store::ApplyReport {
    let mut total = driftless_store::ApplyReport::default();
    loop {
        let after = to.cursor(from.node_id()).unwrap();
        let page = from.read_log(after, 100).unwrap();
        if page.entries.is_empty() {
            return total;
        }
        let changes: Vec<_> = page.entries.iter().map(|e| e.change.clone()).collect();
        total.add(&to.apply_batch(from.node_id(), &changes, page.next).unwrap());
    }
}

#[test]
fn applied_changes_are_not_captured_again_and_relays_keep_origin_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (mut a, ca) = open(&dir.path().join("a.db"), 1, &clock, DDL);
    let (mut b, cb) = open(&dir.path().join("b.db"), 2, &clock, DDL);
    let (mut c, cc) = open(&dir.path().join("c.db"), 3, &clock, DDL);
    let mut written = Vec::new();
    for sql in [
        "INSERT INTO items VALUES (1, 'a', 1), (2, 'b', 2)",
        "UPDATE items SET qty = 5 WHERE id = 1",
    ] {
        ca.execute(sql, []).unwrap();
        written.extend(a.capture(100).unwrap().changes);
    }
    assert_eq!(written.len(), 3);

    let report = sync(&mut a, &mut b);
    assert_eq!(report.applied, 3);
    // no echo: applying created no pending local writes and nothing new to stamp
    assert_eq!(b.pending_local_writes().unwrap(), 0);
    assert!(b.capture(100).unwrap().changes.is_empty());
    // b's log holds the relayed changes with a's origin and versions, not new local ones: in
    // storage format 2 the log is the rows' states, so it serves each row's latest state (row
    // 1's insert and its later update of qty as two changes, one per version)
    let relayed: Vec<_> = b
        .read_log(LogSeq(0), 100)
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.change)
        .collect();
    assert!(relayed.iter().all(|ch| ch.origin() == NodeId::new(1)));
    let versions = |changes: &[driftless_core::Change]| {
        let mut v: Vec<_> = changes.iter().map(|c| c.version).collect();
        v.sort();
        v.dedup();
        v
    };
    assert_eq!(versions(&relayed), versions(&written));
    // served to a itself, they are all left out: a page with no entries that still moves a's
    // cursor to the head
    let to_a = b.read_log_for(LogSeq(0), 100, NodeId::new(1)).unwrap();
    assert!(to_a.entries.is_empty(), "{to_a:?}");
    assert_eq!(to_a.next, b.log_head().unwrap());
    assert_eq!(
        b.read_log_for(LogSeq(0), 100, NodeId::new(3))
            .unwrap()
            .entries
            .len(),
        relayed.len()
    );

    // c only talks to b, and still gets a's writes with a's versions
    sync(&mut b, &mut c);
    let at_c: Vec<_> = c
        .read_log(LogSeq(0), 100)
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.change)
        .collect();
    assert_eq!(at_c, relayed);
    assert_eq!(rows(&cc), rows(&ca));
    assert_eq!(rows(&cb), rows(&ca));
    // replaying the same changes again changes nothing (exactly-once effect)
    let head = b.log_head().unwrap();
    let again = b.apply_batch(NodeId::new(1), &written, LogSeq(3)).unwrap();
    assert_eq!((again.applied, again.duplicates + again.superseded), (0, 3));
    assert_eq!(
        b.log_head().unwrap(),
        head,
        "a duplicate moves no row in the log"
    );
    assert_eq!(b.read_log(LogSeq(0), 100).unwrap().entries, {
        let mut page = b.read_log(LogSeq(0), 100).unwrap().entries;
        page.sort_by_key(|e| e.seq);
        page
    });
}

#[test]
fn unapplicable_changes_become_dead_letters_without_blocking_the_batch_and_retry_after_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let source_ddl = "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, code TEXT);";
    let strict_ddl =
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, code TEXT UNIQUE);";
    let (mut a, ca) = open(&dir.path().join("a.db"), 1, &clock, source_ddl);
    let (mut b, cb) = open(&dir.path().join("b.db"), 2, &clock, strict_ddl);
    for sql in [
        "INSERT INTO items (id, name, code) VALUES (1, 'one', 'X')",
        "INSERT INTO items (id, name, code) VALUES (3, NULL, 'Z')",
        "INSERT INTO items (id, name, code) VALUES (4, 'four', 'X2')",
        "UPDATE items SET code = 'X' WHERE id = 4",
        "INSERT INTO items (id, name, code) VALUES (5, 'five', 'W')",
        // the source's schema moves ahead of the replica's
        "ALTER TABLE items ADD COLUMN extra TEXT",
        "INSERT INTO items (id, name, code, extra) VALUES (2, 'two', 'Y', 'new column')",
    ] {
        ca.execute(sql, []).unwrap();
        a.capture(100).unwrap();
    }
    let report = sync(&mut a, &mut b);
    assert_eq!(report.dead_lettered, 3, "{report:?}");
    assert_eq!(
        report.applied, 3,
        "rows 1, 4 (insert) and 5 apply; {report:?}"
    );
    let dead = b.dead_letters(10).unwrap();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert!(
        reasons[0].contains("NOT NULL constraint failed: items.name"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("UNIQUE constraint failed: items.code"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("unknown column extra"), "{reasons:?}");
    assert!(
        dead.iter()
            .all(|d| d.from == Some(NodeId::new(1)) && d.key.is_some())
    );
    assert_eq!(
        b.cursor(NodeId::new(1)).unwrap(),
        a.log_head().unwrap(),
        "the cursor moved past them"
    );
    let stats = b.table_stats().unwrap();
    assert_eq!(stats[0].dead_letters, 3);

    // Retry before fixing anything: they stay, with one more attempt counted.
    let still = b.retry_dead_letters(None).unwrap();
    assert_eq!(still.dead_lettered, 3);
    assert!(b.dead_letters(10).unwrap().iter().all(|d| d.attempts == 2));

    // Fix the schema: add the column, drop the NOT NULL and UNIQUE constraints (table rebuild).
    cb.execute_batch(
        "BEGIN;
         CREATE TABLE items_new (id INTEGER PRIMARY KEY, name TEXT, code TEXT, extra TEXT);
         INSERT INTO items_new (id, name, code) SELECT id, name, code FROM items;
         DROP TABLE items;
         ALTER TABLE items_new RENAME TO items;
         COMMIT;",
    )
    .unwrap();
    let retried = b.retry_dead_letters(None).unwrap();
    assert_eq!(
        (retried.applied, retried.dead_lettered),
        (3, 0),
        "{retried:?}"
    );
    assert!(b.dead_letters(10).unwrap().is_empty());
    type Full = Vec<(i64, Option<String>, Option<String>, Option<String>)>;
    let full = |c: &Connection| -> Full {
        let mut s = c
            .prepare("SELECT id, name, code, extra FROM items ORDER BY id")
            .unwrap();
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(full(&cb), full(&ca));
    // capture still works on the rebuilt table (triggers were reinstalled)
    cb.execute("UPDATE items SET name = 'uno' WHERE id = 1", [])
        .unwrap();
    assert_eq!(b.capture(10).unwrap().changes.len(), 1);
}

#[test]
fn a_table_without_primary_key_or_missing_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.db");
    Connection::open(&path)
        .unwrap()
        .execute_batch("CREATE TABLE items (name TEXT, qty INTEGER);")
        .unwrap();
    let err =
        SqliteStore::open(&path, SqliteOptions::new(vec![TableConfig::new(items())])).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("items") && text.contains("has no PRIMARY KEY"),
        "{text}"
    );
    let missing = SqliteStore::open(
        &path,
        SqliteOptions::new(vec![TableConfig::new(TableName::new("nope").unwrap())]),
    )
    .unwrap_err();
    assert!(missing.to_string().contains("no such table"), "{missing}");
    assert!(matches!(
        SqliteStore::open(&path, SqliteOptions::new(vec![])),
        Err(OpenError::NoTables)
    ));
    // nothing was left half-installed: the user's table has no triggers
    let triggers: i64 = Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(triggers, 0);
}

#[test]
fn existing_rows_are_bootstrapped_and_added_columns_are_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.db");
    let client = Connection::open(&path).unwrap();
    client
        .execute_batch(&format!(
            "{DDL} INSERT INTO items VALUES (1, 'a', 1), (2, 'b', 2);"
        ))
        .unwrap();
    let clock = ManualClock::new(T0);
    let (mut store, _) = open(&path, 1, &clock, DDL);
    assert_eq!(
        store.capture(100).unwrap().changes.len(),
        2,
        "existing rows get versions at install"
    );
    // reopening does not bootstrap again
    drop(store);
    let (mut store, _) = open(&path, 1, &clock, DDL);
    assert!(store.capture(100).unwrap().changes.is_empty());

    client
        .execute_batch(
            "ALTER TABLE items ADD COLUMN color TEXT; UPDATE items SET color = 'red' WHERE id = 1;",
        )
        .unwrap();
    let changes = store.capture(100).unwrap().changes;
    assert_eq!(changes.len(), 1);
    let cells: Vec<&str> = changes[0]
        .cells()
        .iter()
        .map(|c| c.column.as_str())
        .collect();
    assert_eq!(cells, vec!["color"]);
    assert!(
        store.schemas()[0]
            .column(&ColumnName::new("color").unwrap())
            .is_some()
    );
}

#[test]
fn a_store_keeps_its_node_id_and_refuses_another() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.db");
    let clock = ManualClock::new(T0);
    let (store, _) = open(&path, 7, &clock, DDL);
    drop(store);
    let mut options = SqliteOptions::new(vec![TableConfig::new(items())]);
    options.node_id = Some(NodeId::new(8));
    let err = SqliteStore::open(&path, options).unwrap_err();
    assert!(err.to_string().contains("installed for node"), "{err}");
}

#[test]
fn the_log_is_the_row_states_superseded_changes_vanish_and_no_peer_falls_behind() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (mut a, ca) = open(&dir.path().join("a.db"), 1, &clock, DDL);
    ca.execute("INSERT INTO items VALUES (1, 'a', 0)", [])
        .unwrap();
    a.capture(10).unwrap();
    let (mut b, cb) = open(&dir.path().join("b.db"), 2, &clock, DDL);
    sync(&mut a, &mut b);
    let b_cursor = a.log_head().unwrap();
    for i in 1..=10 {
        ca.execute(
            "UPDATE items SET name = ?1 WHERE id = 1",
            rusqlite::params![format!("v{i}")],
        )
        .unwrap();
        a.capture(10).unwrap();
    }
    ca.execute("INSERT INTO items VALUES (2, 'b', 0)", [])
        .unwrap();
    a.capture(10).unwrap();
    // eleven changes made, two rows: the log holds each row's latest state, whole (row 1 as
    // its insert's cells and its latest name, two versions), superseded names gone
    let page = a.read_log(LogSeq(0), 100).unwrap();
    let rows_in_log: std::collections::BTreeSet<_> = page.entries.iter().map(|e| e.seq).collect();
    assert_eq!(rows_in_log.len(), 2, "{page:?}");
    assert_eq!(page.entries.len(), 3, "{page:?}");
    // nothing to compact, and a peer that acknowledged nothing still just streams
    let slow_peer = NodeId::new(99);
    assert_eq!(
        a.record_ack(slow_peer, LogSeq(0)).unwrap(),
        PeerLogState::Stream
    );
    let report = a
        .compact(&CompactionPolicy {
            retain_entries_min: 0,
            retain_entries_max: 1,
            scan_entries_max: 1000,
            retire_entries_max: 50_000,
        })
        .unwrap();
    assert_eq!(report, driftless_store::CompactionReport::default());
    assert_eq!(
        a.peer_state(slow_peer, LogSeq(0)).unwrap(),
        PeerLogState::Stream
    );
    // b streams on from its cursor, a new replica from 0: both reach the same rows
    let page = a.read_log(b_cursor, 100).unwrap();
    let changes: Vec<_> = page.entries.into_iter().map(|e| e.change).collect();
    b.apply_batch(a.node_id(), &changes, page.next).unwrap();
    assert_eq!(rows(&cb), rows(&ca));
    let (mut c, cc) = open(&dir.path().join("c.db"), 3, &clock, DDL);
    sync(&mut a, &mut c);
    assert_eq!(rows(&cc), rows(&ca));
    // a snapshot in chunks of one row rebuilds the same rows too
    let (mut d, cd) = open(&dir.path().join("d.db"), 4, &clock, DDL);
    let mut after = None;
    let mut chunks = 0;
    loop {
        let chunk = a.snapshot_chunk(&items(), after.as_ref(), 1).unwrap();
        d.apply_batch(a.node_id(), &chunk.changes, LogSeq(0))
            .unwrap();
        chunks += 1;
        match chunk.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert!(chunks >= 2);
    assert_eq!(rows(&cd), rows(&ca));
    // the head never moves back
    let before = a.log_head().unwrap();
    a.compact(&CompactionPolicy::default()).unwrap();
    assert_eq!(a.log_head().unwrap(), before);
}

#[test]
fn a_peer_streaming_while_rows_move_to_the_head_still_gets_every_cell() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (mut a, ca) = open(&dir.path().join("a.db"), 1, &clock, DDL);
    for id in 1..=6 {
        ca.execute("INSERT INTO items VALUES (?1, 'n', 1)", [id])
            .unwrap();
    }
    a.capture(100).unwrap();
    let (mut b, cb) = open(&dir.path().join("b.db"), 2, &clock, DDL);
    // one row per page; after each of the first pages, the row just ahead of the peer's cursor
    // changes one column and moves to the head: when the peer reaches it there, its cursor is
    // past the row's old place, so a log that sent only "the cells changed after the cursor"
    // would never send its other cells (ids start at seq = id)
    let mut moved = 0;
    loop {
        let after = b.cursor(a.node_id()).unwrap();
        let page = a.read_log(after, 1).unwrap();
        if page.entries.is_empty() {
            break;
        }
        let changes: Vec<_> = page.entries.into_iter().map(|e| e.change).collect();
        b.apply_batch(a.node_id(), &changes, page.next).unwrap();
        let ahead = page.next.0 as i64 + 1;
        if moved < 3 && ahead <= 6 {
            ca.execute("UPDATE items SET qty = qty + 1 WHERE id = ?1", [ahead])
                .unwrap();
            a.capture(100).unwrap();
            moved += 1;
        }
    }
    assert_eq!(moved, 3);
    assert_eq!(rows(&cb), rows(&ca));
}

#[test]
fn a_change_stamped_too_far_ahead_is_held_then_released() {
    let dir = tempfile::tempdir().unwrap();
    let fast = ManualClock::new(T0 + 60_000);
    let slow = ManualClock::new(T0);
    let (mut a, ca) = open(&dir.path().join("a.db"), 1, &fast, DDL);
    let (mut b, cb) = open(&dir.path().join("b.db"), 2, &slow, DDL);
    ca.execute("INSERT INTO items VALUES (1, 'from the future', 1)", [])
        .unwrap();
    a.capture(10).unwrap();
    let report = sync(&mut a, &mut b);
    assert_eq!((report.held, report.applied), (1, 0));
    assert!(rows(&cb).is_empty());
    assert!(
        b.hlc().last().physical_ms() < T0 + 60_000,
        "a held change does not drag the clock forward"
    );
    assert_eq!(b.release_held().unwrap().applied, 0, "still too far ahead");
    slow.set(T0 + 56_000);
    assert_eq!(b.release_held().unwrap().applied, 1);
    assert_eq!(rows(&cb), rows(&ca));
}

#[test]
fn concurrent_writes_are_resolved_and_recorded_in_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (mut a, ca) = open(&dir.path().join("a.db"), 1, &clock, DDL);
    let (mut b, cb) = open(&dir.path().join("b.db"), 2, &clock, DDL);
    ca.execute("INSERT INTO items VALUES (1, 'tea', 10)", [])
        .unwrap();
    a.capture(10).unwrap();
    sync(&mut a, &mut b);
    ca.execute("UPDATE items SET name = 'green tea' WHERE id = 1", [])
        .unwrap();
    a.capture(10).unwrap();
    clock.advance(5);
    cb.execute("UPDATE items SET name = 'black tea' WHERE id = 1", [])
        .unwrap();
    b.capture(10).unwrap();
    sync(&mut a, &mut b);
    sync(&mut b, &mut a);
    assert_eq!(rows(&ca), rows(&cb));
    assert_eq!(rows(&ca)[0].1.as_deref(), Some("black tea"));
    for store in [&mut a, &mut b] {
        let conflicts = store.conflicts(10).unwrap();
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert_eq!(conflicts[0].record.loser.value, Some("green tea".into()));
        assert_eq!(store.table_stats().unwrap()[0].conflicts, 1);
    }
}

#[test]
fn a_local_write_that_loses_at_once_is_set_back_to_the_winner() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let path = dir.path().join("a.db");
    let client = Connection::open(&path).unwrap();
    client.execute_batch(DDL).unwrap();
    let mut config = TableConfig::new(items());
    config.column_kinds = vec![(ColumnName::new("qty").unwrap(), ColumnKind::Max)];
    let mut options = SqliteOptions::new(vec![config]);
    options.node_id = Some(NodeId::new(1));
    let mut store = SqliteStore::open_with_clock(&path, options, clock).unwrap();
    client
        .execute("INSERT INTO items VALUES (1, 'a', 10)", [])
        .unwrap();
    store.capture(10).unwrap();
    client
        .execute("UPDATE items SET qty = 3 WHERE id = 1", [])
        .unwrap();
    let report = store.capture(10).unwrap();
    assert_eq!(report.reverted, 1);
    assert_eq!(rows(&client), vec![(1, Some("a".into()), Some(10))]);
    assert_eq!(store.conflicts(10).unwrap().len(), 1);
    // the revert itself was not captured as a new write
    assert!(store.capture(10).unwrap().changes.is_empty());
}

#[test]
fn oversized_batches_are_refused_before_touching_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (mut a, _) = open(&dir.path().join("a.db"), 1, &clock, DDL);
    let change = {
        let (mut src, c) = open(&dir.path().join("s.db"), 2, &clock, DDL);
        c.execute("INSERT INTO items VALUES (1, 'a', 1)", [])
            .unwrap();
        src.capture(1).unwrap().changes.remove(0)
    };
    let batch = vec![change; driftless_store::APPLY_BATCH_CHANGES_MAX + 1];
    let err = a
        .apply_batch(NodeId::new(2), &batch, LogSeq(1))
        .unwrap_err();
    assert!(matches!(err, StoreError::BatchTooLarge { .. }), "{err}");
    assert_eq!(a.cursor(NodeId::new(2)).unwrap(), LogSeq(0));
}

#[test]
fn rows_removed_by_insert_or_replace_through_a_unique_conflict_are_captured_as_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let ddl = "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER);
               CREATE UNIQUE INDEX IF NOT EXISTS items_name ON items (name);";
    let (mut a, client) = open(&dir.path().join("a.db"), 1, &clock, ddl);
    let (mut b, b_client) = open(&dir.path().join("b.db"), 2, &clock, ddl);
    client
        .execute_batch(
            "INSERT INTO items VALUES (1, 'x', 1), (2, 'y', 2), (3, 'z', 3), (4, NULL, 4), (5, NULL, 5);",
        )
        .unwrap();
    a.capture(100).unwrap();
    sync(&mut a, &mut b);
    assert_eq!(rows(&b_client), rows(&client));

    // row 1 goes through REPLACE on the unique name (no delete trigger fires for it) ...
    client
        .execute_batch("INSERT OR REPLACE INTO items VALUES (10, 'x', 10);")
        .unwrap();
    // ... row 2 through UPDATE OR REPLACE; an OR IGNORE that loses deletes nothing; NULLs never
    // conflict
    client
        .execute_batch(
            "UPDATE OR REPLACE items SET name = 'y' WHERE id = 3;
             INSERT OR IGNORE INTO items VALUES (11, 'y', 11);
             INSERT OR REPLACE INTO items VALUES (12, NULL, 12);",
        )
        .unwrap();
    let captured = a.capture(100).unwrap();
    let deleted: Vec<String> = captured
        .changes
        .iter()
        .filter(|c| c.is_delete())
        .map(|c| c.key.to_string())
        .collect();
    assert_eq!(deleted.len(), 2, "{captured:?}");
    assert_eq!(
        rows(&client),
        vec![
            (3, Some("y".into()), Some(3)),
            (4, None, Some(4)),
            (5, None, Some(5)),
            (10, Some("x".into()), Some(10)),
            (12, None, Some(12)),
        ]
    );
    sync(&mut a, &mut b);
    assert_eq!(rows(&b_client), rows(&client));
    // and the local check finds nothing to restore: the deletions are in the merge state
    let report = a.verify_chunk(&items(), None, 1_000, false).unwrap();
    assert_eq!((report.restored, report.adopted), (0, 0), "{report:?}");

    // dropping the unique index drops the guard triggers with it
    let guards = |conn: &Connection| -> i64 {
        conn.query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger' AND name LIKE '%rep_items'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(guards(&client), 2);
    drop(a);
    client.execute_batch("DROP INDEX items_name;").unwrap();
    let (_a, client) = open(&dir.path().join("a.db"), 1, &clock, DDL);
    assert_eq!(guards(&client), 0);
}

#[test]
fn a_store_opens_while_an_application_is_writing_to_a_fresh_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    Connection::open(&path).unwrap().execute_batch(DDL).unwrap();
    // the application holds a write transaction (rollback-journal mode: no node has opened the
    // file yet, so it is not in WAL mode) while the node starts
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let app_path = path.clone();
    let app = std::thread::spawn(move || {
        let conn = Connection::open(&app_path).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE; INSERT INTO items VALUES (1, 'app', 1);")
            .unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        conn.execute_batch("COMMIT").unwrap();
    });
    locked_rx.recv().unwrap();
    let mut options = SqliteOptions::new(vec![TableConfig::new(items())]);
    options.node_id = Some(NodeId::new(1));
    let mut store = SqliteStore::open_with_clock(&path, options, ManualClock::new(T0))
        .expect("the node waits for the application's transaction instead of failing");
    app.join().unwrap();
    // and the application's row is captured
    assert_eq!(store.capture(10).unwrap().changes.len(), 1);
}

#[test]
fn a_nan_relayed_through_sqlite_stays_a_nan_and_is_not_drift() {
    use driftless_core::{CausalLength, CellWrite, Change, ChangeOp, PrimaryKey, Timestamp, Value};
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let ddl = "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT, qty REAL);";
    let (mut b, cb) = open(&dir.path().join("b.db"), 2, &clock, ddl);
    let change = Change {
        table: items(),
        key: PrimaryKey::integer(1),
        version: driftless_core::Version::new(Timestamp::new(T0, 0), NodeId::new(1)),
        causal_length: CausalLength(1),
        op: ChangeOp::Upsert(vec![
            CellWrite {
                column: ColumnName::new("name").unwrap(),
                value: Value::Text("n".into()),
                base: None,
            },
            CellWrite {
                column: ColumnName::new("qty").unwrap(),
                value: Value::Real(f64::NAN),
                base: None,
            },
        ]),
        schema: Default::default(),
    };
    b.apply_batch(NodeId::new(1), std::slice::from_ref(&change), LogSeq(1))
        .unwrap();
    // SQLite holds NULL; the log still serves the NaN that was written
    let held: Option<f64> = cb
        .query_row("SELECT qty FROM items WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(held, None);
    let served = b.read_log_for(LogSeq(0), 10, NodeId::new(3)).unwrap();
    let qty: Vec<_> = served
        .entries
        .iter()
        .flat_map(|e| e.change.cells().iter())
        .filter(|c| c.column.as_str() == "qty")
        .collect();
    assert!(
        matches!(qty[..], [c] if matches!(c.value, Value::Real(r) if r.is_nan())),
        "{served:?}"
    );
    // neither the local check nor a later edit of another column takes NULL for drift
    let report = b.verify_chunk(&items(), None, 1_000, true).unwrap();
    assert_eq!((report.restored, report.adopted), (0, 0), "{report:?}");
    cb.execute("UPDATE items SET name = 'm' WHERE id = 1", [])
        .unwrap();
    let captured = b.capture(10).unwrap();
    assert_eq!(
        (captured.changes.len(), captured.reverted),
        (1, 0),
        "{captured:?}"
    );
}

#[test]
fn the_in_memory_tail_serves_exactly_what_the_stored_rows_would() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let path = dir.path().join("a.db");
    let (mut a, ca) = open(&path, 1, &clock, DDL);
    // inserts, updates that move rows to the head, a delete, and a remote change applied here
    // (relayed with its own origin)
    for sql in [
        "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < 40) \
         INSERT INTO items SELECT x, 'n' || x, x FROM g",
        "UPDATE items SET qty = qty + 100 WHERE id % 3 = 0",
        "DELETE FROM items WHERE id = 7",
        "UPDATE items SET name = 'again' WHERE id = 9",
    ] {
        ca.execute_batch(sql).unwrap();
        clock.advance(1);
        a.capture(1_000).unwrap();
    }
    let (mut b, cb) = open(&dir.path().join("b.db"), 2, &clock, DDL);
    cb.execute("INSERT INTO items VALUES (500, 'from b', 5)", [])
        .unwrap();
    let from_b = b.capture(10).unwrap().changes;
    a.apply_batch(NodeId::new(2), &from_b, LogSeq(1)).unwrap();
    // a second store on the same file has no tail: it reads the stored rows
    let (mut fresh, _) = open(&path, 1, &clock, DDL);
    let head = a.log_head().unwrap();
    assert_eq!(fresh.log_head().unwrap(), head);
    for after in 0..=head.0 {
        for limit in [1, 4, 1_000] {
            let cursor = LogSeq(after);
            assert_eq!(
                a.read_log(cursor, limit).unwrap(),
                fresh.read_log(cursor, limit).unwrap(),
                "after {after}, limit {limit}"
            );
            assert_eq!(
                a.read_log_for(cursor, limit, NodeId::new(2)).unwrap(),
                fresh.read_log_for(cursor, limit, NodeId::new(2)).unwrap(),
                "for b: after {after}, limit {limit}"
            );
        }
    }
    // a write by the other store: `a`'s tail may serve row 1's earlier state once more, then
    // its new place comes from the stored rows; a peer ends with the same rows either way
    ca.execute("UPDATE items SET qty = -1 WHERE id = 1", [])
        .unwrap();
    clock.advance(1);
    fresh.capture(10).unwrap();
    let read_all = |store: &mut SqliteStore<ManualClock>| {
        let mut changes = Vec::new();
        let mut cursor = LogSeq(0);
        loop {
            let page = store.read_log(cursor, 7).unwrap();
            changes.extend(page.entries.into_iter().map(|e| e.change));
            if page.next == page.head {
                break changes;
            }
            assert!(page.next > cursor, "no progress at {cursor}");
            cursor = page.next;
        }
    };
    let fold = |changes: &[driftless_core::Change]| {
        let rules = driftless_core::TableRules::new();
        let mut states: std::collections::BTreeMap<_, driftless_core::RowState> =
            Default::default();
        for c in changes {
            states
                .entry(c.key.clone())
                .or_default()
                .apply(c, &rules)
                .unwrap();
        }
        states
    };
    let all = read_all(&mut a);
    assert_eq!(fold(&all), fold(&read_all(&mut fresh)));
    assert!(
        all.iter()
            .any(|c| c.key == driftless_core::PrimaryKey::integer(1)
                && c.cells().iter().any(|w| w.value == (-1).into())),
        "{all:?}"
    );
}

#[test]
fn a_value_written_after_a_stamped_record_is_never_served_with_an_older_version() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (mut a, ca) = open(&dir.path().join("a.db"), 1, &clock, DDL);
    ca.execute("INSERT INTO items VALUES (1, 'a', 1)", [])
        .unwrap();
    let insert = a.capture(10).unwrap().changes[0].version;
    // two waiting updates of different columns; stamping only the first rebuilds the row from
    // the table, which already shows the second's value under the insert's version
    ca.execute("UPDATE items SET name = 'b' WHERE id = 1", [])
        .unwrap();
    ca.execute("UPDATE items SET qty = 2 WHERE id = 1", [])
        .unwrap();
    clock.advance(1);
    assert_eq!(a.capture(1).unwrap().records, 1);
    let mut served = Vec::new();
    let mut cursor = LogSeq(0);
    loop {
        let page = a.read_log(cursor, 100).unwrap();
        served.extend(page.entries.into_iter().map(|e| e.change));
        if page.next == page.head {
            break;
        }
        cursor = page.next;
    }
    for change in &served {
        for cell in change.cells() {
            assert!(
                !(cell.column.as_str() == "qty"
                    && cell.value == 2.into()
                    && change.version == insert),
                "qty = 2 served with the insert's version: {served:?}"
            );
        }
    }
    assert!(
        served
            .iter()
            .any(|c| c.cells().iter().any(|w| w.value == 2.into())),
        "{served:?}"
    );
}
