//! Operator-facing reads and actions: dead letters, the conflict ledger, per-table counts, and
//! the `Store` trait implementation that ties the modules together.

use crate::schema::{db, quote_ident};
use crate::store::SqliteStore;
use driftless_core::{Change, Clock, NodeId, PrimaryKey, TableName};
use driftless_store::ledger::{ConflictRow, version_from};
use driftless_store::{
    ApplyReport, CaptureReport, CompactionPolicy, CompactionReport, DeadLetter, DeadLetterId,
    LISTING_ROWS_MAX, LogPage, LogSeq, PeerLogState, SnapshotChunk, Store, StoreError,
    StoredConflict, TableSchema, TableStats,
};

fn id_list(ids: Option<&[DeadLetterId]>) -> Option<String> {
    ids.map(|ids| {
        ids.iter()
            .map(|i| i.0.to_string())
            .collect::<Vec<_>>()
            .join(",")
    })
}

impl<C: Clock> SqliteStore<C> {
    fn dead_letters_impl(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, tbl, pk, version, from_peer, reason, attempts, at_ms
                 FROM _driftless_dead_letters ORDER BY id LIMIT ?1",
            )
            .map_err(db)?;
        type Row = (
            i64,
            String,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            String,
            i64,
            i64,
        );
        let rows = stmt
            .query_map([limit.min(LISTING_ROWS_MAX) as i64], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            })
            .map_err(db)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, table, pk, version, from, reason, attempts, at_ms): Row = row.map_err(db)?;
            out.push(DeadLetter {
                id: DeadLetterId(id),
                table,
                key: pk.and_then(|b| PrimaryKey::from_bytes(&b).ok()),
                version: version.map(|b| version_from(&b)).transpose()?,
                from: from
                    .and_then(|b| <[u8; 16]>::try_from(b.as_slice()).ok())
                    .map(NodeId::from_bytes),
                reason,
                attempts: attempts as u32,
                at_ms: at_ms as u64,
            });
        }
        Ok(out)
    }

    fn all_dead_letter_ids(&self) -> Result<Vec<DeadLetterId>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id FROM _driftless_dead_letters WHERE change IS NOT NULL ORDER BY id",
            )
            .map_err(db)?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(db)?;
        rows.map(|r| r.map(DeadLetterId))
            .collect::<Result<_, _>>()
            .map_err(db)
    }

    fn conflicts_impl(&self, limit: usize) -> Result<Vec<StoredConflict>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, tbl, pk, col, rule, winner_version, winner_value, loser_version,
                        loser_value, at_ms
                 FROM _driftless_conflicts ORDER BY id DESC LIMIT ?1",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([limit.min(LISTING_ROWS_MAX) as i64], |r| {
                Ok(ConflictRow {
                    id: r.get(0)?,
                    table: r.get(1)?,
                    pk: r.get(2)?,
                    column: r.get(3)?,
                    rule: r.get(4)?,
                    winner_version: r.get(5)?,
                    winner_value: r.get(6)?,
                    loser_version: r.get(7)?,
                    loser_value: r.get(8)?,
                    at_ms: r.get(9)?,
                })
            })
            .map_err(db)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.map_err(db)?.decode()?);
        }
        Ok(out)
    }

    fn table_stats_impl(&self) -> Result<Vec<TableStats>, StoreError> {
        let mut out = Vec::new();
        for schema in &self.schemas {
            let count = |sql: &str, bind: bool| -> Result<u64, StoreError> {
                let n: i64 = if bind {
                    self.conn
                        .query_row(sql, [schema.name.as_str()], |r| r.get(0))
                        .map_err(db)?
                } else {
                    self.conn.query_row(sql, [], |r| r.get(0)).map_err(db)?
                };
                Ok(n as u64)
            };
            out.push(TableStats {
                table: schema.name.clone(),
                rows: count(
                    &format!("SELECT count(*) FROM {}", quote_ident(schema.name.as_str())),
                    false,
                )?,
                conflicts: count(
                    "SELECT count(*) FROM _driftless_conflicts WHERE tbl = ?1",
                    true,
                )?,
                dead_letters: count(
                    "SELECT count(*) FROM _driftless_dead_letters WHERE tbl = ?1",
                    true,
                )?,
            });
        }
        Ok(out)
    }
}

impl<C: Clock> Store for SqliteStore<C> {
    fn node_id(&self) -> NodeId {
        self.node
    }

    fn schemas(&self) -> &[TableSchema] {
        &self.schemas
    }

    fn capture(&mut self, limit: usize) -> Result<CaptureReport, StoreError> {
        let limit = limit.min(driftless_store::CAPTURE_BATCH_ROWS_MAX);
        self.write_tx(|store| {
            let mut report = CaptureReport::default();
            report.records = store.capture_in_tx(limit, &mut report)?;
            Ok(report)
        })
    }

    fn pending_local_writes(&mut self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM _driftless_pending", [], |r| r.get(0))
            .map_err(db)?;
        Ok(n as u64)
    }

    fn read_log(&mut self, after: LogSeq, limit: usize) -> Result<LogPage, StoreError> {
        self.read_log_impl(after, limit)
    }

    fn read_log_for(
        &mut self,
        after: LogSeq,
        limit: usize,
        peer: NodeId,
    ) -> Result<LogPage, StoreError> {
        self.read_log_for_impl(after, limit, peer)
    }

    fn log_head(&mut self) -> Result<LogSeq, StoreError> {
        self.log_head_impl()
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
        self.cursor_impl(from)
    }

    fn record_ack(&mut self, peer: NodeId, acked: LogSeq) -> Result<PeerLogState, StoreError> {
        self.record_ack_impl(peer, acked)
    }

    fn peer_state(&mut self, _peer: NodeId, from: LogSeq) -> Result<PeerLogState, StoreError> {
        self.peer_state_impl(from)
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
        self.snapshot_chunk_impl(table, after, limit)
    }

    fn release_held(&mut self) -> Result<ApplyReport, StoreError> {
        self.release_held_impl()
    }

    fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.dead_letters_impl(limit)
    }

    fn retry_dead_letters(
        &mut self,
        ids: Option<&[DeadLetterId]>,
    ) -> Result<ApplyReport, StoreError> {
        let ids = match ids {
            Some(ids) => ids.to_vec(),
            None => self.all_dead_letter_ids()?,
        };
        self.write_tx(|store| {
            let mut report = ApplyReport::default();
            let mut captured = CaptureReport::default();
            store.capture_all_in_tx(&mut captured)?;
            for id in ids {
                store.retry_one(id, &mut report)?;
            }
            Ok(report)
        })
    }

    fn drop_dead_letters(&mut self, ids: Option<&[DeadLetterId]>) -> Result<usize, StoreError> {
        let filter = id_list(ids);
        self.write_tx(|store| {
            let sql = match &filter {
                Some(list) => format!("DELETE FROM _driftless_dead_letters WHERE id IN ({list})"),
                None => "DELETE FROM _driftless_dead_letters".to_owned(),
            };
            store.conn.execute(&sql, []).map_err(db)
        })
    }

    fn conflicts(&mut self, limit: usize) -> Result<Vec<StoredConflict>, StoreError> {
        self.conflicts_impl(limit)
    }

    fn table_stats(&mut self) -> Result<Vec<TableStats>, StoreError> {
        self.table_stats_impl()
    }

    fn commit_token(&mut self) -> Result<u64, StoreError> {
        Ok(self.data_version()? as u64)
    }

    fn dead_letter_counts(&mut self) -> Result<Vec<(TableName, u64)>, StoreError> {
        let mut out = Vec::new();
        for schema in &self.schemas {
            let n: i64 = self
                .conn
                .prepare_cached("SELECT count(*) FROM _driftless_dead_letters WHERE tbl = ?1")
                .and_then(|mut s| s.query_row([schema.name.as_str()], |r| r.get(0)))
                .map_err(db)?;
            out.push((schema.name.clone(), n as u64));
        }
        Ok(out)
    }

    fn held_count(&mut self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM _driftless_held", [], |r| r.get(0))
            .map_err(db)?;
        Ok(n as u64)
    }

    fn content_digests(&mut self) -> Result<Vec<(TableName, u64, [u8; 16])>, StoreError> {
        self.content_digests_impl()
    }

    fn top_fingerprints(&mut self, table: &TableName) -> Result<Vec<i64>, StoreError> {
        self.top_fingerprints_impl(table)
    }

    fn fine_fingerprints(
        &mut self,
        table: &TableName,
        tops: &[u32],
    ) -> Result<Vec<(u32, Vec<i64>)>, StoreError> {
        self.fine_fingerprints_impl(table, tops)
    }

    fn bucket_items(
        &mut self,
        table: &TableName,
        fine: &[u32],
    ) -> Result<Vec<(u32, PrimaryKey, i64)>, StoreError> {
        self.bucket_items_impl(table, fine)
    }

    fn row_changes(
        &mut self,
        table: &TableName,
        keys: &[PrimaryKey],
    ) -> Result<Vec<Change>, StoreError> {
        self.row_changes_impl(table, keys)
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
    ) -> Result<driftless_store::VerifyReport, StoreError> {
        self.verify_chunk_impl(table, after, limit, repair)
    }
}
