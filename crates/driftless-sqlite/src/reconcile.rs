//! Reconciliation support: range fingerprints, bucket contents, full row states for repairs, and
//! the local check of table content against merge state (drift behind driftless's back).

use crate::rowio::{key_part_from_sql, load_state, read_user_row, write_user_row};
use crate::schema::{OP_INSERT, Synced, db, quote_ident};
use crate::store::SqliteStore;
use driftless_core::{Change, Clock, NodeId, PrimaryKey, TableName, Value};
use driftless_store::fingerprint::{FINE_PER_TOP, TOP_BUCKETS};
use driftless_store::{ApplyReport, CaptureReport, StoreError, VerifyReport, capture};
use rusqlite::params;
use std::sync::Arc;

/// Most buckets one request may name (bounds a peer's request).
pub const BUCKETS_PER_REQUEST_MAX: usize = 4096;
/// Most keys one repair request may name.
pub const KEYS_PER_REQUEST_MAX: usize = 100_000;

impl<C: Clock> SqliteStore<C> {
    fn synced_or_err(&self, table: &TableName) -> Result<Arc<Synced>, StoreError> {
        self.synced(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_string()))
    }

    pub(crate) fn top_fingerprints_impl(
        &mut self,
        table: &TableName,
    ) -> Result<Vec<i64>, StoreError> {
        self.synced_or_err(table)?;
        let mut tops = vec![0i64; TOP_BUCKETS];
        let mut stmt = self
            .conn
            .prepare_cached("SELECT bucket, fp FROM _driftless_fingerprints WHERE tbl = ?1")
            .map_err(db)?;
        let rows = stmt
            .query_map([table.as_str()], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            })
            .map_err(db)?;
        for row in rows {
            let (top, fp) = row.map_err(db)?;
            if let Some(slot) = usize::try_from(top).ok().and_then(|t| tops.get_mut(t)) {
                *slot = fp;
            }
        }
        Ok(tops)
    }

    /// Fine fingerprints are computed from the rows of the top bucket (through the bucket
    /// index): only the few top buckets that differ are ever asked for.
    pub(crate) fn fine_fingerprints_impl(
        &mut self,
        table: &TableName,
        tops: &[u32],
    ) -> Result<Vec<(u32, Vec<i64>)>, StoreError> {
        self.synced_or_err(table)?;
        if tops.len() > BUCKETS_PER_REQUEST_MAX {
            return Err(StoreError::BatchTooLarge {
                len: tops.len(),
                max: BUCKETS_PER_REQUEST_MAX,
            });
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT bucket, h FROM _driftless_rows
                 WHERE tbl = ?1 AND bucket >= ?2 AND bucket < ?3",
            )
            .map_err(db)?;
        let mut out = Vec::with_capacity(tops.len());
        for &top in tops {
            let first = i64::from(top) * FINE_PER_TOP as i64;
            let mut fps = vec![0i64; FINE_PER_TOP];
            let rows = stmt
                .query_map(
                    params![table.as_str(), first, first + FINE_PER_TOP as i64],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
                )
                .map_err(db)?;
            for row in rows {
                let (bucket, h) = row.map_err(db)?;
                fps[(bucket - first) as usize] ^= h;
            }
            out.push((top, fps));
        }
        Ok(out)
    }

    pub(crate) fn bucket_items_impl(
        &mut self,
        table: &TableName,
        fine: &[u32],
    ) -> Result<Vec<(u32, PrimaryKey, i64)>, StoreError> {
        self.synced_or_err(table)?;
        if fine.len() > BUCKETS_PER_REQUEST_MAX {
            return Err(StoreError::BatchTooLarge {
                len: fine.len(),
                max: BUCKETS_PER_REQUEST_MAX,
            });
        }
        let mut stmt = self
            .conn
            .prepare_cached("SELECT pk, h FROM _driftless_rows WHERE tbl = ?1 AND bucket = ?2")
            .map_err(db)?;
        let mut out = Vec::new();
        for &bucket in fine {
            let rows = stmt
                .query_map(params![table.as_str(), i64::from(bucket)], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?))
                })
                .map_err(db)?;
            for row in rows {
                let (pk, h) = row.map_err(db)?;
                let key = PrimaryKey::from_bytes(&pk)
                    .map_err(|e| StoreError::Corrupt(format!("row key in {table}: {e}")))?;
                out.push((bucket, key, h));
            }
        }
        Ok(out)
    }

    pub(crate) fn row_changes_impl(
        &mut self,
        table: &TableName,
        keys: &[PrimaryKey],
    ) -> Result<Vec<Change>, StoreError> {
        let synced = self.synced_or_err(table)?;
        if keys.len() > KEYS_PER_REQUEST_MAX {
            return Err(StoreError::BatchTooLarge {
                len: keys.len(),
                max: KEYS_PER_REQUEST_MAX,
            });
        }
        let mut out = Vec::new();
        for key in keys {
            let (state, _) = load_state(&self.conn, table.as_str(), key)?;
            out.extend(state.to_changes(table, key, synced.schema.fingerprint));
        }
        Ok(out)
    }

    pub(crate) fn apply_repair_impl(
        &mut self,
        from: NodeId,
        changes: &[Change],
    ) -> Result<ApplyReport, StoreError> {
        if changes.len() > driftless_store::APPLY_BATCH_CHANGES_MAX {
            return Err(StoreError::BatchTooLarge {
                len: changes.len(),
                max: driftless_store::APPLY_BATCH_CHANGES_MAX,
            });
        }
        self.write_tx(|store| {
            let mut report = ApplyReport::default();
            let mut captured = CaptureReport::default();
            store.capture_all_in_tx(&mut captured)?;
            report.captured = captured.changes.len();
            report.captured_tables = captured.changes.iter().map(|c| c.table.clone()).collect();
            for change in changes {
                store.apply_one(Some(from), change, &mut report)?;
            }
            Ok(report)
        })
    }

    /// See [`driftless_store::Store::verify_chunk`]. The rule (docs/reconciliation.md): the merge
    /// state is what was captured and replicated, so table content that differs from it was
    /// written behind driftless's back. A row whose content differs, or that is missing while its
    /// state says it exists, or present while its state says it was deleted, is restored from the
    /// state, and the discarded content goes to the conflict ledger (rule `drift`). A row with no
    /// state at all is adopted as a new local insert (nothing replicated can be overwritten).
    pub(crate) fn verify_chunk_impl(
        &mut self,
        table: &TableName,
        after: Option<&PrimaryKey>,
        limit: usize,
        repair: bool,
    ) -> Result<VerifyReport, StoreError> {
        let synced = self.synced_or_err(table)?;
        let limit = limit.clamp(1, driftless_store::SNAPSHOT_CHUNK_ROWS_MAX);
        self.write_tx(|store| {
            let mut report = VerifyReport::default();
            let mut captured = CaptureReport::default();
            // Pending local writes are not drift: stamp them first.
            store.capture_all_in_tx(&mut captured)?;
            let user_keys = store.user_keys_after(&synced, after, limit)?;
            let upper = capture::chunk_end(&user_keys, user_keys.len() == limit);
            let state_keys = store.state_keys_between(table, after, upper.as_ref())?;
            let keys = capture::chunk_keys(user_keys, state_keys);
            for key in &keys {
                report.checked += 1;
                store.verify_row(&synced, key, repair, &mut report)?;
            }
            report.next = upper;
            Ok(report)
        })
    }

    /// Keys of the user table after `after`, in key order.
    fn user_keys_after(
        &self,
        synced: &Synced,
        after: Option<&PrimaryKey>,
        limit: usize,
    ) -> Result<Vec<PrimaryKey>, StoreError> {
        let keys = synced.schema.key_columns();
        let names: Vec<String> = keys.iter().map(|c| quote_ident(c.name.as_str())).collect();
        let list = names.join(", ");
        let table = quote_ident(synced.schema.name.as_str());
        let placeholders: Vec<String> = (1..=names.len()).map(|i| format!("?{i}")).collect();
        let (filter, params): (String, Vec<rusqlite::types::Value>) = match after {
            None => (String::new(), Vec::new()),
            Some(key) => (
                format!("WHERE ({list}) > ({})", placeholders.join(", ")),
                key.parts()
                    .iter()
                    .map(crate::rowio::key_part_to_sql)
                    .collect(),
            ),
        };
        let sql = format!("SELECT {list} FROM {table} {filter} ORDER BY {list} LIMIT {limit}");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(db)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(params), |r| {
                let mut parts = Vec::with_capacity(names.len());
                for i in 0..names.len() {
                    parts.push(key_part_from_sql(r.get_ref(i)?));
                }
                Ok(parts)
            })
            .map_err(db)?;
        let mut out = Vec::new();
        for row in rows {
            let parts: Result<Vec<_>, String> = row.map_err(db)?.into_iter().collect();
            // keys driftless cannot represent were already refused at capture; skip them here
            if let Ok(key) =
                parts.and_then(|p| PrimaryKey::from_parts(&p).map_err(|e| e.to_string()))
            {
                out.push(key);
            }
        }
        Ok(out)
    }

    fn state_keys_between(
        &self,
        table: &TableName,
        after: Option<&PrimaryKey>,
        upper: Option<&PrimaryKey>,
    ) -> Result<Vec<PrimaryKey>, StoreError> {
        let after_bytes = after.map(|k| k.as_bytes().to_vec()).unwrap_or_default();
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT pk FROM _driftless_rows WHERE tbl = ?1 AND pk > ?2
                 AND (?3 IS NULL OR pk <= ?3) ORDER BY pk",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(
                params![
                    table.as_str(),
                    after_bytes,
                    upper.map(|k| k.as_bytes().to_vec())
                ],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .map_err(db)?;
        let mut out = Vec::new();
        for row in rows {
            let pk = row.map_err(db)?;
            out.push(
                PrimaryKey::from_bytes(&pk)
                    .map_err(|e| StoreError::Corrupt(format!("row key in {table}: {e}")))?,
            );
        }
        Ok(out)
    }

    fn verify_row(
        &mut self,
        synced: &Synced,
        key: &PrimaryKey,
        repair: bool,
        report: &mut VerifyReport,
    ) -> Result<(), StoreError> {
        let table = &synced.schema.name;
        let (state, _) = load_state(&self.conn, table.as_str(), key)?;
        let row = match read_user_row(&self.conn, synced, key) {
            Ok(row) => row,
            Err(StoreError::Schema { .. }) => return Ok(()), // unrepresentable; refused at capture
            Err(e) => return Err(e),
        };
        if state.version().is_none() {
            if row.is_some() {
                // in the table, never captured: adopt it as a local insert
                if repair {
                    let mut capture = CaptureReport::default();
                    self.stamp_key(synced, OP_INSERT, key, &mut capture)?;
                }
                report.adopted += 1;
            }
            return Ok(());
        }
        let visible = state.visible();
        let Some(differs) = capture::drift(visible.as_ref(), row.as_deref(), |_, table, held| {
            Ok::<_, StoreError>(table == held)
        })?
        else {
            return Ok(());
        };
        if !repair {
            report.restored += 1;
            return Ok(());
        }
        let version = state.version().expect("checked above");
        let conflicts = capture::drift_conflicts(table, key, version, differs);
        self.record_conflicts(&conflicts)?;
        write_user_row(&self.conn, synced, key, visible.as_ref(), false).map_err(|reason| {
            StoreError::Schema {
                table: table.to_string(),
                reason: format!("cannot restore {key} from its merge state: {reason}"),
            }
        })?;
        report.restored += 1;
        Ok(())
    }
}

impl<C: Clock> SqliteStore<C> {
    pub(crate) fn content_digests_impl(
        &mut self,
    ) -> Result<Vec<(TableName, u64, [u8; 16])>, StoreError> {
        let mut out = Vec::new();
        for synced in self.synced.clone() {
            let schema = &synced.schema;
            let keys = schema.key_columns();
            let key_list = keys
                .iter()
                .map(|c| quote_ident(c.name.as_str()))
                .collect::<Vec<_>>()
                .join(", ");
            let values: Vec<&str> = schema.value_columns().map(|c| c.name.as_str()).collect();
            let value_list: String = values
                .iter()
                .map(|c| format!(", {}", quote_ident(c)))
                .collect();
            // SQLite's key order (BINARY collation) equals PrimaryKey byte order
            let sql = format!(
                "SELECT {key_list}{value_list} FROM {} ORDER BY {key_list}",
                quote_ident(schema.name.as_str())
            );
            let mut stmt = self.conn.prepare(&sql).map_err(db)?;
            let mut rows = stmt.query([]).map_err(db)?;
            let mut digest = driftless_store::digest::ContentDigest::new();
            while let Some(row) = rows.next().map_err(db)? {
                let mut parts = Vec::with_capacity(keys.len());
                for i in 0..keys.len() {
                    match key_part_from_sql(row.get_ref(i).map_err(db)?) {
                        Ok(p) => parts.push(p),
                        Err(_) => continue,
                    }
                }
                let Ok(key) = PrimaryKey::from_parts(&parts) else {
                    continue;
                };
                let mut cells = Vec::with_capacity(values.len());
                for (i, column) in values.iter().enumerate() {
                    let value = crate::rowio::from_sql(row.get_ref(keys.len() + i).map_err(db)?)
                        .unwrap_or(Value::Null);
                    cells.push((*column, value));
                }
                digest.add_row(&key, &cells);
            }
            let (rows, hash) = digest.finish();
            out.push((schema.name.clone(), rows, hash));
        }
        Ok(out)
    }
}
