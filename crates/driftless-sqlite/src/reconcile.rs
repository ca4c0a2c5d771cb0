//! Reconciliation support: range fingerprints, bucket contents, full row states for repairs, and
//! the local check of table content against merge state (drift behind driftless's back).

use crate::rowio::{key_part_from_sql, load_state, read_user_row, state_hash, table_shows};
use crate::schema::{Synced, db, quote_ident};
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
        let synced = self.synced_or_err(table)?;
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
                    params![synced.id, first, first + FINE_PER_TOP as i64],
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
        let synced = self.synced_or_err(table)?;
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
                .query_map(params![synced.id, i64::from(bucket)], |r| {
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
        self.read_tx(|store| {
            let mut out = Vec::new();
            for key in keys {
                let loaded = load_state(&store.conn, &synced, key, &store.nodes, None)?;
                out.extend(
                    loaded
                        .state
                        .to_changes(table, key, synced.schema.fingerprint),
                );
            }
            Ok(out)
        })
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

    /// See [`driftless_store::Store::verify_chunk`]. The rule (docs/reconciliation.md): table
    /// content that differs from its merge state was written behind driftless's back (no
    /// trigger saw it). Storage format 2 keeps no copy of `lww` values to restore from, so such
    /// content is **adopted**: captured now as a local write of every column of the row (a
    /// missing row as a delete, a row with no live state as an insert), as if a trigger had
    /// fired. Cells whose winning value the metadata does keep (`max`, `min`, priority) are
    /// merged by their rule and set back if the table's value loses.
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
            let state_keys = store.state_keys_between(&synced, after, upper.as_ref())?;
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

    /// Keys of the table's merge states in `(after, upper]`. States are indexed by bucket, not
    /// in key order, so this reads every state key of the table and filters: the local check
    /// calls it per chunk only for the range's rows missing from the table.
    fn state_keys_between(
        &self,
        synced: &Synced,
        after: Option<&PrimaryKey>,
        upper: Option<&PrimaryKey>,
    ) -> Result<Vec<PrimaryKey>, StoreError> {
        let table = &synced.schema.name;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT pk FROM _driftless_rows WHERE tbl = ?1 AND pk > ?2 AND (?3 IS NULL OR pk <= ?3)",
            )
            .map_err(db)?;
        let after_bytes = after.map(|k| k.as_bytes().to_vec()).unwrap_or_default();
        let rows = stmt
            .query_map(
                params![synced.id, after_bytes, upper.map(|k| k.as_bytes().to_vec())],
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
        out.sort();
        Ok(out)
    }

    fn verify_row(
        &mut self,
        synced: &Synced,
        key: &PrimaryKey,
        repair: bool,
        report: &mut VerifyReport,
    ) -> Result<(), StoreError> {
        let row = match read_user_row(&self.conn, synced, key) {
            Ok(row) => row,
            Err(StoreError::Schema { .. }) => return Ok(()), // unrepresentable; refused at capture
            Err(e) => return Err(e),
        };
        let loaded = load_state(&self.conn, synced, key, &self.nodes, Some(row.as_deref()))?;
        let drifted = match (&loaded.stored, &row) {
            (None, None) => false,
            // in the table, never captured
            (None, Some(_)) => true,
            (Some((_, stored_hash)), _) => {
                !capture::matches_row_by(&loaded.state, row.as_deref(), table_shows)
                    || (row.is_some() && state_hash(key, &loaded.state) != *stored_hash)
            }
        };
        if !drifted {
            return Ok(());
        }
        if repair {
            let mut capture = CaptureReport::default();
            let all = capture::Recorded {
                all_columns: true,
                ..capture::Recorded::default()
            };
            self.stamp_recorded(synced, key, &all, &mut capture)?;
        }
        if loaded.stored.is_none() {
            report.adopted += 1;
        } else {
            report.restored += 1;
        }
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
