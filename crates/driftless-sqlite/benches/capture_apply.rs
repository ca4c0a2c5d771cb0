//! Measures the cost of driftless on SQLite: local insert and random-update rates with and
//! without capture triggers, stamping throughput, and the rate of applying a log to a fresh
//! replica.
//!
//! A plain `main()` (no criterion): it runs every measurement once, in the same process, on
//! temporary SQLite files in WAL mode with `synchronous = NORMAL` (baseline and driftless alike),
//! and prints a table. Rows are about 100 bytes:
//! `items(id INTEGER PRIMARY KEY, name TEXT, price REAL, note TEXT, stock INTEGER)`.
//!
//! ```text
//! cargo bench -p driftless-sqlite --bench capture_apply -- --rows 200000 --updates 100000
//! ```
//!
//! `--rows N` (or `DRIFTLESS_BENCH_ROWS`) sets the inserted rows, `--updates M` (or
//! `DRIFTLESS_BENCH_UPDATES`) the random single-row updates.

use driftless_core::{Change, NodeId, TableName};
use driftless_sim::Rng;
use driftless_sqlite::{SqliteOptions, SqliteStore};
use driftless_store::{CAPTURE_BATCH_ROWS_MAX, LogSeq, Store, TableConfig};
use rusqlite::{Connection, params};
use std::error::Error;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const ROWS_DEFAULT: u64 = 200_000;
const UPDATES_DEFAULT: u64 = 100_000;
/// Client writes per local transaction (inserts and updates alike).
const CLIENT_TX_ROWS: u64 = 10_000;
/// Changes per `apply_batch` call, one apply run each.
const APPLY_BATCHES: [usize; 2] = [1_000, 10_000];
/// The capture overhead target of the product brief: with capture ÷ without, at least this.
const CAPTURE_RATIO_TARGET: f64 = 0.5;

const DDL: &str = "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL, \
                   note TEXT, stock INTEGER)";
const INSERT_SQL: &str =
    "INSERT INTO items (id, name, price, note, stock) VALUES (?1, ?2, ?3, ?4, ?5)";
const UPDATE_SQL: &str = "UPDATE items SET price = ?1, stock = ?2 WHERE id = ?3";
/// Filler for the ~60-byte note (the row number is written in front of it).
const NOTE_FILLER: &str = "lorem ipsum dolor sit amet, consectetur adipiscing elit sed do";

struct Config {
    rows: u64,
    updates: u64,
}

fn parse_count(text: &str, what: &str) -> Result<u64> {
    text.replace('_', "")
        .parse()
        .map_err(|e| format!("{what}: cannot read {text:?} as a count: {e}").into())
}

fn config() -> Result<Config> {
    let mut config = Config {
        rows: match std::env::var("DRIFTLESS_BENCH_ROWS") {
            Ok(v) => parse_count(&v, "DRIFTLESS_BENCH_ROWS")?,
            Err(_) => ROWS_DEFAULT,
        },
        updates: match std::env::var("DRIFTLESS_BENCH_UPDATES") {
            Ok(v) => parse_count(&v, "DRIFTLESS_BENCH_UPDATES")?,
            Err(_) => UPDATES_DEFAULT,
        },
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = |flag: &str| -> Result<String> {
            match inline.clone().or_else(|| args.next()) {
                Some(v) => Ok(v),
                None => Err(format!("{flag} needs a value").into()),
            }
        };
        match flag.as_str() {
            "--rows" => config.rows = parse_count(&value("--rows")?, "--rows")?,
            "--updates" => config.updates = parse_count(&value("--updates")?, "--updates")?,
            // cargo passes `--bench` to every bench target; other flags are libtest's.
            "--bench" => {}
            "-h" | "--help" => {
                println!(
                    "usage: cargo bench -p driftless-sqlite --bench capture_apply -- \
                     [--rows N] [--updates M]\n\
                     (env: DRIFTLESS_BENCH_ROWS, DRIFTLESS_BENCH_UPDATES; defaults \
                     {ROWS_DEFAULT} and {UPDATES_DEFAULT})"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)").into()),
        }
    }
    if config.rows == 0 || config.updates == 0 {
        return Err("--rows and --updates must be at least 1".into());
    }
    Ok(config)
}

/// A client connection as a user's app would open it: WAL, `synchronous = NORMAL`.
fn client(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
    Ok(conn)
}

fn items_config() -> Result<Vec<TableConfig>> {
    Ok(vec![TableConfig::new(TableName::new("items")?)])
}

/// Inserts rows `1..=rows` in transactions of `CLIENT_TX_ROWS` with one prepared statement.
fn insert_rows(conn: &mut Connection, rows: u64) -> Result<Duration> {
    let mut name = String::with_capacity(16);
    let mut note = String::with_capacity(64);
    let start = Instant::now();
    let mut id = 1;
    while id <= rows {
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(INSERT_SQL)?;
            let end = (id + CLIENT_TX_ROWS - 1).min(rows);
            for i in id..=end {
                name.clear();
                write!(name, "item-{i:08}")?;
                note.clear();
                write!(note, "{i:08} ")?;
                note.push_str(&NOTE_FILLER[..60 - note.len()]);
                let price = (i % 10_000) as f64 / 100.0;
                stmt.execute(params![i as i64, name, price, note, (i % 1000) as i64])?;
            }
            id = end + 1;
        }
        tx.commit()?;
    }
    Ok(start.elapsed())
}

/// `updates` random single-row updates of `price` and `stock` over rows `1..=rows`, in
/// transactions of `CLIENT_TX_ROWS`. The same seed gives the same updates on every database.
fn update_rows(conn: &mut Connection, rows: u64, updates: u64, seed: u64) -> Result<Duration> {
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    let mut done = 0;
    while done < updates {
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(UPDATE_SQL)?;
            let end = (done + CLIENT_TX_ROWS).min(updates);
            for _ in done..end {
                let id = rng.range(1, rows) as i64;
                let price = rng.below(1_000_000) as f64 / 100.0;
                let stock = rng.below(100_000) as i64;
                let changed = stmt.execute(params![price, stock, id])?;
                if changed != 1 {
                    return Err(format!("update of row {id} changed {changed} rows").into());
                }
            }
            done = end;
        }
        tx.commit()?;
    }
    Ok(start.elapsed())
}

/// Stamps every pending local write: `capture(CAPTURE_BATCH_ROWS_MAX)` until it returns no
/// changes. Returns the time and the number of changes made.
fn stamp_all(store: &mut SqliteStore) -> Result<(Duration, usize)> {
    let start = Instant::now();
    let mut changes = 0;
    loop {
        let report = store.capture(CAPTURE_BATCH_ROWS_MAX)?;
        if report.refused > 0 {
            return Err(format!("capture refused {} local writes", report.refused).into());
        }
        if report.changes.is_empty() {
            break;
        }
        changes += report.changes.len();
    }
    let elapsed = start.elapsed();
    // A batch of writes that all coalesced into earlier changes also returns no changes.
    if store.pending_local_writes()? != 0 {
        return Err("capture stopped with local writes still pending".into());
    }
    Ok((elapsed, changes))
}

/// `(count, sum of price, sum of stock)` of `items`: a cheap check that two replicas agree.
fn digest(conn: &Connection) -> Result<(i64, f64, i64)> {
    Ok(conn.query_row(
        "SELECT count(*), total(price), coalesce(sum(stock), 0) FROM items",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?)
}

/// Pages of `source`'s log from `after` up to `until`, each at most `batch` entries.
fn read_pages(
    source: &mut SqliteStore,
    mut after: LogSeq,
    until: LogSeq,
    batch: usize,
) -> Result<Vec<(Vec<Change>, LogSeq)>> {
    let mut pages = Vec::new();
    while after < until {
        let limit = batch.min((until.0 - after.0) as usize);
        let page = source.read_log(after, limit)?;
        if page.entries.is_empty() {
            return Err(format!("log ends at {} before {until}", page.next).into());
        }
        pages.push((
            page.entries.into_iter().map(|e| e.change).collect(),
            page.next,
        ));
        after = page.next;
    }
    Ok(pages)
}

/// Applies pages in order; returns the time and the number of changes applied. An updated row
/// is served whole (storage format 2), so its older cells arrive again and apply as duplicates.
fn apply_pages(
    target: &mut SqliteStore,
    from: NodeId,
    pages: &[(Vec<Change>, LogSeq)],
) -> Result<(Duration, usize)> {
    let start = Instant::now();
    let mut applied = 0;
    for (changes, next) in pages {
        let report = target.apply_batch(from, changes, *next)?;
        if report.applied + report.duplicates != changes.len() {
            return Err(format!("apply of {} changes: {report:?}", changes.len()).into());
        }
        applied += report.applied;
    }
    Ok((start.elapsed(), applied))
}

fn per_sec(count: u64, time: Duration) -> f64 {
    count as f64 / time.as_secs_f64()
}

fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

struct Table {
    lines: Vec<(String, String, String)>,
}

impl Table {
    fn rate(&mut self, what: &str, count: u64, time: Duration, unit: &str) {
        self.lines.push((
            what.to_owned(),
            format!("{} {unit}", thousands(per_sec(count, time))),
            format!("{} in {:.3} s", thousands(count as f64), time.as_secs_f64()),
        ));
    }

    fn ratio(&mut self, what: &str, ratio: f64, target: Option<f64>) {
        let verdict = match target {
            Some(t) if ratio >= t => format!("target >= {t}: met"),
            Some(t) => format!("target >= {t}: MISSED"),
            None => "(no target)".to_owned(),
        };
        self.lines
            .push((what.to_owned(), format!("{ratio:.2}"), verdict));
    }

    fn print(&self) {
        let w0 = self.lines.iter().map(|l| l.0.len()).max().unwrap_or(0);
        let w1 = self.lines.iter().map(|l| l.1.len()).max().unwrap_or(0);
        for (a, b, c) in &self.lines {
            println!("  {a:<w0$}  {b:>w1$}  {c}");
        }
    }
}

fn main() -> Result<()> {
    let config = config()?;
    let (rows, updates) = (config.rows, config.updates);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("driftless SQLite capture and apply benchmark");
    println!(
        "command: cargo bench -p driftless-sqlite --bench capture_apply -- \
         --rows {rows} --updates {updates}"
    );
    println!(
        "rows {rows} (~100 bytes each), updates {updates}, client transactions of {CLIENT_TX_ROWS} \
         rows, WAL + synchronous=NORMAL, {cores} cores available, SQLite {}",
        rusqlite::version()
    );
    println!();
    let dir = tempfile::tempdir()?;
    let mut table = Table { lines: Vec::new() };

    // 1. Baseline: no driftless in the file.
    let base_path = dir.path().join("baseline.db");
    let mut base = client(&base_path)?;
    base.execute_batch(DDL)?;
    let base_insert = insert_rows(&mut base, rows)?;
    eprintln!("baseline inserts done");

    // 2. The same inserts with capture installed (triggers created by opening the store first),
    //    made by a separate plain connection; then stamping.
    let source_path = dir.path().join("source.db");
    let mut source_client = client(&source_path)?;
    source_client.execute_batch(DDL)?;
    let mut source = SqliteStore::open(&source_path, SqliteOptions::new(items_config()?))?;
    let capture_insert = insert_rows(&mut source_client, rows)?;
    let (stamp_insert, insert_changes) = stamp_all(&mut source)?;
    if insert_changes as u64 != rows {
        return Err(format!("{rows} inserts made {insert_changes} changes").into());
    }
    let insert_head = source.log_head()?;
    // The inserts as a peer would have streamed them before the updates: in storage format 2
    // an updated row moves to the log's head, so it has to be read now.
    let insert_pages: Vec<_> = APPLY_BATCHES
        .into_iter()
        .map(|batch| read_pages(&mut source, LogSeq(0), insert_head, batch))
        .collect::<Result<_>>()?;
    eprintln!("capture inserts and stamping done");

    // 3. Random updates on the prefilled tables, same sequence on both.
    let seed = 0x5eed_d71f;
    let base_update = update_rows(&mut base, rows, updates, seed)?;
    let capture_update = update_rows(&mut source_client, rows, updates, seed)?;
    let (stamp_update, update_changes) = stamp_all(&mut source)?;
    let update_head = source.log_head()?;
    if digest(&base)? != digest(&source_client)? {
        return Err("baseline and captured tables differ after the same writes".into());
    }
    eprintln!("updates and stamping done");

    table.rate("1. insert, no driftless", rows, base_insert, "rows/s");
    table.rate(
        "2. insert, capture triggers installed",
        rows,
        capture_insert,
        "rows/s",
    );
    let insert_ratio = base_insert.as_secs_f64() / capture_insert.as_secs_f64();
    table.ratio(
        "   insert ratio (with capture / without)",
        insert_ratio,
        Some(CAPTURE_RATIO_TARGET),
    );
    table.rate(
        "   stamping of the inserts (capture loop)",
        insert_changes as u64,
        stamp_insert,
        "rows/s",
    );
    let insert_e2e = capture_insert + stamp_insert;
    table.rate(
        "   end-to-end local insert (insert + stamp)",
        rows,
        insert_e2e,
        "rows/s",
    );
    table.ratio(
        "   end-to-end local insert ratio (insert + stamp) / without",
        base_insert.as_secs_f64() / insert_e2e.as_secs_f64(),
        None,
    );
    table.rate(
        "3. random update, no driftless",
        updates,
        base_update,
        "rows/s",
    );
    table.rate(
        "   random update, capture triggers installed",
        updates,
        capture_update,
        "rows/s",
    );
    table.ratio(
        "   update ratio (with capture / without)",
        base_update.as_secs_f64() / capture_update.as_secs_f64(),
        Some(CAPTURE_RATIO_TARGET),
    );
    table.rate(
        "   stamping of the updates (changes made)",
        update_changes as u64,
        stamp_update,
        "changes/s",
    );
    table.rate(
        "   stamping of the updates (writes consumed)",
        updates,
        stamp_update,
        "writes/s",
    );
    let update_e2e = capture_update + stamp_update;
    table.rate(
        "   end-to-end local update (update + stamp)",
        updates,
        update_e2e,
        "rows/s",
    );
    table.ratio(
        "   end-to-end local update ratio (update + stamp) / without",
        base_update.as_secs_f64() / update_e2e.as_secs_f64(),
        None,
    );

    // 4. Apply the source's log to a fresh replica, once per batch size.
    let from = source.node_id();
    let source_digest = digest(&source_client)?;
    for (i, batch) in APPLY_BATCHES.into_iter().enumerate() {
        let number = if i == 0 { "4." } else { "  " };
        let update_pages = read_pages(&mut source, insert_head, update_head, batch)?;
        let target_path = dir.path().join(format!("target-{batch}.db"));
        let target_client = client(&target_path)?;
        target_client.execute_batch(DDL)?;
        let mut target = SqliteStore::open(&target_path, SqliteOptions::new(items_config()?))?;
        let (insert_time, inserted) = apply_pages(&mut target, from, &insert_pages[i])?;
        let (update_time, updated) = apply_pages(&mut target, from, &update_pages)?;
        if digest(&target_client)? != source_digest {
            return Err(format!("replica applied in batches of {batch} differs").into());
        }
        table.rate(
            &format!("{number} apply inserts, batches of {batch}"),
            inserted as u64,
            insert_time,
            "changes/s",
        );
        table.rate(
            &format!("   apply updates, batches of {batch}"),
            updated as u64,
            update_time,
            "changes/s",
        );
        eprintln!("apply in batches of {batch} done");
    }
    // Reading the log, for scale (not part of the apply figures above).
    let start = Instant::now();
    let pages = read_pages(&mut source, LogSeq(0), update_head, 10_000)?;
    let read_time = start.elapsed();
    let read: usize = pages.iter().map(|p| p.0.len()).sum();
    table.rate(
        "   read_log, pages of 10000 (not in apply)",
        read as u64,
        read_time,
        "entries/s",
    );

    println!(
        "{rows} inserts made {insert_changes} changes; {updates} random updates made \
         {update_changes} changes (updates to a row already updated since its last stamp \
         coalesce into one change)"
    );
    println!();
    table.print();
    Ok(())
}
