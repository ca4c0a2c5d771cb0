//! Reconciliation support: range fingerprints, bucket contents, full row states for repairs, the
//! local check of table content against merge state (drift behind driftless's back), and
//! content digests. The fingerprint scheme is `driftless_store::fingerprint`, shared with every
//! adapter, so a PostgreSQL replica and a SQLite replica can be compared.

use crate::rowio::{UserRow, key_from_row};
use crate::schema::Synced;
use crate::store::{Error, PostgresStore, TopFingerprints};
use crate::types::{WireValue, key_to_wire, read_wire};
use driftless_core::{Change, Clock, NodeId, PrimaryKey, RowState, TableName};
use driftless_store::fingerprint::{FINE_BITS, FINE_PER_TOP, TOP_BITS, TOP_BUCKETS};
use driftless_store::{ApplyReport, CaptureReport, StoreError, VerifyReport, capture};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use std::sync::Arc;

/// Most buckets one request may name (bounds a peer's request).
pub const BUCKETS_PER_REQUEST_MAX: usize = 4096;
/// Most keys one repair request may name.
pub const KEYS_PER_REQUEST_MAX: usize = 100_000;

impl<C: Clock> PostgresStore<C> {
    fn synced_or_err(&self, table: &TableName) -> Result<Arc<Synced>, StoreError> {
        self.synced(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_string()))
    }

    /// The top-level fingerprints of `table`. They are not stored: every write would have to
    /// update one of 262,144 fingerprint rows, which cost a quarter of the time of a write.
    /// This process keeps them in memory instead, built once from `row_states` (a scan of the
    /// table's states) and then kept in step by its own commits ([`Self::committed_fingerprints`]).
    /// Every transaction that writes states bumps `fp_gen` in the same transaction, so if
    /// another process (a second node on the same database, an admin command) wrote states,
    /// the counter does not match and the fingerprints are built again.
    pub(crate) fn top_fingerprints_impl(&mut self, table: &TableName) -> Result<Vec<i64>, Error> {
        let synced = self.synced_or_err(table)?;
        let sql = format!("SELECT ival FROM {}.meta WHERE key = 'fp_gen'", self.ds);
        let stmt = self.stmt(&sql)?;
        let generation: Option<i64> = self.client.query_opt(&stmt, &[])?.map(|r| r.get(0));
        if let (Some(generation), Some(cached)) = (generation, self.top_fingerprints.get(table))
            && cached.generation == generation
        {
            return Ok(cached.tops.clone());
        }
        // The counter and the states in one statement, so they come from one snapshot.
        let sql = format!(
            "SELECT g.ival, a.top, a.fp FROM (SELECT ival FROM {ds}.meta WHERE key = 'fp_gen') AS g \
             LEFT JOIN (SELECT bucket >> $2 AS top, pg_catalog.bit_xor(h) AS fp \
             FROM {ds}.rows WHERE tbl = $1 GROUP BY 1) AS a ON true",
            ds = self.ds
        );
        let stmt = self.stmt(&sql)?;
        let shift = (FINE_BITS - TOP_BITS) as i32;
        let rows = self.client.query(&stmt, &[&synced.id, &shift])?;
        let mut tops = vec![0i64; TOP_BUCKETS];
        let mut generation = None;
        for row in rows {
            generation = Some(row.get::<_, i64>(0));
            if let (Some(top), Some(fp)) =
                (row.get::<_, Option<i32>>(1), row.get::<_, Option<i64>>(2))
                && let Some(slot) = tops.get_mut(top as usize)
            {
                *slot = fp;
            }
        }
        match generation {
            Some(generation) => {
                self.top_fingerprints.insert(
                    table.clone(),
                    TopFingerprints {
                        generation,
                        tops: tops.clone(),
                    },
                );
            }
            // (no counter row: an install from before it existed; nothing is cached)
            None => {
                self.top_fingerprints.remove(table);
            }
        }
        Ok(tops)
    }

    /// Folds a committed transaction's fingerprint deltas into the in-memory fingerprints, if
    /// they were current when it began; drops those that were not (another process wrote).
    pub(crate) fn committed_fingerprints(&mut self) {
        let deltas = std::mem::take(&mut self.tx.top_deltas);
        let Some((before, after)) = self.tx.fp_gen.take() else {
            return;
        };
        self.top_fingerprints
            .retain(|_, cached| cached.generation == before);
        for (table, cached) in &mut self.top_fingerprints {
            cached.generation = after;
            for (top, delta) in deltas.get(table).into_iter().flatten() {
                cached.tops[*top] ^= delta;
            }
        }
    }

    /// The fine fingerprints under each of `tops`, from `rows` (its `(tbl, bucket, pk)` primary
    /// key finds a top bucket's rows: ~2,400 at 10M rows).
    pub(crate) fn fine_fingerprints_impl(
        &mut self,
        table: &TableName,
        tops: &[u32],
    ) -> Result<Vec<(u32, Vec<i64>)>, Error> {
        let synced = self.synced_or_err(table)?;
        if tops.len() > BUCKETS_PER_REQUEST_MAX {
            return Err(StoreError::BatchTooLarge {
                len: tops.len(),
                max: BUCKETS_PER_REQUEST_MAX,
            }
            .into());
        }
        let sql = format!(
            "SELECT s.bucket, pg_catalog.bit_xor(s.h) FROM unnest($2::pg_catalog.int8[]) AS t(top) \
             JOIN {}.rows AS s ON s.tbl = $1 AND s.bucket >= t.top * $3 \
             AND s.bucket < (t.top + 1) * $3 GROUP BY s.bucket",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let top_list: Vec<i64> = tops.iter().map(|t| i64::from(*t)).collect();
        let mut out: Vec<(u32, Vec<i64>)> = tops
            .iter()
            .map(|&top| (top, vec![0i64; FINE_PER_TOP]))
            .collect();
        let rows = self
            .client
            .query(&stmt, &[&synced.id, &top_list, &(FINE_PER_TOP as i64)])?;
        for row in rows {
            let bucket = i64::from(row.get::<_, i32>(0));
            let fp: i64 = row.get(1);
            let top = bucket / FINE_PER_TOP as i64;
            for (t, fps) in out.iter_mut().filter(|(t, _)| i64::from(*t) == top) {
                let first = i64::from(*t) * FINE_PER_TOP as i64;
                fps[(bucket - first) as usize] = fp;
            }
        }
        Ok(out)
    }

    pub(crate) fn bucket_items_impl(
        &mut self,
        table: &TableName,
        fine: &[u32],
    ) -> Result<Vec<(u32, PrimaryKey, i64)>, Error> {
        let synced = self.synced_or_err(table)?;
        if fine.len() > BUCKETS_PER_REQUEST_MAX {
            return Err(StoreError::BatchTooLarge {
                len: fine.len(),
                max: BUCKETS_PER_REQUEST_MAX,
            }
            .into());
        }
        let sql = format!(
            "SELECT bucket, pk, h FROM {}.rows WHERE tbl = $1 \
             AND bucket = ANY($2::pg_catalog.int4[]) ORDER BY bucket, pk",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let buckets: Vec<i32> = fine.iter().map(|b| *b as i32).collect();
        let mut out = Vec::new();
        for row in self.client.query(&stmt, &[&synced.id, &buckets])? {
            let bucket: i32 = row.get(0);
            let pk: Vec<u8> = row.get(1);
            let h: i64 = row.get(2);
            let key = PrimaryKey::from_bytes(&pk)
                .map_err(|e| StoreError::Corrupt(format!("row key in {table}: {e}")))?;
            out.push((bucket as u32, key, h));
        }
        // in the order the buckets were asked for, like the SQLite adapter
        out.sort_by_key(|(b, _, _)| fine.iter().position(|f| f == b));
        Ok(out)
    }

    pub(crate) fn row_changes_impl(
        &mut self,
        table: &TableName,
        keys: &[PrimaryKey],
    ) -> Result<Vec<Change>, Error> {
        let synced = self.synced_or_err(table)?;
        if keys.len() > KEYS_PER_REQUEST_MAX {
            return Err(StoreError::BatchTooLarge {
                len: keys.len(),
                max: KEYS_PER_REQUEST_MAX,
            }
            .into());
        }
        let mut out = Vec::new();
        for chunk in keys.chunks(crate::rowio::BULK_ROWS_MAX) {
            let refs: Vec<&PrimaryKey> = chunk.iter().collect();
            let stored = self.read_stored(&synced, &refs)?;
            let present: Vec<bool> = stored.iter().map(Option::is_some).collect();
            let states = self.rebuild_states(&synced, &refs, stored, None)?;
            for ((key, (state, _)), present) in chunk.iter().zip(states).zip(present) {
                if present {
                    out.extend(state.to_changes(table, key, synced.schema.fingerprint));
                }
            }
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
            store.apply_many(Some(from), changes, &mut report)?;
            Ok(report)
        })
    }

    /// See [`driftless_store::Store::verify_chunk`] and the SQLite adapter: table content that
    /// differs from the merge state was written behind driftless's back; it is restored from
    /// the state (the discarded content goes to the ledger as `drift`), and a row with no state
    /// at all is adopted as a new local insert.
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
            let (user_keys, full) = store.user_keys_after(&synced, after, limit)?;
            let upper = capture::chunk_end(&user_keys, full);
            let state_keys = store.state_keys_between(&synced, after, upper.as_ref())?;
            let keys = capture::chunk_keys(user_keys, state_keys);
            let refs: Vec<&PrimaryKey> = keys.iter().collect();
            let rows = store.read_user_rows(&synced, &refs)?;
            let ids: Vec<(TableName, PrimaryKey)> =
                keys.iter().map(|k| (table.clone(), k.clone())).collect();
            let by_key: std::collections::HashMap<_, _> = keys
                .iter()
                .zip(&rows)
                .map(|(k, r)| ((synced.id, k.clone()), r.clone()))
                .collect();
            store.load_states_with(&ids, Some(&by_key))?;
            for (key, row) in keys.iter().zip(rows) {
                report.checked += 1;
                store.verify_row(&synced, key, row, repair, &mut report)?;
            }
            report.next = upper;
            Ok(report)
        })
    }

    /// Keys of the user table after `after`, in key byte order; and whether `limit` rows came
    /// back (there may be more).
    fn user_keys_after(
        &mut self,
        synced: &Synced,
        after: Option<&PrimaryKey>,
        limit: usize,
    ) -> Result<(Vec<PrimaryKey>, bool), Error> {
        let limit = limit as i64;
        let rows = match after {
            None => {
                let stmt = self.stmt(&synced.keys_from_start)?;
                self.client.query(&stmt, &[&limit])?
            }
            Some(key) => {
                let mut wires = Vec::new();
                for (part, column) in key.parts().iter().zip(&synced.keys) {
                    match key_to_wire(column.kind, &column.declared, part) {
                        Ok(w) => wires.push(w),
                        Err(reason) => {
                            return Err(StoreError::Schema {
                                table: synced.schema.name.to_string(),
                                reason,
                            }
                            .into());
                        }
                    }
                }
                let boxed: Vec<Box<dyn ToSql + Sync>> = wires
                    .into_iter()
                    .map(|w| -> Box<dyn ToSql + Sync> {
                        match w {
                            WireValue::Int(i) => Box::new(i),
                            WireValue::Bool(b) => Box::new(b),
                            WireValue::Text(t) => Box::new(t),
                            WireValue::Bytes(b) => Box::new(b),
                            WireValue::Float(f) => Box::new(f),
                            WireValue::Null => Box::new(Option::<i64>::None),
                        }
                    })
                    .collect();
                let mut params: Vec<&(dyn ToSql + Sync)> =
                    boxed.iter().map(|b| b.as_ref()).collect();
                params.push(&limit);
                let stmt = self.stmt(&synced.keys_after)?;
                self.client.query(&stmt, &params)?
            }
        };
        let full = rows.len() as i64 == limit;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            // keys driftless cannot represent were already refused at capture; skip them here
            if let Ok(key) = key_from_row(synced, row)? {
                out.push(key);
            }
        }
        Ok((out, full))
    }

    /// The keys with a stored state in `(after, upper]`. The rows' index is by bucket first, so
    /// this reads every state key of the table (known cost: O(rows) per verify chunk).
    fn state_keys_between(
        &mut self,
        synced: &Synced,
        after: Option<&PrimaryKey>,
        upper: Option<&PrimaryKey>,
    ) -> Result<Vec<PrimaryKey>, Error> {
        let table = &synced.schema.name;
        let sql = format!(
            "SELECT pk FROM {}.rows WHERE tbl = $1 AND pk > $2 \
             AND ($3::pg_catalog.bytea IS NULL OR pk <= $3) ORDER BY pk",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let after_bytes: Vec<u8> = after.map(|k| k.as_bytes().to_vec()).unwrap_or_default();
        let upper_bytes: Option<Vec<u8>> = upper.map(|k| k.as_bytes().to_vec());
        let mut out = Vec::new();
        for row in self
            .client
            .query(&stmt, &[&synced.id, &after_bytes, &upper_bytes])?
        {
            let pk: Vec<u8> = row.get(0);
            out.push(
                PrimaryKey::from_bytes(&pk)
                    .map_err(|e| StoreError::Corrupt(format!("row key in {table}: {e}")))?,
            );
        }
        Ok(out)
    }

    /// One row of the local check. The state was rebuilt from the table row (values the
    /// metadata does not keep come from it), so an edit behind driftless's back shows as an
    /// item hash that no longer matches the stored one, or as a table value that does not show
    /// a value the metadata keeps. Such content is adopted as a local write of every column
    /// (the same rule as the SQLite adapter; docs/reconciliation.md).
    fn verify_row(
        &mut self,
        synced: &Synced,
        key: &PrimaryKey,
        row: Result<Option<UserRow>, String>,
        repair: bool,
        report: &mut VerifyReport,
    ) -> Result<(), Error> {
        let table = &synced.schema.name;
        let state: RowState = self.cached_state(table, key)?;
        let stored_hash = self.tx.states[&(table.clone(), key.clone())].old_hash;
        let Ok(row) = row else {
            return Ok(()); // unrepresentable; refused at capture
        };
        let drifted = match stored_hash {
            None => row.is_some(),
            Some(stored_hash) => {
                let visible = state.visible();
                capture::drift(visible.as_ref(), row.as_deref(), |i, table, held| {
                    self.shows(&synced.values[i], table, held)
                })?
                .is_some()
                    || (row.is_some()
                        && driftless_store::fingerprint::item_hash(
                            key,
                            &driftless_core::codec::encode_row_state(&state),
                        ) != stored_hash)
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
            self.stamp_recorded(synced, key, &all, Ok(row), &mut capture)?;
        }
        if stored_hash.is_none() {
            report.adopted += 1;
        } else {
            report.restored += 1;
        }
        Ok(())
    }

    /// Content digests of every synced table (see `driftless_store::digest`), streamed in key
    /// byte order.
    pub(crate) fn content_digests_impl(
        &mut self,
    ) -> Result<Vec<(TableName, u64, [u8; 16])>, Error> {
        let mut out = Vec::new();
        for synced in self.synced.clone() {
            let key_reads: Vec<String> = synced
                .keys
                .iter()
                .map(|c| c.kind.read_expr(&format!("t.{}", c.quoted)))
                .collect();
            let value_reads: String = synced
                .values
                .iter()
                .map(|c| format!(", {}", c.kind.read_expr(&format!("t.{}", c.quoted))))
                .collect();
            // the same order as `keys_from_start`, without a limit
            let order = synced
                .keys_from_start
                .split(" ORDER BY ")
                .nth(1)
                .and_then(|rest| rest.strip_suffix(" LIMIT $1"))
                .unwrap_or("1")
                .to_owned();
            let sql = format!(
                "SELECT {}{value_reads} FROM {} AS t ORDER BY {order}",
                key_reads.join(", "),
                synced.qualified
            );
            let stmt = self.stmt(&sql)?;
            let mut digest = driftless_store::digest::ContentDigest::new();
            let mut rows = self
                .client
                .query_raw(&stmt, Vec::<&(dyn ToSql + Sync)>::new())?;
            while let Some(row) = rows.next()? {
                let Ok(key) = key_from_row(&synced, &row)? else {
                    continue;
                };
                let mut cells = Vec::with_capacity(synced.values.len());
                for (i, column) in synced.values.iter().enumerate() {
                    let wire = read_wire(&row, synced.keys.len() + i, column.kind.read_wire())?;
                    cells.push((column.name.as_str(), wire.into_value()));
                }
                digest.add_row(&key, &cells);
            }
            let (rows, hash) = digest.finish();
            out.push((synced.schema.name.clone(), rows, hash));
        }
        Ok(out)
    }
}
