//! Serving the change log: pages after a cursor, acknowledgements, compaction, snapshots and
//! held changes.

use crate::meta;
use crate::rowio::load_state;
use crate::schema::db;
use crate::store::SqliteStore;
use driftless_core::codec::{decode_change, decode_row_state};
use driftless_core::{Clock, NodeId, PrimaryKey, TableName};
use driftless_store::{
    ApplyReport, CompactionPolicy, CompactionReport, LOG_PAGE_ENTRIES_MAX, LogEntry, LogPage,
    LogSeq, PeerLogState, SNAPSHOT_CHUNK_ROWS_MAX, SnapshotChunk, StoreError,
};
use rusqlite::{OptionalExtension, params};

/// Most held changes examined per release call.
const HELD_RELEASE_MAX: usize = 10_000;

impl<C: Clock> SqliteStore<C> {
    pub(crate) fn read_log_impl(
        &mut self,
        after: LogSeq,
        limit: usize,
    ) -> Result<LogPage, StoreError> {
        let limit = limit.min(LOG_PAGE_ENTRIES_MAX);
        let head = self.log_head_impl()?;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, change FROM _driftless_log WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![after.0 as i64, limit as i64], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(db)?;
        let mut entries = Vec::new();
        for row in rows {
            let (seq, bytes) = row.map_err(db)?;
            let change = decode_change(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("log entry {seq}: {e}")))?;
            entries.push(LogEntry {
                seq: LogSeq(seq as u64),
                change,
            });
        }
        let next = entries.last().map_or(after, |e| e.seq);
        Ok(LogPage {
            entries,
            next,
            head,
        })
    }

    pub(crate) fn log_head_impl(&self) -> Result<LogSeq, StoreError> {
        let head: i64 = self
            .conn
            .query_row(
                "SELECT coalesce(max(seq), 0) FROM _driftless_log",
                [],
                |r| r.get(0),
            )
            .map_err(db)?;
        Ok(LogSeq(head as u64))
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

    /// See [`driftless_store::Store::compact`]. Superseded entries (whose version no longer
    /// contributes to their row's state) are always safe to drop: every peer still receives the
    /// entries that do contribute, so it reaches the same state. Entries still contributing are
    /// dropped only below the floor: acknowledged by every known peer and older than
    /// `retain_entries_min`, or beyond `retain_entries_max` (then laggards must re-bootstrap).
    pub(crate) fn compact_impl(
        &mut self,
        policy: &CompactionPolicy,
    ) -> Result<CompactionReport, StoreError> {
        self.write_tx(|store| {
            let mut report = CompactionReport::default();
            let position = meta::get_i64(&store.conn, "compact_position").map_err(db)?.unwrap_or(0);
            let scanned: Vec<(i64, String, Vec<u8>, Vec<u8>)> = {
                let mut stmt = store
                    .conn
                    .prepare_cached(
                        "SELECT seq, tbl, pk, change FROM _driftless_log WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                    )
                    .map_err(db)?;
                let rows = stmt
                    .query_map(params![position, policy.scan_entries_max as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })
                    .map_err(db)?;
                rows.collect::<Result<_, _>>().map_err(db)?
            };
            // wrap around to the start once the end of the log is reached
            let next_position = if scanned.len() < policy.scan_entries_max {
                0
            } else {
                scanned.last().map_or(0, |s| s.0)
            };
            // The newest entry always stays, so the log's head never moves back: a peer whose
            // cursor is beyond our head then means a restored backup (see the node's session).
            let newest = store.log_head_impl()?.0 as i64;
            for (seq, table, pk, bytes) in &scanned {
                if *seq == newest {
                    continue;
                }
                let change = decode_change(bytes)
                    .map_err(|e| StoreError::Corrupt(format!("log entry {seq}: {e}")))?;
                let key = PrimaryKey::from_bytes(pk)
                    .map_err(|e| StoreError::Corrupt(format!("log entry {seq}: {e}")))?;
                let (state, _) = load_state(&store.conn, table, &key)?;
                if !state.references(change.version) {
                    store
                        .conn
                        .execute("DELETE FROM _driftless_log WHERE seq = ?1", [seq])
                        .map_err(db)?;
                    report.superseded_dropped += 1;
                }
            }
            meta::set(&store.conn, "compact_position", next_position).map_err(db)?;

            let head = store.log_head_impl()?;
            let floor = store.log_floor()?;
            let peers: Vec<(Vec<u8>, i64)> = {
                let mut stmt = store
                    .conn
                    .prepare_cached("SELECT peer, acked FROM _driftless_peers")
                    .map_err(db)?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(db)?;
                rows.collect::<Result<_, _>>().map_err(db)?
            };
            let count: i64 = store
                .conn
                .query_row("SELECT count(*) FROM _driftless_log", [], |r| r.get(0))
                .map_err(db)?;
            let retention_cut = if count as u64 > policy.retain_entries_max {
                let cut: i64 = store
                    .conn
                    .query_row(
                        "SELECT seq FROM _driftless_log ORDER BY seq DESC LIMIT 1 OFFSET ?1",
                        [policy.retain_entries_max as i64],
                        |r| r.get(0),
                    )
                    .map_err(db)?;
                Some(LogSeq(cut as u64))
            } else {
                None
            };
            let mut target = policy
                .retire_through(
                    head,
                    floor,
                    peers.iter().map(|(_, a)| LogSeq(*a as u64)),
                    retention_cut,
                )
                .0;
            if target > floor.0 {
                // Bounded per call (the write lock is held meanwhile): the floor moves up in
                // steps of at most `retire_entries_max` entries; the next call continues.
                let step: Option<i64> = store
                    .conn
                    .query_row(
                        "SELECT seq FROM _driftless_log WHERE seq > ?1 ORDER BY seq LIMIT 1 OFFSET ?2",
                        params![floor.0 as i64, policy.retire_entries_max.saturating_sub(1) as i64],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db)?;
                if let Some(step) = step {
                    target = target.min(step as u64);
                }
                report.retired_dropped = store
                    .conn
                    .execute("DELETE FROM _driftless_log WHERE seq <= ?1", [target as i64])
                    .map_err(db)?;
                meta::set(&store.conn, "log_floor", target as i64).map_err(db)?;
                for (peer, acked) in &peers {
                    if driftless_store::left_behind(LogSeq(*acked as u64), floor, LogSeq(target))
                        && let Ok(bytes) = <[u8; 16]>::try_from(peer.as_slice()) {
                            report.peers_marked_for_bootstrap.push(NodeId::from_bytes(bytes));
                        }
                }
                report.floor = LogSeq(target);
            } else {
                report.floor = floor;
            }
            Ok(report)
        })
    }

    pub(crate) fn snapshot_chunk_impl(
        &mut self,
        table: &TableName,
        after: Option<&PrimaryKey>,
        limit: usize,
    ) -> Result<SnapshotChunk, StoreError> {
        let synced = self
            .synced(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_string()))?;
        let fingerprint = synced.schema.fingerprint;
        let limit = limit.clamp(1, SNAPSHOT_CHUNK_ROWS_MAX);
        let log_head = self.log_head_impl()?;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT pk, state FROM _driftless_rows WHERE tbl = ?1 AND pk > ?2 ORDER BY pk LIMIT ?3",
            )
            .map_err(db)?;
        let after_bytes: Vec<u8> = after.map(|k| k.as_bytes().to_vec()).unwrap_or_default();
        let rows = stmt
            .query_map(params![table.as_str(), after_bytes, limit as i64], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(db)?;
        let mut changes = Vec::new();
        let mut last = None;
        let mut count = 0;
        for row in rows {
            let (pk, bytes) = row.map_err(db)?;
            let key = PrimaryKey::from_bytes(&pk)
                .map_err(|e| StoreError::Corrupt(format!("row key in {table}: {e}")))?;
            let state = decode_row_state(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("row state of {table} {key}: {e}")))?;
            changes.extend(state.to_changes(table, &key, fingerprint));
            last = Some(key);
            count += 1;
        }
        Ok(SnapshotChunk {
            changes,
            next: if count == limit { last } else { None },
            log_head,
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
