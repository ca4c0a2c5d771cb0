//! The node: wires the store, the capture poller, the peer links (listener and dialers) and
//! the admin API together, and runs them until shutdown. `run(config, listeners, shutdown)` is
//! the whole daemon; the binary and the tests both call it.

use crate::config::{PeerSection, ResolvedConfig};
use crate::session::{Expect, SessionError, run_session};
use crate::status::PeerRegistry;
use crate::store_handle::DynStore;
use crate::store_handle::StoreHandle;
use driftless_core::{NodeId, SchemaFingerprint, TableName};
use driftless_sqlite::{SqliteOptions, SqliteStore};
use driftless_store::{CompactionPolicy, LogSeq, StoreError};
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long a new TCP or TLS connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often held changes are retried.
const RELEASE_HELD_INTERVAL: Duration = Duration::from_secs(1);
/// Capture records stamped per poller round. Small enough that one round holds the store for
/// well under 100 ms, so senders, acks and applies get the store between rounds while a large
/// backlog is captured (a whole `driftless_store::CAPTURE_BATCH_ROWS_MAX` round held it for up to 0.7 s).
const CAPTURE_ROUND_RECORDS: usize = 2_000;
/// How often per-table gauges (dead letters) are refreshed from the store.
const STATS_INTERVAL: Duration = Duration::from_secs(5);
/// Most inbound connections handled at once; more wait in the kernel's accept queue.
const INBOUND_CONNECTIONS_MAX: usize = 256;

/// Errors that stop a node from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Open(#[from] driftless_sqlite::OpenError),
    #[error(transparent)]
    OpenPostgres(#[from] driftless_postgres::OpenError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("TLS setup: {0}")]
    Tls(#[from] driftless_tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("the capture poller stopped: {0}")]
    Poller(String),
}

impl NodeError {
    /// Whether starting again later may succeed (the database was unreachable).
    pub fn is_transient(&self) -> bool {
        matches!(self, NodeError::OpenPostgres(e) if e.is_transient())
    }
}

/// Listening sockets, bound by the caller (tests bind port 0 and read the address back).
#[derive(Debug, Default)]
pub struct Listeners {
    pub peers: Option<TcpListener>,
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses named in the config.
    pub async fn bind(config: &ResolvedConfig) -> Result<Listeners, NodeError> {
        let bind = |addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| NodeError::Bind { addr, source })
        };
        Ok(Listeners {
            peers: match config.listen_addr {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            },
            admin: match config.admin_addr {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            },
        })
    }
}

/// State shared by all of a node's tasks.
#[derive(Debug)]
pub struct Context {
    pub config: ResolvedConfig,
    pub store: StoreHandle,
    pub node_id: NodeId,
    pub name: String,
    pub tables: Vec<(TableName, SchemaFingerprint)>,
    /// The local log's head; senders wait on it for new entries.
    pub head: watch::Sender<LogSeq>,
    pub shutdown: watch::Receiver<bool>,
    pub peers: PeerRegistry,
    pub auth_failures: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub changes_applied: AtomicU64,
    pub changes_captured: AtomicU64,
    pub metrics: crate::telemetry::Metrics,
    /// Live links by peer name, for reconciliation requests.
    pub links: Mutex<std::collections::HashMap<String, crate::reconcile::LinkHandle>>,
    /// Set after events that risk drift (snapshot bootstrap, held changes released); the
    /// reconciliation scheduler runs soon after.
    pub reconcile_soon: std::sync::atomic::AtomicBool,
    /// One reconciliation at a time; and what the running one is doing, for progress bars.
    pub reconcile_running: tokio::sync::Mutex<()>,
    pub reconcile_progress: Mutex<Option<crate::reconcile::ReconcileProgress>>,
    /// Peers with a live link: one link per peer at a time.
    active: Mutex<HashSet<NodeId>>,
}

impl Context {
    /// The live link to the peer named `name`, if any.
    pub fn link(&self, name: &str) -> Option<crate::reconcile::LinkHandle> {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Counts a link refused for authentication (`tls`, `token`, `identity`).
    pub(crate) fn auth_failure(&self, reason: &str) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
        let label = crate::telemetry::ReasonLabel {
            reason: reason.to_owned(),
        };
        self.metrics.auth_failures.get_or_create(&label).inc();
    }

    /// Counts a link closed for a protocol violation (`oversized`, `malformed`, `unexpected`).
    pub(crate) fn protocol_error(&self, reason: &str) {
        self.protocol_errors.fetch_add(1, Ordering::Relaxed);
        let label = crate::telemetry::ReasonLabel {
            reason: reason.to_owned(),
        };
        self.metrics.protocol_errors.get_or_create(&label).inc();
    }

    /// Claims the one link allowed per peer; false if it already has one.
    pub(crate) fn claim(&self, peer: NodeId) -> bool {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer)
    }
    pub(crate) fn release(&self, peer: NodeId) {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&peer);
    }
}

/// Opens the node's store as configured.
pub fn open_store(config: &ResolvedConfig) -> Result<DynStore, NodeError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| NodeError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    match &config.store {
        crate::config::StoreLocation::Sqlite { path } => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| NodeError::DataDir {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            let mut options = SqliteOptions::new(config.tables.clone());
            options.node_id = Some(config.node_id);
            options.max_clock_offset = config.max_clock_offset;
            Ok(Box::new(SqliteStore::open(path, options)?))
        }
        crate::config::StoreLocation::Postgres {
            url,
            schema,
            driftless_schema,
        } => {
            let mut options = driftless_postgres::PostgresOptions::new(config.tables.clone());
            options.node_id = Some(config.node_id);
            options.max_clock_offset = config.max_clock_offset;
            options.table_schema = schema.clone();
            options.driftless_schema = driftless_schema.clone();
            Ok(Box::new(driftless_postgres::PostgresStore::open(
                url, options,
            )?))
        }
    }
}

/// Opens the store on a blocking thread (PostgreSQL's client runs its own runtime and blocks).
async fn open_store_off_runtime(
    config: &ResolvedConfig,
) -> Result<(DynStore, Vec<(TableName, SchemaFingerprint)>, LogSeq), NodeError> {
    let opening = config.clone();
    tokio::task::spawn_blocking(move || {
        let mut store = open_store(&opening)?;
        let tables: Vec<(TableName, SchemaFingerprint)> = store
            .schemas()
            .iter()
            .map(|s| (s.name.clone(), s.fingerprint))
            .collect();
        let head = store.log_head()?;
        Ok::<_, NodeError>((store, tables, head))
    })
    .await
    .map_err(|e| NodeError::Poller(format!("opening the store failed: {e}")))?
}

/// Runs a node until `shutdown` completes. On shutdown, links say goodbye, the batch being
/// applied finishes (it is one transaction either way), and the function returns.
pub async fn run(
    config: ResolvedConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let mut shutdown = Box::pin(shutdown);
    // A database that is not reachable yet (a server still starting, a failover) is waited
    // for, as a running node waits for it; a refused login or a bad schema ends the run.
    let mut attempt = 0u32;
    let (store, tables, head) = loop {
        let opened = open_store_off_runtime(&config).await;
        match opened {
            Err(e) if e.is_transient() => {
                let delay = backoff(
                    attempt,
                    Duration::from_millis(config.file.sync.reconnect_min_ms),
                    Duration::from_millis(config.file.sync.reconnect_max_ms),
                );
                attempt = attempt.saturating_add(1);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "cannot open the store yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut shutdown => return Ok(()),
                }
            }
            other => break other?,
        }
    };
    let (head_tx, _) = watch::channel(head);
    let (stop_tx, stop_rx) = watch::channel(false);
    let server_tls = match &config.file.listen {
        Some(listen) if !listen.insecure => Some(driftless_tls::acceptor(
            driftless_tls::server_config(&driftless_tls::ServerTlsFiles {
                cert: listen.cert.clone().expect("validated"),
                key: listen.key.clone().expect("validated"),
                client_ca: listen.client_ca.clone(),
            })?,
        )),
        _ => None,
    };
    let mut connectors = Vec::new();
    for peer in &config.file.peers {
        let connector = if peer.insecure {
            None
        } else {
            Some(driftless_tls::connector(driftless_tls::client_config(
                &driftless_tls::ClientTlsFiles {
                    ca: peer.ca.clone().expect("validated"),
                    cert: peer.cert.clone(),
                    key: peer.key.clone(),
                },
            )?))
        };
        connectors.push((peer.clone(), connector));
    }
    let ctx = Arc::new(Context {
        node_id: config.node_id,
        name: config.file.node.name.clone(),
        tables,
        store: StoreHandle::new(store),
        head: head_tx,
        shutdown: stop_rx.clone(),
        peers: PeerRegistry::default(),
        auth_failures: AtomicU64::new(0),
        protocol_errors: AtomicU64::new(0),
        changes_applied: AtomicU64::new(0),
        changes_captured: AtomicU64::new(0),
        metrics: crate::telemetry::Metrics::new(),
        links: Mutex::default(),
        reconcile_soon: std::sync::atomic::AtomicBool::new(false),
        reconcile_running: tokio::sync::Mutex::new(()),
        reconcile_progress: Mutex::new(None),
        active: Mutex::new(HashSet::new()),
        config,
    });
    ctx.metrics.initialize(
        ctx.tables.iter().map(|(t, _)| t.as_str()),
        ctx.config.file.peers.iter().map(|p| p.name.as_str()),
    );
    tracing::info!(node = %ctx.name, id = %ctx.node_id, "node starting");

    let poller = {
        let ctx = ctx.clone();
        std::thread::Builder::new()
            .name("driftless-capture".into())
            .spawn(move || poll_store(ctx))
            .map_err(|e| NodeError::Poller(e.to_string()))?
    };
    let mut tasks = JoinSet::new();
    if let Some(listener) = listeners.peers {
        tasks.spawn(accept_peers(ctx.clone(), listener, server_tls));
    }
    for (peer, connector) in connectors {
        tasks.spawn(dial_peer(ctx.clone(), peer, connector));
    }
    if let Some(listener) = listeners.admin {
        tasks.spawn(crate::admin::serve(ctx.clone(), listener));
    }
    tasks.spawn(schedule_reconciliation(ctx.clone()));
    tasks.spawn(schedule_local_check(ctx.clone()));

    shutdown.await;
    tracing::info!(node = %ctx.name, "shutting down");
    let _ = stop_tx.send(true);
    // Links finish the batch they are applying and say goodbye; give them a moment.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    let poller_result = tokio::task::spawn_blocking(move || poller.join())
        .await
        .map_err(|e| NodeError::Poller(e.to_string()))?;
    // Taking the store lock once more waits for any store call still running to commit.
    ctx.store.call(|_| Ok(())).await?;
    match poller_result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(NodeError::Poller(e.to_string())),
        Err(_) => Err(NodeError::Poller("the capture thread panicked".into())),
    }
}

/// The capture poller: notices commits by other connections (the store's commit token changes),
/// stamps them, and wakes the senders. Also releases held changes and compacts the log.
fn poll_store(ctx: Arc<Context>) -> Result<(), StoreError> {
    let sync = &ctx.config.file.sync;
    let poll = Duration::from_millis(sync.poll_interval_ms.max(1));
    let compact_every = Duration::from_millis(sync.compact_interval_ms.max(1_000));
    let policy = CompactionPolicy {
        retain_entries_min: sync.retain_entries_min,
        retain_entries_max: sync.retain_entries_max,
        ..CompactionPolicy::default()
    };
    let mut seen_version = None;
    let mut last_release = Instant::now();
    let mut skew = ClockSkewFile::from_env();
    let mut last_compact = Instant::now();
    let mut last_stats = Instant::now() - STATS_INTERVAL;
    let mut failures = 0u32;
    while !*ctx.shutdown.borrow() {
        skew.poll();
        let result = (|| {
            let version = ctx.store.call_blocking(|s| s.commit_token())?;
            if seen_version != Some(version) {
                seen_version = Some(version);
                // Bounded rounds, each its own store call: the senders can read the log and the
                // links can apply between them, and every round wakes the senders at once.
                loop {
                    let (records, head) = ctx.store.call_blocking(|s| {
                        let report = s.capture(CAPTURE_ROUND_RECORDS)?;
                        record_captured(&ctx, &report.changes);
                        Ok((report.records, s.log_head()?))
                    })?;
                    publish_head(&ctx, head);
                    // (records, not changes: coalesced writes make fewer changes than records,
                    // and stopping on the changes would strand the rest of a backlog)
                    if records < CAPTURE_ROUND_RECORDS {
                        break;
                    }
                }
            }
            ctx.store.call_blocking(|s| {
                if last_release.elapsed() >= RELEASE_HELD_INTERVAL {
                    last_release = Instant::now();
                    if s.release_held()?.applied > 0 {
                        // held changes are a drift risk: reconcile soon after releasing them
                        ctx.reconcile_soon.store(true, Ordering::Relaxed);
                    }
                }
                if last_stats.elapsed() >= STATS_INTERVAL {
                    last_stats = Instant::now();
                    for (table, n) in s.dead_letter_counts()? {
                        let label = crate::telemetry::TableLabel { table: table.to_string() };
                        ctx.metrics.dead_letters.get_or_create(&label).set(n as i64);
                    }
                }
                if last_compact.elapsed() >= compact_every {
                    last_compact = Instant::now();
                    let report = s.compact(&policy)?;
                    for peer in report.peers_marked_for_bootstrap {
                        tracing::warn!(peer = %peer, "peer fell behind the log's retention; it will be re-bootstrapped");
                    }
                }
                s.log_head()
            })
        })();
        match result {
            Ok(head) => {
                failures = 0;
                publish_head(&ctx, head);
            }
            Err(e) => {
                // Usually a lock held too long by another process: log, back off, retry.
                failures += 1;
                tracing::warn!(error = %e, failures, "capture failed; retrying");
                std::thread::sleep(Duration::from_millis(100 * u64::from(failures.min(50))));
                seen_version = None;
            }
        }
        std::thread::sleep(poll);
    }
    Ok(())
}

/// Wakes the senders when the log head moved.
pub(crate) fn publish_head(ctx: &Context, head: driftless_store::LogSeq) {
    ctx.head.send_if_modified(|h| {
        let changed = *h != head;
        *h = head;
        changed
    });
}

/// Counts captured local writes (status and `driftless_changes_captured_total{table}`).
pub(crate) fn record_captured(ctx: &Context, changes: &[driftless_core::Change]) {
    ctx.changes_captured
        .fetch_add(changes.len() as u64, Ordering::Relaxed);
    count_by_table(changes, |table, n| {
        let label = crate::telemetry::TableLabel {
            table: table.to_owned(),
        };
        ctx.metrics.changes_captured.get_or_create(&label).inc_by(n);
    });
}

/// Calls `f(table, count)` once per table appearing in `changes`.
pub(crate) fn count_by_table(changes: &[driftless_core::Change], mut f: impl FnMut(&str, u64)) {
    let mut counts: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    for c in changes {
        *counts.entry(c.table.as_str()).or_default() += 1;
    }
    for (table, n) in counts {
        f(table, n);
    }
}

/// Fault injection only: when `DRIFTLESS_CLOCK_SKEW_FILE` names a file, its content (an integer
/// of milliseconds, may be negative) is this process's wall-clock skew, re-read every 100 ms so a
/// test harness can make the clock jump while the node runs. Unset in production.
struct ClockSkewFile {
    path: Option<std::path::PathBuf>,
    last_read: Option<Instant>,
}

impl ClockSkewFile {
    fn from_env() -> Self {
        let path = std::env::var_os("DRIFTLESS_CLOCK_SKEW_FILE").map(std::path::PathBuf::from);
        let mut file = ClockSkewFile {
            path,
            last_read: None,
        };
        file.poll();
        file
    }

    fn poll(&mut self) {
        let Some(path) = &self.path else { return };
        if self
            .last_read
            .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last_read = Some(Instant::now());
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(skew) = text.trim().parse::<i64>()
        {
            driftless_store::set_clock_skew_ms(skew);
        }
    }
}

async fn accept_peers(
    ctx: Arc<Context>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut shutdown = ctx.shutdown.clone();
    let limit = Arc::new(tokio::sync::Semaphore::new(INBOUND_CONNECTIONS_MAX));
    let mut links = JoinSet::new();
    loop {
        let (socket, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::node::stopped(&mut shutdown) => break,
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let ctx = ctx.clone();
        let tls = tls.clone();
        links.spawn(async move {
            let _permit = permit;
            let _ = socket.set_nodelay(true);
            let (name, result) = match tls {
                None => run_session(ctx.clone(), socket, Expect::Inbound { tls_identity: None }).await,
                Some(acceptor) => match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(socket)).await {
                    Ok(Ok(stream)) => {
                        let identity = driftless_tls::peer_identity(stream.get_ref().1);
                        run_session(ctx.clone(), stream, Expect::Inbound { tls_identity: identity }).await
                    }
                    Ok(Err(e)) => {
                        ctx.auth_failure("tls");
                        tracing::warn!(%addr, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%addr, "TLS handshake timed out");
                        return;
                    }
                },
            };
            match result {
                Ok(()) | Err(SessionError::Shutdown) => {}
                Err(e) if routine_end(&e) => {
                    tracing::info!(%addr, peer = name.as_deref().unwrap_or("?"), error = %e, "inbound link ended")
                }
                Err(e) => tracing::warn!(%addr, peer = name.as_deref().unwrap_or("?"), error = %e, "inbound link ended"),
            }
        });
        while links.try_join_next().is_some() {}
    }
    while links.join_next().await.is_some() {}
}

/// Ends of a link that are part of normal operation (a peer restarting or not up yet): logged
/// at info, not as warnings.
fn routine_end(e: &SessionError) -> bool {
    match e {
        SessionError::Goodbye(reason) => reason == "shutting down",
        SessionError::Wire(driftless_wire::WireError::Closed) => true,
        SessionError::Wire(driftless_wire::WireError::Io(io)) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
        ),
        _ => false,
    }
}

/// A delay of `ms` with ±10% jitter, so a fleet does not run periodic work in lockstep.
fn jittered(ms: u64) -> Duration {
    let jitter = driftless_store::random_u64().unwrap_or(0) % (ms / 5 + 1);
    Duration::from_millis(ms - ms / 10 + jitter)
}

/// Runs reconciliation with every peer this node dials: on the configured interval and soon
/// after events that risk drift. Only the dialing side schedules, so a pair of nodes does not
/// reconcile twice.
async fn schedule_reconciliation(ctx: Arc<Context>) {
    let interval_ms = ctx.config.file.sync.reconcile_interval_ms;
    let mut shutdown = ctx.shutdown.clone();
    let mut next = (interval_ms > 0).then(|| Instant::now() + jittered(interval_ms));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopped(&mut shutdown) => return,
        }
        let event = ctx.reconcile_soon.swap(false, Ordering::Relaxed);
        let due = next.is_some_and(|t| Instant::now() >= t);
        if !event && !due {
            continue;
        }
        let trigger = if event { "event" } else { "scheduled" };
        for peer in &ctx.config.file.peers {
            if ctx.link(&peer.name).is_none() {
                continue;
            }
            let options = crate::reconcile::ReconcileOptions {
                repair: true,
                local_check: false,
            };
            if let Err(e) =
                crate::reconcile::reconcile(&ctx, &peer.name, None, options, trigger).await
            {
                tracing::warn!(peer = %peer.name, error = %e, "reconciliation failed; will retry");
            }
        }
        if due {
            next = Some(Instant::now() + jittered(interval_ms));
        }
    }
}

/// Checks every synced table against its merge state on its own schedule (every node, linked
/// or not): it reads every row, which a comparison with a peer must not wait for.
async fn schedule_local_check(ctx: Arc<Context>) {
    let interval_ms = ctx.config.file.sync.local_check_interval_ms;
    if interval_ms == 0 {
        return;
    }
    let mut shutdown = ctx.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(jittered(interval_ms)) => {}
            _ = stopped(&mut shutdown) => return,
        }
        for (table, _) in &ctx.tables {
            let started = Instant::now();
            let mut report = crate::reconcile::TableReport::default();
            match crate::reconcile::verify_locally(&ctx, table, true, &mut report, None).await {
                Ok(()) => {
                    crate::reconcile::count_drift(&ctx, table, &report);
                    tracing::info!(%table, rows = report.local_checked_rows,
                        restored = report.local_restored, adopted = report.local_adopted,
                        millis = started.elapsed().as_millis() as u64, "local check finished");
                }
                Err(e) => {
                    tracing::warn!(%table, error = %e, "local check failed; will retry at the next interval");
                }
            }
        }
    }
}

/// Completes once shutdown has been requested. (The guard `wait_for` returns must not live
/// across an await in a `Send` task, so it is dropped here.)
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Full-jitter exponential backoff: a random delay in `[0, min(max, min * 2^attempt)]`.
pub fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let ceiling = min.saturating_mul(1u32 << attempt.min(20)).min(max);
    let random = driftless_store::random_u64().unwrap_or(attempt as u64 * 7919);
    Duration::from_millis(random % (ceiling.as_millis() as u64 + 1))
}

async fn dial_peer(
    ctx: Arc<Context>,
    peer: PeerSection,
    connector: Option<tokio_rustls::TlsConnector>,
) {
    let sync = &ctx.config.file.sync;
    let (min, max) = (
        Duration::from_millis(sync.reconnect_min_ms),
        Duration::from_millis(sync.reconnect_max_ms),
    );
    let mut shutdown = ctx.shutdown.clone();
    let mut attempt = 0u32;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        let outcome = connect_and_run(&ctx, &peer, connector.as_ref()).await;
        if let Err(e) = &outcome
            && !matches!(e, SessionError::Shutdown)
        {
            if routine_end(e) {
                tracing::info!(peer = %peer.name, error = %e, "link to peer ended");
            } else {
                tracing::warn!(peer = %peer.name, error = %e, "link to peer ended");
            }
            ctx.peers.update(&peer.name, |p| {
                p.connected = false;
                p.last_error = Some(e.to_string());
            });
        }
        // A link that stayed up a while starts the backoff over.
        if started.elapsed() > max {
            attempt = 0;
        }
        let delay = backoff(attempt, min, max);
        attempt = attempt.saturating_add(1);
        ctx.peers.update(&peer.name, |p| p.reconnects += 1);
        let label = crate::telemetry::ReasonLabel {
            reason: "reconnect".into(),
        };
        ctx.metrics.retries.get_or_create(&label).inc();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = crate::node::stopped(&mut shutdown) => return,
        }
    }
}

async fn connect_and_run(
    ctx: &Arc<Context>,
    peer: &PeerSection,
    connector: Option<&tokio_rustls::TlsConnector>,
) -> Result<(), SessionError> {
    let io = |e: std::io::Error| SessionError::Wire(driftless_wire::WireError::Io(e));
    let socket = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&peer.addr)).await {
        Ok(s) => s.map_err(io)?,
        Err(_) => {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            )));
        }
    };
    let _ = socket.set_nodelay(true);
    let (_, result) = match connector {
        None => run_session(ctx.clone(), socket, Expect::Outbound(peer)).await,
        Some(connector) => {
            let server_name = driftless_tls::server_name(&peer.name)
                .map_err(|e| SessionError::Refused(e.to_string()))?;
            let stream =
                match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(server_name, socket))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        ctx.auth_failure("tls");
                        return Err(SessionError::Refused(format!(
                            "TLS handshake with {} failed: {e}",
                            peer.name
                        )));
                    }
                    Err(_) => {
                        return Err(io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "TLS handshake timed out",
                        )));
                    }
                };
            run_session(ctx.clone(), stream, Expect::Outbound(peer)).await
        }
    };
    result
}
