//! Crash safety: a child process applying a large stream of batches to a PostgreSQL replica is
//! killed with SIGKILL at random moments, again and again. After each kill the replica must
//! hold exactly the effect of the sender's log up to the stored cursor (nothing beyond, nothing
//! missing, nothing twice), its log must hold exactly the applied changes, and it must finish
//! the stream when restarted.
//!
//! Replay: `DRIFTLESS_SEED=<seed> cargo test -p driftless-postgres --test crash`.

mod common;

use driftless_core::{ColumnKind, ColumnName, NodeId, TableName};
use driftless_postgres::{PostgresOptions, PostgresStore};
use driftless_sim::rng::{Rng, seeds_from_env};
use driftless_sqlite::{SqliteOptions, SqliteStore};
use driftless_store::{LogSeq, Store, TableConfig};
use postgres::{Client, NoTls};
use std::process::{Command, Stdio};
use std::time::Duration;

const DDL: &str =
    "CREATE TABLE IF NOT EXISTS items (id bigint PRIMARY KEY, name text, stock bigint);";
const ROWS: i64 = 3_000;
const UPDATE_ROUNDS: i64 = 4;
const KILLS: usize = 20;
/// Small pages: in storage format 2 the source log holds each row once, so a stream of 3,000
/// rows must still take enough apply transactions for kills to land between them.
const PAGE: usize = 200;

fn config() -> TableConfig {
    let mut config = TableConfig::new(TableName::new("items").unwrap());
    config.column_kinds = vec![(ColumnName::new("stock").unwrap(), ColumnKind::Counter)];
    config
}

fn open(url: &str, node: u128) -> PostgresStore {
    Client::connect(url, NoTls)
        .unwrap()
        .batch_execute(DDL)
        .unwrap();
    let mut options = PostgresOptions::new(vec![config()]);
    options.node_id = Some(NodeId::new(node));
    PostgresStore::open(url, options).unwrap()
}

type Rows = Vec<(i64, Option<String>, Option<i64>)>;

fn contents(url: &str) -> Rows {
    Client::connect(url, NoTls)
        .unwrap()
        .query("SELECT id, name, stock FROM items ORDER BY id", &[])
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The child: applies the source's log to the target from the target's cursor until done.
#[test]
#[ignore = "run by `crash_during_apply_loses_nothing_and_applies_nothing_twice` as a child process"]
fn child_apply_loop() {
    let Ok(source) = std::env::var("DRIFTLESS_CRASH_SOURCE") else {
        return;
    };
    let target = std::env::var("DRIFTLESS_CRASH_TARGET").unwrap();
    let mut source = open(&source, 1);
    let mut target = open(&target, 2);
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

/// The state a replica must have after applying exactly the source's log up to `cursor`,
/// computed with the SQLite adapter as the reference.
fn expected_at(source: &mut PostgresStore, cursor: LogSeq) -> Rows {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("expected.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, stock INTEGER);")
        .unwrap();
    let mut options = SqliteOptions::new(vec![config()]);
    options.node_id = Some(NodeId::new(3));
    let mut reference = SqliteStore::open(&path, options).unwrap();
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
            .apply_batch(source.node_id(), &changes, page.next.min(cursor))
            .unwrap();
        after = page.next;
    }
    let mut stmt = conn
        .prepare("SELECT id, name, stock FROM items ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn child(exe: &std::path::Path, source: &str, target: &str) -> Command {
    let mut command = Command::new(exe);
    command
        .args([
            "--exact",
            "child_apply_loop",
            "--ignored",
            "--test-threads=1",
        ])
        .env("DRIFTLESS_CRASH_SOURCE", source)
        .env("DRIFTLESS_CRASH_TARGET", target)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// Empties a target replica: its rows and driftless's schema (reinstalled by the next open).
fn reset(url: &str) {
    Client::connect(url, NoTls)
        .unwrap()
        .batch_execute("DROP SCHEMA IF EXISTS driftless CASCADE; TRUNCATE items;")
        .unwrap();
}

#[test]
fn crash_during_apply_loses_nothing_and_applies_nothing_twice() {
    let Some(dbs) = common::databases("crash", 3) else {
        return;
    };
    let (source_url, target_url, calibration_url) = (&dbs[0].url, &dbs[1].url, &dbs[2].url);
    let seed = seeds_from_env(1)[0];
    let mut rng = Rng::new(seed);
    let mut source = open(source_url, 1);
    {
        // A large log: inserts, then rounds of counter increments and renames.
        let mut conn = Client::connect(source_url, NoTls).unwrap();
        conn.execute(
            "INSERT INTO items SELECT i, 'item ' || i, 0 FROM generate_series(0::bigint, $1::bigint - 1) AS i",
            &[&ROWS],
        )
        .unwrap();
        while source.capture(10_000).unwrap().records == 10_000 {}
        for round in 1..=UPDATE_ROUNDS {
            conn.execute(
                "UPDATE items SET stock = stock + $1::bigint, name = name || '.'",
                &[&round],
            )
            .unwrap();
            while source.capture(10_000).unwrap().records == 10_000 {}
        }
    }
    let head = source.log_head().unwrap();
    let exe = std::env::current_exe().unwrap();
    // Calibrate: how long does a whole uninterrupted stream take here, now?
    drop(open(calibration_url, 2));
    let started = std::time::Instant::now();
    let status = child(&exe, source_url, calibration_url).status().unwrap();
    assert!(status.success());
    let stream_ms = (started.elapsed().as_millis() as u64).max(20);
    drop(open(target_url, 2)); // install before the first child runs

    let mut kills = 0;
    let mut mid_stream = 0;
    let mut rounds = 0;
    while kills < KILLS {
        rounds += 1;
        assert!(
            rounds < KILLS * 10,
            "seed {seed:#x}: the child keeps finishing before it can be killed"
        );
        let mut process = child(&exe, source_url, target_url).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(5 + rng.below(stream_ms * 9 / 10)));
        if process.try_wait().unwrap().is_some() {
            // finished before the kill: start over on an empty target so the stream is long again
            reset(target_url);
            drop(open(target_url, 2));
            continue;
        }
        process.kill().unwrap(); // SIGKILL
        process.wait().unwrap();
        kills += 1;

        // (waits for the killed session's advisory lock: its server process ends when it
        // notices the closed socket, rolling back whatever it had not committed)
        let mut target = open(target_url, 2);
        let cursor = target.cursor(NodeId::new(1)).unwrap();
        if cursor > LogSeq(0) && cursor < head {
            mid_stream += 1;
        }
        assert_eq!(
            contents(target_url),
            expected_at(&mut source, cursor),
            "seed {seed:#x}: after kill {kills} the data does not match the cursor {cursor}"
        );
        // the log is intact: every entry decodes, and replayed into a fresh replica it gives
        // exactly the target's rows (in storage format 2 the log is the rows' states)
        assert_eq!(
            expected_at(&mut target, LogSeq(u64::MAX)),
            contents(target_url),
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
    let status = child(&exe, source_url, target_url).status().unwrap();
    assert!(status.success());
    assert_eq!(contents(target_url), contents(source_url), "seed {seed:#x}");
    let stock_total: i64 = contents(target_url).iter().map(|r| r.2.unwrap()).sum();
    assert_eq!(stock_total, ROWS * (1..=UPDATE_ROUNDS).sum::<i64>());
    println!(
        "seed {seed:#x}: {kills} kills, {mid_stream} mid-stream, {rounds} child runs, stream {stream_ms} ms"
    );
}
