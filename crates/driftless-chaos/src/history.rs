//! One history, start to finish: set up the nodes, proxies and (maybe) the small disk; wait for
//! the initial rows to reach everyone; run the workload while the plan's faults fire; heal
//! everything; wait for quiescence (timed: "time to converge after heal"); stop the nodes; read
//! every replica from its file or database and check it. A failing history keeps its directory
//! (databases, `pg_dump`s of its PostgreSQL databases, logs, configs, the plan and the client
//! history) under `keep_failures_in/<seed>/`.
//!
//! PostgreSQL nodes (`HistoryOptions::postgres_nodes`, chosen by the seed) each get a database of
//! their own, `chaos_<pid>_<seed>_n<node>`, created before the nodes start and dropped when the
//! history ends, whether it passed, failed or the harness hit an error.

use crate::checker::{Verdict, check};
use crate::disk::SmallDisk;
use crate::inspect::{Probe, probe, read_replica, row_counts};
use crate::node::{NodeLayout, NodeProcess, StoreSpec};
use crate::pg::{PgDatabases, database_name};
use crate::plan::{Action, FaultKind, Noise, Plan};
use crate::proxy::{Proxy, ProxyCounts};
use crate::schema::{COUNTER_ROWS, HOT_ITEMS, SCHEMA_SQL, SCHEMA_SQL_POSTGRES, initial_rows_sql};
use crate::workload::{ClientOp, Outcome, run_writer};
use driftless_core::NodeId;
use driftless_node::node_id_from_name;
use driftless_sim::Rng;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The node metrics collected at the end of a history.
pub const NODE_METRICS: [&str; 3] = [
    "driftless_duplicate_changes_total",
    "driftless_drift_incidents_total",
    "driftless_reconciliation_runs_total",
];

/// How a history is run (the plan itself comes from the seed).
#[derive(Debug, Clone)]
pub struct HistoryOptions {
    pub seed: u64,
    pub nodes: usize,
    /// How many of the nodes (chosen by the seed) keep their replica in PostgreSQL, on the
    /// server named by `DRIFTLESS_PG_URL` (default: the local server, see [`crate::pg`]).
    pub postgres_nodes: usize,
    /// How long faults and client writes go on.
    pub duration: Duration,
    /// The `driftless` binary.
    pub driftless: PathBuf,
    /// Extra environment of every node process (e.g. `DRIFTLESS_FAULT=drop-every-50`).
    pub node_env: Vec<(String, String)>,
    /// Without faults the history is only the workload (used to prove the checker can fail).
    pub faults: bool,
    /// Where a failing history's directory is copied.
    pub keep_failures_in: PathBuf,
    /// How long the replicas get to become quiet after the heal.
    pub quiesce_timeout: Duration,
    /// How long a node gets to open its admin port at startup.
    pub ready_timeout: Duration,
    /// The command that replays this history, printed with a failure.
    pub replay: String,
    /// Keep the directory even when the history passes (for inspection).
    pub keep_always: bool,
}

/// What one history did and what the checker found.
#[derive(Debug, Clone, Default)]
pub struct HistoryResult {
    pub seed: u64,
    pub topology: String,
    pub nodes: usize,
    /// The nodes whose replica was a PostgreSQL database.
    pub postgres_nodes: Vec<usize>,
    pub faults: BTreeMap<FaultKind, u64>,
    /// Faults the plan wanted but that could not be injected, with the reason.
    pub skipped: Vec<String>,
    pub proxy: ProxyCounts,
    pub ops_ok: u64,
    pub ops_no_effect: u64,
    pub ops_failed: u64,
    pub ops_unknown: u64,
    /// Client writes that failed because the disk was full.
    pub ops_disk_full: u64,
    /// Whether a node logged a disk-full error while its disk was full.
    pub disk_full_logged: Option<bool>,
    /// Node processes that exited without being told to.
    pub unexpected_exits: Vec<String>,
    /// Nodes that did not exit with status 0 within 10 s of SIGTERM at the end.
    pub unclean_shutdowns: Vec<String>,
    /// From the last heal until the replicas were quiet; `None` if they never were.
    pub converge_ms: Option<u64>,
    /// Why the replicas were not quiet in time, if they were not.
    pub not_quiet: Option<String>,
    /// The nodes' own counters at the end, summed over nodes (lower bounds: a restart resets
    /// them): `driftless_duplicate_changes_total` (duplicate deliveries absorbed),
    /// `driftless_drift_incidents_total`, `driftless_reconciliation_runs_total`.
    pub node_metrics: BTreeMap<String, f64>,
    pub verdict: Verdict,
    /// The harness itself failed (not a finding about driftless).
    pub harness_error: Option<String>,
    pub kept: Option<PathBuf>,
    pub replay: String,
}

impl HistoryResult {
    /// A finding: the checker failed, replicas never became quiet, or a node crashed.
    pub fn failed(&self) -> bool {
        self.verdict.failed()
            || self.converge_ms.is_none()
            || !self.unexpected_exits.is_empty()
            || self.harness_error.is_some()
    }

    /// A readable account of what went wrong (empty when nothing did).
    pub fn failure_text(&self) -> String {
        let mut out = String::new();
        if let Some(e) = &self.harness_error {
            let _ = writeln!(out, "harness error: {e}");
        }
        if let Some(e) = &self.not_quiet {
            let _ = writeln!(out, "the replicas did not become quiet after the heal: {e}");
        }
        for e in &self.unexpected_exits {
            let _ = writeln!(out, "unexpected exit: {e}");
        }
        if self.verdict.failed() {
            let _ = writeln!(out, "checker: {}", self.verdict.counts());
        }
        for p in &self.verdict.problems {
            let _ = writeln!(out, "  {p}");
        }
        out
    }
}

/// Loopback ports are taken from below Linux's ephemeral range (32768 and up), so an outgoing
/// connection can never hold the port of a node that is down, waiting for its restart.
const PORTS_LOW: u16 = 20_000;
const PORTS_HIGH: u16 = 32_000;

/// `n` distinct free loopback ports: all bound at once (so they differ), then released.
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let span = u32::from(PORTS_HIGH - PORTS_LOW);
    let start = (std::process::id().wrapping_mul(7_919)
        + NEXT.fetch_add(n as u32 * 3 + 11, Ordering::Relaxed))
        % span;
    let mut held = Vec::new();
    for offset in 0..span {
        if held.len() == n {
            break;
        }
        let port = PORTS_LOW + ((start + offset) % span) as u16;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
        }
    }
    if held.len() < n {
        return Err(std::io::Error::other("no free loopback ports"));
    }
    held.iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// The running parts of a history.
struct Cluster {
    plan: Plan,
    ids: Vec<NodeId>,
    nodes: Vec<NodeProcess>,
    proxies: Vec<Proxy>,
    small_disk: Option<SmallDisk>,
    /// The PostgreSQL admin connection string, when some node is a PostgreSQL one.
    pg_admin: Option<String>,
    /// Nodes deliberately down (killed, waiting for their restart).
    down: Vec<bool>,
    disk_full: bool,
    unexpected_exits: Vec<String>,
    skipped: Vec<String>,
    faults: BTreeMap<FaultKind, u64>,
    disk_full_logged: Option<bool>,
    log_len_at_fill: usize,
}

impl Cluster {
    /// Restarts any node that died without being killed by the plan, and notes it.
    fn supervise(&mut self, phase: &str) {
        for i in 0..self.nodes.len() {
            if self.down[i] {
                continue;
            }
            if let Some(status) = self.nodes[i].exited() {
                let disk = if self.disk_full && self.plan.small_disk_node == Some(i) {
                    " (its disk was full)"
                } else {
                    ""
                };
                let tail = self.nodes[i].log_tail(1_500);
                let note =
                    format!("n{i} exited with {status} during {phase}{disk}; stderr ends:\n{tail}");
                if disk.is_empty() {
                    self.unexpected_exits.push(note);
                } else {
                    self.skipped.push(note);
                }
                let _ = self.nodes[i].spawn();
            } else if !self.nodes[i].is_running() {
                let _ = self.nodes[i].spawn();
            }
        }
    }

    fn apply(&mut self, action: Action, starts: Option<FaultKind>) {
        let injected = match action {
            Action::Kill(n) => {
                self.nodes[n].kill();
                self.down[n] = true;
                true
            }
            Action::Restart(n) => {
                self.down[n] = false;
                let _ = self.nodes[n].spawn();
                true
            }
            Action::Pause(n) => self.nodes[n].pause().is_ok() && self.nodes[n].paused,
            Action::Resume(n) => self.nodes[n].resume().is_ok(),
            Action::Skew { node, ms } => self.nodes[node].set_skew(ms).is_ok(),
            Action::Cut { link, cut } => {
                self.proxies[link].set_cut(Some(cut));
                true
            }
            Action::Mend(link) => {
                self.proxies[link].set_cut(None);
                true
            }
            Action::Noise { link, noise } => {
                self.proxies[link].set_noise(noise);
                true
            }
            Action::FillDisk(n) => match &self.small_disk {
                Some(disk) => {
                    self.log_len_at_fill = self.nodes[n].log_text().len();
                    // An application checkpoints the WAL back to zero bytes first, so the next
                    // writes need new space (a WAL that already has room would absorb them).
                    if let Some(db) = self.nodes[n].store.sqlite_path()
                        && let Ok(conn) = rusqlite::Connection::open(db)
                    {
                        let _ = conn.busy_timeout(Duration::from_millis(500));
                        let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
                    }
                    let filled = disk.fill();
                    self.disk_full = filled.is_ok();
                    if let Err(e) = filled {
                        self.skipped
                            .push(format!("disk full on n{n}: ballast: {e}"));
                    }
                    self.disk_full
                }
                None => false,
            },
            Action::FreeDisk(n) => match &self.small_disk {
                Some(disk) => {
                    if self.disk_full {
                        let log = self.nodes[n].log_text();
                        let new = log.get(self.log_len_at_fill..).unwrap_or("");
                        let logged = new.contains("full");
                        // A node that was down the whole window had nothing to log.
                        if logged || !new.is_empty() || self.nodes[n].is_running() {
                            self.disk_full_logged =
                                Some(self.disk_full_logged.unwrap_or(false) || logged);
                        }
                    }
                    self.disk_full = false;
                    disk.free().is_ok()
                }
                None => false,
            },
            Action::TerminateBackends(n) => match (&self.pg_admin, &self.nodes[n].store) {
                (Some(admin), StoreSpec::Postgres { database, .. }) => {
                    match crate::pg::terminate_backends(admin, database) {
                        Ok(terminated) => terminated > 0,
                        Err(e) => {
                            self.skipped.push(format!("{action:?}: {e}"));
                            false
                        }
                    }
                }
                _ => false,
            },
        };
        if let Some(kind) = starts {
            if injected {
                *self.faults.entry(kind).or_default() += 1;
            } else if kind != FaultKind::DiskFull {
                self.skipped
                    .push(format!("{kind}: {action:?} could not be injected"));
            }
        }
    }

    /// Undoes every fault: resume, restart, mend, quiet links, clocks back, disk freed.
    fn heal(&mut self) {
        for n in 0..self.nodes.len() {
            let _ = self.nodes[n].resume();
            let _ = self.nodes[n].set_skew(0);
            self.down[n] = false;
        }
        for p in &self.proxies {
            p.set_cut(None);
            p.set_noise(Noise::default());
        }
        if let Some(n) = self.plan.small_disk_node
            && self.disk_full
        {
            self.apply(Action::FreeDisk(n), None);
        }
        self.supervise("the heal");
    }

    fn probes(&self) -> Result<Vec<Probe>, String> {
        self.nodes
            .iter()
            .map(|n| probe(&n.store).map_err(|e| format!("{}: {e}", n.name)))
            .collect()
    }

    /// Quiet: every node running, nothing pending or held, and every link's receiver has
    /// applied the sender's whole log, in two probes in a row with the same log heads.
    fn wait_quiet(&mut self, timeout: Duration, phase: &str) -> Result<Duration, String> {
        let started = Instant::now();
        let mut previous: Option<Vec<Probe>> = None;
        loop {
            self.supervise(phase);
            let state = self.probes();
            let quiet = match &state {
                Ok(p) => self.is_quiet(p),
                Err(_) => false,
            };
            match (quiet, &previous, &state) {
                (true, Some(prev), Ok(now))
                    if prev.iter().zip(now).all(|(a, b)| a.log_head == b.log_head) =>
                {
                    return Ok(started.elapsed());
                }
                (true, _, Ok(now)) => previous = Some(now.clone()),
                _ => previous = None,
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "not quiet after {timeout:?} ({phase}); last probes: {state:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn is_quiet(&self, probes: &[Probe]) -> bool {
        if self.nodes.iter().any(|n| !n.is_running() || n.paused) {
            return false;
        }
        if probes.iter().any(|p| p.pending > 0 || p.held > 0) {
            return false;
        }
        self.plan.links.iter().all(|l| {
            let (d, s) = (l.dialer, l.listener);
            let applied = |receiver: usize, sender: usize| {
                probes[receiver]
                    .cursors
                    .get(&self.ids[sender])
                    .copied()
                    .unwrap_or(0)
                    >= probes[sender].log_head
            };
            applied(d, s) && applied(s, d)
        })
    }

    fn proxy_counts(&self) -> ProxyCounts {
        let mut total = ProxyCounts::default();
        for p in &self.proxies {
            total.add(&p.counts());
        }
        total
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if entry.file_name() != "ballast" {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

fn write_ops(path: &Path, ops: &[ClientOp]) -> std::io::Result<()> {
    let mut text = String::new();
    for op in ops {
        let _ = writeln!(
            text,
            "n{} #{} @{}ms {:?} {}({}) {:?} delta={} -> {:?}",
            op.node, op.n, op.at_ms, op.kind, op.table, op.key, op.cells, op.delta, op.outcome
        );
    }
    std::fs::write(path, text)
}

/// Runs one history. Never panics on a driftless failure: everything found is in the result.
pub fn run_history(options: &HistoryOptions) -> HistoryResult {
    let plan = Plan::generate_with_postgres(
        options.seed,
        options.nodes,
        options.duration.as_millis() as u64,
        options.faults,
        options.postgres_nodes,
    );
    let mut result = HistoryResult {
        seed: options.seed,
        topology: format!("{:?}", plan.topology),
        nodes: plan.nodes,
        postgres_nodes: (0..plan.nodes).filter(|n| plan.postgres[*n]).collect(),
        replay: options.replay.clone(),
        ..HistoryResult::default()
    };
    let dir = match tempfile::Builder::new()
        .prefix(&format!("driftless-chaos-{}-", options.seed))
        .tempdir()
    {
        Ok(d) => d,
        Err(e) => {
            result.harness_error = Some(format!("temp dir: {e}"));
            return result;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            result.harness_error = Some(format!("tokio runtime: {e}"));
            return result;
        }
    };
    let mut ops = Vec::new();
    let outcome = run_in(&plan, options, dir.path(), &runtime, &mut result, &mut ops);
    if let Err(e) = outcome {
        result.harness_error = Some(e);
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    if result.failed() || options.keep_always {
        let keep = options.keep_failures_in.join(options.seed.to_string());
        let mut report = format!(
            "replay: {}\n\n{}\n{}",
            options.replay,
            plan.describe(),
            result.failure_text()
        );
        for s in &result.skipped {
            let _ = writeln!(report, "note: {s}");
        }
        let _ = std::fs::remove_dir_all(&keep);
        match copy_dir(dir.path(), &keep)
            .and_then(|_| std::fs::write(keep.join("report.txt"), &report))
            .and_then(|_| write_ops(&keep.join("ops.txt"), &ops))
        {
            Ok(()) => result.kept = Some(keep),
            Err(e) => {
                let kept = dir.keep();
                result
                    .skipped
                    .push(format!("could not copy to {}: {e}", keep.display()));
                result.kept = Some(kept);
            }
        }
    }
    result
}

fn run_in(
    plan: &Plan,
    options: &HistoryOptions,
    dir: &Path,
    runtime: &tokio::runtime::Runtime,
    result: &mut HistoryResult,
    ops_out: &mut Vec<ClientOp>,
) -> Result<(), String> {
    let mut skipped = Vec::new();
    // Owned here, outside the function that owns the nodes: by the time the databases are
    // dumped (failures) and dropped (always, by `Drop`), every node process has been stopped,
    // on every way out, errors included.
    let mut databases = if plan.postgres.contains(&true) {
        Some(PgDatabases::new(&crate::pg::admin_url())?)
    } else {
        None
    };
    let outcome = run_with_databases(
        plan,
        options,
        dir,
        runtime,
        result,
        ops_out,
        &mut databases,
        &mut skipped,
    );
    // Notes taken before the cluster existed (the cluster takes them over otherwise).
    result.skipped.append(&mut skipped);
    if let Some(dbs) = &databases
        && (outcome.is_err() || result.failed() || options.keep_always)
    {
        for problem in dbs.dump_into(dir) {
            result.skipped.push(problem);
        }
    }
    outcome
}

#[allow(clippy::too_many_arguments)]
fn run_with_databases(
    plan: &Plan,
    options: &HistoryOptions,
    dir: &Path,
    runtime: &tokio::runtime::Runtime,
    result: &mut HistoryResult,
    ops_out: &mut Vec<ClientOp>,
    databases: &mut Option<PgDatabases>,
    skipped: &mut Vec<String>,
) -> Result<(), String> {
    let n = plan.nodes;
    let small_disk = match plan.small_disk_node {
        Some(node) => match SmallDisk::mount(&dir.join(format!("n{node}-disk"))) {
            Ok(disk) => Some(disk),
            Err(reason) => {
                skipped.push(format!(
                    "disk full on n{node}: cannot mount a tmpfs: {reason}"
                ));
                None
            }
        },
        None => None,
    };
    let ports = free_ports(2 * n + plan.links.len()).map_err(|e| format!("free ports: {e}"))?;
    let listen: Vec<SocketAddr> = (0..n)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], ports[2 * i])))
        .collect();
    let mut seeds = Rng::new(plan.seed ^ 0x70_7278);
    let proxies = plan
        .links
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let addr = SocketAddr::from(([127, 0, 0, 1], ports[2 * n + i]));
            runtime.block_on(Proxy::start(addr, listen[l.listener], seeds.next_u64()))
        })
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| format!("proxy: {e}"))?;
    let mut nodes = Vec::new();
    for i in 0..n {
        let name = node_name(i);
        let store = match databases.as_mut().filter(|_| plan.postgres[i]) {
            Some(dbs) => create_postgres_replica(dbs, plan.seed, i, skipped)?,
            None => {
                let db = match (&small_disk, plan.small_disk_node) {
                    (Some(disk), Some(node)) if node == i => disk.dir.join(format!("{name}.db")),
                    _ => dir.join(format!("{name}.db")),
                };
                let conn = rusqlite::Connection::open(&db).map_err(|e| format!("{name}: {e}"))?;
                conn.execute_batch(SCHEMA_SQL)
                    .map_err(|e| format!("{name} schema: {e}"))?;
                if i == 0 {
                    conn.execute_batch(&initial_rows_sql())
                        .map_err(|e| format!("initial rows: {e}"))?;
                }
                StoreSpec::Sqlite(db)
            }
        };
        let layout = NodeLayout {
            name: name.clone(),
            store,
            listen: plan
                .links
                .iter()
                .any(|l| l.listener == i)
                .then_some(listen[i]),
            admin: SocketAddr::from(([127, 0, 0, 1], ports[2 * i + 1])),
            peers: plan
                .links
                .iter()
                .zip(&proxies)
                .filter(|(l, _)| l.dialer == i)
                .map(|(l, p)| (node_name(l.listener), p.addr))
                .collect(),
        };
        nodes.push(
            NodeProcess::new(&layout, dir, &options.driftless, &options.node_env)
                .map_err(|e| format!("{name}: {e}"))?,
        );
    }
    std::fs::write(dir.join("plan.txt"), plan.describe()).map_err(|e| e.to_string())?;
    let mut cluster = Cluster {
        plan: plan.clone(),
        ids: (0..n).map(|i| node_id_from_name(&node_name(i))).collect(),
        nodes,
        proxies,
        small_disk,
        pg_admin: databases.as_ref().map(|d| d.admin().to_owned()),
        down: vec![false; n],
        disk_full: false,
        unexpected_exits: Vec::new(),
        skipped: std::mem::take(skipped),
        faults: BTreeMap::new(),
        disk_full_logged: None,
        log_len_at_fill: 0,
    };
    let outcome = drive(&mut cluster, options, result, ops_out);
    // Stop the nodes before reading their files (and before the small disk is unmounted).
    if outcome.is_ok() {
        for node in &mut cluster.nodes {
            match node.terminate(Duration::from_secs(10)) {
                Some(status) if status.success() => {}
                other => result.unclean_shutdowns.push(format!(
                    "{}: {}",
                    node.name,
                    other.map_or("killed after 10 s".to_owned(), |s| s.to_string())
                )),
            }
        }
    }
    for node in &mut cluster.nodes {
        node.kill();
    }
    result.faults = std::mem::take(&mut cluster.faults);
    result.skipped.append(&mut cluster.skipped);
    result.unexpected_exits = std::mem::take(&mut cluster.unexpected_exits);
    result.proxy = cluster.proxy_counts();
    result.disk_full_logged = cluster.disk_full_logged;
    if outcome.is_ok() {
        let replicas = cluster
            .nodes
            .iter()
            .zip(&cluster.ids)
            .map(|(node, id)| {
                read_replica(&node.store, *id)
                    .map_err(|e| format!("{} ({}): {e}", node.name, node.store.describe()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        result.verdict = check(&cluster.ids, &replicas, ops_out);
    }
    if result.failed() || options.keep_always {
        // Keep the small disk's files: copy them out before it is unmounted.
        if let Some(disk) = &cluster.small_disk {
            let _ = copy_dir(&disk.dir, &dir.join("small-disk-copy"));
        }
    }
    if let Some(disk) = &mut cluster.small_disk {
        disk.unmount();
    }
    outcome
}

/// Creates node `node`'s PostgreSQL database with the chaos schema (and the initial rows on node
/// 0), installs `amcheck` for the integrity check at the end when the server allows it.
fn create_postgres_replica(
    databases: &mut PgDatabases,
    seed: u64,
    node: usize,
    notes: &mut Vec<String>,
) -> Result<StoreSpec, String> {
    let database = database_name(seed, node);
    let url = databases.create(&database)?;
    let mut client = crate::pg::connect(&url).map_err(|e| format!("connect to {database}: {e}"))?;
    client
        .batch_execute(SCHEMA_SQL_POSTGRES)
        .map_err(|e| format!("{database} schema: {e}"))?;
    if node == 0 {
        client
            .batch_execute(&initial_rows_sql())
            .map_err(|e| format!("{database} initial rows: {e}"))?;
    }
    if let Err(e) = client.batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck") {
        notes.push(format!(
            "integrity of PostgreSQL replicas not checked: CREATE EXTENSION amcheck: {e}"
        ));
    }
    Ok(StoreSpec::Postgres { url, database })
}

/// Starts the nodes, runs the workload and the faults, heals and waits for quiet.
fn drive(
    cluster: &mut Cluster,
    options: &HistoryOptions,
    result: &mut HistoryResult,
    ops_out: &mut Vec<ClientOp>,
) -> Result<(), String> {
    for node in &mut cluster.nodes {
        node.spawn()
            .map_err(|e| format!("spawn {}: {e}", node.name))?;
    }
    for node in &mut cluster.nodes {
        node.wait_ready(options.ready_timeout)?;
    }
    // The initial rows (written on n0 before it started) reach everyone before the workload.
    let started = Instant::now();
    loop {
        cluster.wait_quiet(options.quiesce_timeout, "the initial sync")?;
        let complete = cluster
            .nodes
            .iter()
            .all(|node| row_counts(&node.store) == Ok((HOT_ITEMS as u64, COUNTER_ROWS as u64)));
        if complete {
            break;
        }
        if started.elapsed() > options.quiesce_timeout {
            return Err("the initial rows did not reach every node".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut seeds = Rng::new(cluster.plan.workload_seed);
    let writers: Vec<_> = cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let (store, seed, stop) = (node.store.clone(), seeds.next_u64(), stop.clone());
            std::thread::spawn(move || run_writer(i, store, seed, stop, t0))
        })
        .collect();
    let events = cluster.plan.events.clone();
    let mut next = 0;
    let end = Duration::from_millis(cluster.plan.duration_ms);
    while t0.elapsed() < end {
        let now_ms = t0.elapsed().as_millis() as u64;
        while next < events.len() && events[next].at_ms <= now_ms {
            cluster.apply(events[next].action, events[next].starts);
            next += 1;
        }
        cluster.supervise("the faults");
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        ops_out.extend(
            w.join()
                .map_err(|_| "a writer thread panicked".to_owned())?,
        );
    }
    cluster.heal();
    match cluster.wait_quiet(options.quiesce_timeout, "convergence after the heal") {
        Ok(elapsed) => result.converge_ms = Some(elapsed.as_millis() as u64),
        Err(e) => result.not_quiet = Some(e),
    }
    for node in &cluster.nodes {
        for (name, value) in crate::inspect::scrape_metrics(node.admin).unwrap_or_default() {
            if NODE_METRICS.contains(&name.as_str()) {
                *result.node_metrics.entry(name).or_default() += value;
            }
        }
    }
    for op in ops_out.iter() {
        match &op.outcome {
            Outcome::Ok => result.ops_ok += 1,
            Outcome::NoEffect => result.ops_no_effect += 1,
            Outcome::Failed(why) => {
                result.ops_failed += 1;
                if why.contains("full") {
                    result.ops_disk_full += 1;
                }
            }
            Outcome::Unknown(_) => result.ops_unknown += 1,
        }
    }
    Ok(())
}
