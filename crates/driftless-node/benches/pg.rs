//! PostgreSQL → PostgreSQL sync with driftless next to PostgreSQL's native logical replication
//! (publication/subscription), the same workload on the same server, in the same run.
//!
//! A plain `main()` (no criterion): every measurement runs once and the ratios compare figures
//! measured in the same run. Needs a PostgreSQL server with `wal_level = logical` reachable at
//! `DRIFTLESS_PG_URL` (a libpq key=value string, default
//! `host=127.0.0.1 port=5432 user=postgres dbname=test`) as a role that can create databases,
//! publications, subscriptions and replication slots. Every database, subscription, slot and
//! publication the run creates is dropped at the end, also when it fails (and, if the run was
//! interrupted, at the start of the next run).
//!
//! Table: `items(id bigint PRIMARY KEY, name text, price double precision, note text, stock
//! bigint)`, rows of about 100 bytes (60-byte note). A plain client (the sync `postgres` crate)
//! writes in transactions of 10,000 rows, one statement per transaction (`unnest` arrays):
//!
//! 0. Plain insert and random-update rates into a database with no replication (baselines).
//! 1. Native: a publisher database with `CREATE PUBLICATION ... FOR TABLE items` and a
//!    subscriber database with `CREATE SUBSCRIPTION ... WITH (create_slot = false, slot_name =
//!    ..., copy_data = false)` on a slot created apart (`pg_create_logical_replication_slot`,
//!    `pgoutput`): a subscription that creates its slot on its own cluster waits forever.
//! 2. pglogical (Debian `postgresql-15-pglogical`) on a private cluster the bench starts for it
//!    (`benches/pg/pglogical.rs` says why), skipped with a note saying how to install it when the
//!    extension is missing.
//! 3. driftless: two databases, two nodes in this process (`driftless_node::run`) with
//!    PostgreSQL stores, linked over loopback without TLS (`insecure = true`, like native
//!    replication's connection here, which has no TLS either).
//!
//! In both setups, with a marker row (id 0) already replicated: N inserts written to the origin
//! as fast as the client can, timed from the first write until the other database holds all N
//! (`max(id)` polled every 50 ms, then `count(*)` confirms); then U random updates of `price`
//! and `stock` (no row twice in one transaction), the last statement of the last transaction
//! setting the marker's note, timed until the other database shows the marker. Both databases'
//! `items` are then compared by row hashes.
//!
//! For each phase it also prints where the time went: when the client, driftless's capture
//! (the origin's `driftless_changes_captured_total`) and the destination's apply
//! (`driftless_changes_applied_total`, both from `/metrics`, which does not touch the store)
//! finished; the nodes' counters; WAL written; and CPU time per thread group of this process
//! (`/proc/self/task/*/schedstat`) and per PostgreSQL backend (`/proc/<pid>/stat`, matched to
//! `pg_stat_activity`).
//!
//! ```text
//! cargo bench -p driftless-node --bench pg -- --rows 1000000 --updates 200000
//! ```
//!
//! `--rows N`, `--updates U` (or `DRIFTLESS_BENCH_ROWS`, `DRIFTLESS_BENCH_UPDATES`);
//! `--batch-changes B` and `--window W` set `[sync] batch_changes_max` and `window_batches`;
//! `--only native`, `--only pglogical` or `--only driftless` runs one setup (no ratios then).
//! `DRIFTLESS_BENCH_LOG_STATEMENTS=1` (profiling) sets `log_min_duration_statement = 0` on every
//! database the run creates, so the server's log holds each statement with its duration.

#[path = "pg/pglogical.rs"]
mod pglogical;

use driftless_node::status::PeerStatus;
use driftless_node::{Config, Listeners, NodeError, NodeStatus};
use postgres::{Client, NoTls};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::error::Error;
use std::io::{Read, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
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
/// Client writes per transaction (inserts and updates alike).
const CLIENT_TX_ROWS: u64 = 10_000;
/// How often the other database (and the nodes' counters) are checked during a phase.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(50);
/// Progress is printed each time a stage passes another multiple of this.
const PROGRESS_EVERY: u64 = 100_000;
/// A phase that makes no progress at all for this long has failed.
const STALL_TIMEOUT: Duration = Duration::from_secs(180);
/// Threads per node runtime.
const NODE_WORKER_THREADS: usize = 2;
/// Issue 13 (newer than the brief): PG→PG sync rate ÷ native logical replication rate, 1M rows
/// and 200k updates.
const INSERT_RATIO_TARGET: f64 = 0.6;
const UPDATE_RATIO_TARGET: f64 = 0.9;
/// Issue 13: PG→PG sync at least as fast as pglogical, inserts and updates.
const PGLOGICAL_RATIO_TARGET: f64 = 1.0;
/// `[sync] compact_interval_ms` and `check_interval_ms`: long enough that no compaction pass or
/// idle-link digest check lands in a timed window.
const QUIET_MS: u64 = 3_600_000;

const DDL: &str = "CREATE TABLE items (id bigint PRIMARY KEY, name text, \
                   price double precision, note text, stock bigint)";
const INSERT_SQL: &str = "INSERT INTO items (id, name, price, note, stock) \
     SELECT * FROM unnest($1::int8[], $2::text[], $3::float8[], $4::text[], $5::int8[])";
const UPDATE_SQL: &str = "UPDATE items AS t SET price = u.price, stock = u.stock \
     FROM unnest($1::int8[], $2::float8[], $3::int8[]) AS u(id, price, stock) WHERE t.id = u.id";
/// Order-independent content hash: the sum of a 64-bit hash of every row's text.
const HASH_SQL: &str =
    "SELECT count(*)::int8, coalesce(sum(hashtextextended(i::text, 0)), 0)::text FROM items AS i";
const MAX_ID_SQL: &str = "SELECT coalesce(max(id), 0) FROM items";
/// Filler for the ~60-byte note (the row number is written in front of it).
const NOTE_FILLER: &str = "lorem ipsum dolor sit amet, consectetur adipiscing elit sed do";
/// Row 0 is the marker: replicated before the timed phases; random updates never touch it, the
/// last write of the update run sets its note to this.
const MARKER_ID: i64 = 0;
const MARKER_DONE: &str = "marker: all updates written";
const MARKER_SQL: &str = "SELECT count(*) FROM items WHERE id = 0 AND note = $1";

const ORIGIN: &str = "origin";
const DESTINATION: &str = "destination";
/// Thread names (Linux keeps 15 bytes): they sort the CPU time per thread into groups.
const ORIGIN_RT: &str = "origin-rt";
const DESTINATION_RT: &str = "dest-rt";
const CAPTURE_THREAD: &str = "driftless-captu";
const WRITER_THREAD: &str = "bench-writer";
/// `application_name` of the bench's own connections (the nodes' are `driftless`).
const WRITER_APP: &str = "bench-writer";
const PROBE_APP: &str = "bench-probe";

struct Options {
    rows: u64,
    updates: u64,
    batch_changes: Option<usize>,
    window: Option<usize>,
    native: bool,
    pglogical: bool,
    driftless: bool,
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
        batch_changes: None,
        window: None,
        native: true,
        pglogical: true,
        driftless: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut text = |flag: &str| -> Result<String> {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value").into())
        };
        match flag.as_str() {
            "--rows" => options.rows = parse_count(&text("--rows")?, "--rows")?,
            "--updates" => options.updates = parse_count(&text("--updates")?, "--updates")?,
            "--batch-changes" => {
                options.batch_changes =
                    Some(parse_count(&text("--batch-changes")?, "--batch-changes")? as usize)
            }
            "--window" => {
                options.window = Some(parse_count(&text("--window")?, "--window")? as usize)
            }
            "--only" => {
                let only = text("--only")?;
                options.native = only == "native";
                options.pglogical = only == "pglogical";
                options.driftless = only == "driftless";
                if !(options.native || options.pglogical || options.driftless) {
                    return Err(format!(
                        "--only {only:?}: expected native, pglogical or driftless"
                    )
                    .into());
                }
            }
            // cargo passes `--bench` to every bench target.
            "--bench" => {}
            "-h" | "--help" => {
                println!(
                    "usage: cargo bench -p driftless-node --bench pg -- [--rows N] [--updates U] \
                     [--batch-changes B] [--window W] [--only native|pglogical|driftless]\n\
                     (env: DRIFTLESS_PG_URL, DRIFTLESS_BENCH_ROWS, DRIFTLESS_BENCH_UPDATES; \
                     defaults {ROWS_DEFAULT}, {UPDATES_DEFAULT}; batch and window default to \
                     the config defaults)"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)").into()),
        }
    }
    if options.rows == 0 || options.updates == 0 {
        return Err("--rows and --updates must be at least 1".into());
    }
    if options.updates > options.rows {
        return Err("--updates must not exceed --rows (no row twice in one transaction)".into());
    }
    Ok(options)
}

// ---------------------------------------------------------------------------------------------
// The server: databases, publication, slot and subscription, all dropped at the end

/// While set, the server every helper talks to instead of `DRIFTLESS_PG_URL` (the pglogical
/// setup's private cluster, see `pg/pglogical.rs`).
static ADMIN_URL_OVERRIDE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn admin_url() -> String {
    if let Some(url) = ADMIN_URL_OVERRIDE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
    {
        return url;
    }
    std::env::var("DRIFTLESS_PG_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

/// `admin_url()` with another database.
fn database_url(name: &str) -> String {
    admin_url()
        .split_whitespace()
        .filter(|p| !p.starts_with("dbname="))
        .chain(std::iter::once(format!("dbname={name}").as_str()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn connect(url: &str, application: &str) -> Result<Client> {
    Ok(Client::connect(
        &format!("{url} application_name={application}"),
        NoTls,
    )?)
}

/// Everything the run created on the server; `Drop` removes it (subscription, then slot, then
/// databases, which takes their publications along).
struct Server {
    prefix: String,
    databases: Vec<String>,
    /// (subscriber database, subscription name)
    subscription: Option<(String, String)>,
    slot: Option<String>,
}

impl Server {
    fn new() -> Server {
        Server {
            prefix: format!("driftless_bench_pg_{}", std::process::id()),
            databases: Vec::new(),
            subscription: None,
            slot: None,
        }
    }

    /// Creates database `<prefix>_<suffix>` with the `items` table; returns its URL.
    fn create_database(&mut self, suffix: &str) -> Result<String> {
        let name = format!("{}_{suffix}", self.prefix);
        let mut admin = connect(&admin_url(), PROBE_APP)?;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))?;
        admin.batch_execute(&format!("CREATE DATABASE \"{name}\""))?;
        self.databases.push(name.clone());
        if std::env::var_os("DRIFTLESS_BENCH_LOG_STATEMENTS").is_some() {
            // Profiling aid: every statement in this database goes to the server's log with
            // its duration (`log_min_duration_statement = 0`), for a per-statement split.
            admin.batch_execute(&format!(
                "ALTER DATABASE \"{name}\" SET log_min_duration_statement = 0"
            ))?;
        }
        let url = database_url(&name);
        connect(&url, PROBE_APP)?.batch_execute(DDL)?;
        Ok(url)
    }

    fn database_name(&self, suffix: &str) -> String {
        format!("{}_{suffix}", self.prefix)
    }

    /// Drops the subscription and its slot (the native setup), if any.
    fn drop_replication(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some((database, name)) = self.subscription.take() {
            let result = (|| -> Result<()> {
                let mut sub = connect(&database_url(&database), PROBE_APP)?;
                sub.batch_execute(&format!("ALTER SUBSCRIPTION \"{name}\" DISABLE"))?;
                sub.batch_execute(&format!(
                    "ALTER SUBSCRIPTION \"{name}\" SET (slot_name = NONE)"
                ))?;
                sub.batch_execute(&format!("DROP SUBSCRIPTION \"{name}\""))?;
                Ok(())
            })();
            if let Err(e) = result {
                errors.push(format!("drop subscription {name}: {e}"));
            }
        }
        if let Some(slot) = self.slot.take() {
            let result = (|| -> Result<()> {
                let mut admin = connect(&admin_url(), PROBE_APP)?;
                // The walsender exits shortly after the subscription is disabled.
                let started = Instant::now();
                loop {
                    let active: Option<bool> = admin
                        .query_opt(
                            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                            &[&slot],
                        )?
                        .map(|r| r.get(0));
                    match active {
                        None => return Ok(()),
                        Some(false) => break,
                        Some(true) if started.elapsed() > Duration::from_secs(30) => {
                            admin.execute(
                                "SELECT pg_terminate_backend(active_pid) FROM \
                                 pg_replication_slots WHERE slot_name = $1",
                                &[&slot],
                            )?;
                        }
                        Some(true) => {}
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                admin.execute("SELECT pg_drop_replication_slot($1)", &[&slot])?;
                Ok(())
            })();
            if let Err(e) = result {
                errors.push(format!("drop replication slot {slot}: {e}"));
            }
        }
        errors
    }

    fn drop_databases(&mut self, suffixes: Option<&[&str]>) -> Vec<String> {
        let mut errors = Vec::new();
        let names: Vec<String> = match suffixes {
            Some(s) => s.iter().map(|s| self.database_name(s)).collect(),
            None => self.databases.clone(),
        };
        match connect(&admin_url(), PROBE_APP) {
            Ok(mut admin) => {
                for name in names {
                    match admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    {
                        Ok(()) => self.databases.retain(|d| *d != name),
                        Err(e) => errors.push(format!("drop database {name}: {e}")),
                    }
                }
            }
            Err(e) => errors.push(format!("connect to drop databases: {e}")),
        }
        errors
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let mut errors = self.drop_replication();
        errors.extend(self.drop_databases(None));
        for e in errors {
            eprintln!("cleanup failed: {e}");
        }
    }
}

/// Removes what an interrupted earlier run left behind (its process is gone): subscription,
/// slot and databases, so that no slot nobody reads holds back the server's WAL. Returns what
/// it removed.
fn sweep_leftovers() -> Result<Vec<String>> {
    fn entry(leftovers: &mut BTreeMap<u32, Server>, pid: u32) -> &mut Server {
        leftovers.entry(pid).or_insert_with(|| Server {
            prefix: format!("driftless_bench_pg_{pid}"),
            databases: Vec::new(),
            subscription: None,
            slot: None,
        })
    }
    const PREFIX: &str = "driftless_bench_pg_";
    let pid_of = |name: &str| -> Option<u32> {
        let pid = name.strip_prefix(PREFIX)?.split('_').next()?.parse().ok()?;
        (pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()).then_some(pid)
    };
    let mut admin = connect(&admin_url(), PROBE_APP)?;
    let pattern = "driftless\\_bench\\_pg\\_%";
    let mut leftovers: BTreeMap<u32, Server> = BTreeMap::new();
    for row in admin.query(
        "SELECT d.datname, s.subname FROM pg_subscription s \
         JOIN pg_database d ON d.oid = s.subdbid WHERE s.subname LIKE $1",
        &[&pattern],
    )? {
        let (database, name): (String, String) = (row.get(0), row.get(1));
        if let Some(pid) = pid_of(&name) {
            entry(&mut leftovers, pid).subscription = Some((database, name));
        }
    }
    for row in admin.query(
        "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE $1",
        &[&pattern],
    )? {
        let name: String = row.get(0);
        if let Some(pid) = pid_of(&name) {
            entry(&mut leftovers, pid).slot = Some(name);
        }
    }
    for row in admin.query(
        "SELECT datname::text FROM pg_database WHERE datname LIKE $1",
        &[&pattern],
    )? {
        let name: String = row.get(0);
        if let Some(pid) = pid_of(&name) {
            entry(&mut leftovers, pid).databases.push(name);
        }
    }
    Ok(leftovers
        .into_values()
        .map(|server| {
            let mut removed: Vec<String> = server.databases.clone();
            removed.extend(server.subscription.iter().map(|(_, s)| s.clone()));
            removed.extend(server.slot.clone());
            drop(server);
            removed.join(", ")
        })
        .collect())
}

/// WAL records and full-page images the server wrote so far (`pg_stat_wal`).
fn wal_counts(client: &mut Client) -> Result<(u64, u64)> {
    let row = client.query_one("SELECT wal_records, wal_fpi FROM pg_stat_wal", &[])?;
    let (records, fpi): (i64, i64) = (row.get(0), row.get(1));
    Ok((records as u64, fpi as u64))
}

/// Checkpoints the server started because of WAL volume (or by request) so far.
fn checkpoints_requested(client: &mut Client) -> Result<u64> {
    query_u64(client, "SELECT checkpoints_req FROM pg_stat_bgwriter")
}

/// The server's WAL insert position, in bytes.
fn wal_lsn(client: &mut Client) -> Result<u64> {
    let lsn: i64 = client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8", &[])?
        .get(0);
    Ok(lsn as u64)
}

fn query_u64(client: &mut Client, sql: &str) -> Result<u64> {
    let value: i64 = client.query_one(sql, &[])?.get(0);
    Ok(value.max(0) as u64)
}

/// `(rows, sum of row hashes)` of `items`.
fn table_hash(url: &str) -> Result<(i64, String)> {
    let row = connect(url, PROBE_APP)?.query_one(HASH_SQL, &[])?;
    Ok((row.get(0), row.get(1)))
}

fn checkpoint() -> Result<()> {
    connect(&admin_url(), PROBE_APP)?.batch_execute("CHECKPOINT")?;
    Ok(())
}

/// Rows inserted, updated and deleted so far per table of a database (`pg_stat_user_tables`).
type TableWrites = BTreeMap<String, [i64; 3]>;

fn table_writes(url: &str) -> Result<TableWrites> {
    let rows = connect(url, PROBE_APP)?.query(
        "SELECT schemaname || '.' || relname, n_tup_ins, n_tup_upd, n_tup_del \
         FROM pg_stat_user_tables",
        &[],
    )?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), [r.get(1), r.get(2), r.get(3)]))
        .collect())
}

/// `table_writes` once the backends have published their statistics (they do so at most
/// once a second, so: two equal readings a second apart, or 15 s).
fn settled_writes(url: &str) -> Result<TableWrites> {
    let mut last = table_writes(url)?;
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(1_100));
        let now = table_writes(url)?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok(last)
}

/// `label: public.items +1,000,000 ins; ...`: the row writes of a phase, per table.
fn writes_line(label: &str, before: &TableWrites, after: &TableWrites, per: u64) -> String {
    let mut parts = Vec::new();
    let mut total = 0;
    for (table, counts) in after {
        let base = before.get(table).copied().unwrap_or_default();
        let mut text = Vec::new();
        for (i, op) in ["ins", "upd", "del"].iter().enumerate() {
            let d = counts[i] - base[i];
            if d > 0 {
                total += d;
                text.push(format!("{} {op}", thousands(d as f64)));
            }
        }
        if !text.is_empty() {
            parts.push(format!("{table} {}", text.join(" ")));
        }
    }
    format!(
        "{label}: {} row writes ({:.1} per client write): {}",
        thousands(total as f64),
        total as f64 / per.max(1) as f64,
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join("; ")
        }
    )
}

/// Tables (with indexes and TOAST) over 1 MB in a database.
fn sizes_line(label: &str, url: &str) -> Result<String> {
    let rows = connect(url, PROBE_APP)?.query(
        "SELECT n.nspname || '.' || c.relname, pg_total_relation_size(c.oid) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND n.nspname IN ('public', 'driftless') \
         AND pg_total_relation_size(c.oid) > 1000000 ORDER BY 2 DESC",
        &[],
    )?;
    let parts: Vec<String> = rows
        .iter()
        .map(|r| {
            let (name, bytes): (String, i64) = (r.get(0), r.get(1));
            format!("{name} {:.0} MB", bytes as f64 / 1e6)
        })
        .collect();
    // Issue 13's bytes target: every relation of driftless's schema (tables, indexes, TOAST)
    // against the synced table's (`pending` included: at the origin it still holds the dead
    // records of the backlog until it is vacuumed)
    let mut probe = connect(url, PROBE_APP)?;
    let totals = probe.query_one(
        "SELECT (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8 FROM pg_class c \
           JOIN pg_namespace n ON n.oid = c.relnamespace \
           WHERE c.relkind = 'r' AND n.nspname = 'driftless'), \
         coalesce(pg_total_relation_size(to_regclass('public.items')), 0)::int8",
        &[],
    )?;
    let (ours, items): (i64, i64) = (totals.get(0), totals.get(1));
    let ratio = if items > 0 {
        let ratio = ours as f64 / items as f64;
        format!(
            "; driftless's tables / items = {ratio:.3} (target <= {BYTES_RATIO_TARGET}: {})",
            if ratio <= BYTES_RATIO_TARGET {
                "met"
            } else {
                "MISSED"
            }
        )
    } else {
        String::new()
    };
    Ok(format!(
        "{label}, sizes with indexes: {}{ratio}",
        parts.join(", ")
    ))
}

/// Issue 13: driftless's own tables at most the synced table's bytes.
const BYTES_RATIO_TARGET: f64 = 1.0;

// ---------------------------------------------------------------------------------------------
// Client writes (the same code for every database)

/// Inserts rows `1..=rows` in transactions of `CLIENT_TX_ROWS`, one statement each. `written`
/// counts committed rows. Returns the time of the last commit since `start`.
fn insert_rows(
    client: &mut Client,
    rows: u64,
    start: Instant,
    written: &AtomicU64,
) -> Result<Duration> {
    let statement = client.prepare(INSERT_SQL)?;
    let mut id = 1;
    while id <= rows {
        let end = (id + CLIENT_TX_ROWS - 1).min(rows);
        let n = (end - id + 1) as usize;
        let (mut ids, mut names, mut prices, mut notes, mut stocks) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for i in id..=end {
            ids.push(i as i64);
            names.push(format!("item-{i:08}"));
            let mut note = format!("{i:08} ");
            note.push_str(&NOTE_FILLER[..60 - note.len()]);
            notes.push(note);
            prices.push((i % 10_000) as f64 / 100.0);
            stocks.push((i % 1000) as i64);
        }
        let mut tx = client.transaction()?;
        let inserted = tx.execute(&statement, &[&ids, &names, &prices, &notes, &stocks])?;
        tx.commit()?;
        if inserted != n as u64 {
            return Err(format!("inserted {inserted} rows instead of {n}").into());
        }
        written.store(end, Ordering::Relaxed);
        id = end + 1;
    }
    Ok(start.elapsed())
}

/// SplitMix64: the same seed gives the same updates in every database.
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

/// `updates` random updates of `price` and `stock` over rows `1..=rows`, in transactions of
/// `CLIENT_TX_ROWS` rows, one statement each (a row is drawn again if it is already in the
/// transaction, so every update changes one distinct row). With `marker`, the last statement
/// of the last transaction sets the marker row's note. Returns the time of the last commit.
fn update_rows(
    client: &mut Client,
    rows: u64,
    updates: u64,
    marker: bool,
    start: Instant,
    written: &AtomicU64,
) -> Result<Duration> {
    let statement = client.prepare(UPDATE_SQL)?;
    let mut rng = SplitMix64(0x5eed_d71f);
    let mut done = 0;
    let mut chosen = HashSet::new();
    while done < updates {
        let end = (done + CLIENT_TX_ROWS).min(updates);
        let n = (end - done) as usize;
        let (mut ids, mut prices, mut stocks) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        chosen.clear();
        while ids.len() < n {
            let id = 1 + rng.below(rows) as i64;
            if chosen.insert(id) {
                ids.push(id);
                prices.push(rng.below(1_000_000) as f64 / 100.0);
                stocks.push(rng.below(100_000) as i64);
            }
        }
        let mut tx = client.transaction()?;
        let updated = tx.execute(&statement, &[&ids, &prices, &stocks])?;
        if updated != n as u64 {
            return Err(format!("updated {updated} rows instead of {n}").into());
        }
        if marker && end == updates {
            tx.execute(
                "UPDATE items SET note = $1 WHERE id = $2",
                &[&MARKER_DONE, &MARKER_ID],
            )?;
        }
        tx.commit()?;
        written.store(end, Ordering::Relaxed);
        done = end;
    }
    Ok(start.elapsed())
}

/// Inserts the marker row at `origin` and waits until `destination` has it (which also shows
/// that replication runs).
fn replicate_marker(origin: &str, destination: &str) -> Result<Duration> {
    connect(origin, WRITER_APP)?.execute(
        "INSERT INTO items (id, name, price, note, stock) VALUES ($1, 'marker', 0, 'waiting', 0)",
        &[&MARKER_ID],
    )?;
    let started = Instant::now();
    let mut probe = connect(destination, PROBE_APP)?;
    while query_u64(&mut probe, "SELECT count(*) FROM items WHERE id = 0")? == 0 {
        if started.elapsed() > Duration::from_secs(60) {
            return Err("the marker row did not reach the other database within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(started.elapsed())
}

// ---------------------------------------------------------------------------------------------
// driftless nodes

/// A node started in this process on its own tokio runtime (so its threads can be told apart).
struct Node {
    name: &'static str,
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

fn sync_section(options: &Options) -> String {
    let mut text =
        format!("[sync]\ncompact_interval_ms = {QUIET_MS}\ncheck_interval_ms = {QUIET_MS}\n");
    if let Some(b) = options.batch_changes {
        text.push_str(&format!("batch_changes_max = {b}\n"));
    }
    if let Some(w) = options.window {
        text.push_str(&format!("window_batches = {w}\n"));
    }
    text
}

impl Node {
    /// Writes the node's config (a PostgreSQL store at `url`) and starts it.
    fn start(
        dir: &Path,
        name: &'static str,
        runtime: (Runtime, HashSet<u32>),
        url: &str,
        peers: Option<TcpListener>,
        network: &str,
        sync: &str,
    ) -> Result<Node> {
        let (runtime, workers) = runtime;
        let admin = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let admin_addr = admin.local_addr()?;
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config_path,
            format!(
                "[node]\nname = \"{name}\"\ndata_dir = \"./{name}\"\n\n\
                 [store]\nkind = \"postgres\"\nurl = \"{url}\"\n\n\
                 [[tables]]\nname = \"items\"\n\n\
                 {network}\n\n[admin]\naddr = \"{admin_addr}\"\n\n{sync}"
            ),
        )?;
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
            admin: admin_addr,
            runtime,
            stop: Some(stop),
            task: Some(task),
            workers,
        };
        let started = Instant::now();
        while node.status().is_err() {
            if started.elapsed() > Duration::from_secs(60) {
                return Err(format!("node {name} did not start within 60 s").into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(node)
    }

    /// `driftless status` (runs `count(*)` over `items` under the store lock: only between
    /// phases).
    fn status(&self) -> Result<NodeStatus> {
        Ok(self
            .runtime
            .block_on(driftless_node::ops::fetch_status(self.admin))?)
    }

    /// The sum of the counter `name` over its labels, from `/metrics` (which does not touch
    /// the store).
    fn metric(&self, name: &str) -> Result<u64> {
        let text = http_get(self.admin, "/metrics")?;
        let prefix = format!("driftless_{name}_total");
        let mut sum = 0.0;
        let mut found = false;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&prefix)
                && (rest.starts_with('{') || rest.starts_with(' '))
                && let Some(value) = rest.rsplit(' ').next()
                && let Ok(value) = value.parse::<f64>()
            {
                sum += value;
                found = true;
            }
        }
        if !found {
            return Err(format!("node {}: no {prefix} in /metrics", self.name).into());
        }
        Ok(sum as u64)
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

/// A plain HTTP/1.1 GET; returns the body.
fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(format!(
            "GET {path}: unexpected answer {:?}",
            response.lines().next()
        )
        .into()),
    }
}

fn peer<'a>(status: &'a NodeStatus, name: &str) -> Option<&'a PeerStatus> {
    status.peers.iter().find(|p| p.name == name)
}

fn wait_linked(origin: &Node, destination: &Node) -> Result<()> {
    let started = Instant::now();
    loop {
        let (o, d) = (origin.status()?, destination.status()?);
        if peer(&o, DESTINATION).is_some_and(|p| p.connected)
            && peer(&d, ORIGIN).is_some_and(|p| p.connected)
        {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(format!("the nodes did not link within 60 s: {o:?} {d:?}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the nodes' own counters say about a phase.
fn counter_lines(
    before: &(NodeStatus, NodeStatus),
    after: &(NodeStatus, NodeStatus),
) -> Vec<String> {
    let link = |s: &NodeStatus, p: &str| peer(s, p).cloned().unwrap_or_default();
    let (ob, oa) = (link(&before.0, DESTINATION), link(&after.0, DESTINATION));
    let (db, da) = (link(&before.1, ORIGIN), link(&after.1, ORIGIN));
    vec![
        format!(
            "origin: {} changes captured (log head {} -> {})",
            thousands((after.0.changes_captured - before.0.changes_captured) as f64),
            before.0.log_head,
            after.0.log_head,
        ),
        format!(
            "origin -> destination: {} batches sent; destination applied {} changes from {} \
             batches (log head {} -> {})",
            thousands((oa.batches_sent - ob.batches_sent) as f64),
            thousands((da.changes_applied - db.changes_applied) as f64),
            thousands((da.batches_received - db.batches_received) as f64),
            before.1.log_head,
            after.1.log_head,
        ),
        format!(
            "destination -> origin: {} batches sent, origin received {} and applied {} changes",
            thousands((da.batches_sent - db.batches_sent) as f64),
            thousands((oa.batches_received - ob.batches_received) as f64),
            thousands((oa.changes_applied - ob.changes_applied) as f64),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// CPU time: threads of this process and PostgreSQL's processes

/// CPU nanoseconds of every thread of this process, with its name.
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

/// CPU nanoseconds (user + system, from clock ticks of 10 ms) and name of every process.
fn process_cpu() -> HashMap<u32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ...`: utime and stime are fields 14 and 15.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c).to_owned();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        out.insert(pid, (comm, (ticks(11) + ticks(12)) * 10_000_000));
    }
    out
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
    processes: HashMap<u32, (String, u64)>,
    machine: Option<(u64, u64)>,
    at: Instant,
}

fn cpu_snapshot() -> CpuSnapshot {
    CpuSnapshot {
        threads: thread_cpu(),
        processes: process_cpu(),
        machine: machine_jiffies(),
        at: Instant::now(),
    }
}

/// What PostgreSQL says each backend is: `(database, application_name, backend_type)`.
fn backends() -> Result<HashMap<u32, (String, String, String)>> {
    let mut client = connect(&admin_url(), PROBE_APP)?;
    let rows = client.query(
        "SELECT pid, coalesce(datname, ''), coalesce(application_name, ''), \
         coalesce(backend_type, '') FROM pg_stat_activity",
        &[],
    )?;
    Ok(rows
        .iter()
        .map(|r| {
            let pid: i32 = r.get(0);
            (pid as u32, (r.get(1), r.get(2), r.get(3)))
        })
        .collect())
}

/// Sorts threads and PostgreSQL processes into named groups.
struct Groups {
    main: u32,
    /// For a driftless run: the nodes' runtime workers and the origin's capture poller.
    origin_workers: HashSet<u32>,
    destination_workers: HashSet<u32>,
    origin_poller: HashSet<u32>,
    /// Databases: (origin or publisher, destination or subscriber).
    origin_db: String,
    destination_db: String,
}

impl Groups {
    fn thread_group(&self, tid: u32, comm: &str) -> &'static str {
        match comm {
            _ if tid == self.main => "bench main thread (polls progress)",
            WRITER_THREAD => "client (bench writer thread)",
            CAPTURE_THREAD if self.origin_poller.contains(&tid) => {
                "origin capture poller (stamping)"
            }
            CAPTURE_THREAD => "destination capture poller (idle checks)",
            ORIGIN_RT if self.origin_workers.contains(&tid) => "origin tokio workers (frames, LZ4)",
            ORIGIN_RT => "origin store calls (read_log, acks, applies)",
            DESTINATION_RT if self.destination_workers.contains(&tid) => {
                "destination tokio workers (frames, LZ4)"
            }
            DESTINATION_RT => "destination store calls (apply_batch)",
            _ => "other threads of this process",
        }
    }

    fn backend_group(&self, backend: Option<&(String, String, String)>) -> &'static str {
        let Some((db, app, kind)) = backend else {
            return "PostgreSQL: other (checkpointer, WAL writer, autovacuum, ...)";
        };
        match (kind.as_str(), app.as_str()) {
            ("walsender", _) => "PostgreSQL: walsender (decoding, pgoutput)",
            ("logical replication worker", _) => "PostgreSQL: subscriber's apply worker",
            ("client backend", WRITER_APP) => "PostgreSQL: the client's backend",
            ("client backend", PROBE_APP) => "PostgreSQL: the bench's probes",
            ("client backend", "driftless") if *db == self.origin_db => {
                "PostgreSQL: origin node's backend (stamping, read_log, ...)"
            }
            ("client backend", "driftless") if *db == self.destination_db => {
                "PostgreSQL: destination node's backend (apply_batch)"
            }
            _ => "PostgreSQL: other (checkpointer, WAL writer, autovacuum, ...)",
        }
    }

    /// CPU seconds per group between two snapshots (bench threads that exited report their
    /// own time in `writer_ns`), and the lines to print.
    fn report(
        &self,
        before: &CpuSnapshot,
        after: &CpuSnapshot,
        writer_ns: u64,
        backends: &HashMap<u32, (String, String, String)>,
    ) -> Vec<String> {
        let mut groups: Vec<(&'static str, f64)> = Vec::new();
        let mut add =
            |name: &'static str, seconds: f64| match groups.iter_mut().find(|(n, _)| *n == name) {
                Some((_, s)) => *s += seconds,
                None => groups.push((name, seconds)),
            };
        add("client (bench writer thread)", writer_ns as f64 / 1e9);
        let mut ours = writer_ns as f64 / 1e9;
        for (tid, (comm, ns)) in &after.threads {
            if comm == WRITER_THREAD {
                continue;
            }
            let start = before.threads.get(tid).map_or(0, |(_, ns)| *ns);
            let s = ns.saturating_sub(start) as f64 / 1e9;
            ours += s;
            add(self.thread_group(*tid, comm), s);
        }
        let mut server = 0.0;
        let mut others: Vec<(String, f64)> = Vec::new();
        let me = std::process::id();
        for (pid, (comm, ns)) in &after.processes {
            let start = before.processes.get(pid).map_or(0, |(_, ns)| *ns);
            let s = ns.saturating_sub(start) as f64 / 1e9;
            if *pid == me || s < 0.005 {
                continue;
            }
            if comm == "postgres" {
                server += s;
                add(self.backend_group(backends.get(pid)), s);
            } else {
                match others.iter_mut().find(|(c, _)| c == comm) {
                    Some((_, total)) => *total += s,
                    None => others.push((comm.clone(), s)),
                }
            }
        }
        others.sort_by(|a, b| b.1.total_cmp(&a.1));
        let wall = (after.at - before.at).as_secs_f64();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let mut lines = vec![format!(
            "CPU over {wall:.2} s wall ({:.2} core-seconds on {cores:.0} cores): this process \
             {ours:.2} s, PostgreSQL {server:.2} s",
            wall * cores
        )];
        if let (Some((b0, t0)), Some((b1, t1))) = (before.machine, after.machine) {
            let busy = (b1 - b0) as f64 / (t1 - t0).max(1) as f64 * wall * cores;
            let shown: Vec<String> = others
                .iter()
                .take(4)
                .map(|(c, s)| format!("{c} {s:.1} s"))
                .collect();
            lines.push(format!(
                "  whole machine busy {busy:.2} core-seconds, so other processes used about {:.2} \
                 (largest among those running throughout: {})",
                (busy - ours - server).max(0.0),
                if shown.is_empty() {
                    "none".to_owned()
                } else {
                    shown.join(", ")
                }
            ));
        }
        groups.sort_by(|a, b| b.1.total_cmp(&a.1));
        let width = groups.iter().map(|g| g.0.len()).max().unwrap_or(0);
        for (group, s) in groups {
            if s >= 0.005 {
                lines.push(format!(
                    "  {group:<width$}  {s:>7.2} s  ({:>3.0}% of wall)",
                    100.0 * s / wall
                ));
            }
        }
        lines
    }
}

// ---------------------------------------------------------------------------------------------
// Following a phase

#[derive(Clone, Copy)]
struct Sample {
    t: Duration,
    written: u64,
    /// driftless only: changes captured at the origin.
    captured: Option<u64>,
    /// Rows present (inserts) or changes applied (driftless updates) at the other end.
    applied: Option<u64>,
}

/// A poll that returns a count.
type Poll<'a> = Box<dyn FnMut() -> Result<u64> + 'a>;
/// A check of whether the other end is complete.
type Check<'a> = Box<dyn FnMut(&Sample) -> Result<bool> + 'a>;

/// Per-phase polls.
struct Probes<'a> {
    captured: Option<Poll<'a>>,
    applied: Option<Poll<'a>>,
    /// Anything else that moves while the phase progresses (only checked for stalls).
    moving: Poll<'a>,
    complete: Check<'a>,
}

/// Polls every `FOLLOW_INTERVAL` until the other end is complete; prints progress each time a
/// stage passes a multiple of `PROGRESS_EVERY`.
fn follow(
    what: &str,
    start: Instant,
    written: &AtomicU64,
    mut probes: Probes<'_>,
) -> Result<(Duration, Vec<Sample>)> {
    let mut samples: Vec<Sample> = Vec::new();
    let mut next = start;
    let mut printed = (0, 0, 0);
    let mut last_progress = (Instant::now(), (0, 0, 0, 0));
    loop {
        next += FOLLOW_INTERVAL;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
        let written = written.load(Ordering::Relaxed);
        let captured = match probes.captured.as_mut() {
            Some(f) => Some(f()?),
            None => None,
        };
        let applied = match probes.applied.as_mut() {
            Some(f) => Some(f()?),
            None => None,
        };
        let sample = Sample {
            t: start.elapsed(),
            written,
            captured,
            applied,
        };
        samples.push(sample);
        let steps = (
            written / PROGRESS_EVERY,
            captured.unwrap_or(0) / PROGRESS_EVERY,
            applied.unwrap_or(0) / PROGRESS_EVERY,
        );
        let complete = (probes.complete)(&sample)?;
        if steps != printed || complete {
            printed = steps;
            let show = |v: Option<u64>| v.map_or("-".to_owned(), |v| thousands(v as f64));
            eprintln!(
                "  {what} {:>7.2} s: written {:>9}, captured {:>9}, at the other end {:>9}",
                sample.t.as_secs_f64(),
                thousands(written as f64),
                show(captured),
                show(applied),
            );
        }
        if complete {
            return Ok((sample.t, samples));
        }
        let state = (
            written,
            captured.unwrap_or(0),
            applied.unwrap_or(0),
            (probes.moving)()?,
        );
        if state != last_progress.1 {
            last_progress = (Instant::now(), state);
        } else if last_progress.0.elapsed() > STALL_TIMEOUT {
            return Err(format!(
                "{what}: no progress for {STALL_TIMEOUT:?} (written {written}, captured \
                 {captured:?}, at the other end {applied:?})"
            )
            .into());
        }
    }
}

/// Result of one timed phase.
struct Phase {
    writer_done: Duration,
    total: Duration,
    samples: Vec<Sample>,
    wal_bytes: u64,
    /// Checkpoints requested during the phase (`max_wal_size` reached, or anyone's
    /// `CHECKPOINT`: the server is shared).
    checkpoints: u64,
    /// WAL records and full-page images written during the phase (the whole server).
    wal_records: u64,
    wal_fpi: u64,
    cpu: Vec<String>,
    /// Row writes per table in each database (`pg_stat_user_tables`).
    row_writes: Vec<String>,
}

/// Runs `write` on a writer thread against `origin_url` and follows it with `probes` until
/// complete.
fn run_phase(
    what: &str,
    origin_url: &str,
    groups: &Groups,
    databases: [(&str, &str); 2],
    writes: u64,
    write: impl FnOnce(&mut Client, Instant, &AtomicU64) -> Result<Duration> + Send + 'static,
    probes: Probes<'_>,
) -> Result<Phase> {
    checkpoint()?;
    let writes_before = databases
        .iter()
        .map(|(_, url)| table_writes(url))
        .collect::<Result<Vec<_>>>()?;
    let mut admin = connect(&admin_url(), PROBE_APP)?;
    let wal_before = wal_lsn(&mut admin)?;
    let checkpoints_before = checkpoints_requested(&mut admin)?;
    let wal_counts_before = wal_counts(&mut admin)?;
    // The writer connects before the clock starts.
    let mut client = connect(origin_url, WRITER_APP)?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Instant>();
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let written = written.clone();
        std::thread::Builder::new()
            .name(WRITER_THREAD.into())
            .spawn(move || -> Result<(Duration, u64, Client)> {
                let start = ready_rx.recv()?;
                let done = write(&mut client, start, &written)?;
                // The client is returned, so its backend is still there for the CPU report.
                Ok((done, own_cpu_ns(), client))
            })?
    };
    let backends = backends()?;
    let cpu_before = cpu_snapshot();
    let start = Instant::now();
    ready_tx.send(start)?;
    let followed = follow(what, start, &written, probes);
    let writer = writer.join().map_err(|_| "the writer thread panicked")?;
    let cpu_after = cpu_snapshot();
    let (total, samples) = followed?;
    let (writer_done, writer_ns, client) = writer?;
    drop(client);
    let wal_after = wal_lsn(&mut admin)?;
    let checkpoints = checkpoints_requested(&mut admin)?.saturating_sub(checkpoints_before);
    let wal_counts_after = wal_counts(&mut admin)?;
    let cpu = groups.report(&cpu_before, &cpu_after, writer_ns, &backends);
    let mut row_writes = Vec::new();
    for ((label, url), before) in databases.iter().zip(&writes_before) {
        row_writes.push(writes_line(label, before, &settled_writes(url)?, writes));
    }
    Ok(Phase {
        row_writes,
        writer_done,
        total,
        samples,
        wal_bytes: wal_after.saturating_sub(wal_before),
        checkpoints,
        wal_records: wal_counts_after.0.saturating_sub(wal_counts_before.0),
        wal_fpi: wal_counts_after.1.saturating_sub(wal_counts_before.1),
        cpu,
    })
}

/// When each stage finished and how far behind the next one fell.
fn stage_lines(phase: &Phase, writes: u64, changes: Option<u64>, unit: &str) -> Vec<String> {
    let samples = &phase.samples;
    let total = phase.total;
    let mut lines = vec![
        format!(
            "client committed all {} {unit} at {:.2} s ({} {unit}/s while replicating)",
            thousands(writes as f64),
            phase.writer_done.as_secs_f64(),
            thousands(per_sec(writes, phase.writer_done)),
        ),
        format!(
            "other end complete at {:.2} s, {:.2} s after the client's last commit",
            total.as_secs_f64(),
            total.saturating_sub(phase.writer_done).as_secs_f64(),
        ),
    ];
    let show = |v: Option<u64>| v.map_or("-".to_owned(), |v| thousands(v as f64));
    if let Some(s) = samples.iter().find(|s| s.t >= phase.writer_done) {
        lines.push(format!(
            "when the client finished: {} captured, {} at the other end",
            show(s.captured),
            show(s.applied),
        ));
    }
    if let Some(changes) = changes {
        let captured_all = samples
            .iter()
            .find(|s| s.captured.is_some_and(|c| c >= changes));
        if let Some(c) = captured_all {
            lines.push(format!(
                "origin had captured all {} changes at {:.2} s ({} changes/s from the first \
                 write); {} at the other end then, the rest took {:.2} s more",
                thousands(changes as f64),
                c.t.as_secs_f64(),
                thousands(per_sec(changes, c.t)),
                show(c.applied),
                total.saturating_sub(c.t).as_secs_f64(),
            ));
        }
        let backlog_capture = samples
            .iter()
            .map(|s| s.written.saturating_sub(s.captured.unwrap_or(0)))
            .max()
            .unwrap_or(0);
        let backlog_apply = samples
            .iter()
            .map(|s| {
                s.captured
                    .unwrap_or(0)
                    .saturating_sub(s.applied.unwrap_or(0))
            })
            .max()
            .unwrap_or(0);
        lines.push(format!(
            "largest backlogs: written but not captured {}, captured but not at the other end {}",
            thousands(backlog_capture as f64),
            thousands(backlog_apply as f64),
        ));
        // Capture and apply rates over the phase, by quarter of the run.
        let quarters: Vec<String> = (1..=4)
            .filter_map(|q| {
                let t = total.mul_f64(q as f64 / 4.0);
                samples.iter().find(|s| s.t >= t).map(|s| {
                    format!(
                        "{:.1} s: {} captured, {} applied",
                        s.t.as_secs_f64(),
                        show(s.captured),
                        show(s.applied)
                    )
                })
            })
            .collect();
        lines.push(format!("over time: {}", quarters.join("; ")));
    }
    lines.push(format!(
        "WAL written by the whole server during the phase: {:.0} MB ({:.0} bytes, {:.1} \
         records per client write), {} full-page images; {} checkpoints requested meanwhile \
         (max_wal_size reached, or anyone's CHECKPOINT: the first write to a page after one \
         logs the whole page)",
        phase.wal_bytes as f64 / 1e6,
        phase.wal_bytes as f64 / writes as f64,
        phase.wal_records as f64 / writes as f64,
        thousands(phase.wal_fpi as f64),
        phase.checkpoints
    ));
    lines.extend(phase.row_writes.iter().cloned());
    lines
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

    fn ratio(&mut self, what: &str, ratio: f64, target: Option<f64>) {
        let verdict = match target {
            Some(target) if ratio >= target => format!("target >= {target}: met"),
            Some(target) => format!("target >= {target}: MISSED"),
            None => "no target".to_owned(),
        };
        self.lines
            .push((what.to_owned(), format!("{ratio:.3}"), verdict));
    }

    fn print(&self) {
        let w0 = self.lines.iter().map(|l| l.0.len()).max().unwrap_or(0);
        let w1 = self.lines.iter().map(|l| l.1.len()).max().unwrap_or(0);
        for (a, b, c) in &self.lines {
            println!("  {a:<w0$}  {b:>w1$}  {c}");
        }
    }
}

fn print_lines(title: &str, lines: &[String]) {
    println!("{title}");
    for line in lines {
        println!("  {line}");
    }
}

// ---------------------------------------------------------------------------------------------
// The two setups

/// Insert and update phases of one setup.
struct Setup {
    inserts: Phase,
    updates: Phase,
    /// Changes the updates made (driftless: captured at the origin).
    update_changes: Option<u64>,
    details: Vec<String>,
}

/// Inserts are complete when `max(id)` at the other end reaches N (rows arrive in key order,
/// so that is cheap progress) and `count(*)` confirms N rows plus the marker.
fn insert_probes<'a>(
    destination_url: &str,
    rows: u64,
    captured: Option<Poll<'a>>,
    moving: Poll<'a>,
) -> Result<Probes<'a>> {
    let mut progress = connect(destination_url, PROBE_APP)?;
    let mut count = connect(destination_url, PROBE_APP)?;
    Ok(Probes {
        captured,
        applied: Some(Box::new(move || query_u64(&mut progress, MAX_ID_SQL))),
        moving,
        complete: Box::new(move |s| {
            Ok(s.applied.is_some_and(|a| a >= rows)
                && query_u64(&mut count, "SELECT count(*) FROM items")? == rows + 1)
        }),
    })
}

fn marker_done(client: &mut Client) -> Result<bool> {
    let n: i64 = client.query_one(MARKER_SQL, &[&MARKER_DONE])?.get(0);
    Ok(n == 1)
}

fn compare(origin: &str, destination: &str) -> Result<String> {
    let (a, b) = (table_hash(origin)?, table_hash(destination)?);
    if a != b {
        return Err(format!("the databases differ after the updates: {a:?} vs {b:?}").into());
    }
    Ok(format!(
        "items equal at both ends after the updates: {} rows, hash sum {}",
        thousands(a.0 as f64),
        a.1
    ))
}

/// The inserts and updates phases of a logical-replication setup (native or pglogical): the
/// writer on `origin`, completion seen at `other`, progress from the slot's confirmed position
/// (`slot_lsn_sql`). Returns both phases and the other end's sizes after the inserts.
fn logical_phases(
    name: &str,
    options: &Options,
    groups: &Groups,
    origin: (&str, &str),
    other: (&str, &str),
    slot_lsn_sql: &str,
) -> Result<(Phase, Phase, String)> {
    let (rows, updates) = (options.rows, options.updates);
    let (origin_role, origin_url) = origin;
    let (other_role, other_url) = other;
    let mut admin = connect(&admin_url(), PROBE_APP)?;
    let inserts = run_phase(
        &format!("{name} inserts"),
        origin_url,
        groups,
        [(origin_role, origin_url), (other_role, other_url)],
        rows,
        move |c, start, w| insert_rows(c, rows, start, w),
        insert_probes(
            other_url,
            rows,
            None,
            Box::new(|| query_u64(&mut admin, slot_lsn_sql)),
        )?,
    )?;
    let sizes = sizes_line(&format!("{other_role} after the inserts"), other_url)?;
    eprintln!("{name} inserts done");
    let mut admin = connect(&admin_url(), PROBE_APP)?;
    let mut probe = connect(other_url, PROBE_APP)?;
    let updates_phase = run_phase(
        &format!("{name} updates"),
        origin_url,
        groups,
        [(origin_role, origin_url), (other_role, other_url)],
        updates + 1,
        move |c, start, w| update_rows(c, rows, updates, true, start, w),
        Probes {
            captured: None,
            applied: None,
            moving: Box::new(|| query_u64(&mut admin, slot_lsn_sql)),
            complete: Box::new(|_| marker_done(&mut probe)),
        },
    )?;
    Ok((inserts, updates_phase, sizes))
}

fn run_native(server: &mut Server, options: &Options) -> Result<Setup> {
    let publisher = server.create_database("pub")?;
    let subscriber = server.create_database("sub")?;
    let slot = format!("{}_slot", server.prefix);
    {
        let mut publisher = connect(&publisher, PROBE_APP)?;
        publisher.batch_execute("CREATE PUBLICATION bench_pub FOR TABLE items")?;
        publisher.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )?;
        server.slot = Some(slot.clone());
    }
    let subscription = format!("{}_sub", server.prefix);
    let conninfo = database_url(&server.database_name("pub"));
    connect(&subscriber, PROBE_APP)?.batch_execute(&format!(
        "CREATE SUBSCRIPTION \"{subscription}\" CONNECTION '{conninfo}' PUBLICATION bench_pub \
         WITH (create_slot = false, slot_name = '{slot}', copy_data = false)"
    ))?;
    server.subscription = Some((server.database_name("sub"), subscription.clone()));
    let marker = replicate_marker(&publisher, &subscriber)?;
    eprintln!(
        "native: subscription streaming (marker row replicated in {:.0} ms)",
        marker.as_secs_f64() * 1e3
    );
    let groups = Groups {
        main: std::process::id(),
        origin_workers: HashSet::new(),
        destination_workers: HashSet::new(),
        origin_poller: HashSet::new(),
        origin_db: server.database_name("pub"),
        destination_db: server.database_name("sub"),
    };
    let slot_lsn_sql = format!(
        "SELECT coalesce((confirmed_flush_lsn - '0/0'::pg_lsn)::int8, 0) FROM \
         pg_replication_slots WHERE slot_name = '{slot}'"
    );
    let (inserts, updates_phase, sizes) = logical_phases(
        "native",
        options,
        &groups,
        ("publisher", &publisher),
        ("subscriber", &subscriber),
        &slot_lsn_sql,
    )?;
    eprintln!("native updates done; comparing");
    let details = vec![
        compare(&publisher, &subscriber)?,
        sizes,
        "subscription: pgoutput, default options (binary = false, streaming = off, \
         synchronous_commit = off for the apply worker), copy_data = false"
            .to_owned(),
    ];
    let errors = server.drop_replication();
    if !errors.is_empty() {
        return Err(errors.join("; ").into());
    }
    let errors = server.drop_databases(Some(&["pub", "sub"]));
    if !errors.is_empty() {
        return Err(errors.join("; ").into());
    }
    Ok(Setup {
        inserts,
        updates: updates_phase,
        update_changes: None,
        details,
    })
}

fn run_driftless(server: &mut Server, options: &Options) -> Result<Setup> {
    let (rows, updates) = (options.rows, options.updates);
    let origin_url = server.create_database("origin")?;
    let destination_url = server.create_database("dest")?;
    let dir = tempfile::tempdir()?;
    let origin_runtime = node_runtime(ORIGIN_RT)?;
    let destination_runtime = node_runtime(DESTINATION_RT)?;
    let peers = destination_runtime
        .0
        .block_on(TcpListener::bind("127.0.0.1:0"))?;
    let peers_addr = peers.local_addr()?;
    let sync = sync_section(options);
    let mut destination = Node::start(
        dir.path(),
        DESTINATION,
        destination_runtime,
        &destination_url,
        Some(peers),
        &format!("[listen]\naddr = \"{peers_addr}\"\ninsecure = true"),
        &sync,
    )?;
    let destination_poller = threads_named(CAPTURE_THREAD);
    let mut origin = Node::start(
        dir.path(),
        ORIGIN,
        origin_runtime,
        &origin_url,
        None,
        &format!("[[peers]]\nname = \"{DESTINATION}\"\naddr = \"{peers_addr}\"\ninsecure = true"),
        &sync,
    )?;
    let origin_poller = threads_named(CAPTURE_THREAD)
        .difference(&destination_poller)
        .copied()
        .collect();
    wait_linked(&origin, &destination)?;
    let marker = replicate_marker(&origin_url, &destination_url)?;
    eprintln!(
        "driftless: nodes linked (marker row replicated in {:.0} ms)",
        marker.as_secs_f64() * 1e3
    );
    let groups = Groups {
        main: std::process::id(),
        origin_workers: origin.workers.clone(),
        destination_workers: destination.workers.clone(),
        origin_poller,
        origin_db: server.database_name("origin"),
        destination_db: server.database_name("dest"),
    };

    // Inserts.
    let before = (origin.status()?, destination.status()?);
    let captured_base = origin.metric("changes_captured")?;
    let inserts = run_phase(
        "driftless inserts",
        &origin_url,
        &groups,
        [("origin", &origin_url), ("destination", &destination_url)],
        rows,
        move |c, start, w| insert_rows(c, rows, start, w),
        insert_probes(
            &destination_url,
            rows,
            Some(Box::new(|| {
                Ok(origin.metric("changes_captured")? - captured_base)
            })),
            Box::new(|| destination.metric("changes_applied")),
        )?,
    )?;
    let after_inserts = (origin.status()?, destination.status()?);
    let sizes = [
        sizes_line("origin after the inserts", &origin_url)?,
        sizes_line("destination after the inserts", &destination_url)?,
    ];
    eprintln!("driftless inserts done");

    // Updates.
    let captured_base = origin.metric("changes_captured")?;
    let applied_base = destination.metric("changes_applied")?;
    let before_updates = (origin.status()?, destination.status()?);
    let mut probe = connect(&destination_url, PROBE_APP)?;
    let updates_phase = run_phase(
        "driftless updates",
        &origin_url,
        &groups,
        [("origin", &origin_url), ("destination", &destination_url)],
        updates + 1,
        move |c, start, w| update_rows(c, rows, updates, true, start, w),
        Probes {
            captured: Some(Box::new(|| {
                Ok(origin.metric("changes_captured")? - captured_base)
            })),
            applied: Some(Box::new(|| {
                Ok(destination.metric("changes_applied")? - applied_base)
            })),
            moving: Box::new(|| Ok(0)),
            complete: Box::new(|_| marker_done(&mut probe)),
        },
    )?;
    let after_updates = (origin.status()?, destination.status()?);
    let update_changes = origin.metric("changes_captured")? - captured_base;
    eprintln!("driftless updates done; comparing");
    let mut details = vec![compare(&origin_url, &destination_url)?];
    // one writer: nothing is concurrent, so any conflict recorded is a bug to look at
    for (name, url) in [("origin", &origin_url), ("destination", &destination_url)] {
        let mut probe = connect(url, PROBE_APP)?;
        let n: i64 = probe
            .query_one("SELECT count(*) FROM driftless.conflicts", &[])?
            .get(0);
        let sample: Vec<String> = probe
            .query(
                "SELECT tbl || ' ' || encode(pk, 'hex') || ' ' || col || ' ' || rule || ' winner ' \
                 || encode(winner_version, 'hex') || ' loser ' || encode(loser_version, 'hex') \
                 FROM driftless.conflicts ORDER BY id LIMIT 3",
                &[],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        details.push(format!(
            "conflicts recorded at the {name} (one writer: expected 0): {n} {sample:?}"
        ));
    }
    details.extend(sizes);
    details.push("inserts, node counters:".into());
    details.extend(counter_lines(&before, &after_inserts));
    details.push("updates, node counters:".into());
    details.extend(counter_lines(&before_updates, &after_updates));
    origin.stop()?;
    destination.stop()?;
    drop(origin);
    drop(destination);
    let errors = server.drop_databases(Some(&["origin", "dest"]));
    if !errors.is_empty() {
        return Err(errors.join("; ").into());
    }
    Ok(Setup {
        inserts,
        updates: updates_phase,
        update_changes: Some(update_changes),
        details,
    })
}

/// Plain writes into a database with no replication at all.
fn run_baseline(server: &mut Server, options: &Options) -> Result<(Duration, Duration)> {
    let url = server.create_database("base")?;
    checkpoint()?;
    let mut client = connect(&url, WRITER_APP)?;
    let ignored = AtomicU64::new(0);
    let inserts = insert_rows(&mut client, options.rows, Instant::now(), &ignored)?;
    checkpoint()?;
    let updates = update_rows(
        &mut client,
        options.rows,
        options.updates,
        false,
        Instant::now(),
        &ignored,
    )?;
    drop(client);
    let errors = server.drop_databases(Some(&["base"]));
    if !errors.is_empty() {
        return Err(errors.join("; ").into());
    }
    Ok((inserts, updates))
}

// ---------------------------------------------------------------------------------------------

fn main() -> Result<()> {
    let options = options()?;
    let (rows, updates) = (options.rows, options.updates);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let defaults = driftless_node::config::SyncSection::default();
    let mut admin = connect(&admin_url(), PROBE_APP)?;
    let version: String = admin.query_one("SHOW server_version", &[])?.get(0);
    let wal_level: String = admin.query_one("SHOW wal_level", &[])?.get(0);
    if (options.native || options.pglogical) && wal_level != "logical" {
        return Err(format!(
            "native logical replication needs wal_level = logical (it is {wal_level}): \
             ALTER SYSTEM SET wal_level = logical, then restart the server"
        )
        .into());
    }
    let settings: Vec<String> = [
        "shared_buffers",
        "synchronous_commit",
        "max_wal_size",
        "checkpoint_timeout",
    ]
    .iter()
    .map(|s| -> Result<String> {
        let v: String = admin.query_one(&format!("SHOW {s}"), &[])?.get(0);
        Ok(format!("{s} {v}"))
    })
    .collect::<Result<_>>()?;
    drop(admin);
    println!(
        "PostgreSQL -> PostgreSQL: driftless (two nodes in this process, no TLS over loopback) \
         vs native logical replication"
    );
    println!(
        "command: cargo bench -p driftless-node --bench pg -- --rows {rows} --updates \
         {updates}{}{}{}",
        options
            .batch_changes
            .map_or(String::new(), |b| format!(" --batch-changes {b}")),
        options
            .window
            .map_or(String::new(), |w| format!(" --window {w}")),
        match (options.native, options.pglogical, options.driftless) {
            (true, false, false) => " --only native",
            (false, true, false) => " --only pglogical",
            (false, false, true) => " --only driftless",
            _ => "",
        }
    );
    println!(
        "rows {rows} (~100 bytes each), updates {updates}; client transactions of \
         {CLIENT_TX_ROWS} rows, one statement each; PostgreSQL {version}, wal_level \
         {wal_level}, {}; [sync] batch_changes_max {}, window_batches {}, poll_interval_ms {}, \
         compact and check intervals {QUIET_MS} ms; {cores} cores",
        settings.join(", "),
        options.batch_changes.unwrap_or(defaults.batch_changes_max),
        options.window.unwrap_or(defaults.window_batches),
        defaults.poll_interval_ms,
    );
    println!();
    for removed in sweep_leftovers()? {
        eprintln!("removed the leftovers of an interrupted run: {removed}");
    }
    let started = Instant::now();
    let mut server = Server::new();

    let (base_insert, base_update) = run_baseline(&mut server, &options)?;
    eprintln!(
        "baseline: {} inserts/s, {} updates/s",
        thousands(per_sec(rows, base_insert)),
        thousands(per_sec(updates, base_update))
    );
    let native = if options.native {
        Some(run_native(&mut server, &options)?)
    } else {
        None
    };
    let pglogical = if options.pglogical {
        match pglogical::unavailable(&version)? {
            None => Some(pglogical::run(&options, &version)?),
            Some(why) => {
                eprintln!("pglogical skipped: {why}");
                None
            }
        }
    } else {
        None
    };
    let driftless = if options.driftless {
        Some(run_driftless(&mut server, &options)?)
    } else {
        None
    };
    drop(server);

    let mut table = Table { lines: Vec::new() };
    table.rate(
        "0. plain insert, no replication",
        rows,
        base_insert,
        "rows/s",
    );
    table.rate(
        "   plain random update, no replication",
        updates,
        base_update,
        "rows/s",
    );
    if let Some(n) = &native {
        table.rate(
            "1. native: client insert rate at the publisher",
            rows,
            n.inserts.writer_done,
            "rows/s",
        );
        table.rate(
            "   native: sync inserts (first write -> subscriber holds all)",
            rows,
            n.inserts.total,
            "rows/s",
        );
        table.rate(
            "   native: client update rate at the publisher",
            updates,
            n.updates.writer_done,
            "rows/s",
        );
        table.rate(
            "   native: sync updates (first write -> marker at subscriber)",
            updates,
            n.updates.total,
            "rows/s",
        );
    }
    if let Some(p) = &pglogical {
        table.rate(
            "1b. pglogical: sync inserts (first write -> subscriber holds all)",
            rows,
            p.inserts.total,
            "rows/s",
        );
        table.rate(
            "    pglogical: sync updates (first write -> marker at subscriber)",
            updates,
            p.updates.total,
            "rows/s",
        );
    }
    if let Some(d) = &driftless {
        table.rate(
            "2. driftless: client insert rate at the origin",
            rows,
            d.inserts.writer_done,
            "rows/s",
        );
        table.rate(
            "   driftless: sync inserts (first write -> destination holds all)",
            rows,
            d.inserts.total,
            "rows/s",
        );
        table.rate(
            "   driftless: client update rate at the origin",
            updates,
            d.updates.writer_done,
            "rows/s",
        );
        table.rate(
            "   driftless: sync updates (first write -> marker at destination)",
            updates,
            d.updates.total,
            "rows/s",
        );
    }
    if let (Some(n), Some(d)) = (&native, &driftless) {
        table.ratio(
            "ratio sync inserts, driftless / native",
            n.inserts.total.as_secs_f64() / d.inserts.total.as_secs_f64(),
            Some(INSERT_RATIO_TARGET),
        );
        table.ratio(
            "ratio sync updates, driftless / native",
            n.updates.total.as_secs_f64() / d.updates.total.as_secs_f64(),
            Some(UPDATE_RATIO_TARGET),
        );
        table.ratio(
            "ratio client insert rate, driftless origin / native publisher",
            n.inserts.writer_done.as_secs_f64() / d.inserts.writer_done.as_secs_f64(),
            None,
        );
        table.ratio(
            "ratio client update rate, driftless origin / native publisher",
            n.updates.writer_done.as_secs_f64() / d.updates.writer_done.as_secs_f64(),
            None,
        );
    }
    if let (Some(p), Some(d)) = (&pglogical, &driftless) {
        table.ratio(
            "ratio sync inserts, driftless / pglogical",
            p.inserts.total.as_secs_f64() / d.inserts.total.as_secs_f64(),
            Some(PGLOGICAL_RATIO_TARGET),
        );
        table.ratio(
            "ratio sync updates, driftless / pglogical",
            p.updates.total.as_secs_f64() / d.updates.total.as_secs_f64(),
            Some(PGLOGICAL_RATIO_TARGET),
        );
    }
    table.print();
    println!();
    for (name, setup) in [
        ("1. native", &native),
        ("1b. pglogical", &pglogical),
        ("2. driftless", &driftless),
    ] {
        let Some(setup) = setup else { continue };
        // driftless: every insert is one captured change.
        let insert_changes = setup.update_changes.map(|_| rows);
        print_lines(
            &format!("{name}: inserts (times from the first write)"),
            &stage_lines(&setup.inserts, rows, insert_changes, "rows"),
        );
        print_lines("", &setup.inserts.cpu);
        print_lines(
            &format!("{name}: updates (times from the first write)"),
            &stage_lines(&setup.updates, updates + 1, setup.update_changes, "writes"),
        );
        print_lines("", &setup.updates.cpu);
        print_lines("", &setup.details);
        println!();
    }
    println!("whole run: {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
