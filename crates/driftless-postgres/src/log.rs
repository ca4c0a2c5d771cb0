//! Serving the change log: pages after a cursor, acknowledgements, compaction, snapshots and
//! held changes. The same rules as the SQLite adapter (docs/sqlite.md, "The log").

use crate::store::{Error, PostgresStore};
use driftless_core::codec::{decode_change, decode_row_state};
use driftless_core::{Clock, NodeId, PrimaryKey, TableName};
use driftless_store::{
    ApplyReport, CompactionPolicy, CompactionReport, LOG_PAGE_ENTRIES_MAX, LogEntry, LogPage,
    LogSeq, PeerLogState, SNAPSHOT_CHUNK_ROWS_MAX, SnapshotChunk, StoreError,
};

/// Most held changes examined per release call.
const HELD_RELEASE_MAX: usize = 10_000;

impl<C: Clock> PostgresStore<C> {
    pub(crate) fn read_log_impl(&mut self, after: LogSeq, limit: usize) -> Result<LogPage, Error> {
        let limit = limit.min(LOG_PAGE_ENTRIES_MAX);
        let sql = format!(
            "SELECT seq, change FROM {}.log WHERE seq > $1 ORDER BY seq LIMIT $2",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let rows = self
            .client
            .query(&stmt, &[&(after.0 as i64), &(limit as i64)])?;
        let mut entries = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.get(0);
            let bytes: Vec<u8> = row.get(1);
            let change = decode_change(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("log entry {seq}: {e}")))?;
            entries.push(LogEntry {
                seq: LogSeq(seq as u64),
                change,
            });
        }
        // read after the entries, so the head is never below the last entry returned
        let head = self.log_head_impl()?;
        let next = entries.last().map_or(after, |e| e.seq);
        Ok(LogPage {
            entries,
            next,
            head,
        })
    }

    pub(crate) fn log_head_impl(&mut self) -> Result<LogSeq, Error> {
        let sql = format!("SELECT coalesce(max(seq), 0) FROM {}.log", self.ds);
        let stmt = self.stmt(&sql)?;
        let head: i64 = self.client.query_one(&stmt, &[])?.get(0);
        Ok(LogSeq(head as u64))
    }

    fn log_floor(&mut self) -> Result<LogSeq, Error> {
        Ok(LogSeq(
            self.meta
                .get_i64(&mut self.client, "log_floor")?
                .unwrap_or(0) as u64,
        ))
    }

    pub(crate) fn cursor_impl(&mut self, from: NodeId) -> Result<LogSeq, Error> {
        let sql = format!("SELECT seq FROM {}.cursors WHERE peer = $1", self.ds);
        let stmt = self.stmt(&sql)?;
        let seq: Option<i64> = self
            .client
            .query_opt(&stmt, &[&from.to_bytes().as_slice()])?
            .map(|r| r.get(0));
        Ok(LogSeq(seq.unwrap_or(0) as u64))
    }

    pub(crate) fn peer_state_impl(&mut self, from: LogSeq) -> Result<PeerLogState, Error> {
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
            let sql = format!(
                "INSERT INTO {}.peers (peer, acked) VALUES ($1, $2)
                 ON CONFLICT (peer) DO UPDATE SET acked = EXCLUDED.acked",
                store.ds
            );
            let stmt = store.stmt(&sql)?;
            store
                .client
                .execute(&stmt, &[&peer.to_bytes().as_slice(), &(acked.0 as i64)])?;
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
            let position = store
                .meta
                .get_i64(&mut store.client, "compact_position")?
                .unwrap_or(0);
            let sql = format!(
                "SELECT seq, tbl, pk, change FROM {}.log WHERE seq > $1 ORDER BY seq LIMIT $2",
                store.ds
            );
            let stmt = store.stmt(&sql)?;
            let rows = store
                .client
                .query(&stmt, &[&position, &(policy.scan_entries_max as i64)])?;
            // wrap around to the start once the end of the log is reached
            let next_position = if rows.len() < policy.scan_entries_max {
                0
            } else {
                rows.last().map_or(0, |r| r.get::<_, i64>(0))
            };
            let mut scanned = Vec::with_capacity(rows.len());
            for row in rows {
                let seq: i64 = row.get(0);
                let table: String = row.get(1);
                let pk: Vec<u8> = row.get(2);
                let bytes: Vec<u8> = row.get(3);
                let change = decode_change(&bytes)
                    .map_err(|e| StoreError::Corrupt(format!("log entry {seq}: {e}")))?;
                let key = PrimaryKey::from_bytes(&pk)
                    .map_err(|e| StoreError::Corrupt(format!("log entry {seq}: {e}")))?;
                let table = TableName::new(&table)
                    .map_err(|e| StoreError::Corrupt(format!("log entry {seq}: {e}")))?;
                scanned.push((seq, table, key, change.version));
            }
            let ids: Vec<(TableName, PrimaryKey)> = scanned
                .iter()
                .map(|(_, t, k, _)| (t.clone(), k.clone()))
                .collect();
            store.load_states(&ids)?;
            // The newest entry always stays, so the log's head never moves back: a peer whose
            // cursor is beyond our head then means a restored backup (see session.rs).
            let newest = store.log_head_impl()?.0 as i64;
            let superseded: Vec<i64> = scanned
                .iter()
                .filter(|(seq, t, k, v)| {
                    *seq != newest
                        && !store.tx.states[&(t.clone(), k.clone())]
                            .state
                            .references(*v)
                })
                .map(|(seq, _, _, _)| *seq)
                .collect();
            if !superseded.is_empty() {
                let sql = format!(
                    "DELETE FROM {}.log WHERE seq = ANY($1::pg_catalog.int8[])",
                    store.ds
                );
                let stmt = store.stmt(&sql)?;
                report.superseded_dropped = store.client.execute(&stmt, &[&superseded])? as usize;
            }
            store
                .meta
                .set_i64(&mut store.client, "compact_position", next_position)?;

            let head = store.log_head_impl()?;
            let floor = store.log_floor()?;
            let sql = format!("SELECT peer, acked FROM {}.peers", store.ds);
            let stmt = store.stmt(&sql)?;
            let peers: Vec<(Vec<u8>, i64)> = store
                .client
                .query(&stmt, &[])?
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            // Entries above the floor are at most head - floor; count them exactly only when
            // that bound exceeds the limit (a count of a large log is a scan).
            let mut retention_cut = None;
            if head.0.saturating_sub(floor.0) > policy.retain_entries_max {
                let sql = format!(
                    "SELECT seq FROM {}.log ORDER BY seq DESC LIMIT 1 OFFSET $1",
                    store.ds
                );
                let stmt = store.stmt(&sql)?;
                if let Some(row) = store
                    .client
                    .query_opt(&stmt, &[&(policy.retain_entries_max as i64)])?
                {
                    retention_cut = Some(LogSeq(row.get::<_, i64>(0) as u64));
                }
            }
            let mut target = policy
                .retire_through(
                    head,
                    floor,
                    peers.iter().map(|(_, a)| LogSeq(*a as u64)),
                    retention_cut,
                )
                .0;
            if target > floor.0 {
                // Bounded per call: the floor moves up at most `retire_entries_max` entries.
                let step_sql = format!(
                    "SELECT seq FROM {}.log WHERE seq > $1 ORDER BY seq LIMIT 1 OFFSET $2",
                    store.ds
                );
                let stmt = store.stmt(&step_sql)?;
                let offset = policy.retire_entries_max.saturating_sub(1) as i64;
                if let Some(row) = store
                    .client
                    .query_opt(&stmt, &[&(floor.0 as i64), &offset])?
                {
                    target = target.min(row.get::<_, i64>(0) as u64);
                }
                let sql = format!("DELETE FROM {}.log WHERE seq <= $1", store.ds);
                let stmt = store.stmt(&sql)?;
                report.retired_dropped = store.client.execute(&stmt, &[&(target as i64)])? as usize;
                store
                    .meta
                    .set_i64(&mut store.client, "log_floor", target as i64)?;
                for (peer, acked) in &peers {
                    if driftless_store::left_behind(LogSeq(*acked as u64), floor, LogSeq(target))
                        && let Ok(bytes) = <[u8; 16]>::try_from(peer.as_slice())
                    {
                        report
                            .peers_marked_for_bootstrap
                            .push(NodeId::from_bytes(bytes));
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
    ) -> Result<SnapshotChunk, Error> {
        let synced = self
            .synced(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_string()))?;
        let fingerprint = synced.schema.fingerprint;
        let limit = limit.clamp(1, SNAPSHOT_CHUNK_ROWS_MAX);
        let log_head = self.log_head_impl()?;
        let sql = format!(
            "SELECT pk, state FROM {}.row_states WHERE tbl = $1 AND pk > $2 ORDER BY pk LIMIT $3",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let after_bytes: Vec<u8> = after.map(|k| k.as_bytes().to_vec()).unwrap_or_default();
        let rows = self
            .client
            .query(&stmt, &[&table.as_str(), &after_bytes, &(limit as i64)])?;
        let mut changes = Vec::new();
        let mut last = None;
        let count = rows.len();
        for row in rows {
            let pk: Vec<u8> = row.get(0);
            let bytes: Vec<u8> = row.get(1);
            let key = PrimaryKey::from_bytes(&pk)
                .map_err(|e| StoreError::Corrupt(format!("row key in {table}: {e}")))?;
            let state = decode_row_state(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("row state of {table} {key}: {e}")))?;
            changes.extend(state.to_changes(table, &key, fingerprint));
            last = Some(key);
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
            let sql = format!(
                "SELECT id, from_peer, change FROM {}.held ORDER BY id LIMIT $1",
                store.ds
            );
            let stmt = store.stmt(&sql)?;
            let held: Vec<(i64, Vec<u8>, Vec<u8>)> = store
                .client
                .query(&stmt, &[&(HELD_RELEASE_MAX as i64)])?
                .into_iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            if held.is_empty() {
                return Ok(report);
            }
            let mut captured = driftless_store::CaptureReport::default();
            store.capture_all_in_tx(&mut captured)?;
            let delete = format!("DELETE FROM {}.held WHERE id = $1", store.ds);
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
                let stmt = store.stmt(&delete)?;
                store.client.execute(&stmt, &[&id])?;
                let from = <[u8; 16]>::try_from(from.as_slice())
                    .ok()
                    .map(NodeId::from_bytes);
                store.apply_one(from, &change, &mut report)?;
            }
            Ok(report)
        })
    }
}
