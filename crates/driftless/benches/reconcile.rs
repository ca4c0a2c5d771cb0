//! Reconciliation between two `driftless run` processes (issue 7): for a table of N rows in which
//! D rows differ, the round trips, bytes each way, wall time and peak RSS of each side of
//! `driftless diff` and `driftless reconcile`.
//!
//! A plain `main()` (no criterion). Every measurement runs once. The rows differ in the merge
//! states, not only in the tables, so the reconciliation protocol has to find them: streaming has
//! nothing to send.
//!
//! 1. **Replica A.** `items(id INTEGER PRIMARY KEY, name TEXT, price REAL, note TEXT, stock
//!    INTEGER)`, rows of about 100 bytes. N rows are inserted by a plain rusqlite connection in
//!    transactions of 10,000. The file is then opened with `SqliteStore` under the node id of
//!    `a`, and `capture(10_000)` runs until nothing is left, so every row has a merge state (in
//!    storage format 2 also its log entry) and its share of the bucket fingerprints. This base
//!    file is built once per run and copied for every D (with `--dir`, it is kept and reused by
//!    later runs).
//! 2. **Replica B.** A copy of the base file whose stored node id (`_driftless_meta.node_id`) is
//!    changed to that of `b`. B then gets D differences: plain-SQL writes (in turn an update of
//!    `price` and `note` of an existing row, an insert of a new row, a delete of an existing row),
//!    stamped by opening B with `SqliteStore`. These changes never replicate: the cursors below
//!    place them behind A's cursor, as if they had been lost on the way. The merge states and
//!    fingerprints stay as they are.
//! 3. **Cursors.** Each file records that it has applied the other's whole log
//!    (`_driftless_cursors`) and that the other has acknowledged its whole log
//!    (`_driftless_peers`), B's D changes included, so the link streams nothing.
//! 4. **Nodes.** `driftless run` for `a` (listens) and `b` (dials `a`), on loopback without TLS,
//!    with `[admin]` on both. Scheduled reconciliation is off (`reconcile_interval_ms = 0`). The
//!    idle digest check and log compaction are pushed out to one hour, so they do not run during
//!    the measurements. The benchmark waits until both sides show the link connected.
//! 5. **Measurements**, through `b`'s admin API (`POST /reconcile`, as `driftless diff` and
//!    `driftless reconcile` do): a diff, a repair, and a second diff that must find nothing (with
//!    `--local-check`, then `diff --local`, which also reads every row of both replicas). For
//!    each step: wall time of the request, the report's round trips and bytes, and each node's
//!    resident set before the step (`VmRSS`) and its peak during the step. The peak is `VmHWM`,
//!    reset through `/proc/PID/clear_refs` just before the step. Both nodes are then stopped,
//!    and the two SQLite files must hold identical `items` tables.
//!
//! ```text
//! cargo bench -p driftless --bench reconcile                  # 1M rows; D = 1, 100, 10000
//! cargo bench -p driftless --bench reconcile -- --big         # 10M rows
//! cargo bench -p driftless --bench reconcile -- --rows 200000 --diffs 1,100 --dir /tmp/rb
//! cargo bench -p driftless --bench reconcile -- --diffs 100 --local-check  # + the full scan
//! ```
//!
//! `--rows N` (or `DRIFTLESS_BENCH_ROWS`), `--big` (10M rows), and `--diffs D1,D2,..` set the
//! sizes. `--dir DIR` keeps the base file in DIR and reuses it in later runs (otherwise everything
//! lives in a temporary directory). `--driftless PATH` picks the binary; the default is the one
//! cargo builds for this benchmark (`CARGO_BIN_EXE_driftless`, release profile).

use driftless_core::{NodeId, TableName};
use driftless_node::node_id_from_name;
use driftless_node::ops::{fetch_status, request_reconcile_with};
use driftless_node::reconcile::ReconcileOptions;
use driftless_node::reconcile::ReconcileReport;
use driftless_sqlite::{SqliteOptions, SqliteStore};
use driftless_store::{CAPTURE_BATCH_ROWS_MAX, Store, TableConfig};
use rusqlite::{Connection, params};
use std::collections::HashSet;
use std::error::Error;
use std::fmt::Write as _;
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const ROWS_DEFAULT: u64 = 1_000_000;
const ROWS_BIG: u64 = 10_000_000;
const DIFFS_DEFAULT: [u64; 3] = [1, 100, 10_000];
/// Client writes per local transaction when building the base file.
const CLIENT_TX_ROWS: u64 = 10_000;
/// How long a started node gets to open its admin port, and the pair to link.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Time given to the link after it came up, so that anything it streams shows in the status.
const SETTLE: Duration = Duration::from_secs(1);
/// `[sync] heartbeat_ms` of both nodes. A link is dropped after 4 heartbeats of silence, and a
/// node sends no heartbeat while its store is busy with one long call. The default of 2 s would
/// drop the link in the middle of a slow reconciliation step; a minute keeps it up so that the
/// step can be measured (`--heartbeat-ms 2000` shows the default's behaviour).
const HEARTBEAT_MS_DEFAULT: u64 = 60_000;
/// Seed of the choice of differing rows.
const SEED: u64 = 0x5eed_0007;
/// The tail of a node's stderr shown when something fails.
const LOG_TAIL_BYTES: usize = 8 * 1024;

const DDL: &str = "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL, \
                   note TEXT, stock INTEGER)";
const INSERT_SQL: &str =
    "INSERT INTO items (id, name, price, note, stock) VALUES (?1, ?2, ?3, ?4, ?5)";
/// Filler for the ~60-byte note (the row number is written in front of it).
const NOTE_FILLER: &str = "lorem ipsum dolor sit amet, consectetur adipiscing elit sed do";

/// Targets of issue 7, for 10M rows and 100 differences.
const TARGET_ROWS: u64 = 10_000_000;
const TARGET_DIFFS: u64 = 100;
const TARGET_ROUND_TRIPS: u64 = 4;
const TARGET_BYTES: u64 = 256 * 1024;
const TARGET_MILLIS: u128 = 1_000;
const TARGET_RSS_KB: u64 = 64 * 1024;

struct Config {
    rows: u64,
    diffs: Vec<u64>,
    driftless: PathBuf,
    dir: Option<PathBuf>,
    heartbeat_ms: u64,
    /// Also measure `diff --local` (the full local check on both sides) after the repair.
    local_check: bool,
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
        diffs: DIFFS_DEFAULT.to_vec(),
        driftless: PathBuf::from(env!("CARGO_BIN_EXE_driftless")),
        dir: None,
        heartbeat_ms: HEARTBEAT_MS_DEFAULT,
        local_check: false,
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
            "--big" => config.rows = ROWS_BIG,
            "--diffs" => {
                config.diffs = value("--diffs")?
                    .split(',')
                    .map(|d| parse_count(d.trim(), "--diffs"))
                    .collect::<Result<_>>()?;
            }
            "--driftless" => config.driftless = PathBuf::from(value("--driftless")?),
            "--dir" => config.dir = Some(PathBuf::from(value("--dir")?)),
            "--local-check" => config.local_check = true,
            "--heartbeat-ms" => {
                config.heartbeat_ms = parse_count(&value("--heartbeat-ms")?, "--heartbeat-ms")?;
            }
            // cargo passes `--bench` to every bench target; other flags are libtest's.
            "--bench" => {}
            "-h" | "--help" => {
                println!(
                    "usage: cargo bench -p driftless --bench reconcile -- [--rows N | --big] \
                     [--diffs D1,D2,..] [--dir DIR] [--driftless PATH] [--heartbeat-ms MS] \
                     [--local-check]\n\
                     (defaults: {ROWS_DEFAULT} rows, --big = {ROWS_BIG}, diffs {DIFFS_DEFAULT:?}, \
                     heartbeat {HEARTBEAT_MS_DEFAULT} ms; env DRIFTLESS_BENCH_ROWS)"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)").into()),
        }
    }
    if config.rows < 3 || config.diffs.is_empty() {
        return Err("--rows must be at least 3 and --diffs must name at least one count".into());
    }
    if let Some(&d) = config
        .diffs
        .iter()
        .find(|&&d| d == 0 || d > config.rows / 3)
    {
        return Err(format!("{d} differences: must be between 1 and rows / 3").into());
    }
    Ok(config)
}

// ---------------------------------------------------------------------------------------------
// Building the replicas
// ---------------------------------------------------------------------------------------------

/// A client connection as a user's app would open it: WAL, `synchronous = NORMAL`.
fn client(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(60))?;
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
    Ok(conn)
}

fn open_store(path: &Path, node: NodeId) -> Result<SqliteStore> {
    let mut options = SqliteOptions::new(vec![TableConfig::new(TableName::new("items")?)]);
    options.node_id = Some(node);
    Ok(SqliteStore::open(path, options)?)
}

/// Stamps every pending local write; returns the number of changes made.
fn stamp_all(store: &mut SqliteStore) -> Result<u64> {
    let mut changes = 0;
    loop {
        let report = store.capture(CAPTURE_BATCH_ROWS_MAX)?;
        if report.refused > 0 {
            return Err(format!("capture refused {} local writes", report.refused).into());
        }
        if report.changes.is_empty() {
            break;
        }
        changes += report.changes.len() as u64;
    }
    if store.pending_local_writes()? != 0 {
        return Err("capture stopped with local writes still pending".into());
    }
    Ok(changes)
}

fn note(id: u64, text: &mut String) {
    text.clear();
    let _ = write!(text, "{id:08} ");
    text.push_str(&NOTE_FILLER[..60 - text.len()]);
}

/// Writes the database file out of its WAL, so that copying the main file copies everything.
fn checkpoint(conn: &Connection) -> Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

/// Replica A's file: `rows` rows inserted by a client, then stamped by A's store. Reused if
/// `path` is complete from an earlier run (a `.done` file next to it).
fn build_base(path: &Path, rows: u64) -> Result<()> {
    let done = path.with_extension("db.done");
    if done.exists() && path.exists() {
        eprintln!("reusing {} ({rows} rows)", path.display());
        return Ok(());
    }
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let started = Instant::now();
    let mut conn = client(path)?;
    conn.execute_batch(DDL)?;
    let mut name = String::with_capacity(16);
    let mut text = String::with_capacity(64);
    let mut id = 1;
    while id <= rows {
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(INSERT_SQL)?;
            let end = (id + CLIENT_TX_ROWS - 1).min(rows);
            for i in id..=end {
                name.clear();
                write!(name, "item-{i:08}")?;
                note(i, &mut text);
                let price = (i % 10_000) as f64 / 100.0;
                stmt.execute(params![i as i64, name, price, text, (i % 1000) as i64])?;
            }
            id = end + 1;
        }
        tx.commit()?;
    }
    let inserted = started.elapsed();
    eprintln!(
        "base: {rows} rows inserted in {:.1} s; stamping",
        inserted.as_secs_f64()
    );
    let mut store = open_store(path, node_id_from_name("a"))?;
    let changes = stamp_all(&mut store)?;
    if changes != rows {
        return Err(format!("stamping {rows} rows made {changes} changes").into());
    }
    drop(store);
    checkpoint(&conn)?;
    drop(conn);
    eprintln!(
        "base: stamped in {:.1} s ({:.0} MB file)",
        (started.elapsed() - inserted).as_secs_f64(),
        std::fs::metadata(path)?.len() as f64 / 1e6
    );
    File::create(&done)?;
    Ok(())
}

fn log_head(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT coalesce(max(seq), 0) FROM _driftless_rows",
        [],
        |r| r.get(0),
    )?)
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The differences made on B.
#[derive(Debug, Default, Clone, Copy)]
struct Diffs {
    updated: u64,
    inserted: u64,
    deleted: u64,
}

impl Diffs {
    fn total(&self) -> u64 {
        self.updated + self.inserted + self.deleted
    }
}

/// `a.db` and `b.db` in `dir` from the base file, with `diffs` differences on B that never
/// replicated, and cursors saying each side has the other's whole log.
fn make_pair(base: &Path, dir: &Path, rows: u64, diffs: u64) -> Result<(PathBuf, PathBuf, Diffs)> {
    let (a_path, b_path) = (dir.join("a.db"), dir.join("b.db"));
    for path in [&a_path, &b_path] {
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        std::fs::copy(base, path)?;
    }
    let (id_a, id_b) = (node_id_from_name("a"), node_id_from_name("b"));

    // B: its own node id, then D writes by a client, stamped by B's store.
    let mut b = client(&b_path)?;
    let changed = b.execute(
        "UPDATE _driftless_meta SET value = ?1 WHERE key = 'node_id'",
        [id_b.to_bytes().to_vec()],
    )?;
    if changed != 1 {
        return Err("no node_id in _driftless_meta of the base file".into());
    }
    let head_before = log_head(&b)?;
    let mut rng = Rng(SEED ^ diffs);
    let mut picked = HashSet::new();
    let mut made = Diffs::default();
    let mut text = String::with_capacity(64);
    {
        let tx = b.transaction()?;
        for i in 0..diffs {
            let id = loop {
                let id = 1 + rng.next() % rows;
                if picked.insert(id) {
                    break id;
                }
            };
            match i % 3 {
                0 => {
                    note(id + 1, &mut text);
                    tx.execute(
                        "UPDATE items SET price = price + 0.5, note = ?1 WHERE id = ?2",
                        params![text, id as i64],
                    )?;
                    made.updated += 1;
                }
                1 => {
                    let new = rows + 1 + i;
                    note(new, &mut text);
                    tx.execute(
                        INSERT_SQL,
                        params![new as i64, format!("item-{new:08}"), 1.25, text, 7],
                    )?;
                    made.inserted += 1;
                }
                _ => {
                    tx.execute("DELETE FROM items WHERE id = ?1", [id as i64])?;
                    made.deleted += 1;
                }
            }
        }
        tx.commit()?;
    }
    let mut store = open_store(&b_path, id_b)?;
    let stamped = stamp_all(&mut store)?;
    drop(store);
    if stamped != diffs {
        return Err(format!("{diffs} writes on B made {stamped} changes").into());
    }
    // The changes never replicated. In storage format 2 the log is the row states (each row's
    // entry moves to the head when it changes), so the entries past `head_before` cannot be
    // deleted without deleting the states too, which would leave B's fingerprints covering
    // rows it no longer has. Instead A's cursor is set to B's head below: A "has" everything
    // B wrote, so B streams nothing, while the states and fingerprints stay as they are: the
    // same replicas as before, found only by reconciliation.
    let past: i64 = b.query_row(
        "SELECT count(*) FROM _driftless_rows WHERE seq > ?1",
        [head_before],
        |r| r.get(0),
    )?;
    if past as u64 != diffs {
        return Err(format!("{past} row states of B past the base, expected {diffs}").into());
    }
    let head_b = log_head(&b)?;

    let a = client(&a_path)?;
    let head_a = log_head(&a)?;
    // Each side has applied the other's whole log, and the other has acknowledged its own.
    for (conn, other, other_head, own_head) in
        [(&a, id_b, head_b, head_a), (&b, id_a, head_a, head_b)]
    {
        conn.execute(
            "INSERT INTO _driftless_cursors (peer, seq) VALUES (?1, ?2)",
            params![other.to_bytes().to_vec(), other_head],
        )?;
        conn.execute(
            "INSERT INTO _driftless_peers (peer, acked) VALUES (?1, ?2)",
            params![other.to_bytes().to_vec(), own_head],
        )?;
        checkpoint(conn)?;
    }
    Ok((a_path, b_path, made))
}

// ---------------------------------------------------------------------------------------------
// Node processes
// ---------------------------------------------------------------------------------------------

/// One `driftless run` process. Dropping it kills the process.
struct Node {
    name: &'static str,
    admin: SocketAddr,
    log: PathBuf,
    child: Child,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        match std::fs::read(&self.log) {
            Ok(bytes) => {
                let start = bytes.len().saturating_sub(LOG_TAIL_BYTES);
                format!(
                    "\n---- {} stderr ({}) ----\n{}",
                    self.name,
                    self.log.display(),
                    String::from_utf8_lossy(&bytes[start..])
                )
            }
            Err(e) => format!("\n(cannot read {}: {e})", self.log.display()),
        }
    }
}

/// Distinct free ports: all are bound at once (so they differ), then released for the nodes.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()?)
}

fn config_text(
    name: &str,
    listen: Option<u16>,
    admin: u16,
    heartbeat_ms: u64,
    dial: Option<(&str, u16)>,
) -> String {
    let mut text = format!(
        "[node]\nname = \"{name}\"\ndata_dir = \"./{name}-data\"\n\n\
         [store]\nkind = \"sqlite\"\npath = \"./{name}.db\"\n\n\
         [[tables]]\nname = \"items\"\n\n\
         [admin]\naddr = \"127.0.0.1:{admin}\"\n\n\
         [sync]\nreconcile_interval_ms = 0\ncheck_interval_ms = 3600000\n\
         compact_interval_ms = 3600000\nheartbeat_ms = {heartbeat_ms}\n"
    );
    if let Some(port) = listen {
        let _ = write!(
            text,
            "\n[listen]\naddr = \"127.0.0.1:{port}\"\ninsecure = true\n"
        );
    }
    if let Some((peer, port)) = dial {
        let _ = write!(
            text,
            "\n[[peers]]\nname = \"{peer}\"\naddr = \"127.0.0.1:{port}\"\ninsecure = true\n"
        );
    }
    text
}

fn spawn(bin: &Path, dir: &Path, name: &'static str, admin: u16, config: &str) -> Result<Node> {
    let config_path = dir.join(format!("{name}.toml"));
    std::fs::write(&config_path, config)?;
    let log = dir.join(format!("{name}.stderr.log"));
    let child = Command::new(bin)
        .arg("run")
        .arg("-c")
        .arg(&config_path)
        .current_dir(dir)
        .env("DRIFTLESS_LOG", "info")
        .env_remove("DRIFTLESS_FAULT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(File::create(&log)?))
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    Ok(Node {
        name,
        admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        log,
        child,
    })
}

fn wait_ready(node: &mut Node) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Some(status) = node.child.try_wait()? {
            return Err(format!(
                "node {} exited during startup with {status}{}",
                node.name,
                node.log_tail()
            )
            .into());
        }
        if TcpStream::connect_timeout(&node.admin, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if started.elapsed() > READY_TIMEOUT {
            return Err(format!(
                "node {} did not open its admin port within {READY_TIMEOUT:?}{}",
                node.name,
                node.log_tail()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `node`'s status shows `peer` connected.
fn wait_link(rt: &Runtime, node: &Node, peer: &str) -> Result<()> {
    let started = Instant::now();
    loop {
        let status = rt.block_on(fetch_status(node.admin));
        if let Ok(status) = &status
            && status.peers.iter().any(|p| p.name == peer && p.connected)
        {
            return Ok(());
        }
        if started.elapsed() > READY_TIMEOUT {
            return Err(format!(
                "{} shows no live link to {peer} after {READY_TIMEOUT:?} (last status: {status:?}){}",
                node.name,
                node.log_tail()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Changes `node` applied from its peers so far (streaming, snapshots and repairs).
fn changes_applied(rt: &Runtime, node: &Node) -> Result<u64> {
    Ok(rt.block_on(fetch_status(node.admin))?.changes_applied)
}

/// `(VmRSS, VmHWM)` of a process, in KiB.
fn memory_kb(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status").into())
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets the process's peak resident set (`VmHWM`) to its current size.
fn reset_peak(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .map_err(|e| format!("cannot reset the peak RSS of {pid}: {e}").into())
}

// ---------------------------------------------------------------------------------------------
// Measurement
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    Diff,
    Repair,
    DiffAfter,
    /// `diff --local`: the local check of both replicas, then the comparison.
    LocalCheck,
}

impl Step {
    fn label(self) -> &'static str {
        match self {
            Step::Diff => "diff",
            Step::Repair => "repair",
            Step::DiffAfter => "diff again",
            Step::LocalCheck => "diff --local",
        }
    }
}

struct Measured {
    rows: u64,
    diffs: u64,
    step: Step,
    /// The report, or why the request failed.
    outcome: std::result::Result<ReconcileReport, String>,
    /// The part of the run spent on the local check, if the report has it.
    local_check_ms: Option<u64>,
    wall: Duration,
    /// `(resident before, peak during)` in KiB, of a and of b.
    rss_a: (u64, u64),
    rss_b: (u64, u64),
}

impl Measured {
    /// Keys `(only here, only there, differing)` as b (the initiator) sees them.
    fn found(&self) -> Option<(u64, u64, u64)> {
        let report = self.outcome.as_ref().ok()?;
        Some(report.tables.iter().fold((0, 0, 0), |(h, t, d), r| {
            (
                h + r.keys_only_here,
                t + r.keys_only_there,
                d + r.keys_differing,
            )
        }))
    }

    fn report(&self) -> Option<&ReconcileReport> {
        self.outcome.as_ref().ok()
    }
}

/// Runs one step through b's admin API. A failed request is recorded, not returned as an error.
fn measure(
    rt: &Runtime,
    a: &Node,
    b: &Node,
    step: Step,
    rows: u64,
    diffs: u64,
) -> Result<Measured> {
    let (before_a, _) = memory_kb(a.pid())?;
    let (before_b, _) = memory_kb(b.pid())?;
    reset_peak(a.pid())?;
    reset_peak(b.pid())?;
    let started = Instant::now();
    let options = ReconcileOptions {
        repair: step == Step::Repair,
        local_check: step == Step::LocalCheck,
    };
    let outcome = rt.block_on(request_reconcile_with(b.admin, "a", Some("items"), options));
    let wall = started.elapsed();
    let (_, peak_a) = memory_kb(a.pid())?;
    let (_, peak_b) = memory_kb(b.pid())?;
    // Read by name, so that the benchmark does not depend on the field being there.
    let local_check_ms = match &outcome {
        Ok(report) => serde_json::to_value(report)?
            .get("local_check_millis")
            .and_then(serde_json::Value::as_u64),
        Err(_) => None,
    };
    Ok(Measured {
        rows,
        diffs,
        step,
        outcome,
        local_check_ms,
        wall,
        rss_a: (before_a, peak_a),
        rss_b: (before_b, peak_b),
    })
}

/// One D: fresh replicas, two nodes, diff / repair / diff, then the replicas must agree. A step
/// that fails is recorded and ends this D (the later steps would fail the same way).
fn run_pair(
    config: &Config,
    rt: &Runtime,
    base: &Path,
    dir: &Path,
    diffs: u64,
) -> Result<Vec<Measured>> {
    let rows = config.rows;
    let prepared = Instant::now();
    let (a_path, b_path, made) = make_pair(base, dir, rows, diffs)?;
    eprintln!(
        "D = {diffs}: replicas ready in {:.1} s ({made:?}); starting nodes",
        prepared.elapsed().as_secs_f64()
    );
    for name in ["a", "b"] {
        let _ = std::fs::remove_dir_all(dir.join(format!("{name}-data")));
    }
    let ports = free_ports(3)?;
    let (listen_a, admin_a, admin_b) = (ports[0], ports[1], ports[2]);
    let heartbeat = config.heartbeat_ms;
    let mut a = spawn(
        &config.driftless,
        dir,
        "a",
        admin_a,
        &config_text("a", Some(listen_a), admin_a, heartbeat, None),
    )?;
    let mut b = spawn(
        &config.driftless,
        dir,
        "b",
        admin_b,
        &config_text("b", None, admin_b, heartbeat, Some(("a", listen_a))),
    )?;
    wait_ready(&mut a)?;
    wait_ready(&mut b)?;
    wait_link(rt, &b, "a")?;
    wait_link(rt, &a, "b")?;
    std::thread::sleep(SETTLE);
    let streamed = (changes_applied(rt, &a)?, changes_applied(rt, &b)?);
    if streamed != (0, 0) {
        return Err(format!(
            "the link streamed changes before reconciliation (applied: a {}, b {}): the cursors \
             are not set up as intended{}{}",
            streamed.0,
            streamed.1,
            a.log_tail(),
            b.log_tail()
        )
        .into());
    }
    let mut out = Vec::new();
    let mut failed = false;
    let mut steps = vec![Step::Diff, Step::Repair, Step::DiffAfter];
    if config.local_check {
        steps.push(Step::LocalCheck);
    }
    for step in steps {
        let m = measure(rt, &a, &b, step, rows, diffs)?;
        match &m.outcome {
            Ok(report) => eprintln!(
                "D = {diffs}: {} in {} ms: {} round trips, {} B sent, {} B received, found {:?}",
                step.label(),
                m.wall.as_millis(),
                report.round_trips,
                report.bytes_sent,
                report.bytes_received,
                m.found()
            ),
            Err(e) => {
                eprintln!(
                    "D = {diffs}: {} FAILED after {} ms: {e}{}{}",
                    step.label(),
                    m.wall.as_millis(),
                    a.log_tail(),
                    b.log_tail()
                );
                out.push(m);
                failed = true;
                break;
            }
        }
        let found = m.found().unwrap_or_default();
        if matches!(step, Step::DiffAfter | Step::LocalCheck) {
            if m.report().is_some_and(ReconcileReport::found_differences) {
                return Err(
                    format!("the replicas still differ after the repair: {found:?}").into(),
                );
            }
        } else {
            // b runs it: B's inserts exist only here; its updates and deletes differ.
            let expected = (made.inserted, 0, made.updated + made.deleted);
            if found != expected || made.total() != diffs {
                return Err(format!(
                    "{}: found (only here, only there, differing) = {found:?}, made {expected:?}",
                    step.label()
                )
                .into());
            }
        }
        out.push(m);
    }
    drop(b);
    drop(a);
    if !failed {
        let digests_a = driftless_node::digest::table_digests(&a_path, &["items"])?;
        let digests_b = driftless_node::digest::table_digests(&b_path, &["items"])?;
        let expected_rows = rows + made.inserted - made.deleted;
        if digests_a != digests_b || digests_a.first().map(|d| d.rows) != Some(expected_rows) {
            return Err(format!(
                "after the repair: a {digests_a:?}, b {digests_b:?}, expected {expected_rows} rows"
            )
            .into());
        }
        eprintln!("D = {diffs}: replicas identical after the repair ({expected_rows} rows)");
    }
    for path in [&a_path, &b_path] {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
    Ok(out)
}

fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mb(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

fn print_table(results: &[Measured]) {
    let header = [
        "rows",
        "diffs",
        "step",
        "found here/there/differing",
        "round trips",
        "bytes b->a",
        "bytes a->b",
        "wall ms",
        "local check ms",
        "RSS a MB (before -> peak)",
        "RSS b MB (before -> peak)",
    ];
    let lines: Vec<Vec<String>> = results
        .iter()
        .map(|m| {
            let mut line = vec![
                thousands(m.rows),
                thousands(m.diffs),
                m.step.label().to_owned(),
            ];
            match m.report().zip(m.found()) {
                Some((report, (here, there, differing))) => line.extend([
                    format!("{here}/{there}/{differing}"),
                    report.round_trips.to_string(),
                    thousands(report.bytes_sent),
                    thousands(report.bytes_received),
                ]),
                None => {
                    let reason = m.outcome.as_ref().err().map_or("no report", String::as_str);
                    line.extend([
                        format!("FAILED: {}", reason.lines().next().unwrap_or("")),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                    ]);
                }
            }
            line.extend([
                thousands(m.wall.as_millis() as u64),
                m.local_check_ms.map_or("-".into(), thousands),
                format!("{} -> {}", mb(m.rss_a.0), mb(m.rss_a.1)),
                format!("{} -> {}", mb(m.rss_b.0), mb(m.rss_b.1)),
            ]);
            line
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let row = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 2 || i == 3 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        println!("| {} |", text.join(" | "));
    };
    row(header.to_vec());
    println!(
        "|{}|",
        widths
            .iter()
            .enumerate()
            .map(|(i, w)| if i == 2 || i == 3 {
                format!(":{}-", "-".repeat(*w))
            } else {
                format!("-{}:", "-".repeat(*w))
            })
            .collect::<Vec<_>>()
            .join("|")
    );
    for line in &lines {
        row(line.iter().map(String::as_str).collect());
    }
}

/// The issue's targets, checked on every diff and repair of 10M rows with 100 differences.
fn print_targets(results: &[Measured]) {
    println!();
    println!(
        "targets (issue 7, {} rows / {TARGET_DIFFS} differences): <= {TARGET_ROUND_TRIPS} round \
         trips, <= {} bytes both ways, <= {TARGET_MILLIS} ms, <= {} MB peak RSS per side",
        thousands(TARGET_ROWS),
        thousands(TARGET_BYTES),
        TARGET_RSS_KB / 1024
    );
    let checked: Vec<&Measured> = results
        .iter()
        .filter(|m| {
            m.rows == TARGET_ROWS
                && m.diffs == TARGET_DIFFS
                && matches!(m.step, Step::Diff | Step::Repair)
        })
        .collect();
    if checked.is_empty() {
        println!("  (not measured in this run: use --big)");
        return;
    }
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    for m in checked {
        let peak = m.rss_a.1.max(m.rss_b.1);
        let wall = format!(
            "wall {} ms ({})",
            thousands(m.wall.as_millis() as u64),
            verdict(m.wall.as_millis() <= TARGET_MILLIS)
        );
        let rss = format!(
            "peak RSS {} MB ({})",
            mb(peak),
            verdict(peak <= TARGET_RSS_KB)
        );
        match m.report() {
            Some(report) => {
                let bytes = report.bytes_sent + report.bytes_received;
                println!(
                    "  {}: round trips {} ({}), bytes {} ({}), {wall}, {rss}",
                    m.step.label(),
                    report.round_trips,
                    verdict(report.round_trips <= TARGET_ROUND_TRIPS),
                    thousands(bytes),
                    verdict(bytes <= TARGET_BYTES),
                );
            }
            None => println!(
                "  {}: FAILED (round trips and bytes unknown: MISSED), {wall}, {rss}",
                m.step.label()
            ),
        }
    }
}

fn main() -> Result<()> {
    let config = config()?;
    if !config.driftless.exists() {
        return Err(format!(
            "no driftless binary at {} (build it with `cargo build --release -p driftless`)",
            config.driftless.display()
        )
        .into());
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("driftless reconciliation benchmark (issue 7)");
    println!(
        "command: cargo bench -p driftless --bench reconcile -- --rows {} --diffs {}",
        config.rows,
        config
            .diffs
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    println!(
        "binary {}; {cores} cores available; SQLite {} (benchmark side)",
        config.driftless.display(),
        rusqlite::version()
    );
    println!();
    let temp;
    let dir = match &config.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let base = dir.join(format!("base-{}.db", config.rows));
    let started = Instant::now();
    build_base(&base, config.rows)?;
    eprintln!(
        "base file ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut results = Vec::new();
    for &diffs in &config.diffs {
        results.extend(run_pair(&config, &rt, &base, &dir, diffs)?);
    }
    println!();
    print_table(&results);
    print_targets(&results);
    Ok(())
}
