//! One peer link: the hello exchange and its checks, then full-duplex streaming — our log out in
//! a bounded window of batches, their batches in, applied and acknowledged one by one.

use crate::node::Context;
use driftless_core::{Clock, NodeId};
use driftless_store::{LogSeq, PeerLogState, StoreError, SystemClock};
use driftless_wire::{
    Batch, BatchKind, Hello, Message, PROTOCOL_VERSION, WireError, read_message, write_message,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc};
use tracing::Instrument as _;

/// While batches are in flight, a peer's acks are stored at most this often (see the `Ack`
/// handler).
const ACK_RECORD_INTERVAL: Duration = Duration::from_millis(200);

/// How long the other side has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The other side failed a check (version, identity, token): counted as an auth failure
    /// or protocol error, the link is closed with this reason.
    #[error("refused: {0}")]
    Refused(String),
    /// The other side closed the link and said why.
    #[error("peer said goodbye: {0}")]
    Goodbye(String),
    #[error("no message from the peer for {0:?}")]
    Silent(Duration),
    #[error("shutting down")]
    Shutdown,
}

/// Who we expect on the other end.
#[derive(Debug)]
pub enum Expect<'a> {
    /// We dialed this configured peer.
    Outbound(&'a crate::config::PeerSection),
    /// It dialed us; `tls_identity` is the node name in its verified client certificate.
    Inbound { tls_identity: Option<String> },
}

async fn my_hello(
    ctx: &Context,
    peer: Option<NodeId>,
    token: Option<String>,
) -> Result<Hello, StoreError> {
    let (cursor, log_head) = ctx
        .store
        .call(move |s| {
            let cursor = match peer {
                Some(p) => s.cursor(p)?,
                None => LogSeq(0),
            };
            Ok((cursor, s.log_head()?))
        })
        .await?;
    Ok(Hello {
        protocol: PROTOCOL_VERSION,
        node: ctx.node_id,
        name: ctx.name.clone(),
        token,
        tables: ctx.tables.clone(),
        cursor,
        log_head,
    })
}

async fn read_hello<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Hello, SessionError> {
    match tokio::time::timeout(HELLO_TIMEOUT, read_message(reader)).await {
        Err(_) => Err(SessionError::Refused(format!(
            "no hello within {HELLO_TIMEOUT:?}"
        ))),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(Message::Hello(h))) => Ok(h),
        Ok(Ok(Message::Goodbye { reason })) => Err(SessionError::Goodbye(reason)),
        Ok(Ok(other)) => Err(SessionError::Refused(format!(
            "expected a hello, got {}",
            message_name(&other)
        ))),
    }
}

fn message_name(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "hello",
        Message::Batch(_) => "batch",
        Message::Ack { .. } => "ack",
        Message::SnapshotDone { .. } => "snapshot-done",
        Message::Heartbeat { .. } => "heartbeat",
        Message::Goodbye { .. } => "goodbye",
        Message::Digest { .. } => "digest",
        Message::ReconRequest { .. } => "reconcile-request",
        Message::ReconResponse { .. } => "reconcile-response",
    }
}

/// How a refused hello is counted.
enum Failure {
    Auth(&'static str),
    Protocol(&'static str),
}

/// The metric reason of a link ended by a protocol violation, if it was one.
fn protocol_violation(e: &SessionError) -> Option<&'static str> {
    match e {
        SessionError::Wire(WireError::FrameTooLarge { .. } | WireError::BatchTooLarge { .. }) => {
            Some("oversized")
        }
        SessionError::Wire(WireError::Malformed(_) | WireError::UnknownTag(_)) => Some("malformed"),
        SessionError::Refused(_) => Some("unexpected"),
        _ => None,
    }
}

/// Checks the other side's hello. Returns the reason to refuse and how to count it.
fn check_hello(ctx: &Context, hello: &Hello, expect: &Expect<'_>) -> Result<(), (String, Failure)> {
    if hello.protocol != PROTOCOL_VERSION {
        return Err((
            format!(
                "protocol version {} is not supported (this node speaks {PROTOCOL_VERSION})",
                hello.protocol
            ),
            Failure::Protocol("unexpected"),
        ));
    }
    if hello.node != crate::config::node_id_from_name(&hello.name) {
        return Err((
            format!(
                "node id {} does not belong to the name {:?}",
                hello.node, hello.name
            ),
            Failure::Auth("identity"),
        ));
    }
    if hello.node == ctx.node_id {
        return Err((
            "the peer has this node's own name".into(),
            Failure::Protocol("unexpected"),
        ));
    }
    match expect {
        Expect::Outbound(peer) => {
            if hello.name != peer.name {
                return Err((
                    format!("expected node {:?}, reached {:?}", peer.name, hello.name),
                    Failure::Auth("identity"),
                ));
            }
        }
        Expect::Inbound { tls_identity } => {
            if let Some(listen) = &ctx.config.file.listen {
                if listen.client_ca.is_some()
                    && tls_identity.as_deref() != Some(hello.name.as_str())
                {
                    return Err((
                        format!(
                            "client certificate names {:?} but the hello says {:?}",
                            tls_identity.as_deref().unwrap_or("nobody"),
                            hello.name
                        ),
                        Failure::Auth("identity"),
                    ));
                }
                if !listen.tokens.is_empty()
                    && !hello
                        .token
                        .as_ref()
                        .is_some_and(|t| listen.tokens.iter().any(|ok| constant_time_eq(ok, t)))
                {
                    return Err(("missing or wrong token".into(), Failure::Auth("token")));
                }
            }
        }
    }
    Ok(())
}

/// Compares secrets without an early exit that would leak how much matched.
fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Runs one link until it ends. Returns the peer's name with the outcome.
pub async fn run_session<S>(
    ctx: Arc<Context>,
    stream: S,
    expect: Expect<'_>,
) -> (Option<String>, Result<(), SessionError>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (their_hello, direction) = match &expect {
        Expect::Outbound(peer) => {
            let peer_id = crate::config::node_id_from_name(&peer.name);
            let hello = match my_hello(&ctx, Some(peer_id), peer.token.clone()).await {
                Ok(h) => h,
                Err(e) => return (Some(peer.name.clone()), Err(e.into())),
            };
            if let Err(e) = write_message(&mut writer, &Message::Hello(hello)).await {
                return (Some(peer.name.clone()), Err(e.into()));
            }
            match read_hello(&mut reader).await {
                Ok(h) => (h, "outbound"),
                Err(e) => return (Some(peer.name.clone()), Err(e)),
            }
        }
        Expect::Inbound { .. } => match read_hello(&mut reader).await {
            Ok(h) => (h, "inbound"),
            Err(e) => {
                if let Some(reason) = protocol_violation(&e) {
                    ctx.protocol_error(reason);
                }
                return (None, Err(e));
            }
        },
    };
    let name = their_hello.name.clone();
    if let Err((reason, failure)) = check_hello(&ctx, &their_hello, &expect) {
        match failure {
            Failure::Auth(kind) => ctx.auth_failure(kind),
            Failure::Protocol(kind) => ctx.protocol_error(kind),
        }
        tracing::warn!(peer = %name, %reason, "refusing peer");
        let _ = write_message(
            &mut writer,
            &Message::Goodbye {
                reason: reason.clone(),
            },
        )
        .await;
        return (Some(name), Err(SessionError::Refused(reason)));
    }
    let peer = their_hello.node;
    if !ctx.claim(peer) {
        let reason = "already connected to this node".to_owned();
        let _ = write_message(
            &mut writer,
            &Message::Goodbye {
                reason: reason.clone(),
            },
        )
        .await;
        return (Some(name), Err(SessionError::Refused(reason)));
    }
    if let Expect::Inbound { .. } = expect {
        let token = None;
        let hello = match my_hello(&ctx, Some(peer), token).await {
            Ok(h) => h,
            Err(e) => {
                ctx.release(peer);
                return (Some(name), Err(e.into()));
            }
        };
        if let Err(e) = write_message(&mut writer, &Message::Hello(hello)).await {
            ctx.release(peer);
            return (Some(name), Err(e.into()));
        }
    }
    for (table, fingerprint) in &their_hello.tables {
        if let Some((_, mine)) = ctx.tables.iter().find(|(t, _)| t == table)
            && mine != fingerprint
        {
            tracing::warn!(peer = %name, %table, "schema differs from the peer's; changes to columns this node lacks will be dead-lettered");
        }
    }
    ctx.peers.update(&name, |p| {
        p.node_id = peer.to_string();
        p.direction = direction.to_owned();
        p.connected = true;
        p.last_error = None;
    });
    tracing::info!(peer = %name, direction, "peer connected");
    ctx.metrics
        .peer_connected
        .get_or_create(&ctx.metrics.peer(&name))
        .set(1);
    let result =
        stream_both_ways(ctx.clone(), peer, name.clone(), their_hello, reader, writer).await;
    ctx.release(peer);
    ctx.metrics
        .peer_connected
        .get_or_create(&ctx.metrics.peer(&name))
        .set(0);
    ctx.peers.update(&name, |p| {
        p.connected = false;
        if let Err(e) = &result {
            p.last_error = Some(e.to_string());
        }
    });
    (Some(name), result)
}

async fn stream_both_ways<R, W>(
    ctx: Arc<Context>,
    peer: NodeId,
    name: String,
    hello: Hello,
    mut reader: R,
    mut writer: W,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let sync = &ctx.config.file.sync;
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(sync.window_batches * 2 + 8);
    // The writer owns the write half; everything we send goes through it in order.
    let writer_task = tokio::spawn(async move {
        while let Some(message) = out_rx.recv().await {
            let last = matches!(message, Message::Goodbye { .. });
            write_message(&mut writer, &message).await?;
            if last {
                break;
            }
        }
        Ok::<(), WireError>(())
    });
    let window = Arc::new(Semaphore::new(sync.window_batches));
    // The `next` of every batch sent and not yet acknowledged, oldest first: an ack releases the
    // window permits of the batches it covers, so a duplicated or stale ack releases nothing.
    let in_flight: Arc<std::sync::Mutex<std::collections::VecDeque<LogSeq>>> = Arc::default();
    // Where the peer's next log batch must start: our stored cursor of its log.
    let mut expected = ctx.store.call(move |s| s.cursor(peer)).await?;
    let link = crate::reconcile::LinkHandle::new(peer, out_tx.clone());
    ctx.links
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.clone(), link.clone());
    let sender = tokio::spawn(send_log(
        ctx.clone(),
        peer,
        name.clone(),
        hello.cursor,
        window.clone(),
        in_flight.clone(),
        out_tx.clone(),
    ));
    ctx.peers.update(&name, |p| {
        p.backlog_in = hello.log_head.0.saturating_sub(hello.cursor.0)
    });
    let silence = Duration::from_millis(sync.heartbeat_ms * 4);
    let mut last_ack_record = std::time::Instant::now();
    let mut shutdown = ctx.shutdown.clone();
    // The read half is drained by a task of its own into a queue, so that the batches the
    // peer's window has already delivered can be seen (and applied together) without a read
    // that could be cancelled halfway through a message.
    let (inbox_tx, mut inbox) =
        mpsc::channel::<Result<Message, WireError>>(sync.window_batches + 8);
    let reader_task = tokio::spawn(async move {
        loop {
            let message = read_message(&mut reader).await;
            let failed = message.is_err();
            if inbox_tx.send(message).await.is_err() || failed {
                break;
            }
        }
    });
    // A message taken from the queue while gathering batches, handled next.
    let mut held: Option<Result<Message, WireError>> = None;
    let result: Result<(), SessionError> = async {
        loop {
            let message = match held.take() {
                Some(m) => m?,
                None => tokio::select! {
                    m = tokio::time::timeout(silence, inbox.recv()) => match m {
                        Err(_) => return Err(SessionError::Silent(silence)),
                        Ok(Some(m)) => m?,
                        // the reader stops only after passing on its error
                        Ok(None) => return Err(SessionError::Silent(silence)),
                    },
                    _ = crate::node::stopped(&mut shutdown) => return Err(SessionError::Shutdown),
                },
            };
            match message {
                Message::Batch(mut batch) => {
                    let ack = if batch.kind == BatchKind::Snapshot || batch.after == expected {
                        // Log batches that follow on directly and have already arrived are
                        // applied in the same transaction, with the cursor of the last one: one
                        // commit (and its WAL flush) and one set of per-transaction statements
                        // instead of several. Still exactly once: the changes and the cursor
                        // covering them commit together or not at all.
                        let mut merged = 1u64;
                        while batch.kind == BatchKind::Log
                            && batch.changes.len() < driftless_store::APPLY_BATCH_CHANGES_MAX
                        {
                            match inbox.try_recv() {
                                Ok(Ok(Message::Batch(next)))
                                    if next.kind == BatchKind::Log
                                        && next.after == batch.next
                                        && batch.changes.len() + next.changes.len()
                                            <= driftless_store::APPLY_BATCH_CHANGES_MAX =>
                                {
                                    batch.changes.extend(next.changes);
                                    batch.next = next.next;
                                    batch.head = next.head;
                                    batch.trace_id = next.trace_id;
                                    merged += 1;
                                }
                                Ok(other) => {
                                    held = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        if merged > 1 {
                            ctx.peers.update(&name, |p| p.batches_received += merged - 1);
                        }
                        let ack = apply(&ctx, peer, &name, batch).await?;
                        if ack > expected {
                            expected = ack;
                        }
                        ack
                    } else if batch.next <= expected {
                        // a duplicate or stale batch: everything in it is already applied
                        expected
                    } else {
                        ctx.protocol_error("unexpected");
                        return Err(SessionError::Refused(format!(
                            "a batch starts at {} but this node has applied the log up to {}; \
                             resuming from the stored cursor",
                            batch.after, expected
                        )));
                    };
                    if out_tx.send(Message::Ack { applied_through: ack }).await.is_err() {
                        return Ok(());
                    }
                }
                Message::SnapshotDone { resume_after } => {
                    ctx.store
                        .call(move |s| s.apply_batch(peer, &[], resume_after).map(|_| ()))
                        .await?;
                    tracing::info!(peer = %name, resume_after = resume_after.0, "bootstrap from snapshot complete");
                    expected = resume_after;
                    ctx.reconcile_soon.store(true, Ordering::Relaxed);
                    let _ = out_tx.send(Message::Ack { applied_through: resume_after }).await;
                }
                Message::Ack { applied_through } => {
                    let released = {
                        let mut queue = in_flight.lock().unwrap_or_else(|p| p.into_inner());
                        let mut released = 0;
                        while queue.front().is_some_and(|next| *next <= applied_through) {
                            queue.pop_front();
                            released += 1;
                        }
                        released
                    };
                    window.add_permits(released);
                    // Storing the ack is a write transaction (a commit and its WAL flush) and
                    // only lets compaction drop entries sooner, so while batches are in flight
                    // it is stored at most every ACK_RECORD_INTERVAL; the last ack, when nothing
                    // is in flight any more, always is. A stored ack that lags is only
                    // conservative (compaction keeps more).
                    let idle = in_flight.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
                    let head = if idle || last_ack_record.elapsed() >= ACK_RECORD_INTERVAL {
                        last_ack_record = std::time::Instant::now();
                        ctx.store
                            .call(move |s| {
                                s.record_ack(peer, applied_through)?;
                                s.log_head()
                            })
                            .await?
                    } else {
                        *ctx.head.borrow()
                    };
                    let backlog = head.0.saturating_sub(applied_through.0);
                    ctx.peers.update(&name, |p| p.backlog_out = backlog);
                    ctx.metrics.backlog.get_or_create(&ctx.metrics.peer(&name)).set(backlog as i64);
                }
                Message::Heartbeat { log_head } => {
                    let cursor = ctx.store.call(move |s| s.cursor(peer)).await?;
                    ctx.peers.update(&name, |p| p.backlog_in = log_head.0.saturating_sub(cursor.0));
                }
                Message::Digest { head, cursor, tables } => {
                    compare_digests(&ctx, peer, &name, head, cursor, tables).await?;
                }
                Message::ReconRequest { id, table, request } => {
                    let reply = crate::reconcile::respond(&ctx, peer, table, request).await;
                    if out_tx.send(Message::ReconResponse { id, reply }).await.is_err() {
                        return Ok(());
                    }
                }
                Message::ReconResponse { id, reply } => link.deliver(id, reply),
                Message::Goodbye { reason } => return Err(SessionError::Goodbye(reason)),
                Message::Hello(_) => {
                    ctx.protocol_error("unexpected");
                    return Err(SessionError::Refused("a second hello".into()));
                }
            }
        }
    }
    .await;
    sender.abort();
    reader_task.abort();
    ctx.links
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&name);
    let reason = match &result {
        Err(SessionError::Shutdown) => Some("shutting down".to_owned()),
        Err(SessionError::Goodbye(_))
        | Err(SessionError::Wire(_))
        | Err(SessionError::Silent(_)) => None,
        Err(e) => Some(e.to_string()),
        Ok(()) => None,
    };
    if let Some(reason) = reason {
        let _ = out_tx.send(Message::Goodbye { reason }).await;
    }
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer_task).await;
    result
}

/// Applies one received batch; returns the position to acknowledge.
async fn apply(
    ctx: &Arc<Context>,
    peer: NodeId,
    name: &str,
    batch: Batch,
) -> Result<LogSeq, SessionError> {
    let committed_ms: Vec<u64> = batch
        .changes
        .iter()
        .map(|c| c.version.timestamp.physical_ms())
        .collect();
    let newest_ms = committed_ms.iter().copied().max();
    let count = batch.changes.len() as u64;
    let kind = batch.kind;
    // The batch's trace id ties this span to the sender's `send_batch` span.
    let span = tracing::debug_span!("apply_batch", peer = %name, trace_id = batch.trace_id, changes = count);
    let (report, cursor, head) = ctx
        .store
        .call(move |s| {
            let cursor = match kind {
                BatchKind::Log => batch.next,
                // snapshot rows do not move the cursor; SnapshotDone does
                BatchKind::Snapshot => s.cursor(peer)?,
            };
            let report = s.apply_batch(peer, &batch.changes, cursor)?;
            Ok((report, cursor, s.log_head()?))
        })
        .instrument(span)
        .await?;
    ctx.head.send_if_modified(|h| {
        let changed = *h != head;
        *h = head;
        changed
    });
    let now = SystemClock.now_ms();
    ctx.changes_applied
        .fetch_add(report.applied as u64, Ordering::Relaxed);
    record_apply_metrics(ctx, name, &report, &committed_ms, now);
    if report.captured > 0 {
        // local writes stamped by the apply transaction (it stamps all pending writes first)
        ctx.changes_captured
            .fetch_add(report.captured as u64, Ordering::Relaxed);
        let mut counts: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
        for table in &report.captured_tables {
            *counts.entry(table.as_str()).or_default() += 1;
        }
        for (table, n) in counts {
            let label = crate::telemetry::TableLabel {
                table: table.to_owned(),
            };
            ctx.metrics.changes_captured.get_or_create(&label).inc_by(n);
        }
    }
    if report.retried > 0 {
        // dead letters applied after all: check the replicas agree
        ctx.reconcile_soon.store(true, Ordering::Relaxed);
    }
    ctx.peers.update(name, |p| {
        p.batches_received += 1;
        p.changes_applied += report.applied as u64;
        if let Some(ms) = newest_ms.filter(|_| count > 0) {
            p.lag_ms_last = Some(now.saturating_sub(ms));
        }
    });
    if report.dead_lettered > 0 || report.held > 0 {
        tracing::warn!(peer = %name, dead_lettered = report.dead_lettered, held = report.held, "some changes were not applied");
    }
    Ok(cursor)
}

/// This node's table digests with its log head and its cursor of `peer`'s log, read in one go.
async fn my_digests(
    ctx: &Context,
    peer: NodeId,
) -> Result<(LogSeq, LogSeq, Vec<driftless_wire::TableDigestWire>), SessionError> {
    let names: Vec<driftless_core::TableName> = ctx.tables.iter().map(|(t, _)| t.clone()).collect();
    Ok(ctx
        .store
        .call(move |s| {
            let head = s.log_head()?;
            let cursor = s.cursor(peer)?;
            // the reconciliation fingerprints: maintained with every write, so this costs a
            // few thousand index reads, not a scan of the tables
            let mut digests = Vec::with_capacity(names.len());
            for table in names {
                let fingerprints = s.top_fingerprints(&table)?;
                digests.push(driftless_wire::TableDigestWire {
                    table,
                    fingerprints,
                });
            }
            Ok((head, cursor, digests))
        })
        .await?)
}

/// Compares the peer's digests with ours when both sides had applied all of each other's log;
/// sets the convergence gauge and counts a drift incident for each table that differs.
async fn compare_digests(
    ctx: &Context,
    peer: NodeId,
    name: &str,
    their_head: LogSeq,
    their_cursor: LogSeq,
    theirs: Vec<driftless_wire::TableDigestWire>,
) -> Result<(), SessionError> {
    let (my_head, my_cursor, mine) = my_digests(ctx, peer).await?;
    if their_head != my_cursor || their_cursor != my_head {
        return Ok(()); // changes in flight: the digests may differ legitimately
    }
    let m = &ctx.metrics;
    m.reconciliation_runs
        .get_or_create(&crate::telemetry::TriggerLabel {
            trigger: "scheduled".into(),
        })
        .inc();
    for t in &theirs {
        let Some(my) = mine.iter().find(|m| m.table == t.table) else {
            continue;
        };
        let compared = my.fingerprints.len().max(1);
        let agreeing = my
            .fingerprints
            .iter()
            .zip(&t.fingerprints)
            .filter(|(a, b)| a == b)
            .count();
        let agree = agreeing == compared && my.fingerprints.len() == t.fingerprints.len();
        let label = crate::telemetry::PeerTableLabel {
            peer: name.to_owned(),
            table: t.table.to_string(),
        };
        // the share of compared ranges (top buckets) in agreement
        m.convergence
            .get_or_create(&label)
            .set(agreeing as f64 / compared as f64);
        if !agree {
            m.drift_incidents
                .get_or_create(&crate::telemetry::TableLabel {
                    table: t.table.to_string(),
                })
                .inc();
            tracing::warn!(peer = %name, table = %t.table, ranges_differing = compared - agreeing,
                "replicas differ although both have applied all of each other's changes (drift); reconciling");
            ctx.reconcile_soon.store(true, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Lag is measured from the origin's HLC physical time (its wall clock at commit, or later if its
/// clock was behind a timestamp it had seen) to this node's wall clock at apply. Clock skew
/// between the two shifts it: a fast origin clock makes lag look smaller (clamped at zero), a
/// slow one larger; `max_clock_offset_ms` bounds the error, since changes stamped further ahead
/// are held instead of applied.
fn record_apply_metrics(
    ctx: &Context,
    name: &str,
    report: &driftless_store::ApplyReport,
    committed_ms: &[u64],
    now_ms: u64,
) {
    let m = &ctx.metrics;
    let peer = m.peer(name);
    m.changes_applied
        .get_or_create(&peer)
        .inc_by(report.applied as u64);
    m.duplicates
        .get_or_create(&peer)
        .inc_by(report.duplicates as u64);
    m.clock_holds.inc_by(report.held as u64);
    if report.retried > 0 {
        let label = crate::telemetry::ReasonLabel {
            reason: "dead_letter_retry".into(),
        };
        m.retries
            .get_or_create(&label)
            .inc_by(report.retried as u64);
    }
    let lag = m.lag.get_or_create(&peer);
    for ms in committed_ms {
        lag.observe(now_ms.saturating_sub(*ms) as f64 / 1000.0);
    }
    for (table, rule) in &report.conflict_rules {
        let label = crate::telemetry::TableRuleLabel {
            table: table.to_string(),
            rule: rule.as_str().to_owned(),
        };
        m.conflicts.get_or_create(&label).inc();
    }
    for (table, reason) in &report.dead_letter_reasons {
        let label = crate::telemetry::TableReasonLabel {
            table: table.clone(),
            reason: reason.as_str().to_owned(),
        };
        m.apply_errors.get_or_create(&label).inc();
    }
}

/// Streams our log to the peer from `cursor`, bootstrapping it from a snapshot first if the log
/// no longer reaches back that far.
async fn send_log(
    ctx: Arc<Context>,
    peer: NodeId,
    name: String,
    mut cursor: LogSeq,
    window: Arc<Semaphore>,
    in_flight: Arc<std::sync::Mutex<std::collections::VecDeque<LogSeq>>>,
    out: mpsc::Sender<Message>,
) -> Result<(), SessionError> {
    let sent = |next: LogSeq| {
        in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(next);
    };
    let batch_max = ctx.config.file.sync.batch_changes_max;
    let heartbeat = Duration::from_millis(ctx.config.file.sync.heartbeat_ms);
    let mut head_rx = ctx.head.subscribe();
    let (state, head) = ctx
        .store
        .call(move |s| Ok((s.peer_state(peer, cursor)?, s.log_head()?)))
        .await?;
    // The peer has applied our log further than it reaches: this replica was restored from a
    // backup (or lost the end of its log). Our next entries would reuse sequence numbers the
    // peer believes it has, and it would skip them; a snapshot of every row brings it up to
    // date and moves its cursor back to our head. Our own writes that the restore lost are
    // still on the peer: reconciliation brings them back.
    let state = if cursor > head {
        tracing::warn!(peer = %name, peer_cursor = cursor.0, log_head = head.0,
            "the peer has applied our log beyond its end (was this replica restored from a backup?); sending a snapshot and reconciling");
        ctx.reconcile_soon.store(true, Ordering::Relaxed);
        PeerLogState::NeedsBootstrap { resume_after: head }
    } else {
        state
    };
    if let PeerLogState::NeedsBootstrap { resume_after } = state {
        tracing::warn!(peer = %name, cursor = cursor.0, "peer is behind the log's retention; sending a snapshot");
        ctx.peers.update(&name, |p| p.snapshots_sent += 1);
        for table in ctx.tables.iter().map(|(t, _)| t.clone()) {
            let mut after = None;
            loop {
                window.acquire().await.expect("never closed").forget();
                let t = table.clone();
                let a = after.clone();
                let chunk = ctx
                    .store
                    .call(move |s| s.snapshot_chunk(&t, a.as_ref(), batch_max))
                    .await?;
                let next = chunk.next.clone();
                let batch = Batch {
                    kind: BatchKind::Snapshot,
                    after: cursor,
                    next: cursor,
                    head: chunk.log_head,
                    trace_id: 0,
                    changes: chunk.changes,
                };
                sent(cursor);
                if out.send(Message::Batch(batch)).await.is_err() {
                    return Ok(());
                }
                match next {
                    Some(key) => after = Some(key),
                    None => break,
                }
            }
        }
        if out
            .send(Message::SnapshotDone { resume_after })
            .await
            .is_err()
        {
            return Ok(());
        }
        cursor = resume_after;
    }
    let check_every = Duration::from_millis(ctx.config.file.sync.check_interval_ms);
    let mut last_check = std::time::Instant::now();
    let mut trace_id: u64 =
        u64::from_le_bytes(ctx.node_id.to_bytes()[..8].try_into().expect("8 bytes"));
    // Where the next batch starts: `cursor` (what has been read) or earlier, when pages holding
    // only the peer's own changes were skipped since the last batch.
    let mut unsent_from = cursor;
    loop {
        window.acquire().await.expect("never closed").forget();
        // Marked before reading, so a commit landing after the read still wakes us.
        head_rx.mark_unchanged();
        let page = ctx
            .store
            .call(move |s| s.read_log_for(cursor, batch_max, peer))
            .await?;
        // Nothing read at all: caught up. (A page of only the peer's own changes comes back
        // with no entries but a `next` beyond the cursor.)
        let caught_up = page.next == cursor;
        if caught_up && unsent_from < cursor {
            // caught up after skipping pages of the peer's own changes: move its cursor now
            // (with the permit taken above)
            trace_id = trace_id.wrapping_add(1);
            let batch = Batch {
                kind: BatchKind::Log,
                after: unsent_from,
                next: cursor,
                head: page.head,
                trace_id,
                changes: Vec::new(),
            };
            sent(cursor);
            if out.send(Message::Batch(batch)).await.is_err() {
                return Ok(());
            }
            unsent_from = cursor;
            ctx.peers.update(&name, |p| p.batches_sent += 1);
            continue;
        }
        if caught_up {
            window.add_permits(1);
            tokio::select! {
                _ = head_rx.changed() => {}
                _ = tokio::time::sleep(heartbeat) => {
                    if out.send(Message::Heartbeat { log_head: page.head }).await.is_err() {
                        return Ok(());
                    }
                    if last_check.elapsed() >= check_every {
                        last_check = std::time::Instant::now();
                        let (head, cursor, tables) = my_digests(&ctx, peer).await?;
                        if out.send(Message::Digest { head, cursor, tables }).await.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
            continue;
        }
        // The peer's own changes were left out by the store: they need not travel back to it.
        let changes: Vec<_> = page.entries.into_iter().map(|e| e.change).collect();
        if changes.is_empty() && page.next < page.head {
            // A page of the peer's own changes (what it sent us, in our log since we applied
            // it) with more log after it: read on instead of sending a batch that only moves
            // the cursor. Each such batch costs the peer a write transaction; the next batch
            // sent starts at `unsent_from`, so it also covers this page.
            window.add_permits(1);
            cursor = page.next;
            continue;
        }
        trace_id = trace_id.wrapping_add(1);
        tracing::debug!(peer = %name, trace_id, next = page.next.0, "send_batch");
        let batch = Batch {
            kind: BatchKind::Log,
            after: unsent_from,
            next: page.next,
            head: page.head,
            trace_id,
            changes,
        };
        sent(page.next);
        if out.send(Message::Batch(batch)).await.is_err() {
            return Ok(());
        }
        cursor = page.next;
        unsent_from = cursor;
        ctx.peers.update(&name, |p| p.batches_sent += 1);
    }
}
