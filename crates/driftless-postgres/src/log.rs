//! Serving the change log, which in storage format 2 is the row states themselves: pages after
//! a cursor, acknowledgements, compaction (nothing left to do), snapshots and held changes. The
//! same rules as the SQLite adapter (docs/sqlite.md, "The log").

use crate::rowio::UserRow;
use crate::schema::Synced;
use crate::store::{Error, PostgresStore};
use driftless_core::codec::decode_change;
use driftless_core::{Change, Clock, NodeId, PrimaryKey, TableName};
use driftless_store::rowmeta::RowMeta;
use driftless_store::{
    ApplyReport, CompactionPolicy, CompactionReport, LOG_PAGE_ENTRIES_MAX, LogEntry, LogPage,
    LogSeq, PeerLogState, SNAPSHOT_CHUNK_ROWS_MAX, SnapshotChunk, StoreError,
};
use std::collections::HashMap;
use std::sync::Arc;

/// A stored row listed for serving: its sequence number, its table (`None`: no longer synced),
/// its key and its decoded metadata (`None`: nothing to serve).
type Listed = (i64, Option<Arc<Synced>>, PrimaryKey, Option<RowMeta>);

/// Most held changes examined per release call.
const HELD_RELEASE_MAX: usize = 10_000;

impl<C: Clock> PostgresStore<C> {
    /// Up to `limit` changes after `after`: the rows whose state changed after the cursor, in
    /// the order of their last change, each as its whole state (see `driftless_store::rowmeta`
    /// for why not only the cells that changed), without those whose origin is `skip`. A page
    /// holds whole rows only (its `next` is the last row's sequence number), so a cursor never
    /// falls inside a row; a row with more changes than `limit` fills a page on its own. Runs
    /// in one snapshot ([`Self::read_snapshot`]).
    pub(crate) fn read_page(
        &mut self,
        after: LogSeq,
        limit: usize,
        skip: Option<NodeId>,
    ) -> Result<LogPage, Error> {
        let limit = limit.clamp(1, LOG_PAGE_ENTRIES_MAX);
        let head = self.log_head_impl()?;
        let sql = format!(
            "SELECT seq, tbl, pk, meta FROM {}.rows WHERE seq > $1 ORDER BY seq LIMIT $2",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let rows = self
            .client
            .query(&stmt, &[&(after.0 as i64), &(limit as i64)])?;
        let mut listed: Vec<Listed> = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.get(0);
            let table_id: i32 = row.get(1);
            let pk: Vec<u8> = row.get(2);
            let meta: Vec<u8> = row.get(3);
            let synced = self.synced.iter().find(|s| s.id == table_id).cloned();
            let key = PrimaryKey::from_bytes(&pk)
                .map_err(|e| StoreError::Corrupt(format!("row key at seq {seq}: {e}")))?;
            let decoded = match &synced {
                // a table no longer synced: nothing to send, the cursor moves past it
                None => None,
                Some(synced) => {
                    let decoded = self.decode_meta(synced, &key, seq, &meta)?;
                    (!skip.is_some_and(|peer| decoded.only_from(peer))).then_some(decoded)
                }
            };
            listed.push((seq, synced, key, decoded));
        }
        let changes = self.rows_as_changes(&mut listed, skip)?;
        let mut entries = Vec::new();
        let mut next = after;
        for ((seq, _, _, _), changes) in listed.iter().zip(changes) {
            if !entries.is_empty() && entries.len() + changes.len() > limit {
                break;
            }
            entries.extend(changes.into_iter().map(|change| LogEntry {
                seq: LogSeq(*seq as u64),
                change,
            }));
            next = LogSeq(*seq as u64);
        }
        Ok(LogPage {
            entries,
            next,
            head,
        })
    }

    /// The whole states of listed rows as changes (none for a row without metadata), reading
    /// the user rows they need with one query per table; changes whose origin is `skip` are
    /// left out.
    fn rows_as_changes(
        &mut self,
        listed: &mut [Listed],
        skip: Option<NodeId>,
    ) -> Result<Vec<Vec<Change>>, Error> {
        let mut out: Vec<Vec<Change>> = vec![Vec::new(); listed.len()];
        let mut tables: Vec<Arc<Synced>> = Vec::new();
        for (_, synced, _, meta) in listed.iter() {
            if let (Some(s), Some(_)) = (synced, meta)
                && !tables.iter().any(|t| t.id == s.id)
            {
                tables.push(s.clone());
            }
        }
        for synced in tables {
            let at: Vec<usize> = (0..listed.len())
                .filter(|&i| {
                    listed[i].3.is_some() && listed[i].1.as_ref().is_some_and(|s| s.id == synced.id)
                })
                .collect();
            let need: Vec<usize> = at
                .iter()
                .copied()
                .filter(|&i| {
                    listed[i]
                        .3
                        .as_ref()
                        .is_some_and(|m| !m.columns_from_table(synced.as_ref()).is_empty())
                })
                .collect();
            let keys: Vec<&PrimaryKey> = need.iter().map(|&i| &listed[i].2).collect();
            let read = self.read_user_rows(&synced, &keys)?;
            let mut rows: HashMap<usize, Result<Option<UserRow>, String>> =
                need.iter().copied().zip(read).collect();
            for i in at {
                let row = match rows.remove(&i) {
                    None => None,
                    Some(Ok(row)) => row,
                    // a value driftless cannot represent: that write was refused at capture (a
                    // dead letter), and the value it replaced is gone; the row is not served
                    Some(Err(_)) => continue,
                };
                let meta = listed[i].3.take().expect("listed with metadata");
                let key = &listed[i].2;
                let state = meta
                    .into_state(synced.as_ref(), |column| {
                        row.as_ref()
                            .and_then(|r| r.iter().find(|(c, _)| c == column))
                            .map(|(_, v)| v.clone())
                    })
                    .map_err(|e| {
                        StoreError::Corrupt(format!(
                            "row state of {} {key}: {e}",
                            synced.schema.name
                        ))
                    })?;
                let mut changes =
                    state.to_changes(&synced.schema.name, key, synced.schema.fingerprint);
                if let Some(peer) = skip {
                    changes.retain(|c| c.origin() != peer);
                }
                out[i] = changes;
            }
        }
        Ok(out)
    }

    pub(crate) fn log_head_impl(&mut self) -> Result<LogSeq, Error> {
        let sql = format!("SELECT coalesce(max(seq), 0) FROM {}.rows", self.ds);
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

    /// See [`driftless_store::Store::compact`]. In storage format 2 the log is the row states:
    /// a superseded change left nothing behind when its row moved on, and every row's latest
    /// state stays reachable from any cursor, so no peer ever falls behind the log. The floor
    /// is only non-zero in a database upgraded from format 1 (peers behind it re-bootstrap).
    pub(crate) fn compact_impl(
        &mut self,
        _policy: &CompactionPolicy,
    ) -> Result<CompactionReport, StoreError> {
        let floor = self.read_snapshot(|s| s.log_floor())?;
        Ok(CompactionReport {
            floor,
            ..CompactionReport::default()
        })
    }

    /// A table's rows in the order of the row index (fine bucket, then key), resumable after
    /// any key: the chunk's `next` is the last key served.
    pub(crate) fn snapshot_chunk_impl(
        &mut self,
        table: &TableName,
        after: Option<&PrimaryKey>,
        limit: usize,
    ) -> Result<SnapshotChunk, Error> {
        let synced = self
            .synced(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_string()))?;
        let limit = limit.clamp(1, SNAPSHOT_CHUNK_ROWS_MAX);
        let log_head = self.log_head_impl()?;
        let (bucket, after_bytes) = match after {
            Some(k) => (
                driftless_store::fingerprint::fine_bucket(k) as i32,
                k.as_bytes().to_vec(),
            ),
            None => (-1, Vec::new()),
        };
        let sql = format!(
            "SELECT seq, pk, meta FROM {}.rows WHERE tbl = $1 AND (bucket, pk) > ($2, $3) \
             ORDER BY bucket, pk LIMIT $4",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let rows = self
            .client
            .query(&stmt, &[&synced.id, &bucket, &after_bytes, &(limit as i64)])?;
        let count = rows.len();
        let mut listed = Vec::with_capacity(count);
        for row in rows {
            let seq: i64 = row.get(0);
            let pk: Vec<u8> = row.get(1);
            let meta: Vec<u8> = row.get(2);
            let key = PrimaryKey::from_bytes(&pk)
                .map_err(|e| StoreError::Corrupt(format!("row key in {table}: {e}")))?;
            let decoded = self.decode_meta(&synced, &key, seq, &meta)?;
            listed.push((seq, Some(synced.clone()), key, Some(decoded)));
        }
        let next = if count == limit {
            listed.last().map(|(_, _, k, _)| k.clone())
        } else {
            None
        };
        let changes = self.rows_as_changes(&mut listed, None)?.concat();
        Ok(SnapshotChunk {
            changes,
            next,
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
