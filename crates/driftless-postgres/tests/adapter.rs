//! Behaviour of the PostgreSQL adapter, one property per test, mirroring the SQLite adapter's
//! tests: echo suppression and relaying, dead letters and their retry, schema handling,
//! bootstrap, compaction, snapshots, clock holds, the ledger, and use from tokio's blocking pool.

mod common;

use common::{TestDb, databases, sync};
use driftless_core::hlc::ManualClock;
use driftless_core::{ColumnKind, ColumnName, NodeId, PrimaryKey, TableName};
use driftless_postgres::{OpenError, PostgresOptions, PostgresStore};
use driftless_store::{CompactionPolicy, LogSeq, PeerLogState, Store, StoreError, TableConfig};
use postgres::Client;
use std::time::Duration;

const T0: u64 = 1_700_000_000_000;

fn items() -> TableName {
    TableName::new("items").unwrap()
}

const DDL: &str =
    "CREATE TABLE IF NOT EXISTS items (id bigint PRIMARY KEY, name text, qty bigint);";

fn open(
    db: &TestDb,
    node: u128,
    clock: &ManualClock,
    ddl: &str,
) -> (PostgresStore<ManualClock>, Client) {
    let mut client = db.client();
    client.batch_execute(ddl).unwrap();
    let mut options = PostgresOptions::new(vec![TableConfig::new(items())]);
    options.node_id = Some(NodeId::new(node));
    options.max_clock_offset = Duration::from_secs(5);
    let store = PostgresStore::open_with_clock(&db.url, options, clock.clone()).unwrap();
    (store, client)
}

fn rows(client: &mut Client) -> Vec<(i64, Option<String>, Option<i64>)> {
    client
        .query("SELECT id, name, qty FROM items ORDER BY id", &[])
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[test]
fn applied_changes_are_not_captured_again_and_relays_keep_origin_and_version() {
    let Some(dbs) = databases("echo", 3) else {
        return;
    };
    let clock = ManualClock::new(T0);
    let (mut a, mut ca) = open(&dbs[0], 1, &clock, DDL);
    let (mut b, mut cb) = open(&dbs[1], 2, &clock, DDL);
    let (mut c, mut cc) = open(&dbs[2], 3, &clock, DDL);
    let mut written = Vec::new();
    for sql in [
        "INSERT INTO items VALUES (1, 'a', 1), (2, 'b', 2)",
        "UPDATE items SET qty = 5 WHERE id = 1",
    ] {
        ca.batch_execute(sql).unwrap();
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
    assert_eq!(rows(&mut cc), rows(&mut ca));
    assert_eq!(rows(&mut cb), rows(&mut ca));
    // replaying the same changes again changes nothing (exactly-once effect)
    let head = b.log_head().unwrap();
    let again = b.apply_batch(NodeId::new(1), &written, LogSeq(3)).unwrap();
    assert_eq!((again.applied, again.duplicates + again.superseded), (0, 3));
    assert_eq!(
        b.log_head().unwrap(),
        head,
        "a duplicate moves no row in the log"
    );
    // a client write on top of applied rows is captured as one local change
    cb.batch_execute("UPDATE items SET name = 'bee' WHERE id = 2")
        .unwrap();
    let local = b.capture(100).unwrap().changes;
    assert_eq!(local.len(), 1);
    assert_eq!(local[0].origin(), NodeId::new(2));
    assert_eq!(local[0].cells().len(), 1, "only the changed column");
}

#[test]
fn unapplicable_changes_become_dead_letters_without_blocking_the_batch_and_retry_after_a_fix() {
    let Some(dbs) = databases("dead_letters", 2) else {
        return;
    };
    let clock = ManualClock::new(T0);
    let source_ddl = "CREATE TABLE items (id bigint PRIMARY KEY, name text, code text);";
    let strict_ddl =
        "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, code text UNIQUE);";
    let (mut a, mut ca) = open(&dbs[0], 1, &clock, source_ddl);
    let (mut b, mut cb) = open(&dbs[1], 2, &clock, strict_ddl);
    for sql in [
        "INSERT INTO items (id, name, code) VALUES (1, 'one', 'X')",
        "INSERT INTO items (id, name, code) VALUES (3, NULL, 'Z')",
        "INSERT INTO items (id, name, code) VALUES (4, 'four', 'X2')",
        "UPDATE items SET code = 'X' WHERE id = 4",
        "INSERT INTO items (id, name, code) VALUES (5, 'five', 'W')",
        // the source's schema moves ahead of the replica's
        "ALTER TABLE items ADD COLUMN extra text",
        "INSERT INTO items (id, name, code, extra) VALUES (2, 'two', 'Y', 'new column')",
    ] {
        ca.batch_execute(sql).unwrap();
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
    assert!(reasons[0].contains("not-null constraint"), "{reasons:?}");
    assert!(reasons[1].contains("unique constraint"), "{reasons:?}");
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
    assert_eq!(b.table_stats().unwrap()[0].dead_letters, 3);

    // Retry before fixing anything: they stay, with one more attempt counted.
    let still = b.retry_dead_letters(None).unwrap();
    assert_eq!(still.dead_lettered, 3);
    assert!(b.dead_letters(10).unwrap().iter().all(|d| d.attempts == 2));

    // Fix the schema: add the column, drop the NOT NULL and UNIQUE constraints.
    cb.batch_execute(
        "ALTER TABLE items ADD COLUMN extra text;
         ALTER TABLE items ALTER COLUMN name DROP NOT NULL;
         ALTER TABLE items DROP CONSTRAINT items_code_key;",
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
    let full = |c: &mut Client| -> Full {
        c.query("SELECT id, name, code, extra FROM items ORDER BY id", &[])
            .unwrap()
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    };
    assert_eq!(full(&mut cb), full(&mut ca));
    // capture still works after the DDL, including the added column
    cb.batch_execute("UPDATE items SET extra = 'e' WHERE id = 1")
        .unwrap();
    let changes = b.capture(10).unwrap().changes;
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].cells()[0].column.as_str(), "extra");
}

#[test]
fn unsupported_tables_and_types_are_refused_at_open_with_a_clear_error() {
    let Some(db) = TestDb::create("refused") else {
        return;
    };
    let mut client = db.client();
    client
        .batch_execute(
            "CREATE TABLE nokey (name text, qty bigint);
             CREATE TABLE items (id bigint PRIMARY KEY, tags text[], spot point);
             CREATE TABLE realkey (k double precision PRIMARY KEY, v text);
             CREATE VIEW v AS SELECT 1 AS x;",
        )
        .unwrap();
    let open = |name: &str| {
        PostgresStore::open(
            &db.url,
            PostgresOptions::new(vec![TableConfig::new(TableName::new(name).unwrap())]),
        )
        .unwrap_err()
        .to_string()
    };
    let text = open("nokey");
    assert!(
        text.contains("nokey") && text.contains("has no PRIMARY KEY"),
        "{text}"
    );
    let text = open("items");
    assert!(
        text.contains("items") && text.contains("column tags") && text.contains("text[]"),
        "{text}"
    );
    let text = open("realkey");
    assert!(
        text.contains("primary-key column k has type double precision"),
        "{text}"
    );
    assert!(open("missing").contains("no such table"));
    assert!(open("v").contains("is a view"));
    assert!(matches!(
        PostgresStore::open(&db.url, PostgresOptions::new(vec![])),
        Err(OpenError::NoTables)
    ));
    // nothing was left half-installed: no triggers on the user's tables
    let triggers: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(triggers, 0);
}

#[test]
fn existing_rows_are_bootstrapped_and_added_columns_are_picked_up() {
    let Some(db) = TestDb::create("bootstrap") else {
        return;
    };
    let mut client = db.client();
    client
        .batch_execute(&format!(
            "{DDL} INSERT INTO items VALUES (1, 'a', 1), (2, 'b', 2);"
        ))
        .unwrap();
    let clock = ManualClock::new(T0);
    let (mut store, _) = open(&db, 1, &clock, DDL);
    assert_eq!(
        store.capture(100).unwrap().changes.len(),
        2,
        "existing rows get versions at install"
    );
    drop(store);
    let (mut store, _) = open(&db, 1, &clock, DDL);
    assert!(
        store.capture(100).unwrap().changes.is_empty(),
        "reopening does not bootstrap again"
    );

    client
        .batch_execute(
            "ALTER TABLE items ADD COLUMN color text; UPDATE items SET color = 'red' WHERE id = 1;",
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
    let Some(db) = TestDb::create("node_id") else {
        return;
    };
    let clock = ManualClock::new(T0);
    let (store, _) = open(&db, 7, &clock, DDL);
    drop(store);
    let mut options = PostgresOptions::new(vec![TableConfig::new(items())]);
    options.node_id = Some(NodeId::new(8));
    let err = PostgresStore::open(&db.url, options).unwrap_err();
    assert!(err.to_string().contains("installed for node"), "{err}");
}

#[test]
fn the_log_is_the_row_states_superseded_changes_vanish_and_no_peer_falls_behind() {
    let Some(dbs) = databases("log_is_states", 4) else {
        return;
    };
    let clock = ManualClock::new(T0);
    let (mut a, mut ca) = open(&dbs[0], 1, &clock, DDL);
    ca.batch_execute("INSERT INTO items VALUES (1, 'a', 0)")
        .unwrap();
    a.capture(10).unwrap();
    let (mut b, mut cb) = open(&dbs[1], 2, &clock, DDL);
    sync(&mut a, &mut b);
    let b_cursor = a.log_head().unwrap();
    for i in 1..=10i64 {
        ca.execute(
            "UPDATE items SET name = $1 WHERE id = 1",
            &[&format!("v{i}")],
        )
        .unwrap();
        a.capture(10).unwrap();
    }
    ca.batch_execute("INSERT INTO items VALUES (2, 'b', 0)")
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
    assert_eq!(rows(&mut cb), rows(&mut ca));
    let (mut c, mut cc) = open(&dbs[2], 3, &clock, DDL);
    sync(&mut a, &mut c);
    assert_eq!(rows(&mut cc), rows(&mut ca));
    // a snapshot in chunks of one row rebuilds the same rows too
    let (mut d, mut cd) = open(&dbs[3], 4, &clock, DDL);
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
    assert_eq!(rows(&mut cd), rows(&mut ca));
    // the head never moves back
    let before = a.log_head().unwrap();
    a.compact(&CompactionPolicy::default()).unwrap();
    assert_eq!(a.log_head().unwrap(), before);
}

#[test]
fn a_peer_streaming_while_rows_move_to_the_head_still_gets_every_cell() {
    let Some(dbs) = databases("moving_rows", 2) else {
        return;
    };
    let clock = ManualClock::new(T0);
    let (mut a, mut ca) = open(&dbs[0], 1, &clock, DDL);
    for id in 1..=6i64 {
        ca.execute("INSERT INTO items VALUES ($1, 'n', 1)", &[&id])
            .unwrap();
        a.capture(100).unwrap();
    }
    let (mut b, mut cb) = open(&dbs[1], 2, &clock, DDL);
    // one row per page; after each of the first pages, the row just ahead of the peer's cursor
    // changes one column and moves to the head: when the peer reaches it there, its cursor is
    // past the row's old place, so a log that sent only "the cells changed after the cursor"
    // would never send its other cells
    let mut moved = 0;
    let mut served = Vec::new();
    loop {
        let after = b.cursor(a.node_id()).unwrap();
        let page = a.read_log(after, 1).unwrap();
        if page.entries.is_empty() {
            break;
        }
        let changes: Vec<_> = page.entries.into_iter().map(|e| e.change).collect();
        served.push(changes[0].key.clone());
        b.apply_batch(a.node_id(), &changes, page.next).unwrap();
        if moved < 3 {
            // the next row in the log after this page
            let ahead = a.read_log(page.next, 1).unwrap();
            if let Some(next) = ahead.entries.first() {
                let id = match next.change.key.parts()[0] {
                    driftless_core::KeyPart::Integer(i) => i,
                    _ => unreachable!(),
                };
                ca.execute("UPDATE items SET qty = qty + 1 WHERE id = $1", &[&id])
                    .unwrap();
                a.capture(100).unwrap();
                moved += 1;
            }
        }
    }
    assert_eq!(moved, 3);
    assert_eq!(rows(&mut cb), rows(&mut ca));
}

#[test]
fn a_change_stamped_too_far_ahead_is_held_then_released() {
    let Some(dbs) = databases("held", 2) else {
        return;
    };
    let fast = ManualClock::new(T0 + 60_000);
    let slow = ManualClock::new(T0);
    let (mut a, mut ca) = open(&dbs[0], 1, &fast, DDL);
    let (mut b, mut cb) = open(&dbs[1], 2, &slow, DDL);
    ca.batch_execute("INSERT INTO items VALUES (1, 'from the future', 1)")
        .unwrap();
    a.capture(10).unwrap();
    let report = sync(&mut a, &mut b);
    assert_eq!((report.held, report.applied), (1, 0));
    assert!(rows(&mut cb).is_empty());
    assert_eq!(b.held_count().unwrap(), 1);
    assert!(
        b.hlc().last().physical_ms() < T0 + 60_000,
        "a held change does not drag the clock forward"
    );
    assert_eq!(b.release_held().unwrap().applied, 0, "still too far ahead");
    slow.set(T0 + 56_000);
    assert_eq!(b.release_held().unwrap().applied, 1);
    assert_eq!(rows(&mut cb), rows(&mut ca));
    assert_eq!(b.held_count().unwrap(), 0);
}

#[test]
fn concurrent_writes_are_resolved_and_recorded_in_the_ledger() {
    let Some(dbs) = databases("ledger", 2) else {
        return;
    };
    let clock = ManualClock::new(T0);
    let (mut a, mut ca) = open(&dbs[0], 1, &clock, DDL);
    let (mut b, mut cb) = open(&dbs[1], 2, &clock, DDL);
    ca.batch_execute("INSERT INTO items VALUES (1, 'tea', 10)")
        .unwrap();
    a.capture(10).unwrap();
    sync(&mut a, &mut b);
    ca.batch_execute("UPDATE items SET name = 'green tea' WHERE id = 1")
        .unwrap();
    a.capture(10).unwrap();
    clock.advance(5);
    cb.batch_execute("UPDATE items SET name = 'black tea' WHERE id = 1")
        .unwrap();
    b.capture(10).unwrap();
    sync(&mut a, &mut b);
    sync(&mut b, &mut a);
    assert_eq!(rows(&mut ca), rows(&mut cb));
    assert_eq!(rows(&mut ca)[0].1.as_deref(), Some("black tea"));
    for store in [&mut a, &mut b] {
        let conflicts = store.conflicts(10).unwrap();
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert_eq!(conflicts[0].record.loser.value, Some("green tea".into()));
        assert_eq!(store.table_stats().unwrap()[0].conflicts, 1);
    }
    // reconciliation fingerprints agree once converged
    assert_eq!(
        a.top_fingerprints(&items()).unwrap(),
        b.top_fingerprints(&items()).unwrap()
    );
    assert_eq!(a.content_digests().unwrap(), b.content_digests().unwrap());
}

#[test]
fn a_local_write_that_loses_at_once_is_set_back_to_the_winner() {
    let Some(db) = TestDb::create("revert") else {
        return;
    };
    let clock = ManualClock::new(T0);
    let mut client = db.client();
    client.batch_execute(DDL).unwrap();
    let mut config = TableConfig::new(items());
    config.column_kinds = vec![(ColumnName::new("qty").unwrap(), ColumnKind::Max)];
    let mut options = PostgresOptions::new(vec![config]);
    options.node_id = Some(NodeId::new(1));
    let mut store = PostgresStore::open_with_clock(&db.url, options, clock).unwrap();
    client
        .batch_execute("INSERT INTO items VALUES (1, 'a', 10)")
        .unwrap();
    store.capture(10).unwrap();
    client
        .batch_execute("UPDATE items SET qty = 3 WHERE id = 1")
        .unwrap();
    let report = store.capture(10).unwrap();
    assert_eq!(report.reverted, 1);
    assert_eq!(rows(&mut client), vec![(1, Some("a".into()), Some(10))]);
    assert_eq!(store.conflicts(10).unwrap().len(), 1);
    // the revert itself was not captured as a new write
    assert!(store.capture(10).unwrap().changes.is_empty());
}

#[test]
fn oversized_batches_are_refused_before_touching_the_store() {
    let Some(dbs) = databases("oversized", 2) else {
        return;
    };
    let clock = ManualClock::new(T0);
    let (mut a, _) = open(&dbs[0], 1, &clock, DDL);
    let change = {
        let (mut src, mut c) = open(&dbs[1], 2, &clock, DDL);
        c.batch_execute("INSERT INTO items VALUES (1, 'a', 1)")
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
fn truncate_of_a_synced_table_is_refused_and_verify_repairs_writes_behind_our_back() {
    let Some(db) = TestDb::create("truncate") else {
        return;
    };
    let clock = ManualClock::new(T0);
    let (mut store, mut client) = open(&db, 1, &clock, DDL);
    client
        .batch_execute("INSERT INTO items VALUES (1, 'a', 1), (2, 'b', 2)")
        .unwrap();
    store.capture(10).unwrap();
    let err = client.batch_execute("TRUNCATE items").unwrap_err();
    assert!(
        err.to_string().contains("use DELETE") || format!("{err:?}").contains("use DELETE"),
        "{err:?}"
    );
    // a write behind driftless's back (capture bypassed by the setting driftless uses itself)
    client
        .batch_execute(
            "BEGIN; SET LOCAL driftless.applying = 'on'; UPDATE items SET name = 'sneaky' WHERE id = 1; \
             INSERT INTO items VALUES (3, 'never captured', 3); COMMIT;",
        )
        .unwrap();
    let check = store.verify_chunk(&items(), None, 100, false).unwrap();
    assert_eq!(
        (check.checked, check.restored, check.adopted),
        (3, 1, 1),
        "{check:?}"
    );
    let repaired = store.verify_chunk(&items(), None, 100, true).unwrap();
    assert_eq!((repaired.restored, repaired.adopted), (1, 1));
    // storage format 2 keeps no copy of the values, so content written behind driftless's back
    // is adopted as a local write (docs/reconciliation.md), not restored
    assert_eq!(
        rows(&mut client),
        vec![
            (1, Some("sneaky".into()), Some(1)),
            (2, Some("b".into()), Some(2)),
            (3, Some("never captured".into()), Some(3))
        ]
    );
    let again = store.verify_chunk(&items(), None, 100, false).unwrap();
    assert_eq!((again.restored, again.adopted), (0, 0));
    // and the adopted content is in the log, to be sent to every peer
    let served: Vec<_> = store
        .read_log(LogSeq(0), 100)
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.change)
        .collect();
    assert!(
        served.iter().any(|c| c.key == PrimaryKey::integer(1)
            && c.cells().iter().any(|w| w.value == "sneaky".into())),
        "{served:?}"
    );
}

#[test]
fn the_store_works_from_tokio_blocking_threads_on_a_multi_thread_runtime() {
    let Some(dbs) = databases("spawn_blocking", 2) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let urls: Vec<String> = dbs.iter().map(|d| d.url.clone()).collect();
    for db in &dbs {
        db.client().batch_execute(DDL).unwrap();
    }
    runtime.block_on(async move {
        let open = |url: String, node: u128| {
            tokio::task::spawn_blocking(move || {
                let mut options = PostgresOptions::new(vec![TableConfig::new(items())]);
                options.node_id = Some(NodeId::new(node));
                PostgresStore::open(&url, options).unwrap()
            })
        };
        let a = open(urls[0].clone(), 1).await.unwrap();
        let b = open(urls[1].clone(), 2).await.unwrap();
        let store = std::sync::Arc::new(std::sync::Mutex::new((a, b)));
        let mut client = tokio::task::spawn_blocking({
            let url = urls[0].clone();
            move || postgres::Client::connect(&url, postgres::NoTls).unwrap()
        })
        .await
        .unwrap();
        let client = tokio::task::spawn_blocking(move || {
            client
                .batch_execute("INSERT INTO items VALUES (1, 'x', 1)")
                .unwrap();
            client
        })
        .await
        .unwrap();
        let shared = store.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let mut guard = shared.lock().unwrap();
            let (a, b) = &mut *guard;
            a.capture(10).unwrap();
            sync(a, b).applied
        })
        .await
        .unwrap();
        assert_eq!(applied, 1);
        tokio::task::spawn_blocking(move || drop(client))
            .await
            .unwrap();
        // the stores are dropped here, on a runtime worker thread: that must not panic
        drop(store);
    });
}

/// Drops test roles (cluster-wide) when dropped, after the databases using them.
struct Roles(Vec<String>);

impl Drop for Roles {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&common::admin_url(), postgres::NoTls) {
            for role in &self.0 {
                let _ = admin.batch_execute(&format!(
                    "DROP ROLE IF EXISTS {}",
                    driftless_postgres::quote_ident(role)
                ));
            }
        }
    }
}

#[test]
fn a_role_with_only_the_documented_grants_runs_driftless_and_clients_need_no_grant_on_its_schema() {
    let suffix = format!("{}_{}", std::process::id(), T0 % 1000);
    let (driftless_role, app_role) = (format!("dl_{suffix}"), format!("app_{suffix}"));
    let roles = Roles(vec![driftless_role.clone(), app_role.clone()]);
    let Some(dbs) = databases("least_privilege", 2) else {
        return;
    };
    let mut admin = dbs[0].client();
    let q = driftless_postgres::quote_ident;
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {dl}; DROP ROLE IF EXISTS {app};
             CREATE ROLE {dl} LOGIN NOSUPERUSER; CREATE ROLE {app} LOGIN NOSUPERUSER;
             {DDL}
             -- the documented grants: CREATE on the database (for its schema), and on each
             -- synced table SELECT, INSERT, UPDATE, DELETE and TRIGGER
             GRANT CREATE ON DATABASE {db} TO {dl};
             GRANT SELECT, INSERT, UPDATE, DELETE, TRIGGER ON items TO {dl};
             GRANT SELECT, INSERT, UPDATE, DELETE ON items TO {app};",
            dl = q(&driftless_role),
            app = q(&app_role),
            db = q(&dbs[0].name),
        ))
        .unwrap();
    let as_role = |role: &str| format!("{} user={role}", dbs[0].url.replace("user=postgres", ""));
    let mut options = PostgresOptions::new(vec![TableConfig::new(items())]);
    options.node_id = Some(NodeId::new(1));
    let mut a = PostgresStore::open(&as_role(&driftless_role), options).unwrap();
    let superuser: bool = a
        .client()
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!superuser);
    // the application role writes; the trigger records it although the role has no privilege
    // on driftless's schema
    let mut app = postgres::Client::connect(&as_role(&app_role), postgres::NoTls).unwrap();
    app.batch_execute("INSERT INTO items VALUES (1, 'by the app', 1)")
        .unwrap();
    assert!(
        app.batch_execute("SELECT * FROM driftless.pending")
            .is_err()
    );
    assert_eq!(a.capture(10).unwrap().changes.len(), 1);
    // and remote changes apply under the same role (b's clock reads now, like a's)
    let clock = ManualClock::new(driftless_core::Clock::now_ms(&driftless_store::SystemClock));
    let (mut b, mut cb) = open(&dbs[1], 2, &clock, DDL);
    cb.batch_execute("INSERT INTO items VALUES (2, 'remote', 2)")
        .unwrap();
    b.capture(10).unwrap();
    assert_eq!(sync(&mut b, &mut a).applied, 1);
    assert_eq!(sync(&mut a, &mut b).applied, 1);
    assert_eq!(rows(&mut admin), rows(&mut cb));
    drop(a);
    drop(app);
    drop(dbs);
    drop(roles);
}

#[test]
fn the_store_can_be_the_nodes_boxed_store() {
    // the node keeps its store as `Box<dyn Store + Send>` behind a mutex
    fn boxed(store: PostgresStore) -> Box<dyn Store + Send> {
        Box::new(store)
    }
    let _ = boxed;
}

#[test]
fn writes_committed_while_driftless_installs_are_all_captured() {
    let Some(db) = TestDb::create("install_race") else {
        return;
    };
    let mut client = db.client();
    client.batch_execute(DDL).unwrap();
    // a client inserting rows, one transaction each, for as long as the install takes
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut writer_client = db.client();
        std::thread::spawn(move || {
            let mut id = 1i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                writer_client
                    .execute("INSERT INTO items VALUES ($1, 'racing', 1)", &[&id])
                    .unwrap();
                id += 1;
            }
            id - 1
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let clock = ManualClock::new(T0);
    let (mut store, _) = open(&db, 1, &clock, DDL);
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    let mut captured = 0;
    loop {
        let n = store.capture(10_000).unwrap().changes.len();
        captured += n;
        if n == 0 {
            break;
        }
    }
    assert!(
        written > 10,
        "the writer raced the install ({written} rows)"
    );
    assert_eq!(
        captured as i64, written,
        "every row written around the install is captured exactly once"
    );
}

#[test]
fn every_kind_of_multi_row_statement_is_captured_once_per_row() {
    let Some(dbs) = databases("statements", 2) else {
        return;
    };
    let clock = ManualClock::new(T0);
    let (mut a, mut ca) = open(&dbs[0], 1, &clock, DDL);
    let (mut b, mut cb) = open(&dbs[1], 2, &clock, DDL);
    let statements = [
        // one statement, many rows
        "INSERT INTO items SELECT g, 'row ' || g, g FROM generate_series(1, 500) AS g",
        "UPDATE items SET qty = qty * 10 WHERE id <= 100",
        // keys change: the old keys are deleted, the new ones written
        "UPDATE items SET id = id + 1000 WHERE id BETWEEN 401 AND 450",
        // and a key change mixed with plain updates in one statement
        "UPDATE items SET id = CASE WHEN id % 2 = 0 THEN -id ELSE id END, qty = 0 \
         WHERE id BETWEEN 301 AND 310",
        "DELETE FROM items WHERE id BETWEEN 201 AND 250",
        "INSERT INTO items VALUES (1, 'upserted', 7), (9999, 'new', 1) \
         ON CONFLICT (id) DO UPDATE SET name = excluded.name",
        "MERGE INTO items AS t USING (VALUES (2, 'merged'), (8888, 'merged new')) AS s(id, name) \
         ON t.id = s.id WHEN MATCHED THEN UPDATE SET name = s.name \
         WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.name, 0)",
        "MERGE INTO items AS t USING (VALUES (3)) AS s(id) ON t.id = s.id \
         WHEN MATCHED THEN DELETE",
    ];
    for sql in statements {
        ca.batch_execute(sql).unwrap();
        clock.advance(1);
        let captured = a.capture(10_000).unwrap();
        assert!(!captured.changes.is_empty(), "{sql}: nothing captured");
        sync(&mut a, &mut b);
        assert_eq!(rows(&mut cb), rows(&mut ca), "after {sql}");
    }
    // 500 inserted, 50 deleted, 1 deleted by MERGE, 2 inserted by upsert and merge; the key
    // changes kept their row counts
    assert_eq!(rows(&mut ca).len(), 500 - 50 - 1 + 2);
    // driftless's own applies at b were not captured as b's writes
    assert!(b.capture(10_000).unwrap().changes.is_empty());
}

#[test]
fn writes_straight_into_a_partition_of_a_partitioned_table_are_captured() {
    let Some(dbs) = databases("partitions", 2) else {
        return;
    };
    let clock = ManualClock::new(T0);
    let partitioned = "CREATE TABLE IF NOT EXISTS items (id bigint PRIMARY KEY, name text, qty bigint)
                         PARTITION BY RANGE (id);
                       CREATE TABLE IF NOT EXISTS items_low PARTITION OF items FOR VALUES FROM (MINVALUE) TO (1000);
                       CREATE TABLE IF NOT EXISTS items_high PARTITION OF items FOR VALUES FROM (1000) TO (5000);";
    let (mut a, mut ca) = open(&dbs[0], 1, &clock, partitioned);
    let (mut b, mut cb) = open(&dbs[1], 2, &clock, DDL);
    for sql in [
        "INSERT INTO items SELECT g, 'row ' || g, g FROM generate_series(990, 1010) AS g",
        // statements that name a partition, not the partitioned table
        "INSERT INTO items_low VALUES (1, 'straight into a partition', 1)",
        "UPDATE items_high SET qty = -1 WHERE id > 1005",
        "DELETE FROM items_low WHERE id BETWEEN 990 AND 992",
        // a partition created after driftless was installed
        "CREATE TABLE items_top PARTITION OF items FOR VALUES FROM (5000) TO (6000);
         INSERT INTO items_top VALUES (5500, 'into a new partition', 5)",
    ] {
        ca.batch_execute(sql).unwrap();
        clock.advance(1);
        a.capture(10_000).unwrap();
        sync(&mut a, &mut b);
        assert_eq!(rows(&mut cb), rows(&mut ca), "after {sql}");
    }
}

/// Top-level fingerprints straight from the merge states (what a fresh process computes).
fn fresh_tops(db: &TestDb, clock: &ManualClock) -> Vec<i64> {
    let (mut store, _) = open(db, 7, clock, DDL);
    store.top_fingerprints(&items()).unwrap()
}

#[test]
fn fingerprints_kept_in_memory_follow_own_writes_and_notice_another_process() {
    let Some(db) = TestDb::create("fp_cache") else {
        return;
    };
    let clock = ManualClock::new(T0);
    let (mut a, mut client) = open(&db, 7, &clock, DDL);
    let empty = a.top_fingerprints(&items()).unwrap();
    assert!(empty.iter().all(|fp| *fp == 0));
    // own writes: the cached fingerprints follow them, and match a fresh computation
    client
        .batch_execute("INSERT INTO items SELECT i, 'n' || i, i FROM generate_series(1, 300) i")
        .unwrap();
    a.capture(1000).unwrap();
    let after_insert = a.top_fingerprints(&items()).unwrap();
    assert_ne!(after_insert, empty);
    assert_eq!(after_insert, fresh_tops(&db, &clock));
    client
        .batch_execute(
            "UPDATE items SET qty = qty + 1 WHERE id <= 100; DELETE FROM items WHERE id > 250",
        )
        .unwrap();
    a.capture(1000).unwrap();
    let after_update = a.top_fingerprints(&items()).unwrap();
    assert_ne!(after_update, after_insert);
    assert_eq!(after_update, fresh_tops(&db, &clock));
    // fine fingerprints (read from the states) add up to their top
    let tops: Vec<u32> = (0..4096u32)
        .filter(|t| after_update[*t as usize] != 0)
        .collect();
    for chunk in tops.chunks(1000) {
        for (top, fine) in a.fine_fingerprints(&items(), chunk).unwrap() {
            let folded = fine.iter().fold(0i64, |x, fp| x ^ fp);
            assert_eq!(folded, after_update[top as usize], "top {top}");
        }
    }
    // another process writes states: this one must not serve its stale fingerprints
    let (mut b, _) = open(&db, 7, &clock, DDL);
    client
        .batch_execute("UPDATE items SET name = 'b' WHERE id = 7")
        .unwrap();
    assert_eq!(b.capture(1000).unwrap().changes.len(), 1);
    let seen_by_a = a.top_fingerprints(&items()).unwrap();
    assert_ne!(seen_by_a, after_update);
    assert_eq!(seen_by_a, b.top_fingerprints(&items()).unwrap());
    // and after its own next write, it is still in step
    client
        .batch_execute("UPDATE items SET name = 'a' WHERE id = 8")
        .unwrap();
    a.capture(1000).unwrap();
    assert_eq!(
        a.top_fingerprints(&items()).unwrap(),
        fresh_tops(&db, &clock)
    );
}

#[test]
fn the_in_memory_tail_serves_exactly_what_the_stored_rows_would() {
    let Some(dbs) = databases("tail", 2) else {
        return;
    };
    let clock = ManualClock::new(T0);
    let (mut a, mut ca) = open(&dbs[0], 1, &clock, DDL);
    // inserts, updates that move rows to the head, a delete, and a remote change applied here
    // (relayed with its own origin)
    for sql in [
        "INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 40) AS g",
        "UPDATE items SET qty = qty + 100 WHERE id % 3 = 0",
        "DELETE FROM items WHERE id = 7",
        "UPDATE items SET name = 'again' WHERE id = 9",
    ] {
        ca.batch_execute(sql).unwrap();
        clock.advance(1);
        a.capture(1_000).unwrap();
    }
    let (mut b, mut cb) = open(&dbs[1], 2, &clock, DDL);
    cb.batch_execute("INSERT INTO items VALUES (500, 'from b', 5)")
        .unwrap();
    let from_b = b.capture(10).unwrap().changes;
    a.apply_batch(NodeId::new(2), &from_b, LogSeq(1)).unwrap();
    // a second store on the same database has no tail: it reads the stored rows
    let (mut fresh, _) = open(&dbs[0], 1, &clock, DDL);
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
    // the other store's write restarts the tail: what it wrote is served from the rows
    drop(fresh);
    let (mut other, mut co) = open(&dbs[0], 1, &clock, DDL);
    co.batch_execute("UPDATE items SET qty = -1 WHERE id = 1")
        .unwrap();
    clock.advance(1);
    other.capture(10).unwrap();
    // read through to the head: `a`'s tail may serve row 1's state from before the other
    // store moved it (a state it really had) and then its new place from the stored rows; the
    // rows a peer ends with are the same
    let read_all = |store: &mut PostgresStore<ManualClock>| {
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
        let mut states: std::collections::BTreeMap<PrimaryKey, driftless_core::RowState> =
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
    let all_fresh = read_all(&mut other);
    assert_eq!(fold(&all), fold(&all_fresh));
    assert!(
        all.iter()
            .any(|c| c.key == PrimaryKey::integer(1)
                && c.cells().iter().any(|w| w.value == (-1).into())),
        "{all:?}"
    );
}

#[test]
fn a_value_written_after_a_stamped_record_is_never_served_with_an_older_version() {
    let Some(db) = TestDb::create("tail_waiting") else {
        return;
    };
    let clock = ManualClock::new(T0);
    let (mut a, mut ca) = open(&db, 1, &clock, DDL);
    ca.batch_execute("INSERT INTO items VALUES (1, 'a', 1)")
        .unwrap();
    let insert = a.capture(10).unwrap().changes[0].version;
    // two waiting updates of different columns; stamping only the first rebuilds the row from
    // the table, which already shows the second's value under the insert's version
    ca.batch_execute("UPDATE items SET name = 'b' WHERE id = 1")
        .unwrap();
    ca.batch_execute("UPDATE items SET qty = 2 WHERE id = 1")
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
