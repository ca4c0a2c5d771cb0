//! Serving the change log, which in storage format 2 is the row states themselves: pages after
//! a cursor, acknowledgements, compaction (nothing left to do), snapshots and held changes.

use crate::meta;
use crate::rowio::{decode_meta, read_user_row, rebuild};
use crate::schema::{Synced, db};
use crate::store::SqliteStore;
use driftless_core::codec::decode_change;
use driftless_core::{Change, Clock, NodeId, PrimaryKey, TableName};
use driftless_store::{
    ApplyReport, CompactionPolicy, CompactionReport, LOG_PAGE_ENTRIES_MAX, LogEntry, LogPage,
    LogSeq, PeerLogState, SNAPSHOT_CHUNK_ROWS_MAX, SnapshotChunk, StoreError,
};
use rusqlite::params;

/// Most held changes examined per release call.
const HELD_RELEASE_MAX: usize = 10_000;

impl<C: Clock> SqliteStore<C> {
    /// Up to `limit` changes after `after`: the rows whose state changed after the cursor, in
    /// the order of their last change, each as its whole state (see `rowmeta` for why not only
    /// the cells that changed). A page holds whole rows only (its `next` is the last row's
    /// sequence number), so a cursor never falls inside a row; a row with more changes than
    /// `limit` fills a page on its own.
    pub(crate) fn read_log_impl(
        &mut self,
        after: LogSeq,
        limit: usize,
    ) -> Result<LogPage, StoreError> {
        self.serve(after, limit, None)
    }

    /// [`Self::read_log_impl`] without `peer`'s own changes; a row holding only those is
    /// skipped before its values are read from the table.
    pub(crate) fn read_log_for_impl(
        &mut self,
        after: LogSeq,
        limit: usize,
        peer: NodeId,
    ) -> Result<LogPage, StoreError> {
        self.serve(after, limit, Some(peer))
    }

    /// A page from the in-memory tail when it covers the cursor (a peer close behind the head),
    /// else from the stored rows in one read transaction.
    fn serve(
        &mut self,
        after: LogSeq,
        limit: usize,
        skip: Option<NodeId>,
    ) -> Result<LogPage, StoreError> {
        let limit = limit.clamp(1, LOG_PAGE_ENTRIES_MAX);
        let mut drained = false;
        for round in 0.. {
            if self.tail.covers(after) {
                let head = self.log_head_impl()?;
                if let Some(page) = self.tail.page(after, limit, skip, head) {
                    return Ok(page);
                }
            }
            // A backlog of local writes: stamp it in bounded rounds. The round that stamps the
            // last of it adds its rows to the tail (earlier ones cannot: their states may show
            // a later write's value, see `capture_in_tx`), so a peer at the head is then
            // served from memory.
            let waiting: bool = self
                .conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM _driftless_pending)")
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(db)?;
            if !waiting || round >= driftless_store::BACKLOG_ROUNDS_MAX || drained {
                break;
            }
            let stamped = self.write_tx(|store| {
                let mut captured = driftless_store::CaptureReport::default();
                store.capture_in_tx(driftless_store::CAPTURE_BATCH_ROWS_MAX, &mut captured)
            })?;
            // (a round short of the limit stamped everything there was: one more look at the
            // tail, then the stored rows; clients still writing cannot hold the read back)
            drained = stamped < driftless_store::CAPTURE_BATCH_ROWS_MAX;
        }
        self.read_tx(|store| store.read_page(after, limit, skip))
    }

    fn read_page(
        &mut self,
        after: LogSeq,
        limit: usize,
        skip: Option<NodeId>,
    ) -> Result<LogPage, StoreError> {
        let head = self.log_head_impl()?;
        let rows: Vec<(i64, i64, Vec<u8>, Vec<u8>)> = {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT seq, tbl, pk, meta FROM _driftless_rows WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map(params![after.0 as i64, limit as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)?
        };
        let mut entries = Vec::new();
        let mut next = after;
        for (seq, table_id, pk, meta) in rows {
            let changes = match self.synced.iter().find(|s| s.id == table_id).cloned() {
                // a table no longer synced: nothing to send, the cursor moves past it
                None => Vec::new(),
                Some(synced) => self.stored_row_changes(&synced, seq, &pk, &meta, skip)?,
            };
            if !entries.is_empty() && entries.len() + changes.len() > limit {
                break;
            }
            entries.extend(changes.into_iter().map(|change| LogEntry {
                seq: LogSeq(seq as u64),
                change,
            }));
            next = LogSeq(seq as u64);
        }
        Ok(LogPage {
            entries,
            next,
            head,
        })
    }

    /// One stored row's whole state as changes, without those whose origin is `skip`.
    pub(crate) fn stored_row_changes(
        &self,
        synced: &Synced,
        seq: i64,
        pk: &[u8],
        meta: &[u8],
        skip: Option<NodeId>,
    ) -> Result<Vec<Change>, StoreError> {
        let table = &synced.schema.name;
        let key = PrimaryKey::from_bytes(pk)
            .map_err(|e| StoreError::Corrupt(format!("row key in {table}: {e}")))?;
        let decoded = decode_meta(synced, &key, seq, meta, &self.nodes)?;
        if skip.is_some_and(|peer| decoded.only_from(peer)) {
            return Ok(Vec::new());
        }
        let row = if !decoded.columns_from_table(synced).is_empty() {
            match read_user_row(&self.conn, synced, &key) {
                Ok(row) => row,
                // a value driftless cannot represent: that write was refused at capture (a dead
                // letter), and the value it replaced is gone; the row is not served
                Err(StoreError::Schema { .. }) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let state = rebuild(synced, &key, decoded, row.as_deref())?;
        let mut changes = state.to_changes(table, &key, synced.schema.fingerprint);
        if let Some(peer) = skip {
            changes.retain(|c| c.origin() != peer);
        }
        Ok(changes)
    }

    pub(crate) fn log_head_impl(&self) -> Result<LogSeq, StoreError> {
        Ok(LogSeq(self.head_seq()? as u64))
    }

    fn log_floor(&self) -> Result<LogSeq, StoreError> {
        Ok(LogSeq(
            meta::get_i64(&self.conn, "log_floor")
                .map_err(db)?
                .unwrap_or(0) as u64,
        ))
    }

    pub(crate) fn cursor_impl(&self, from: NodeId) -> Result<LogSeq, StoreError> {
        let seq: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM _driftless_cursors WHERE peer = ?1",
                [from.to_bytes().to_vec()],
                |r| r.get(0),
            )
            .ok();
        Ok(LogSeq(seq.unwrap_or(0) as u64))
    }

    pub(crate) fn peer_state_impl(&self, from: LogSeq) -> Result<PeerLogState, StoreError> {
        let floor = self.log_floor()?;
        if from < floor {
            Ok(PeerLogState::NeedsBootstrap {
                resume_after: self.log_head_impl()?,
            })
        } else {
            Ok(PeerLogState::Stream)
        }
    }

    pub(crate) fn record_ack_impl(
        &mut self,
        peer: NodeId,
        acked: LogSeq,
    ) -> Result<PeerLogState, StoreError> {
        self.write_tx(|store| {
            store
                .conn
                .execute(
                    "INSERT INTO _driftless_peers (peer, acked) VALUES (?1, ?2)
                     ON CONFLICT (peer) DO UPDATE SET acked = excluded.acked",
                    params![peer.to_bytes().to_vec(), acked.0 as i64],
                )
                .map_err(db)?;
            store.peer_state_impl(acked)
        })
    }

    /// See [`driftless_store::Store::compact`]. In storage format 2 the log is the row states:
    /// a superseded change left nothing behind when its row moved on, and every row's latest
    /// state stays reachable from any cursor, so no peer ever falls behind the log. The floor
    /// is only non-zero in a database upgraded from format 1 (peers behind it re-bootstrap).
    pub(crate) fn compact_impl(
        &mut self,
        _policy: &CompactionPolicy,
    ) -> Result<CompactionReport, StoreError> {
        Ok(CompactionReport {
            floor: self.log_floor()?,
            ..CompactionReport::default()
        })
    }

    /// A table's rows in the order of the key index (fine bucket, then key), resumable after
    /// any key: the chunk's `next` is the last key served.
    pub(crate) fn snapshot_chunk_impl(
        &mut self,
        table: &TableName,
        after: Option<&PrimaryKey>,
        limit: usize,
    ) -> Result<SnapshotChunk, StoreError> {
        let synced = self
            .synced(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_string()))?;
        let limit = limit.clamp(1, SNAPSHOT_CHUNK_ROWS_MAX);
        self.read_tx(|store| {
            let log_head = store.log_head_impl()?;
            let (bucket, after_bytes) = match after {
                Some(k) => (
                    driftless_store::fingerprint::fine_bucket(k),
                    k.as_bytes().to_vec(),
                ),
                None => (-1, Vec::new()),
            };
            let rows: Vec<(i64, Vec<u8>, Vec<u8>)> = {
                let mut stmt = store
                    .conn
                    .prepare_cached(
                        "SELECT seq, pk, meta FROM _driftless_rows
                         WHERE tbl = ?1 AND (bucket, pk) > (?2, ?3) ORDER BY bucket, pk LIMIT ?4",
                    )
                    .map_err(db)?;
                let rows = stmt
                    .query_map(params![synced.id, bucket, after_bytes, limit as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .map_err(db)?;
                rows.collect::<Result<_, _>>().map_err(db)?
            };
            let mut changes = Vec::new();
            let mut last = None;
            let count = rows.len();
            for (seq, pk, meta) in rows {
                changes.extend(store.stored_row_changes(&synced, seq, &pk, &meta, None)?);
                last = Some(pk);
            }
            let next = match last {
                Some(pk) if count == limit => Some(
                    PrimaryKey::from_bytes(&pk)
                        .map_err(|e| StoreError::Corrupt(format!("row key in {table}: {e}")))?,
                ),
                _ => None,
            };
            Ok(SnapshotChunk {
                changes,
                next,
                log_head,
            })
        })
    }

    pub(crate) fn release_held_impl(&mut self) -> Result<ApplyReport, StoreError> {
        self.write_tx(|store| {
            let mut report = ApplyReport::default();
            let held: Vec<(i64, Vec<u8>, Vec<u8>)> = {
                let mut stmt = store
                    .conn
                    .prepare_cached(
                        "SELECT id, from_peer, change FROM _driftless_held ORDER BY id LIMIT ?1",
                    )
                    .map_err(db)?;
                let rows = stmt
                    .query_map([HELD_RELEASE_MAX as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .map_err(db)?;
                rows.collect::<Result<_, _>>().map_err(db)?
            };
            if held.is_empty() {
                return Ok(report);
            }
            let mut captured = driftless_store::CaptureReport::default();
            store.capture_all_in_tx(&mut captured)?;
            for (id, from, bytes) in held {
                let change = decode_change(&bytes)
                    .map_err(|e| StoreError::Corrupt(format!("held change {id}: {e}")))?;
                let ahead_ms = change
                    .version
                    .timestamp
                    .physical_ms()
                    .saturating_sub(store.hlc.clock().now_ms());
                if ahead_ms > store.hlc.max_offset_ms() {
                    continue; // still too far ahead
                }
                store
                    .conn
                    .execute("DELETE FROM _driftless_held WHERE id = ?1", [id])
                    .map_err(db)?;
                let from = <[u8; 16]>::try_from(from.as_slice())
                    .ok()
                    .map(NodeId::from_bytes);
                store.apply_one(from, &change, &mut report)?;
            }
            Ok(report)
        })
    }
}
