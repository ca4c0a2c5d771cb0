//! Crash safety: a child process applying a large stream of batches is killed with SIGKILL at
//! random moments, again and again. After each kill the replica must hold exactly the effect of
//! the sender's log up to the stored cursor (nothing beyond, nothing missing, nothing twice),
//! its log must be intact, and it must finish the stream when restarted.
//!
//! Replay: `DRIFTLESS_SEED=<seed> cargo test -p driftless-sqlite --test crash`.

use driftless_core::ColumnKind;
use driftless_core::{ColumnName, NodeId, TableName};
use driftless_sim::rng::{Rng, seeds_from_env};
use driftless_sqlite::{SqliteOptions, SqliteStore};
use driftless_store::{LogSeq, Store, TableConfig};
use rusqlite::Connection;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const DDL: &str =
    "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT, stock INTEGER);";
const ROWS: i64 = 3_000;
const UPDATE_ROUNDS: i64 = 4;
const KILLS: usize = 20;
/// Small pages: the source's log is one entry per row (storage format 2), so the stream needs many
/// batches for kills to land between them.
const PAGE: usize = 200;

fn options(node: u128) -> SqliteOptions {
    let mut config = TableConfig::new(TableName::new("items").unwrap());
    config.column_kinds = vec![(ColumnName::new("stock").unwrap(), ColumnKind::Counter)];
    let mut options = SqliteOptions::new(vec![config]);
    options.node_id = Some(NodeId::new(node));
    options
}

fn open(path: &Path, node: u128) -> SqliteStore {
    Connection::open(path).unwrap().execute_batch(DDL).unwrap();
    SqliteStore::open(path, options(node)).unwrap()
}

fn contents(path: &Path) -> Vec<(i64, Option<String>, Option<i64>)> {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT id, name, stock FROM items ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The child: applies the source's log to the target from the target's cursor until done.
#[test]
#[ignore = "run by `crash_during_apply_loses_nothing_and_applies_nothing_twice` as a child process"]
fn child_apply_loop() {
    let Some(source) = std::env::var_os("DRIFTLESS_CRASH_SOURCE") else {
        return;
    };
    let target = std::env::var_os("DRIFTLESS_CRASH_TARGET").unwrap();
    let mut source = open(Path::new(&source), 1);
    let mut target = open(Path::new(&target), 2);
    loop {
        let after = target.cursor(source.node_id()).unwrap();
        let page = source.read_log(after, PAGE).unwrap();
        if page.entries.is_empty() {
            break;
        }
        let changes: Vec<_> = page.entries.iter().map(|e| e.change.clone()).collect();
        target
            .apply_batch(source.node_id(), &changes, page.next)
            .unwrap();
    }
}

/// The state the target must have after applying exactly the source's log up to `cursor`.
fn expected_at(
    source: &mut SqliteStore,
    dir: &Path,
    cursor: LogSeq,
    n: usize,
) -> Vec<(i64, Option<String>, Option<i64>)> {
    let path = dir.join(format!("expected-{n}.db"));
    let mut reference = open(&path, 3);
    let mut after = LogSeq(0);
    while after < cursor {
        let page = source.read_log(after, PAGE).unwrap();
        let changes: Vec<_> = page
            .entries
            .iter()
            .filter(|e| e.seq <= cursor)
            .map(|e| e.change.clone())
            .collect();
        if changes.is_empty() {
            break;
        }
        reference
            .apply_batch(source.node_id(), &changes, cursor)
            .unwrap();
        after = page.next;
    }
    contents(&path)
}

#[test]
fn crash_during_apply_loses_nothing_and_applies_nothing_twice() {
    let seed = seeds_from_env(1)[0];
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let source_path = dir.path().join("source.db");
    let target_path = dir.path().join("target.db");
    let mut source = open(&source_path, 1);
    {
        // A large log: inserts, then rounds of counter increments and renames.
        let conn = Connection::open(&source_path).unwrap();
        conn.execute_batch("BEGIN").unwrap();
        for id in 0..ROWS {
            conn.execute(
                "INSERT INTO items VALUES (?1, ?2, 0)",
                rusqlite::params![id, format!("item {id}")],
            )
            .unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
        while source.capture(10_000).unwrap().records == 10_000 {}
        for round in 1..=UPDATE_ROUNDS {
            conn.execute(
                "UPDATE items SET stock = stock + ?1, name = name || '.'",
                [round],
            )
            .unwrap();
            while source.capture(10_000).unwrap().records == 10_000 {}
        }
    }
    let head = source.log_head().unwrap();
    let exe = std::env::current_exe().unwrap();
    // Calibrate: how long does a whole uninterrupted stream take here, now? Kills are then spread
    // over that time, so they land mid-stream whatever the machine's speed.
    let calibration_path = dir.path().join("calibration.db");
    drop(open(&calibration_path, 2));
    let started = std::time::Instant::now();
    let status = Command::new(&exe)
        .args([
            "--exact",
            "child_apply_loop",
            "--ignored",
            "--test-threads=1",
        ])
        .env("DRIFTLESS_CRASH_SOURCE", &source_path)
        .env("DRIFTLESS_CRASH_TARGET", &calibration_path)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let stream_ms = (started.elapsed().as_millis() as u64).max(20);
    drop(open(&target_path, 2)); // install before the first child runs

    let mut kills = 0;
    let mut mid_stream = 0;
    let mut rounds = 0;
    while kills < KILLS {
        rounds += 1;
        assert!(
            rounds < KILLS * 10,
            "seed {seed:#x}: the child keeps finishing before it can be killed"
        );
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "child_apply_loop",
                "--ignored",
                "--test-threads=1",
            ])
            .env("DRIFTLESS_CRASH_SOURCE", &source_path)
            .env("DRIFTLESS_CRASH_TARGET", &target_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(5 + rng.below(stream_ms * 9 / 10)));
        if child.try_wait().unwrap().is_some() {
            // finished before the kill: start over on a fresh target so the stream is long again
            std::fs::remove_file(&target_path).unwrap();
            let _ = std::fs::remove_file(target_path.with_extension("db-wal"));
            let _ = std::fs::remove_file(target_path.with_extension("db-shm"));
            drop(open(&target_path, 2));
            continue;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;

        let mut target = open(&target_path, 2);
        let cursor = target.cursor(NodeId::new(1)).unwrap();
        if cursor > LogSeq(0) && cursor < head {
            mid_stream += 1;
        }
        let integrity: String = target
            .connection()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(integrity, "ok", "seed {seed:#x}");
        assert_eq!(
            contents(&target_path),
            expected_at(&mut source, dir.path(), cursor, kills),
            "seed {seed:#x}: after kill {kills} the data does not match the cursor {cursor}"
        );
        // the log is intact: every entry decodes, and replayed into a fresh replica it gives
        // exactly the target's rows (in storage format 2 the log is the rows' states)
        let replay_path = dir.path().join(format!("replay-{kills}.db"));
        let mut replay = open(&replay_path, 4);
        let mut after = LogSeq(0);
        loop {
            let page = target.read_log(after, PAGE).unwrap();
            if page.entries.is_empty() {
                break;
            }
            let changes: Vec<_> = page.entries.into_iter().map(|e| e.change).collect();
            replay
                .apply_batch(NodeId::new(2), &changes, page.next)
                .unwrap();
            after = page.next;
        }
        assert_eq!(
            contents(&replay_path),
            contents(&target_path),
            "seed {seed:#x}: the target's log does not rebuild its rows"
        );
        assert_eq!(
            target.pending_local_writes().unwrap(),
            0,
            "applies were captured as local writes"
        );
    }
    assert!(
        mid_stream >= KILLS / 2,
        "seed {seed:#x}: only {mid_stream} of {kills} kills landed mid-stream"
    );

    // restart and finish: the target ends equal to the source, each change applied once
    let status = Command::new(&exe)
        .args([
            "--exact",
            "child_apply_loop",
            "--ignored",
            "--test-threads=1",
        ])
        .env("DRIFTLESS_CRASH_SOURCE", &source_path)
        .env("DRIFTLESS_CRASH_TARGET", &target_path)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        contents(&target_path),
        contents(&source_path),
        "seed {seed:#x}"
    );
    let stock_total: i64 = contents(&target_path).iter().map(|r| r.2.unwrap()).sum();
    assert_eq!(stock_total, ROWS * (1..=UPDATE_ROUNDS).sum::<i64>());
    println!(
        "seed {seed:#x}: {kills} kills, {mid_stream} mid-stream, {rounds} child runs, stream {stream_ms} ms"
    );
}
