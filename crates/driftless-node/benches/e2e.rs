//! End-to-end sync between two SQLite nodes running in this process (`driftless_node::run`),
//! linked over loopback with mutual TLS (certificates from `driftless_tls::TestPki`).
//!
//! A plain `main()` (no criterion): every measurement runs once, in the same process, and the
//! ratios compare figures measured in the same run. All connections use WAL and
//! `synchronous = NORMAL`. Rows are about 100 bytes:
//! `items(id INTEGER PRIMARY KEY, name TEXT, price REAL, note TEXT, stock INTEGER)`.
//!
//! 1. Plain local insert and random-update rates on a file without driftless (the baselines).
//! 2. Sync of inserts: N rows written at the origin by a plain rusqlite connection in
//!    transactions of 10,000, timed from the first write until the destination holds all N.
//! 3. Sync of random updates: U single-row updates of `price` and `stock` at the origin, the
//!    last write of the run being a marker row update, timed until the destination shows the
//!    marker; then the two replicas' digests are compared.
//! 4. Lag at 1,000 single-row transactions per second into `pings`, from the origin's commit to
//!    the row's arrival at the destination, both read from `Instant` in this process.
//! 5. The same lag across the origin's restart and its first compaction pass after the bulk
//!    load (short `compact_interval_ms`). In SQLite storage format 2 the log is the row states
//!    (`_driftless_rows`), so that pass has nothing to drop; the window still shows what a
//!    restart and the pass cost. Then the time of the whole-table reads a node makes under its
//!    store lock (`count(*)` for `table_stats`, a digest for the convergence check), and the
//!    bytes driftless's tables and indexes take next to `items` (`dbstat`).
//!
//! For each phase it also prints where the time went: when the origin's client, its capture
//! and the destination's apply each finished, the nodes' counters, and the CPU time of each
//! thread group (Linux `/proc/self/task/*/schedstat`), with the CPU other processes took.
//!
//! ```text
//! cargo bench -p driftless-node --bench e2e -- --rows 1000000 --updates 200000 --lag-seconds 10
//! ```
//!
//! `--rows N`, `--updates U`, `--lag-seconds S` (or `DRIFTLESS_BENCH_ROWS`,
//! `DRIFTLESS_BENCH_UPDATES`, `DRIFTLESS_BENCH_LAG_SECONDS`); `--batch-changes B` and
//! `--window W` set `[sync] batch_changes_max` and `window_batches` (default: the config
//! defaults); `--compact-ms` and `--check-ms` set `compact_interval_ms` and
//! `check_interval_ms` (default: one hour, so that neither pass lands in a timed window).

use driftless_node::digest::table_digests;
use driftless_node::status::PeerStatus;
use driftless_node::{Config, Listeners, NodeError, NodeStatus};
use driftless_tls::TestPki;
use rusqlite::{Connection, OpenFlags, params};
use std::collections::{HashMap, HashSet};
use std::error::Error;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

const ROWS_DEFAULT: u64 = 1_000_000;
const UPDATES_DEFAULT: u64 = 200_000;
const LAG_SECONDS_DEFAULT: u64 = 10;
/// Client writes per local transaction (inserts and updates alike).
const CLIENT_TX_ROWS: u64 = 10_000;
/// How often the destination is checked during the throughput phases.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(10);
/// How often the lag probes read `max(id)` / the log head (the lag's resolution).
const PROBE_INTERVAL: Duration = Duration::from_micros(100);
/// Single-row transactions per second in the lag phase.
const LAG_RATE: u64 = 1_000;
/// Lag bursts: pings over the lag target less than this many slots apart are one burst.
const BURST_GAP: usize = 20;
const BURSTS_SHOWN: usize = 12;
/// Progress is printed each time a stage (written, captured, applied) passes another multiple
/// of this.
const PROGRESS_EVERY: u64 = 100_000;
/// A phase that makes no progress at all for this long has failed.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Threads per node runtime (a node process on this machine would get one per core).
const NODE_WORKER_THREADS: usize = 2;

/// Issue 13's targets (storage format 2).
const INSERT_RATIO_TARGET: f64 = 0.08;
const UPDATE_RATIO_TARGET: f64 = 0.5;
const LAG_P99_TARGET_MS: f64 = 10.0;
/// `[sync] compact_interval_ms` and `check_interval_ms` of the nodes during phases 2 to 4: long
/// enough that no compaction pass or idle-link digest check lands in a timed window at a point
/// that depends on how fast the earlier phases ran (`--compact-ms` and `--check-ms` override
/// them). Phase 5 runs a compaction pass on purpose; the cost of a digest is timed apart.
const COMPACT_MS_DEFAULT: u64 = 3_600_000;
const CHECK_MS_DEFAULT: u64 = 3_600_000;
/// Phase 5: the origin restarts with this compaction interval, so its first compaction pass
/// runs this long after the start, after the link is up and inside the ping window.
const COMPACT_PROBE_MS: u64 = 8_000;
/// Phase 5: the ping window ends this long after the first compaction pass is due.
const COMPACT_PROBE_AFTER_MS: u64 = 4_000;

const DDL: &str = "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT, \
                   price REAL, note TEXT, stock INTEGER);
                   CREATE TABLE IF NOT EXISTS pings (id INTEGER PRIMARY KEY, sent_us INTEGER);";
const INSERT_SQL: &str =
    "INSERT INTO items (id, name, price, note, stock) VALUES (?1, ?2, ?3, ?4, ?5)";
const UPDATE_SQL: &str = "UPDATE items SET price = ?1, stock = ?2 WHERE id = ?3";
/// Filler for the ~60-byte note (the row number is written in front of it).
const NOTE_FILLER: &str = "lorem ipsum dolor sit amet, consectetur adipiscing elit sed do";
/// Row 0 of `items` is the marker: random updates never touch it, the last write of the update
/// run sets its note to this.
const MARKER_ID: i64 = 0;
const MARKER_DONE: &str = "marker: all updates written";

const ORIGIN: &str = "origin";
const DESTINATION: &str = "destination";
/// Thread names (Linux keeps 15 bytes): they sort the CPU time per thread into groups.
const ORIGIN_RT: &str = "origin-rt";
const DESTINATION_RT: &str = "dest-rt";
const CAPTURE_THREAD: &str = "driftless-captu";
const WRITER_THREAD: &str = "bench-writer";
const PROBE_THREAD: &str = "bench-probe";

struct Options {
    rows: u64,
    updates: u64,
    lag_seconds: u64,
    batch_changes: Option<usize>,
    window: Option<usize>,
    compact_ms: u64,
    check_ms: u64,
}

fn parse_count(text: &str, what: &str) -> Result<u64> {
    text.replace('_', "")
        .parse()
        .map_err(|e| format!("{what}: cannot read {text:?} as a count: {e}").into())
}

fn options() -> Result<Options> {
    let env = |name: &str, default: u64| -> Result<u64> {
        match std::env::var(name) {
            Ok(v) => parse_count(&v, name),
            Err(_) => Ok(default),
        }
    };
    let mut options = Options {
        rows: env("DRIFTLESS_BENCH_ROWS", ROWS_DEFAULT)?,
        updates: env("DRIFTLESS_BENCH_UPDATES", UPDATES_DEFAULT)?,
        lag_seconds: env("DRIFTLESS_BENCH_LAG_SECONDS", LAG_SECONDS_DEFAULT)?,
        batch_changes: None,
        window: None,
        compact_ms: COMPACT_MS_DEFAULT,
        check_ms: CHECK_MS_DEFAULT,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = |flag: &str| -> Result<u64> {
            match inline.clone().or_else(|| args.next()) {
                Some(v) => parse_count(&v, flag),
                None => Err(format!("{flag} needs a value").into()),
            }
        };
        match flag.as_str() {
            "--rows" => options.rows = value("--rows")?,
            "--updates" => options.updates = value("--updates")?,
            "--lag-seconds" => options.lag_seconds = value("--lag-seconds")?,
            "--batch-changes" => options.batch_changes = Some(value("--batch-changes")? as usize),
            "--window" => options.window = Some(value("--window")? as usize),
            "--compact-ms" => options.compact_ms = value("--compact-ms")?,
            "--check-ms" => options.check_ms = value("--check-ms")?,
            // cargo passes `--bench` to every bench target; other flags are libtest's.
            "--bench" => {}
            "-h" | "--help" => {
                println!(
                    "usage: cargo bench -p driftless-node --bench e2e -- [--rows N] \
                     [--updates U] [--lag-seconds S] [--batch-changes B] [--window W] \
                     [--compact-ms MS] [--check-ms MS]\n\
                     (env: DRIFTLESS_BENCH_ROWS, DRIFTLESS_BENCH_UPDATES, \
                     DRIFTLESS_BENCH_LAG_SECONDS; defaults {ROWS_DEFAULT}, {UPDATES_DEFAULT}, \
                     {LAG_SECONDS_DEFAULT}; batch and window default to the config defaults, \
                     compaction and idle-link digest checks to every {COMPACT_MS_DEFAULT} ms)"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)").into()),
        }
    }
    if options.rows == 0 || options.updates == 0 || options.lag_seconds == 0 {
        return Err("--rows, --updates and --lag-seconds must be at least 1".into());
    }
    Ok(options)
}

// ---------------------------------------------------------------------------------------------
// Client writes (the same code for the baseline file and the origin's file)

/// A client connection as a user's app would open it: WAL, `synchronous = NORMAL`.
fn client(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
    Ok(conn)
}

/// A read-only connection for polling.
fn reader(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// Inserts rows `1..=rows` in transactions of `CLIENT_TX_ROWS` with one prepared statement.
/// `written` counts committed rows. Returns the time of the last commit since `start`.
fn insert_rows(
    conn: &mut Connection,
    rows: u64,
    start: Instant,
    written: &AtomicU64,
) -> Result<Duration> {
    let mut name = String::with_capacity(16);
    let mut note = String::with_capacity(64);
    let mut id = 1;
    while id <= rows {
        let tx = conn.transaction()?;
        let end = (id + CLIENT_TX_ROWS - 1).min(rows);
        {
            let mut stmt = tx.prepare_cached(INSERT_SQL)?;
            for i in id..=end {
                name.clear();
                write!(name, "item-{i:08}")?;
                note.clear();
                write!(note, "{i:08} ")?;
                note.push_str(&NOTE_FILLER[..60 - note.len()]);
                let price = (i % 10_000) as f64 / 100.0;
                stmt.execute(params![i as i64, name, price, note, (i % 1000) as i64])?;
            }
        }
        tx.commit()?;
        written.store(end, Ordering::Relaxed);
        id = end + 1;
    }
    Ok(start.elapsed())
}

/// SplitMix64: the same seed gives the same updates on the baseline and at the origin.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `updates` random single-row updates of `price` and `stock` over rows `1..=rows`, in
/// transactions of `CLIENT_TX_ROWS`. With `marker`, the last statement of the last transaction
/// sets the marker row's note. Returns the time of the last commit since `start`.
fn update_rows(
    conn: &mut Connection,
    rows: u64,
    updates: u64,
    seed: u64,
    marker: bool,
    start: Instant,
    written: &AtomicU64,
) -> Result<Duration> {
    let mut rng = SplitMix64(seed);
    let mut done = 0;
    while done < updates {
        let tx = conn.transaction()?;
        let end = (done + CLIENT_TX_ROWS).min(updates);
        {
            let mut stmt = tx.prepare_cached(UPDATE_SQL)?;
            for _ in done..end {
                let id = 1 + rng.below(rows) as i64;
                let price = rng.below(1_000_000) as f64 / 100.0;
                let stock = rng.below(100_000) as i64;
                let changed = stmt.execute(params![price, stock, id])?;
                if changed != 1 {
                    return Err(format!("update of row {id} changed {changed} rows").into());
                }
            }
            if marker && end == updates {
                tx.execute(
                    "UPDATE items SET note = ?1 WHERE id = ?2",
                    params![MARKER_DONE, MARKER_ID],
                )?;
            }
        }
        tx.commit()?;
        written.store(end, Ordering::Relaxed);
        done = end;
    }
    Ok(start.elapsed())
}

fn query_u64(conn: &Connection, sql: &str) -> Result<u64> {
    let value: i64 = conn.query_row(sql, [], |r| r.get(0))?;
    Ok(value.max(0) as u64)
}

/// The log's head. Storage format 2 keeps one entry per row, whose `seq` moves to the head at
/// each change of the row, so the head grows by one per row state saved.
const LOG_HEAD_SQL: &str = "SELECT coalesce(max(seq), 0) FROM _driftless_rows";

// ---------------------------------------------------------------------------------------------
// Nodes

/// A node started in this process on its own tokio runtime (so its threads can be told apart).
struct Node {
    name: &'static str,
    db: PathBuf,
    admin: SocketAddr,
    runtime: Runtime,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::result::Result<(), NodeError>>>,
    /// The runtime's worker threads (its later threads with the same name are the blocking
    /// pool, which runs the store calls).
    workers: HashSet<u32>,
}

fn node_runtime(thread_name: &str) -> Result<(Runtime, HashSet<u32>)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(NODE_WORKER_THREADS)
        .thread_name(thread_name)
        // Idle blocking threads would exit after 10 s and take their CPU time with them.
        .thread_keep_alive(Duration::from_secs(3_600))
        .enable_all()
        .build()?;
    // Workers start with the runtime; give them a moment to appear in /proc.
    let mut workers = HashSet::new();
    for _ in 0..100 {
        workers = threads_named(thread_name);
        if workers.len() >= NODE_WORKER_THREADS {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok((runtime, workers))
}

fn sync_section(options: &Options, compact_ms: u64) -> String {
    let mut text = format!(
        "[sync]\ncompact_interval_ms = {compact_ms}\ncheck_interval_ms = {}\n",
        options.check_ms
    );
    if let Some(b) = options.batch_changes {
        text.push_str(&format!("batch_changes_max = {b}\n"));
    }
    if let Some(w) = options.window {
        text.push_str(&format!("window_batches = {w}\n"));
    }
    text
}

fn node_config(name: &str, admin: SocketAddr, network: &str, sync: &str) -> String {
    format!(
        "[node]\nname = \"{name}\"\ndata_dir = \"./{name}\"\n\n\
         [store]\nkind = \"sqlite\"\npath = \"./{name}.db\"\n\n\
         [[tables]]\nname = \"items\"\n\n[[tables]]\nname = \"pings\"\n\n\
         {network}\n\n[admin]\naddr = \"{admin}\"\n\n{sync}"
    )
}

impl Node {
    /// Creates the node's database with the tables, writes its config and starts it.
    fn start(
        dir: &Path,
        name: &'static str,
        runtime: (Runtime, HashSet<u32>),
        peers: Option<TcpListener>,
        network: &str,
        sync: &str,
    ) -> Result<Node> {
        let (runtime, workers) = runtime;
        let admin = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let admin_addr = admin.local_addr()?;
        let db = dir.join(format!("{name}.db"));
        client(&db)?.execute_batch(DDL)?;
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, node_config(name, admin_addr, network, sync))?;
        let config = Config::load(&config_path)?;
        let listeners = Listeners {
            peers,
            admin: Some(admin),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = runtime.spawn(driftless_node::run(config, listeners, async move {
            let _ = stopped.await;
        }));
        let node = Node {
            name,
            db,
            admin: admin_addr,
            runtime,
            stop: Some(stop),
            task: Some(task),
            workers,
        };
        // The admin API answers once the store is open and the capture poller runs.
        let started = Instant::now();
        while node.status().is_err() {
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("node {name} did not start within 30 s").into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(node)
    }

    fn status(&self) -> Result<NodeStatus> {
        Ok(self
            .runtime
            .block_on(driftless_node::ops::fetch_status(self.admin))?)
    }

    fn stop(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            self.runtime
                .block_on(task)?
                .map_err(|e| format!("node {}: {e}", self.name))?;
        }
        Ok(())
    }
}

/// Waits until both ends report the link as connected.
fn wait_linked(origin: &Node, destination: &Node) -> Result<()> {
    let started = Instant::now();
    loop {
        let (o, d) = (origin.status()?, destination.status()?);
        if peer(&o, DESTINATION).is_some_and(|p| p.connected)
            && peer(&d, ORIGIN).is_some_and(|p| p.connected)
        {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(format!("the nodes did not link within 30 s: {o:?} {d:?}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn peer<'a>(status: &'a NodeStatus, name: &str) -> Option<&'a PeerStatus> {
    status.peers.iter().find(|p| p.name == name)
}

/// Counters of both nodes at a phase boundary.
struct Counters {
    origin: NodeStatus,
    destination: NodeStatus,
    origin_log: u64,
}

fn counters(origin: &Node, destination: &Node) -> Result<Counters> {
    Ok(Counters {
        origin: origin.status()?,
        destination: destination.status()?,
        origin_log: query_u64(&reader(&origin.db)?, LOG_HEAD_SQL)?,
    })
}

/// What the nodes' own counters say about a phase.
fn counter_lines(before: &Counters, after: &Counters) -> Vec<String> {
    let link = |s: &NodeStatus, p: &str| peer(s, p).cloned().unwrap_or_default();
    let (ob, oa) = (
        link(&before.origin, DESTINATION),
        link(&after.origin, DESTINATION),
    );
    let (db, da) = (
        link(&before.destination, ORIGIN),
        link(&after.destination, ORIGIN),
    );
    let stamped = after.origin_log - before.origin_log;
    let by_poller = after.origin.changes_captured - before.origin.changes_captured;
    vec![
        format!(
            "origin log grew by {} changes; its capture poller counted {} of them \
             (changes_captured), the other {} were stamped inside the origin's apply of \
             batches from the destination",
            thousands(stamped as f64),
            thousands(by_poller as f64),
            thousands(stamped.saturating_sub(by_poller) as f64),
        ),
        format!(
            "origin -> destination: {} batches sent; destination applied {} changes in {} batches",
            thousands((oa.batches_sent - ob.batches_sent) as f64),
            thousands((da.changes_applied - db.changes_applied) as f64),
            thousands((da.batches_received - db.batches_received) as f64),
        ),
        format!(
            "destination -> origin: {} batches sent back (the destination's log holds the \
             applied changes; it reads them and sends batches with them filtered out), origin \
             applied {} of them ({} changes), one write transaction each",
            thousands((da.batches_sent - db.batches_sent) as f64),
            thousands((oa.batches_received - ob.batches_received) as f64),
            thousands((oa.changes_applied - ob.changes_applied) as f64),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// CPU time per thread group (Linux: /proc/self/task/*/schedstat, nanoseconds on a CPU)

fn thread_cpu() -> HashMap<u32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let path = entry.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok());
        if let Some(ns) = ns {
            out.insert(tid, (comm.trim().to_owned(), ns));
        }
    }
    out
}

fn threads_named(name: &str) -> HashSet<u32> {
    thread_cpu()
        .into_iter()
        .filter(|(_, (comm, _))| comm == name)
        .map(|(tid, _)| tid)
        .collect()
}

/// CPU time of the calling thread so far.
fn own_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A bench thread's result and its own CPU time. Bench threads have exited by the time the
/// CPU report is made, so they report their time themselves.
struct Timed<T> {
    value: T,
    cpu_ns: u64,
}

type BenchThread<T> = std::thread::JoinHandle<Result<Timed<T>>>;

fn spawn_bench<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> BenchThread<T> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let value = work()?;
            Ok(Timed {
                value,
                cpu_ns: own_cpu_ns(),
            })
        })
        .expect("spawn a bench thread")
}

fn join<T>(thread: BenchThread<T>) -> Result<Timed<T>> {
    thread.join().map_err(|_| "a bench thread panicked")?
}

/// Busy and total jiffies of the whole machine (first line of /proc/stat).
fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4)?;
    Some((total - idle, total))
}

struct CpuSnapshot {
    threads: HashMap<u32, (String, u64)>,
    machine: Option<(u64, u64)>,
    at: Instant,
}

fn cpu_snapshot() -> CpuSnapshot {
    CpuSnapshot {
        threads: thread_cpu(),
        machine: machine_jiffies(),
        at: Instant::now(),
    }
}

/// Sorts threads into groups by name and by the thread sets recorded at start-up.
struct Groups {
    main: u32,
    origin_workers: HashSet<u32>,
    destination_workers: HashSet<u32>,
    origin_poller: HashSet<u32>,
}

const GROUP_WRITER: usize = 0;
const GROUP_PROBES: usize = 8;
const GROUPS: [&str; 10] = [
    "origin client (plain rusqlite writer)",
    "origin capture poller (stamping)",
    "origin store calls (read_log, acks, apply of returned batches)",
    "origin tokio workers (TLS, frames, LZ4)",
    "destination store calls (apply_batch)",
    "destination tokio workers (TLS, frames, LZ4)",
    "destination capture poller (idle checks)",
    "bench main thread (follows progress)",
    "bench lag probes",
    "other threads",
];

impl Groups {
    fn group(&self, tid: u32, comm: &str) -> usize {
        match comm {
            _ if tid == self.main => 7,
            WRITER_THREAD => GROUP_WRITER,
            CAPTURE_THREAD if self.origin_poller.contains(&tid) => 1,
            CAPTURE_THREAD => 6,
            ORIGIN_RT if self.origin_workers.contains(&tid) => 3,
            ORIGIN_RT => 2,
            DESTINATION_RT if self.destination_workers.contains(&tid) => 5,
            DESTINATION_RT => 4,
            PROBE_THREAD => GROUP_PROBES,
            _ => 9,
        }
    }

    /// CPU seconds per group between two snapshots (bench threads report their own, as
    /// `(group, ns)`), and the lines to print.
    fn report(
        &self,
        before: &CpuSnapshot,
        after: &CpuSnapshot,
        bench_threads: &[(usize, u64)],
    ) -> Vec<String> {
        if after.threads.is_empty() {
            return vec!["(no per-thread CPU times: /proc/self/task is not readable)".into()];
        }
        let mut seconds = [0f64; GROUPS.len()];
        for (group, ns) in bench_threads {
            seconds[*group] += *ns as f64 / 1e9;
        }
        for (tid, (comm, ns)) in &after.threads {
            if comm == WRITER_THREAD || comm == PROBE_THREAD {
                continue;
            }
            let start = before.threads.get(tid).map_or(0, |(_, ns)| *ns);
            seconds[self.group(*tid, comm)] += ns.saturating_sub(start) as f64 / 1e9;
        }
        let wall = (after.at - before.at).as_secs_f64();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let ours: f64 = seconds.iter().sum();
        let mut lines = vec![format!(
            "CPU time by thread group over {wall:.2} s wall ({:.2} core-seconds on {cores:.0} \
             cores); this process used {ours:.2}",
            wall * cores
        )];
        if let (Some((b0, t0)), Some((b1, t1))) = (before.machine, after.machine) {
            let busy = (b1 - b0) as f64 / (t1 - t0).max(1) as f64 * wall * cores;
            lines.push(format!(
                "  whole machine busy {busy:.2} core-seconds, so other processes used about {:.2}",
                (busy - ours).max(0.0)
            ));
        }
        let width = GROUPS.iter().map(|g| g.len()).max().unwrap_or(0);
        for (group, s) in GROUPS.iter().zip(seconds) {
            if s >= 0.005 {
                lines.push(format!(
                    "  {group:<width$}  {s:>6.2} s  ({:>3.0}% of wall)",
                    100.0 * s / wall
                ));
            }
        }
        lines
    }
}

// ---------------------------------------------------------------------------------------------
// Following a throughput phase

#[derive(Clone, Copy)]
struct Sample {
    t: Duration,
    written: u64,
    captured: u64,
    applied: u64,
}

type Check<'a> = dyn FnMut(&Sample) -> Result<bool> + 'a;

/// Per-phase polls: what the origin's client has written, what the origin has captured into
/// its log, what the destination has applied, and whether the destination is complete.
struct Probes<'a> {
    written: &'a AtomicU64,
    captured: Box<dyn FnMut() -> Result<u64> + 'a>,
    applied: Box<dyn FnMut() -> Result<u64> + 'a>,
    complete: Box<Check<'a>>,
}

/// Polls every `FOLLOW_INTERVAL` (on a deadline schedule) until the destination is complete;
/// prints progress each time `applied` passes a multiple of `PROGRESS_EVERY`.
fn follow(what: &str, start: Instant, mut probes: Probes<'_>) -> Result<(Duration, Vec<Sample>)> {
    let mut samples: Vec<Sample> = Vec::new();
    let mut next = start;
    let mut printed = (0, 0, 0);
    let mut last_progress = (Instant::now(), (0, 0, 0));
    loop {
        next += FOLLOW_INTERVAL;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
        let written = probes.written.load(Ordering::Relaxed);
        let captured = (probes.captured)()?;
        let applied = (probes.applied)()?;
        let sample = Sample {
            t: start.elapsed(),
            written,
            captured,
            applied,
        };
        samples.push(sample);
        let steps = (
            written / PROGRESS_EVERY,
            captured / PROGRESS_EVERY,
            applied / PROGRESS_EVERY,
        );
        if steps != printed {
            printed = steps;
            eprintln!(
                "  {what} {:>6.2} s: origin {:>9} written, {:>9} captured; destination {:>9}",
                sample.t.as_secs_f64(),
                thousands(written as f64),
                thousands(captured as f64),
                thousands(applied as f64),
            );
        }
        if (probes.complete)(&sample)? {
            return Ok((sample.t, samples));
        }
        let state = (written, captured, applied);
        if state != last_progress.1 {
            last_progress = (Instant::now(), state);
        } else if last_progress.0.elapsed() > STALL_TIMEOUT {
            return Err(format!(
                "{what}: no progress for {STALL_TIMEOUT:?} (written {written}, captured \
                 {captured}, applied {applied})"
            )
            .into());
        }
    }
}

/// When each stage finished and how far behind the next one fell.
fn stage_lines(
    samples: &[Sample],
    writes: u64,
    writer_done: Duration,
    changes: u64,
    total: Duration,
    unit: &str,
) -> Vec<String> {
    let first = |f: &dyn Fn(&Sample) -> bool| samples.iter().find(|s| f(s)).map(|s| s.t);
    let secs =
        |t: Option<Duration>| t.map_or("?".to_owned(), |t| format!("{:.2} s", t.as_secs_f64()));
    let rate = |n: u64, t: Option<Duration>| t.map_or("?".to_owned(), |t| thousands(per_sec(n, t)));
    let captured_all = first(&|s| s.captured >= changes);
    let backlog_capture = samples
        .iter()
        .max_by_key(|s| s.written.saturating_sub(s.captured))
        .map_or(0, |s| s.written.saturating_sub(s.captured));
    let backlog_apply = samples
        .iter()
        .max_by_key(|s| s.captured.saturating_sub(s.applied))
        .copied();
    let at_writer_done = samples.iter().find(|s| s.t >= writer_done).copied();
    let mut lines = vec![
        format!(
            "origin client committed all {} {unit} at {:.2} s ({} {unit}/s while the nodes ran)",
            thousands(writes as f64),
            writer_done.as_secs_f64(),
            thousands(per_sec(writes, writer_done)),
        ),
        format!(
            "origin log held all {} changes at {} ({} changes/s from the first write)",
            thousands(changes as f64),
            secs(captured_all),
            rate(changes, captured_all),
        ),
        format!(
            "destination complete at {:.2} s ({} changes/s from the first write)",
            total.as_secs_f64(),
            thousands(per_sec(changes, total)),
        ),
    ];
    if let Some(s) = at_writer_done {
        lines.push(format!(
            "when the client finished: {} changes captured, {} applied at the destination",
            thousands(s.captured as f64),
            thousands(s.applied as f64),
        ));
    }
    if let Some(c) = captured_all {
        let applied_then = samples.iter().find(|s| s.t >= c).map_or(0, |s| s.applied);
        lines.push(format!(
            "when capture finished: {} applied; the last {} took the destination {:.2} s more",
            thousands(applied_then as f64),
            thousands(changes.saturating_sub(applied_then) as f64),
            (total.saturating_sub(c)).as_secs_f64(),
        ));
    }
    lines.push(format!(
        "largest backlogs: written but not captured {}, captured but not applied {}{}",
        thousands(backlog_capture as f64),
        thousands(backlog_apply.map_or(0, |s| s.captured.saturating_sub(s.applied)) as f64),
        backlog_apply.map_or(String::new(), |s| format!(
            " (at {:.2} s)",
            s.t.as_secs_f64()
        )),
    ));
    lines
}

// ---------------------------------------------------------------------------------------------
// Lag

/// Polls `sql` (a `max(...)` that grows by one per ping) every `PROBE_INTERVAL` on a thread and
/// records when each value was first seen. Returns `(times indexed by value - base, polls)`.
fn probe(
    path: PathBuf,
    sql: &'static str,
    base: u64,
    total: u64,
    deadline: Instant,
) -> BenchThread<(Vec<Option<Instant>>, u64)> {
    spawn_bench(PROBE_THREAD, move || {
        let conn = reader(&path)?;
        let mut stmt = conn.prepare(sql)?;
        let mut seen = vec![None; total as usize + 1];
        let mut last = 0u64;
        let mut polls = 0u64;
        while last < total && Instant::now() < deadline {
            let value: i64 = stmt.query_row([], |r| r.get(0))?;
            let now = Instant::now();
            polls += 1;
            let value = (value.max(0) as u64).saturating_sub(base).min(total);
            for slot in seen
                .iter_mut()
                .take(value as usize + 1)
                .skip(last as usize + 1)
            {
                *slot = Some(now);
            }
            last = last.max(value);
            std::thread::sleep(PROBE_INTERVAL);
        }
        Ok((seen, polls))
    })
}

struct LagResult {
    pings: u64,
    lags_ms: Vec<f64>,
    capture_ms: Vec<f64>,
    delivery_ms: Vec<f64>,
    late_max_ms: f64,
    sent_over: Duration,
    probe_interval_us: f64,
    /// CPU time of the writer and the probes, as `(group, ns)`.
    bench_cpu: Vec<(usize, u64)>,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// One row per millisecond into `pings` at the origin (ids `first_id..first_id + total`);
/// arrival at the destination probed.
fn measure_lag(origin: &Path, destination: &Path, first_id: u64, total: u64) -> Result<LagResult> {
    let origin_base = query_u64(&reader(origin)?, LOG_HEAD_SQL)?;
    let deadline = Instant::now() + Duration::from_millis(total) + Duration::from_secs(60);
    let arrivals = probe(
        destination.to_path_buf(),
        "SELECT coalesce(max(id), 0) FROM pings",
        first_id - 1,
        total,
        deadline,
    );
    let captures = probe(
        origin.to_path_buf(),
        LOG_HEAD_SQL,
        origin_base,
        total,
        deadline,
    );
    let path = origin.to_path_buf();
    let writer = spawn_bench(
        WRITER_THREAD,
        move || -> Result<(Vec<Instant>, f64, Duration)> {
            let conn = client(&path)?;
            let mut stmt = conn.prepare("INSERT INTO pings (id, sent_us) VALUES (?1, ?2)")?;
            let mut commits = Vec::with_capacity(total as usize + 1);
            let mut late_max = Duration::ZERO;
            let t0 = Instant::now() + Duration::from_millis(50);
            let period = Duration::from_secs(1) / LAG_RATE as u32;
            for i in 1..=total {
                let id = first_id + i - 1;
                let due = t0 + period * (i - 1) as u32;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let sent = Instant::now();
                late_max = late_max.max(sent - due);
                stmt.execute(params![id as i64, (sent - t0).as_micros() as i64])?;
                commits.push(Instant::now());
            }
            let over = commits.last().map_or(Duration::ZERO, |c| *c - t0);
            Ok((commits, late_max.as_secs_f64() * 1e3, over))
        },
    );
    let writer = join(writer)?;
    let arrivals = join(arrivals)?;
    let captures = join(captures)?;
    let bench_cpu = vec![
        (GROUP_WRITER, writer.cpu_ns),
        (GROUP_PROBES, arrivals.cpu_ns + captures.cpu_ns),
    ];
    let (commits, late_max_ms, sent_over) = writer.value;
    let (arrived, polls) = arrivals.value;
    let (captured, _) = captures.value;
    let probe_window = arrived
        .last()
        .copied()
        .flatten()
        .zip(commits.first())
        .map_or(0.0, |(a, c)| (a - *c).as_secs_f64());
    let ms = |later: Instant, earlier: Instant| {
        if later >= earlier {
            (later - earlier).as_secs_f64() * 1e3
        } else {
            -((earlier - later).as_secs_f64() * 1e3)
        }
    };
    let mut result = LagResult {
        pings: total,
        lags_ms: Vec::new(),
        capture_ms: Vec::new(),
        delivery_ms: Vec::new(),
        late_max_ms,
        sent_over,
        probe_interval_us: probe_window * 1e6 / polls.max(1) as f64,
        bench_cpu,
    };
    for (i, commit) in commits.iter().enumerate() {
        let id = i + 1;
        let Some(arrival) = arrived[id] else {
            return Err(
                format!("ping {} never reached the destination", first_id + i as u64).into(),
            );
        };
        result.lags_ms.push(ms(arrival, *commit));
        if let Some(capture) = captured[id] {
            result.capture_ms.push(ms(capture, *commit));
            result.delivery_ms.push(ms(arrival, capture));
        }
    }
    if captured.iter().skip(1).any(Option::is_none) {
        return Err("the origin's log did not grow by exactly one entry per ping".into());
    }
    Ok(result)
}

/// The detail lines of a lag run.
fn lag_lines(lag: &LagResult, poll_interval_ms: u64) -> Vec<String> {
    let lags = sorted(lag.lags_ms.clone());
    let capture = sorted(lag.capture_ms.clone());
    let delivery = sorted(lag.delivery_ms.clone());
    let max = |v: &[f64]| v.last().copied().unwrap_or(f64::NAN);
    // Pings over the target, grouped into bursts (slots less than BURST_GAP apart).
    let mut bursts: Vec<(usize, usize, f64)> = Vec::new();
    for (slot, &ms) in lag.lags_ms.iter().enumerate() {
        if ms <= LAG_P99_TARGET_MS {
            continue;
        }
        match bursts.last_mut() {
            Some(b) if slot <= b.1 + BURST_GAP => {
                b.1 = slot;
                b.2 = b.2.max(ms);
            }
            _ => bursts.push((slot, slot, ms)),
        }
    }
    let over = lag
        .lags_ms
        .iter()
        .filter(|&&ms| ms > LAG_P99_TARGET_MS)
        .count();
    let shown: Vec<String> = bursts
        .iter()
        .take(BURSTS_SHOWN)
        .map(|(a, b, m)| format!("{a}-{b} ({m:.0} ms)"))
        .collect();
    vec![
        format!(
            "{} pings committed over {:.3} s (one per ms on a deadline schedule; latest start \
             {:.2} ms after its slot)",
            thousands(lag.pings as f64),
            lag.sent_over.as_secs_f64(),
            lag.late_max_ms
        ),
        format!(
            "resolution: the probes poll every {:.0} us on average (asked for {} us), so each \
             figure is up to one poll interval late",
            lag.probe_interval_us,
            PROBE_INTERVAL.as_micros()
        ),
        format!(
            "commit -> in the origin's log (capture poller, poll_interval_ms {poll_interval_ms}): \
             p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(&capture, 0.5),
            percentile(&capture, 0.99),
            max(&capture)
        ),
        format!(
            "in the origin's log -> visible at the destination (read_log, TLS, apply): p50 \
             {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(&delivery, 0.5),
            percentile(&delivery, 0.99),
            max(&delivery)
        ),
        format!(
            "total: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            percentile(&lags, 0.5),
            percentile(&lags, 0.9),
            percentile(&lags, 0.99),
            percentile(&lags, 0.999),
            max(&lags)
        ),
        format!(
            "{} pings over {LAG_P99_TARGET_MS} ms, in {} bursts; by slot (ms after the first \
             ping) and worst lag: {}{}",
            thousands(over as f64),
            bursts.len(),
            if shown.is_empty() {
                "none".to_owned()
            } else {
                shown.join(", ")
            },
            if bursts.len() > BURSTS_SHOWN {
                ", ..."
            } else {
                ""
            }
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Output

fn per_sec(count: u64, time: Duration) -> f64 {
    count as f64 / time.as_secs_f64()
}

fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value);
    let (sign, digits) = match digits.strip_prefix('-') {
        Some(d) => ("-", d.to_owned()),
        None => ("", digits),
    };
    let mut out = String::from(sign);
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

    fn ratio(&mut self, what: &str, ratio: f64, target: f64) {
        let verdict = if ratio >= target {
            format!("target >= {target}: met")
        } else {
            format!("target >= {target}: MISSED")
        };
        self.lines
            .push((what.to_owned(), format!("{ratio:.3}"), verdict));
    }

    fn ms(&mut self, what: &str, value: f64, detail: String) {
        self.lines
            .push((what.to_owned(), format!("{value:.2} ms"), detail));
    }

    fn print(&self) {
        let w0 = self.lines.iter().map(|l| l.0.len()).max().unwrap_or(0);
        let w1 = self.lines.iter().map(|l| l.1.len()).max().unwrap_or(0);
        for (a, b, c) in &self.lines {
            println!("  {a:<w0$}  {b:>w1$}  {c}");
        }
    }
}

/// The bytes every `_driftless_` table and index takes in a file next to `items` (and
/// `pings`), from `dbstat`. An index counts under its table (`sqlite_schema.tbl_name`), so the
/// automatic indexes of UNIQUE constraints (`sqlite_autoindex__driftless_...`) count too.
fn storage_lines(path: &Path, node: &str) -> Result<Vec<String>> {
    let conn = reader(path)?;
    let mut stmt = conn.prepare(
        "SELECT d.name, coalesce(s.tbl_name, d.name), sum(d.pgsize) FROM dbstat AS d \
         LEFT JOIN sqlite_schema AS s ON s.name = d.name GROUP BY d.name",
    )?;
    let mut ours: Vec<(String, u64)> = Vec::new();
    let (mut items, mut pings) = (0u64, 0u64);
    for row in stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })? {
        let (name, table, bytes) = row?;
        let bytes = bytes.max(0) as u64;
        match table.as_str() {
            "items" => items += bytes,
            "pings" => pings += bytes,
            t if t.starts_with("_driftless_") => ours.push((name, bytes)),
            _ => {}
        }
    }
    ours.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let total: u64 = ours.iter().map(|(_, b)| b).sum();
    let log: u64 = ours
        .iter()
        .filter(|(n, _)| n == "_driftless_rows" || n == "_driftless_rows_key")
        .map(|(_, b)| b)
        .sum();
    let mb = |bytes: u64| format!("{:.1} MB", bytes as f64 / 1e6);
    let shown: Vec<String> = ours
        .iter()
        .map(|(n, b)| format!("{n} {}", mb(*b)))
        .collect();
    Ok(vec![
        format!(
            "{node}: items {}, pings {}; driftless's tables and indexes {} = {:.3} x items \
             (the log, _driftless_rows + _driftless_rows_key, {}; it also holds the pings' \
             states)",
            mb(items),
            mb(pings),
            mb(total),
            total as f64 / items.max(1) as f64,
            mb(log),
        ),
        format!("  {}", shown.join(", ")),
    ])
}

fn print_lines(title: &str, lines: &[String]) {
    println!("{title}");
    for line in lines {
        println!("  {line}");
    }
}

// ---------------------------------------------------------------------------------------------

fn main() -> Result<()> {
    let options = options()?;
    let (rows, updates, lag_seconds) = (options.rows, options.updates, options.lag_seconds);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "driftless end-to-end benchmark: two SQLite nodes in one process, mutual TLS over loopback"
    );
    println!(
        "command: cargo bench -p driftless-node --bench e2e -- --rows {rows} --updates {updates} \
         --lag-seconds {lag_seconds}{}{}{}{}",
        options
            .batch_changes
            .map_or(String::new(), |b| format!(" --batch-changes {b}")),
        options
            .window
            .map_or(String::new(), |w| format!(" --window {w}")),
        if options.compact_ms == COMPACT_MS_DEFAULT {
            String::new()
        } else {
            format!(" --compact-ms {}", options.compact_ms)
        },
        if options.check_ms == CHECK_MS_DEFAULT {
            String::new()
        } else {
            format!(" --check-ms {}", options.check_ms)
        },
    );
    let defaults = driftless_node::config::SyncSection::default();
    println!(
        "rows {rows} (~100 bytes each), updates {updates}, lag {lag_seconds} s at {LAG_RATE} tx/s; \
         client transactions of {CLIENT_TX_ROWS} rows, WAL + synchronous=NORMAL; \
         [sync] batch_changes_max {}, window_batches {}, poll_interval_ms {}, \
         compact_interval_ms {} (default {}), check_interval_ms {} (default {}); \
         {cores} cores available, SQLite {}",
        options.batch_changes.unwrap_or(defaults.batch_changes_max),
        options.window.unwrap_or(defaults.window_batches),
        defaults.poll_interval_ms,
        options.compact_ms,
        defaults.compact_interval_ms,
        options.check_ms,
        defaults.check_interval_ms,
        rusqlite::version()
    );
    println!();
    let dir = tempfile::tempdir()?;
    let mut table = Table { lines: Vec::new() };
    let seed = 0x5eed_d71f;

    // 1. Baselines on a file without driftless, before any node runs.
    let base_path = dir.path().join("baseline.db");
    let mut base = client(&base_path)?;
    base.execute_batch(DDL)?;
    let ignored = AtomicU64::new(0);
    let base_insert = insert_rows(&mut base, rows, Instant::now(), &ignored)?;
    let base_update = update_rows(
        &mut base,
        rows,
        updates,
        seed,
        false,
        Instant::now(),
        &ignored,
    )?;
    drop(base);
    eprintln!("baselines done");

    // Two nodes: the destination listens with TLS and requires a client certificate; the
    // origin dials it.
    let pki = TestPki::new(&dir.path().join("pki"))?;
    let (dest_cert, dest_key) = pki.issue(DESTINATION)?;
    let (origin_cert, origin_key) = pki.issue(ORIGIN)?;
    let main_tid = std::process::id();
    let origin_runtime = node_runtime(ORIGIN_RT)?;
    let destination_runtime = node_runtime(DESTINATION_RT)?;
    let peers = destination_runtime
        .0
        .block_on(TcpListener::bind("127.0.0.1:0"))?;
    let peers_addr = peers.local_addr()?;
    let sync = sync_section(&options, options.compact_ms);
    let origin_network = format!(
        "[[peers]]\nname = \"{DESTINATION}\"\naddr = \"{peers_addr}\"\nca = \"{}\"\n\
         cert = \"{}\"\nkey = \"{}\"",
        pki.ca_path().display(),
        origin_cert.display(),
        origin_key.display()
    );
    let mut destination = Node::start(
        dir.path(),
        DESTINATION,
        destination_runtime,
        Some(peers),
        &format!(
            "[listen]\naddr = \"{peers_addr}\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"",
            dest_cert.display(),
            dest_key.display(),
            pki.ca_path().display()
        ),
        &sync,
    )?;
    // The destination's capture poller runs already; the one that appears next is the origin's.
    let destination_poller = threads_named(CAPTURE_THREAD);
    let mut origin = Node::start(
        dir.path(),
        ORIGIN,
        origin_runtime,
        None,
        &origin_network,
        &sync,
    )?;
    let origin_poller = threads_named(CAPTURE_THREAD)
        .difference(&destination_poller)
        .copied()
        .collect();
    let groups = Groups {
        main: main_tid,
        origin_workers: origin.workers.clone(),
        destination_workers: destination.workers.clone(),
        origin_poller,
    };
    wait_linked(&origin, &destination)?;
    eprintln!("nodes linked over TLS");
    let origin_reader = reader(&origin.db)?;
    let destination_reader = reader(&destination.db)?;

    // 2. Sync of inserts.
    let counters_before = counters(&origin, &destination)?;
    let origin_log_base = counters_before.origin_log;
    let written = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_snapshot();
    let start = Instant::now();
    let writer = {
        let (path, written) = (origin.db.clone(), written.clone());
        spawn_bench(WRITER_THREAD, move || {
            insert_rows(&mut client(&path)?, rows, start, &written)
        })
    };
    let (sync_insert, insert_samples) = follow(
        "inserts",
        start,
        Probes {
            written: &written,
            captured: Box::new(|| {
                Ok(query_u64(&origin_reader, LOG_HEAD_SQL)?.saturating_sub(origin_log_base))
            }),
            // Rows arrive in key order, so max(id) is cheap progress; count(*) confirms.
            applied: Box::new(|| {
                query_u64(
                    &destination_reader,
                    "SELECT coalesce(max(id), 0) FROM items",
                )
            }),
            complete: Box::new(|s| {
                Ok(s.applied >= rows
                    && query_u64(&destination_reader, "SELECT count(*) FROM items")? == rows)
            }),
        },
    )?;
    let cpu_after = cpu_snapshot();
    let insert_writer = join(writer)?;
    let counters_inserts = counters(&origin, &destination)?;
    eprintln!("insert sync done");
    let insert_cpu = groups.report(
        &cpu_before,
        &cpu_after,
        &[(GROUP_WRITER, insert_writer.cpu_ns)],
    );
    let insert_writer = insert_writer.value;
    let insert_stages = stage_lines(
        &insert_samples,
        rows,
        insert_writer,
        rows,
        sync_insert,
        "rows",
    );
    let insert_counters = counter_lines(&counters_before, &counters_inserts);

    // The marker row, synced before the update run starts.
    client(&origin.db)?.execute(
        "INSERT INTO items (id, name, price, note, stock) VALUES (?1, 'marker', 0, 'waiting', 0)",
        [MARKER_ID],
    )?;
    let waiting = Instant::now();
    while query_u64(
        &destination_reader,
        "SELECT count(*) FROM items WHERE id = 0",
    )? == 0
    {
        if waiting.elapsed() > STALL_TIMEOUT {
            return Err("the marker row did not reach the destination".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));

    // 3. Sync of random updates; the last write sets the marker.
    let counters_before = counters(&origin, &destination)?;
    let origin_log_base = counters_before.origin_log;
    let destination_log_base = query_u64(&destination_reader, LOG_HEAD_SQL)?;
    let written = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_snapshot();
    let start = Instant::now();
    let writer = {
        let (path, written) = (origin.db.clone(), written.clone());
        spawn_bench(WRITER_THREAD, move || {
            update_rows(
                &mut client(&path)?,
                rows,
                updates,
                seed,
                true,
                start,
                &written,
            )
        })
    };
    let (sync_update, update_samples) = follow(
        "updates",
        start,
        Probes {
            written: &written,
            captured: Box::new(|| {
                Ok(query_u64(&origin_reader, LOG_HEAD_SQL)?.saturating_sub(origin_log_base))
            }),
            applied: Box::new(|| {
                Ok(query_u64(&destination_reader, LOG_HEAD_SQL)?
                    .saturating_sub(destination_log_base))
            }),
            complete: Box::new(|_| {
                let marked: i64 = destination_reader.query_row(
                    "SELECT count(*) FROM items WHERE id = ?1 AND note = ?2",
                    params![MARKER_ID, MARKER_DONE],
                    |r| r.get(0),
                )?;
                Ok(marked == 1)
            }),
        },
    )?;
    let cpu_after = cpu_snapshot();
    let update_writer = join(writer)?;
    let counters_updates = counters(&origin, &destination)?;
    let update_changes = counters_updates.origin_log - origin_log_base;
    eprintln!("update sync done; comparing digests");
    let update_cpu = groups.report(
        &cpu_before,
        &cpu_after,
        &[(GROUP_WRITER, update_writer.cpu_ns)],
    );
    let update_writer = update_writer.value;
    let update_stages = stage_lines(
        &update_samples,
        updates + 1,
        update_writer,
        update_changes,
        sync_update,
        "writes",
    );
    let update_counters = counter_lines(&counters_before, &counters_updates);
    let origin_digest = table_digests(&origin.db, &["items"])?;
    let digest_start = Instant::now();
    let destination_digest = table_digests(&destination.db, &["items"])?;
    let digest_time = digest_start.elapsed();
    let count_start = Instant::now();
    query_u64(&destination_reader, "SELECT count(*) FROM items")?;
    let count_time = count_start.elapsed();
    if origin_digest != destination_digest {
        return Err(format!(
            "replicas differ after the updates: origin {origin_digest:?}, destination \
             {destination_digest:?}"
        )
        .into());
    }

    // 4. Lag at 1,000 single-row transactions per second.
    let cpu_before = cpu_snapshot();
    let lag = measure_lag(&origin.db, &destination.db, 1, lag_seconds * LAG_RATE)?;
    let cpu_after = cpu_snapshot();
    let lag_cpu = groups.report(&cpu_before, &cpu_after, &lag.bench_cpu);
    let pings_equal =
        table_digests(&origin.db, &["pings"])? == table_digests(&destination.db, &["pings"])?;
    if !pings_equal {
        return Err("replicas differ in pings after the lag run".into());
    }
    eprintln!("lag run done");

    // 5. The first compaction pass after the bulk load: the origin restarts with a short
    //    compaction interval, and a ping window runs across that pass. In storage format 2 the
    //    pass has nothing to drop (the log is the row states), so there is no floor to watch:
    //    the window measures the restart and a pass that only reads the floor.
    origin.stop()?;
    drop(origin);
    let log_entries = query_u64(
        &reader(&dir.path().join("origin.db"))?,
        "SELECT count(*) FROM _driftless_rows",
    )?;
    let restarted = Instant::now();
    let mut origin = Node::start(
        dir.path(),
        ORIGIN,
        node_runtime(ORIGIN_RT)?,
        None,
        &origin_network,
        &sync_section(&options, COMPACT_PROBE_MS),
    )?;
    wait_linked(&origin, &destination)?;
    let window_start = restarted.elapsed();
    let window_ms = (COMPACT_PROBE_MS + COMPACT_PROBE_AFTER_MS)
        .saturating_sub(window_start.as_millis() as u64)
        .max(COMPACT_PROBE_AFTER_MS);
    let compaction = measure_lag(
        &origin.db,
        &destination.db,
        lag_seconds * LAG_RATE + 1,
        window_ms * LAG_RATE / 1_000,
    )?;
    if table_digests(&origin.db, &["pings"])? != table_digests(&destination.db, &["pings"])? {
        return Err("replicas differ in pings after the compaction run".into());
    }
    eprintln!("compaction run done");
    origin.stop()?;
    destination.stop()?;
    // With both nodes stopped, so the scans disturb no measurement.
    let mut storage = storage_lines(&origin.db, ORIGIN)?;
    storage.extend(storage_lines(&destination.db, DESTINATION)?);

    table.rate("1. plain insert, no driftless", rows, base_insert, "rows/s");
    table.rate(
        "2. sync inserts (first write -> destination holds all)",
        rows,
        sync_insert,
        "rows/s",
    );
    table.ratio(
        "   ratio sync inserts / plain insert",
        base_insert.as_secs_f64() / sync_insert.as_secs_f64(),
        INSERT_RATIO_TARGET,
    );
    table.rate(
        "3. plain random update, no driftless",
        updates,
        base_update,
        "rows/s",
    );
    table.rate(
        "   sync random updates (first write -> destination shows marker)",
        updates,
        sync_update,
        "rows/s",
    );
    table.ratio(
        "   ratio sync updates / plain update",
        base_update.as_secs_f64() / sync_update.as_secs_f64(),
        UPDATE_RATIO_TARGET,
    );
    let lags = sorted(lag.lags_ms.clone());
    let p99 = percentile(&lags, 0.99);
    table.ms(
        "4. lag at 1,000 tx/s, p50",
        percentile(&lags, 0.5),
        format!("{} pings", thousands(lag.pings as f64)),
    );
    table.ms(
        "   lag p99",
        p99,
        if p99 <= LAG_P99_TARGET_MS {
            format!("target <= {LAG_P99_TARGET_MS} ms: met")
        } else {
            format!("target <= {LAG_P99_TARGET_MS} ms: MISSED")
        },
    );
    table.ms(
        "   lag max",
        lags.last().copied().unwrap_or(f64::NAN),
        String::new(),
    );
    let compaction_lags = sorted(compaction.lags_ms.clone());
    table.ms(
        "5. lag across the origin's restart and first compaction pass, p99",
        percentile(&compaction_lags, 0.99),
        "no target; see 5. below".into(),
    );
    table.ms(
        "   lag max",
        compaction_lags.last().copied().unwrap_or(f64::NAN),
        format!(
            "a client insert at the origin started up to {:.0} ms late",
            compaction.late_max_ms
        ),
    );
    println!(
        "items digests equal after the updates: {} rows, {}",
        thousands(origin_digest[0].rows as f64),
        origin_digest[0].digest
    );
    println!(
        "{updates} random updates made {update_changes} changes at the origin (updates to a row \
         not yet stamped coalesce), plus the marker"
    );
    println!();
    table.print();
    println!();
    print_lines(
        "2. inserts: stages (times from the first write)",
        &insert_stages,
    );
    print_lines("", &insert_counters);
    print_lines("", &insert_cpu);
    println!();
    print_lines(
        "3. updates: stages (times from the first write)",
        &update_stages,
    );
    print_lines("", &update_counters);
    print_lines("", &update_cpu);
    println!();
    print_lines(
        "4. lag: commit at the origin -> row visible at the destination",
        &lag_lines(&lag, defaults.poll_interval_ms),
    );
    print_lines("", &lag_cpu);
    println!();
    let mut lines = vec![
        format!(
            "the origin stopped with {} entries in its log (_driftless_rows: one per row ever \
             seen) and restarted with compact_interval_ms {COMPACT_PROBE_MS}; linked {:.2} s \
             after the restart, then pings for {:.1} s; its first compaction pass is due {:.1} s \
             after the restart",
            thousands(log_entries as f64),
            window_start.as_secs_f64(),
            window_ms as f64 / 1e3,
            COMPACT_PROBE_MS as f64 / 1e3
        ),
        "storage format 2: compaction has nothing to do (a row's change replaces its entry, \
         and no peer falls behind the log), so this window shows the restart and an empty pass"
            .to_owned(),
    ];
    lines.extend(lag_lines(&compaction, defaults.poll_interval_ms));
    print_lines(
        "5. lag across the origin's restart and first compaction pass after the bulk load",
        &lines,
    );
    println!();
    print_lines(
        "whole-table reads a node makes while holding its store (timed here on the destination's \
         file after phase 3; nothing is captured or applied on a node while it runs one)",
        &[
            format!(
                "SELECT count(*) FROM items ({} rows): {:.1} ms (table_stats counts every synced \
                 table this way: the status endpoint and the node's periodic stats refresh)",
                thousands(origin_digest[0].rows as f64),
                count_time.as_secs_f64() * 1e3
            ),
            format!(
                "digest of items: {:.2} s (an idle link's convergence check computes one on each \
                 node every check_interval_ms, default {} ms)",
                digest_time.as_secs_f64(),
                defaults.check_interval_ms
            ),
        ],
    );
    println!();
    print_lines(
        "storage after the run: pages of each table and index (dbstat), indexes counted with \
         their table",
        &storage,
    );
    Ok(())
}
