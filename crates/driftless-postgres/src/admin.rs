//! Operator-facing reads and actions: dead letters, the conflict ledger, per-table counts, and
//! the `Store` trait implementation that ties the modules together.

use crate::store::{Error, PostgresStore};
use driftless_core::{Change, Clock, NodeId, PrimaryKey, TableName};
use driftless_store::ledger::{ConflictRow, version_from};
use driftless_store::{
    ApplyReport, CaptureReport, CompactionPolicy, CompactionReport, DeadLetter, DeadLetterId,
    LISTING_ROWS_MAX, LogPage, LogSeq, PeerLogState, SnapshotChunk, Store, StoreError,
    StoredConflict, TableSchema, TableStats, VerifyReport,
};

impl<C: Clock> PostgresStore<C> {
    /// Runs a read-only operation on the connection (each statement sees the latest commits).
    fn read<T>(
        &mut self,
        body: impl FnOnce(&mut Self) -> Result<T, Error>,
    ) -> Result<T, StoreError> {
        self.ensure_connected()?;
        body(self).map_err(Error::into_store)
    }

    /// A page of the log: from the in-memory tail when it covers the cursor (a peer close
    /// behind the head), else from `rows` and the user rows in one snapshot.
    fn serve(
        &mut self,
        after: LogSeq,
        limit: usize,
        skip: Option<NodeId>,
    ) -> Result<LogPage, StoreError> {
        let limit = limit.clamp(1, driftless_store::LOG_PAGE_ENTRIES_MAX);
        let mut drained = false;
        for round in 0.. {
            if self.tail.covers(after) {
                let head = self.read(|s| s.log_head_impl())?;
                if let Some(page) = self.tail.page(after, limit, skip, head) {
                    return Ok(page);
                }
            }
            // A backlog of local writes: stamp it in bounded rounds. The round that stamps the
            // last of it adds its rows to the tail (earlier ones cannot: their states may show
            // a later write's value, see `capture_in_tx`), so a peer at the head is then
            // served from memory.
            let sql = format!("SELECT EXISTS (SELECT 1 FROM {}.pending)", self.ds);
            let waiting: bool = self.read(|s| {
                let stmt = s.stmt(&sql)?;
                Ok(s.client.query_one(&stmt, &[])?.get(0))
            })?;
            let stamped = if waiting && round < driftless_store::BACKLOG_ROUNDS_MAX && !drained {
                self.write_tx(|store| {
                    let mut captured = CaptureReport::default();
                    store.capture_in_tx(driftless_store::CAPTURE_BATCH_ROWS_MAX, &mut captured)
                })?
            } else {
                0
            };
            self.vacuum_pending_if_due(stamped < driftless_store::CAPTURE_BATCH_ROWS_MAX);
            if stamped == 0 {
                break;
            }
            // (a round short of the limit stamped everything there was: one more look at the
            // tail, then the stored rows; clients still writing cannot hold the read back)
            drained = stamped < driftless_store::CAPTURE_BATCH_ROWS_MAX;
        }
        self.read_snapshot(|s| s.read_page(after, limit, skip))
    }

    fn dead_letters_impl(&mut self, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        let sql = format!(
            "SELECT id, tbl, pk, version, from_peer, reason, attempts, at_ms
             FROM {}.dead_letters ORDER BY id LIMIT $1",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let rows = self
            .client
            .query(&stmt, &[&(limit.min(LISTING_ROWS_MAX) as i64)])?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let pk: Option<Vec<u8>> = row.get(2);
            let version: Option<Vec<u8>> = row.get(3);
            let from: Option<Vec<u8>> = row.get(4);
            let attempts: i32 = row.get(6);
            let at_ms: i64 = row.get(7);
            out.push(DeadLetter {
                id: DeadLetterId(row.get(0)),
                table: row.get(1),
                key: pk.and_then(|b| PrimaryKey::from_bytes(&b).ok()),
                version: version.map(|b| version_from(&b)).transpose()?,
                from: from
                    .and_then(|b| <[u8; 16]>::try_from(b.as_slice()).ok())
                    .map(NodeId::from_bytes),
                reason: row.get(5),
                attempts: attempts as u32,
                at_ms: at_ms as u64,
            });
        }
        Ok(out)
    }

    fn all_dead_letter_ids(&mut self) -> Result<Vec<DeadLetterId>, Error> {
        let sql = format!(
            "SELECT id FROM {}.dead_letters WHERE change IS NOT NULL ORDER BY id",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        Ok(self
            .client
            .query(&stmt, &[])?
            .into_iter()
            .map(|r| DeadLetterId(r.get(0)))
            .collect())
    }

    fn conflicts_impl(&mut self, limit: usize) -> Result<Vec<StoredConflict>, Error> {
        let sql = format!(
            "SELECT id, tbl, pk, col, rule, winner_version, winner_value, loser_version,
                    loser_value, at_ms
             FROM {}.conflicts ORDER BY id DESC LIMIT $1",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let rows = self
            .client
            .query(&stmt, &[&(limit.min(LISTING_ROWS_MAX) as i64)])?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(
                ConflictRow {
                    id: row.get(0),
                    table: row.get(1),
                    pk: row.get(2),
                    column: row.get(3),
                    rule: row.get(4),
                    winner_version: row.get(5),
                    winner_value: row.get(6),
                    loser_version: row.get(7),
                    loser_value: row.get(8),
                    at_ms: row.get(9),
                }
                .decode()?,
            );
        }
        Ok(out)
    }

    fn table_stats_impl(&mut self) -> Result<Vec<TableStats>, Error> {
        let mut out = Vec::new();
        let conflicts_sql = format!("SELECT count(*) FROM {}.conflicts WHERE tbl = $1", self.ds);
        let dead_sql = format!(
            "SELECT count(*) FROM {}.dead_letters WHERE tbl = $1",
            self.ds
        );
        for synced in self.synced.clone() {
            let name = synced.schema.name.as_str();
            let rows_sql = format!("SELECT count(*) FROM {}", synced.qualified);
            let stmt = self.stmt(&rows_sql)?;
            let rows: i64 = self.client.query_one(&stmt, &[])?.get(0);
            let stmt = self.stmt(&conflicts_sql)?;
            let conflicts: i64 = self.client.query_one(&stmt, &[&name])?.get(0);
            let stmt = self.stmt(&dead_sql)?;
            let dead: i64 = self.client.query_one(&stmt, &[&name])?.get(0);
            out.push(TableStats {
                table: synced.schema.name.clone(),
                rows: rows as u64,
                conflicts: conflicts as u64,
                dead_letters: dead as u64,
            });
        }
        Ok(out)
    }

    fn count(&mut self, table: &str) -> Result<u64, Error> {
        let sql = format!("SELECT count(*) FROM {}.{table}", self.ds);
        let stmt = self.stmt(&sql)?;
        let n: i64 = self.client.query_one(&stmt, &[])?.get(0);
        Ok(n as u64)
    }

    /// Changes whenever a client commits a write to a synced table: the lowest and highest
    /// pending record visible now. Stamping removes every visible record, so any commit after a
    /// stamp makes a set with different ends (sequence numbers are never reused), even when
    /// client transactions commit out of sequence order.
    fn commit_token_impl(&mut self) -> Result<u64, Error> {
        let sql = format!(
            "SELECT coalesce(min(seq), 0), coalesce(max(seq), 0) FROM {}.pending",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let row = self.client.query_one(&stmt, &[])?;
        let (low, high): (i64, i64) = (row.get(0), row.get(1));
        Ok((low as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ high as u64)
    }
}

impl<C: Clock> Store for PostgresStore<C> {
    fn node_id(&self) -> NodeId {
        self.node
    }

    fn schemas(&self) -> &[TableSchema] {
        &self.schemas
    }

    fn capture(&mut self, limit: usize) -> Result<CaptureReport, StoreError> {
        let limit = limit.clamp(1, driftless_store::CAPTURE_BATCH_ROWS_MAX);
        let report = self.write_tx(|store| {
            let mut report = CaptureReport::default();
            report.records = store.capture_in_tx(limit, &mut report)?;
            Ok(report)
        })?;
        self.vacuum_pending_if_due(report.records < limit);
        Ok(report)
    }

    fn pending_local_writes(&mut self) -> Result<u64, StoreError> {
        self.read(|s| s.count("pending"))
    }

    fn read_log(&mut self, after: LogSeq, limit: usize) -> Result<LogPage, StoreError> {
        self.serve(after, limit, None)
    }

    fn read_log_for(
        &mut self,
        after: LogSeq,
        limit: usize,
        peer: NodeId,
    ) -> Result<LogPage, StoreError> {
        self.serve(after, limit, Some(peer))
    }

    fn log_head(&mut self) -> Result<LogSeq, StoreError> {
        self.read(|s| s.log_head_impl())
    }

    fn apply_batch(
        &mut self,
        from: NodeId,
        changes: &[Change],
        cursor: LogSeq,
    ) -> Result<ApplyReport, StoreError> {
        self.apply_batch_impl(from, changes, cursor)
    }

    fn cursor(&mut self, from: NodeId) -> Result<LogSeq, StoreError> {
        self.read(|s| s.cursor_impl(from))
    }

    fn record_ack(&mut self, peer: NodeId, acked: LogSeq) -> Result<PeerLogState, StoreError> {
        self.record_ack_impl(peer, acked)
    }

    fn peer_state(&mut self, _peer: NodeId, from: LogSeq) -> Result<PeerLogState, StoreError> {
        self.read(|s| s.peer_state_impl(from))
    }

    fn compact(&mut self, policy: &CompactionPolicy) -> Result<CompactionReport, StoreError> {
        self.compact_impl(policy)
    }

    fn snapshot_chunk(
        &mut self,
        table: &TableName,
        after: Option<&PrimaryKey>,
        limit: usize,
    ) -> Result<SnapshotChunk, StoreError> {
        self.read_snapshot(|s| s.snapshot_chunk_impl(table, after, limit))
    }

    fn release_held(&mut self) -> Result<ApplyReport, StoreError> {
        self.release_held_impl()
    }

    fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(|s| s.dead_letters_impl(limit))
    }

    fn retry_dead_letters(
        &mut self,
        ids: Option<&[DeadLetterId]>,
    ) -> Result<ApplyReport, StoreError> {
        let ids = match ids {
            Some(ids) => ids.to_vec(),
            None => self.read(|s| s.all_dead_letter_ids())?,
        };
        self.write_tx(|store| {
            let mut report = ApplyReport::default();
            let mut captured = CaptureReport::default();
            store.capture_all_in_tx(&mut captured)?;
            for id in &ids {
                store.retry_one(*id, &mut report)?;
            }
            Ok(report)
        })
    }

    fn drop_dead_letters(&mut self, ids: Option<&[DeadLetterId]>) -> Result<usize, StoreError> {
        let ids: Option<Vec<i64>> = ids.map(|ids| ids.iter().map(|i| i.0).collect());
        self.write_tx(|store| {
            let n = match &ids {
                Some(list) => {
                    let sql = format!(
                        "DELETE FROM {}.dead_letters WHERE id = ANY($1::pg_catalog.int8[])",
                        store.ds
                    );
                    let stmt = store.stmt(&sql)?;
                    store.client.execute(&stmt, &[list])?
                }
                None => {
                    let sql = format!("DELETE FROM {}.dead_letters", store.ds);
                    let stmt = store.stmt(&sql)?;
                    store.client.execute(&stmt, &[])?
                }
            };
            Ok(n as usize)
        })
    }

    fn conflicts(&mut self, limit: usize) -> Result<Vec<StoredConflict>, StoreError> {
        self.read(|s| s.conflicts_impl(limit))
    }

    fn table_stats(&mut self) -> Result<Vec<TableStats>, StoreError> {
        self.read(|s| s.table_stats_impl())
    }

    fn dead_letter_counts(&mut self) -> Result<Vec<(TableName, u64)>, StoreError> {
        self.read(|s| {
            let sql = format!("SELECT count(*) FROM {}.dead_letters WHERE tbl = $1", s.ds);
            let mut out = Vec::new();
            for synced in s.synced.clone() {
                let stmt = s.stmt(&sql)?;
                let n: i64 = s
                    .client
                    .query_one(&stmt, &[&synced.schema.name.as_str()])?
                    .get(0);
                out.push((synced.schema.name.clone(), n as u64));
            }
            Ok(out)
        })
    }

    fn commit_token(&mut self) -> Result<u64, StoreError> {
        self.read(|s| s.commit_token_impl())
    }

    fn held_count(&mut self) -> Result<u64, StoreError> {
        self.read(|s| s.count("held"))
    }

    fn content_digests(&mut self) -> Result<Vec<(TableName, u64, [u8; 16])>, StoreError> {
        self.read(|s| s.content_digests_impl())
    }

    fn top_fingerprints(&mut self, table: &TableName) -> Result<Vec<i64>, StoreError> {
        self.read(|s| s.top_fingerprints_impl(table))
    }

    fn fine_fingerprints(
        &mut self,
        table: &TableName,
        tops: &[u32],
    ) -> Result<Vec<(u32, Vec<i64>)>, StoreError> {
        self.read(|s| s.fine_fingerprints_impl(table, tops))
    }

    fn bucket_items(
        &mut self,
        table: &TableName,
        fine: &[u32],
    ) -> Result<Vec<(u32, PrimaryKey, i64)>, StoreError> {
        self.read(|s| s.bucket_items_impl(table, fine))
    }

    fn row_changes(
        &mut self,
        table: &TableName,
        keys: &[PrimaryKey],
    ) -> Result<Vec<Change>, StoreError> {
        self.read_snapshot(|s| s.row_changes_impl(table, keys))
    }

    fn apply_repair(
        &mut self,
        from: NodeId,
        changes: &[Change],
    ) -> Result<ApplyReport, StoreError> {
        self.apply_repair_impl(from, changes)
    }

    fn verify_chunk(
        &mut self,
        table: &TableName,
        after: Option<&PrimaryKey>,
        limit: usize,
        repair: bool,
    ) -> Result<VerifyReport, StoreError> {
        self.verify_chunk_impl(table, after, limit, repair)
    }
}
