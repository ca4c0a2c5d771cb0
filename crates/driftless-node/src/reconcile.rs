//! Reconciliation between two linked nodes: find the rows whose merge states differ by comparing
//! bucket fingerprints (three round trips for a handful of differences in millions of rows), then
//! exchange those rows' full states and merge them on both sides. Repairs go through the merge
//! rule, so they never overwrite a newer write. The protocol is in docs/reconciliation.md.

use crate::node::Context;
use crate::session::SessionError;
use driftless_core::{NodeId, PrimaryKey, TableName};
use driftless_store::StoreError;
use driftless_store::fingerprint::FINE_PER_TOP;
use driftless_wire::{Message, ReconReply, ReconRequest, encode_frame};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Fine buckets compared per `Items` request (bounds each message).
const FINE_BUCKETS_PER_REQUEST: usize = 2_048;
/// Keys whose states go in one `Repair` request.
const KEYS_PER_REPAIR: usize = 2_000;
/// How long one reconciliation step may wait for the peer.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// Passes over a table before giving up on a difference that keeps coming back (writes racing
/// the repair; the next run picks it up).
const PASSES_MAX: usize = 3;
/// Sample keys shown per table.
const SAMPLES_MAX: usize = 10;
/// Rows checked per local verification step.
const VERIFY_CHUNK_ROWS: usize = 5_000;

/// A live link that reconciliation can send requests over.
#[derive(Debug, Clone)]
pub struct LinkHandle {
    pub peer: NodeId,
    pub out: mpsc::Sender<Message>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<ReconReply>>>>,
}

impl LinkHandle {
    pub fn new(peer: NodeId, out: mpsc::Sender<Message>) -> Self {
        LinkHandle {
            peer,
            out,
            pending: Arc::default(),
        }
    }

    /// Routes a response to the request waiting for it.
    pub fn deliver(&self, id: u64, reply: ReconReply) {
        let waiter = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(reply);
        }
    }
}

static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

/// Why a reconciliation could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("not connected to peer {0}: reconciliation runs over a live link")]
    NotConnected(String),
    #[error("unknown table {0}")]
    UnknownTable(String),
    #[error("the link to the peer closed during reconciliation")]
    LinkClosed,
    #[error("the peer did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("the peer answered out of turn")]
    Unexpected,
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// What a reconciliation of one table found and did.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct TableReport {
    pub table: String,
    /// Top-level ranges (buckets) compared, and how many differed.
    pub ranges_compared: u64,
    pub ranges_differing: u64,
    /// Keys present here only, there only, or on both sides with different states.
    pub keys_only_here: u64,
    pub keys_only_there: u64,
    pub keys_differing: u64,
    pub sample_keys: Vec<String>,
    /// With the local check (`--local`): rows of this replica whose content differed from
    /// their merge state (restored) or that had none (adopted), i.e. writes made behind
    /// driftless's back, found before comparing with the peer; and the same on the peer.
    #[serde(default)]
    pub local_checked_rows: u64,
    pub local_restored: u64,
    pub local_adopted: u64,
    #[serde(default)]
    pub peer_checked_rows: u64,
    #[serde(default)]
    pub peer_restored: u64,
    #[serde(default)]
    pub peer_adopted: u64,
    /// Changes that had an effect here and on the peer.
    pub repaired_here: u64,
    pub repaired_there: u64,
}

/// A whole reconciliation run.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct ReconcileReport {
    pub peer: String,
    pub repair: bool,
    /// Whether both replicas' tables were also read in full against their merge states.
    #[serde(default)]
    pub local_check: bool,
    pub tables: Vec<TableReport>,
    pub round_trips: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Total wall time, and the part spent on the local check (reading whole tables).
    pub millis: u64,
    pub local_check_millis: u64,
}

impl ReconcileReport {
    /// Whether any difference was found (the exit status of `driftless diff`).
    pub fn found_differences(&self) -> bool {
        self.tables.iter().any(|t| {
            t.keys_only_here
                + t.keys_only_there
                + t.keys_differing
                + t.local_restored
                + t.local_adopted
                + t.peer_restored
                + t.peer_adopted
                > 0
        })
    }
}

struct Exchange<'a> {
    link: &'a LinkHandle,
    table: TableName,
    report: &'a mut ReconcileReport,
}

impl Exchange<'_> {
    async fn ask(&mut self, request: ReconRequest) -> Result<ReconReply, ReconcileError> {
        let id = REQUEST_IDS.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.link
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let message = Message::ReconRequest {
            id,
            table: self.table.clone(),
            request,
        };
        self.report.bytes_sent += encode_frame(&message).map(|f| f.len() as u64).unwrap_or(0);
        self.report.round_trips += 1;
        if self.link.out.send(message).await.is_err() {
            return Err(ReconcileError::LinkClosed);
        }
        let reply = match tokio::time::timeout(STEP_TIMEOUT, rx).await {
            Err(_) => {
                self.link
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                return Err(ReconcileError::Timeout(STEP_TIMEOUT));
            }
            Ok(Err(_)) => return Err(ReconcileError::LinkClosed),
            Ok(Ok(reply)) => reply,
        };
        let echo = Message::ReconResponse { id, reply };
        self.report.bytes_received += encode_frame(&echo).map(|f| f.len() as u64).unwrap_or(0);
        let Message::ReconResponse { reply, .. } = echo else {
            unreachable!()
        };
        if let ReconReply::Refused { reason } = reply {
            return Err(ReconcileError::Refused(reason));
        }
        Ok(reply)
    }
}

/// How a reconciliation runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconcileOptions {
    /// Repair the differences on both sides (`driftless reconcile`); otherwise only count them
    /// (`driftless diff`).
    pub repair: bool,
    /// Also read every row of both replicas' tables against their merge states, to find writes
    /// made behind driftless's back (`--local`). Costs a full scan on each side, so it is off by
    /// default and otherwise runs on its own schedule (`local_check_interval_ms`).
    pub local_check: bool,
}

/// What a running reconciliation is doing (`GET /reconcile/progress`, the progress bar of
/// `driftless diff` and `driftless reconcile`).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct ReconcileProgress {
    pub peer: String,
    pub table: String,
    /// Tables finished, and all tables of this run.
    pub tables_done: u64,
    pub tables_total: u64,
    /// `local check`, `local check on peer`, `fingerprints`, `rows` or `repair`.
    pub phase: String,
    /// Units done in this phase (rows, or fine buckets), and their total (0 = unknown).
    pub done: u64,
    pub total: u64,
}

/// Publishes progress for the admin API; cleared when the run ends (also on error). Shared by
/// the two halves of the local check, which run at the same time.
pub(crate) struct ProgressGuard<'a> {
    ctx: &'a Context,
    progress: Mutex<ReconcileProgress>,
    /// Rows checked here and on the peer in the current local check, and this side's row count.
    checked_here: AtomicU64,
    checked_there: AtomicU64,
    rows_here: AtomicU64,
}

impl<'a> ProgressGuard<'a> {
    fn new(ctx: &'a Context, peer: &str, tables_total: usize) -> Self {
        ProgressGuard {
            ctx,
            progress: Mutex::new(ReconcileProgress {
                peer: peer.to_owned(),
                tables_total: tables_total as u64,
                ..ReconcileProgress::default()
            }),
            checked_here: AtomicU64::new(0),
            checked_there: AtomicU64::new(0),
            rows_here: AtomicU64::new(0),
        }
    }

    fn start_table(&self, table: &TableName) {
        self.checked_here.store(0, Ordering::Relaxed);
        self.checked_there.store(0, Ordering::Relaxed);
        self.rows_here.store(0, Ordering::Relaxed);
        self.update(|p| {
            p.table = table.to_string();
        });
    }

    fn finish_table(&self) {
        self.update(|p| p.tables_done += 1);
    }

    fn set(&self, phase: &str, done: u64, total: u64) {
        self.update(|p| {
            p.phase.clear();
            p.phase.push_str(phase);
            p.done = done;
            p.total = total;
        });
    }

    /// Both sides' local check as one bar; the peer's row count is not known, so its share is
    /// estimated as equal to ours (replicas of one table) until it turns out larger.
    fn local_check(&self) {
        let done =
            self.checked_here.load(Ordering::Relaxed) + self.checked_there.load(Ordering::Relaxed);
        let total = (2 * self.rows_here.load(Ordering::Relaxed)).max(done);
        self.set("local check, both sides", done, total);
    }

    fn update(&self, f: impl FnOnce(&mut ReconcileProgress)) {
        let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut progress);
        *self
            .ctx
            .reconcile_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(progress.clone());
    }
}

impl Drop for ProgressGuard<'_> {
    fn drop(&mut self) {
        *self
            .ctx
            .reconcile_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Reconciles `tables` (all synced tables if `None`) with the peer named `peer`. One run at a
/// time per node: a second one waits for the first (two repairs racing would only redo work).
pub async fn reconcile(
    ctx: &Arc<Context>,
    peer: &str,
    table: Option<&str>,
    options: ReconcileOptions,
    trigger: &str,
) -> Result<ReconcileReport, ReconcileError> {
    let started = Instant::now();
    let link = ctx
        .link(peer)
        .ok_or_else(|| ReconcileError::NotConnected(peer.to_owned()))?;
    let tables: Vec<TableName> = match table {
        None => ctx.tables.iter().map(|(t, _)| t.clone()).collect(),
        Some(name) => vec![
            ctx.tables
                .iter()
                .map(|(t, _)| t.clone())
                .find(|t| t.as_str() == name)
                .ok_or_else(|| ReconcileError::UnknownTable(name.to_owned()))?,
        ],
    };
    let _running = ctx.reconcile_running.lock().await;
    let repair = options.repair;
    let mut report = ReconcileReport {
        peer: peer.to_owned(),
        repair,
        local_check: options.local_check,
        ..ReconcileReport::default()
    };
    let progress = ProgressGuard::new(ctx, peer, tables.len());
    for table in tables {
        progress.start_table(&table);
        let mut table_report = TableReport {
            table: table.to_string(),
            ..TableReport::default()
        };
        if options.local_check {
            // both replicas at once: each reads its own table, in its own process
            let check_started = Instant::now();
            let mut there = TableReport::default();
            let mut exchange = Exchange {
                link: &link,
                table: table.clone(),
                report: &mut report,
            };
            let (here, peer_side) = tokio::join!(
                verify_locally(ctx, &table, repair, &mut table_report, Some(&progress)),
                verify_on_peer(&mut exchange, repair, &mut there, &progress),
            );
            here?;
            peer_side?;
            table_report.peer_checked_rows = there.peer_checked_rows;
            table_report.peer_restored = there.peer_restored;
            table_report.peer_adopted = there.peer_adopted;
            report.local_check_millis += check_started.elapsed().as_millis() as u64;
        }
        for pass in 0..PASSES_MAX {
            let mut exchange = Exchange {
                link: &link,
                table: table.clone(),
                report: &mut report,
            };
            let found = compare_and_repair(
                ctx,
                &mut exchange,
                &mut table_report,
                repair,
                pass == 0,
                &progress,
            )
            .await?;
            if !repair || !found {
                break;
            }
        }
        let m = &ctx.metrics;
        let label = crate::telemetry::PeerTableLabel {
            peer: peer.to_owned(),
            table: table.to_string(),
        };
        let compared = table_report.ranges_compared.max(1) as f64;
        m.convergence
            .get_or_create(&label)
            .set((compared - table_report.ranges_differing as f64) / compared);
        // only this node's own drift counts here; the peer counts its own when it serves the check
        count_drift(ctx, &table, &table_report);
        report.tables.push(table_report);
        progress.finish_table();
    }
    drop(progress);
    ctx.metrics
        .reconciliation_runs
        .get_or_create(&crate::telemetry::TriggerLabel {
            trigger: trigger.to_owned(),
        })
        .inc();
    report.millis = started.elapsed().as_millis() as u64;
    tracing::info!(
        peer,
        trigger,
        repair,
        local_check = options.local_check,
        differences = report.found_differences(),
        round_trips = report.round_trips,
        bytes_sent = report.bytes_sent,
        bytes_received = report.bytes_received,
        millis = report.millis,
        "reconciliation finished"
    );
    Ok(report)
}

/// Counts drift incidents (M6): rows of this replica written behind driftless's back.
pub(crate) fn count_drift(ctx: &Context, table: &TableName, report: &TableReport) {
    let drift = report.local_restored + report.local_adopted;
    if drift > 0 {
        ctx.metrics
            .drift_incidents
            .get_or_create(&crate::telemetry::TableLabel {
                table: table.to_string(),
            })
            .inc_by(drift);
    }
}

/// Checks this replica's table content against its own merge state, chunk by chunk. Each chunk
/// is its own transaction, so writes continue between chunks.
pub(crate) async fn verify_locally(
    ctx: &Context,
    table: &TableName,
    repair: bool,
    report: &mut TableReport,
    progress: Option<&ProgressGuard<'_>>,
) -> Result<(), ReconcileError> {
    if let Some(progress) = progress {
        let stats = ctx.store.call(|s| s.table_stats()).await?;
        let rows = stats
            .iter()
            .find(|t| &t.table == table)
            .map_or(0, |t| t.rows);
        progress.rows_here.store(rows, Ordering::Relaxed);
        progress.local_check();
    }
    let mut after: Option<PrimaryKey> = None;
    loop {
        let t = table.clone();
        let a = after.clone();
        let chunk = ctx
            .store
            .call(move |s| s.verify_chunk(&t, a.as_ref(), VERIFY_CHUNK_ROWS, repair))
            .await?;
        report.local_checked_rows += chunk.checked as u64;
        report.local_restored += chunk.restored as u64;
        report.local_adopted += chunk.adopted as u64;
        if chunk.restored + chunk.adopted > 0 {
            tracing::warn!(%table, restored = chunk.restored, adopted = chunk.adopted, repaired = repair,
                "table content differs from driftless's merge state (written behind its back)");
        }
        if let Some(progress) = progress {
            progress
                .checked_here
                .store(report.local_checked_rows, Ordering::Relaxed);
            progress.local_check();
        }
        match chunk.next {
            Some(next) => after = Some(next),
            None => return Ok(()),
        }
    }
}

/// Asks the peer to check its own table content against its merge state, chunk by chunk.
async fn verify_on_peer(
    exchange: &mut Exchange<'_>,
    repair: bool,
    report: &mut TableReport,
    progress: &ProgressGuard<'_>,
) -> Result<(), ReconcileError> {
    let mut after: Option<PrimaryKey> = None;
    loop {
        let ReconReply::Verified {
            checked,
            restored,
            adopted,
            next,
        } = exchange
            .ask(ReconRequest::Verify {
                after: after.take(),
                repair,
            })
            .await?
        else {
            return Err(ReconcileError::Unexpected);
        };
        report.peer_checked_rows += checked;
        report.peer_restored += restored;
        report.peer_adopted += adopted;
        progress
            .checked_there
            .store(report.peer_checked_rows, Ordering::Relaxed);
        progress.local_check();
        match next {
            // a peer that answers with the key it was given would loop forever
            Some(next) if checked > 0 => after = Some(next),
            Some(_) => return Err(ReconcileError::Unexpected),
            None => return Ok(()),
        }
    }
}

/// One pass: fingerprints, items, repairs. Returns whether differences were found.
async fn compare_and_repair(
    ctx: &Context,
    exchange: &mut Exchange<'_>,
    report: &mut TableReport,
    repair: bool,
    first_pass: bool,
    progress: &ProgressGuard<'_>,
) -> Result<bool, ReconcileError> {
    progress.set("fingerprints", 0, 0);
    let table = exchange.table.clone();
    let t = table.clone();
    let tops = ctx.store.call(move |s| s.top_fingerprints(&t)).await?;
    let ReconReply::Fine { buckets: theirs } = exchange
        .ask(ReconRequest::Top {
            fingerprints: tops.clone(),
        })
        .await?
    else {
        return Err(ReconcileError::Unexpected);
    };
    if first_pass {
        report.ranges_compared = tops.len() as u64;
        report.ranges_differing = theirs.len() as u64;
    }
    if theirs.is_empty() {
        return Ok(false);
    }
    let top_ids: Vec<u32> = theirs.iter().map(|(top, _)| *top).collect();
    let t = table.clone();
    let mine = ctx
        .store
        .call(move |s| s.fine_fingerprints(&t, &top_ids))
        .await?;
    let mine: BTreeMap<u32, Vec<i64>> = mine.into_iter().collect();
    let mut differing_fine = Vec::new();
    for (top, their_fps) in &theirs {
        let Some(my_fps) = mine.get(top) else {
            continue;
        };
        for (i, (a, b)) in my_fps.iter().zip(their_fps).enumerate() {
            if a != b {
                differing_fine.push(top * FINE_PER_TOP as u32 + i as u32);
            }
        }
    }
    let mut found = false;
    let total = differing_fine.len() as u64;
    let mut done = 0u64;
    for chunk in differing_fine.chunks(FINE_BUCKETS_PER_REQUEST) {
        progress.set(if repair { "repair" } else { "rows" }, done, total);
        done += chunk.len() as u64;
        let buckets = chunk.to_vec();
        let t = table.clone();
        let b = buckets.clone();
        let items = ctx.store.call(move |s| s.bucket_items(&t, &b)).await?;
        let ReconReply::Rows {
            wanted,
            differing,
            only_here,
            changes,
        } = exchange
            .ask(ReconRequest::Items {
                buckets,
                items,
                repair,
            })
            .await?
        else {
            return Err(ReconcileError::Unexpected);
        };
        // "only_here" from the responder's view is "only there" from ours
        if first_pass {
            report.keys_only_here += wanted.len() as u64;
            report.keys_only_there += only_here.len() as u64;
            report.keys_differing += differing.len() as u64;
            for key in wanted.iter().chain(&differing).chain(&only_here) {
                if report.sample_keys.len() < SAMPLES_MAX {
                    report.sample_keys.push(key.to_string());
                }
            }
        }
        found |= !(wanted.is_empty() && differing.is_empty() && only_here.is_empty());
        if !repair {
            continue;
        }
        // Merge their states here first; ours are then the join, which we send back.
        for part in changes.chunks(driftless_store::APPLY_BATCH_CHANGES_MAX) {
            let peer = exchange.link.peer;
            let part = part.to_vec();
            let applied = ctx.store.call(move |s| s.apply_repair(peer, &part)).await?;
            report.repaired_here += applied.applied as u64;
        }
        let send: Vec<PrimaryKey> = wanted
            .into_iter()
            .chain(differing)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for keys in send.chunks(KEYS_PER_REPAIR) {
            let t = table.clone();
            let keys = keys.to_vec();
            let changes = ctx.store.call(move |s| s.row_changes(&t, &keys)).await?;
            for part in changes.chunks(driftless_store::APPLY_BATCH_CHANGES_MAX) {
                let ReconReply::Repaired { applied } = exchange
                    .ask(ReconRequest::Repair {
                        changes: part.to_vec(),
                    })
                    .await?
                else {
                    return Err(ReconcileError::Unexpected);
                };
                report.repaired_there += applied;
            }
        }
    }
    Ok(found)
}

/// Serves one reconciliation request from a peer.
pub async fn respond(
    ctx: &Context,
    peer: NodeId,
    table: TableName,
    request: ReconRequest,
) -> ReconReply {
    match respond_inner(ctx, peer, table, request).await {
        Ok(reply) => reply,
        Err(e) => ReconReply::Refused {
            reason: e.to_string(),
        },
    }
}

async fn respond_inner(
    ctx: &Context,
    peer: NodeId,
    table: TableName,
    request: ReconRequest,
) -> Result<ReconReply, SessionError> {
    Ok(match request {
        ReconRequest::Top { fingerprints } => {
            let t = table.clone();
            let mine = ctx.store.call(move |s| s.top_fingerprints(&t)).await?;
            if mine.len() != fingerprints.len() {
                return Ok(ReconReply::Refused {
                    reason: format!(
                        "expected {} top fingerprints, got {}",
                        mine.len(),
                        fingerprints.len()
                    ),
                });
            }
            let differing: Vec<u32> = (0..mine.len() as u32)
                .filter(|&i| mine[i as usize] != fingerprints[i as usize])
                .collect();
            let buckets = ctx
                .store
                .call(move |s| s.fine_fingerprints(&table, &differing))
                .await?;
            ReconReply::Fine { buckets }
        }
        ReconRequest::Items {
            buckets,
            items,
            repair,
        } => {
            let t = table.clone();
            let mine = ctx
                .store
                .call(move |s| s.bucket_items(&t, &buckets))
                .await?;
            let mine: HashMap<PrimaryKey, i64> = mine.into_iter().map(|(_, k, h)| (k, h)).collect();
            let theirs: HashMap<&PrimaryKey, i64> = items.iter().map(|(_, k, h)| (k, *h)).collect();
            let mut wanted = Vec::new();
            let mut differing = Vec::new();
            for (key, hash) in &theirs {
                match mine.get(*key) {
                    None => wanted.push((*key).clone()),
                    Some(h) if h != hash => differing.push((*key).clone()),
                    Some(_) => {}
                }
            }
            let only_here: Vec<PrimaryKey> = mine
                .keys()
                .filter(|k| !theirs.contains_key(k))
                .cloned()
                .collect();
            wanted.sort();
            differing.sort();
            let mut only_here = only_here;
            only_here.sort();
            let changes = if repair {
                let keys: Vec<PrimaryKey> = differing.iter().chain(&only_here).cloned().collect();
                let mut changes = ctx
                    .store
                    .call(move |s| s.row_changes(&table, &keys))
                    .await?;
                // bounded per message; a later pass picks up the rest
                changes.truncate(driftless_store::APPLY_BATCH_CHANGES_MAX);
                changes
            } else {
                Vec::new()
            };
            ReconReply::Rows {
                wanted,
                differing,
                only_here,
                changes,
            }
        }
        ReconRequest::Repair { changes } => {
            let report = ctx
                .store
                .call(move |s| s.apply_repair(peer, &changes))
                .await?;
            ReconReply::Repaired {
                applied: report.applied as u64,
            }
        }
        ReconRequest::Verify { after, repair } => {
            let t = table.clone();
            let chunk = ctx
                .store
                .call(move |s| s.verify_chunk(&t, after.as_ref(), VERIFY_CHUNK_ROWS, repair))
                .await?;
            let found = TableReport {
                local_restored: chunk.restored as u64,
                local_adopted: chunk.adopted as u64,
                ..TableReport::default()
            };
            if chunk.restored + chunk.adopted > 0 {
                tracing::warn!(%table, restored = chunk.restored, adopted = chunk.adopted, repaired = repair,
                    "table content differs from driftless's merge state (written behind its back); found for a peer's reconciliation");
            }
            count_drift(ctx, &table, &found);
            ReconReply::Verified {
                checked: chunk.checked as u64,
                restored: chunk.restored as u64,
                adopted: chunk.adopted as u64,
                next: chunk.next,
            }
        }
    })
}
