//! Row merge states inside a transaction: reading stored metadata (and the user-row values it
//! leaves to the table) into full states, caching them for the transaction, and flushing the
//! changed ones back, each at a new place in the log, with one multi-row statement per chunk.

use crate::rowio::{BULK_ROWS_MAX, UserRow};
use crate::schema::{Synced, quote_literal};
use crate::store::{CachedState, Error, PostgresStore};
use crate::types::canonical_local;
use driftless_core::codec::{encode_change, encode_row_state};
use driftless_core::{CellState, Change, Clock, PrimaryKey, RowState, TableName};
use driftless_store::StoreError;
use driftless_store::rowmeta::{CellMeta, ColumnIds, RowMeta};
use std::collections::HashMap;
use std::sync::Arc;

/// A state entry as loaded (not changed yet).
fn fresh(state: RowState, stored: Option<(i64, i64)>, table_row: Option<UserRow>) -> CachedState {
    CachedState {
        state,
        old_hash: stored.map(|(_, h)| h),
        seq: stored.map(|(seq, _)| seq),
        dirty: false,
        touched: 0,
        table_row,
    }
}

/// Whether this process keeps every change in `history` (fault-injection test builds only).
#[cfg(feature = "fault-injection")]
fn history_enabled() -> bool {
    use std::sync::OnceLock;
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("DRIFTLESS_HISTORY").is_ok_and(|v| v == "1"))
}

#[cfg(not(feature = "fault-injection"))]
fn history_enabled() -> bool {
    false
}

/// Row states to write, column by column (for the array parameters of `flush_sql`).
#[derive(Default)]
struct StateArrays {
    tables: Vec<i32>,
    buckets: Vec<i32>,
    pks: Vec<Vec<u8>>,
    /// 1-based position in the chunk: the row's sequence number is the chunk's base plus it.
    ordinals: Vec<i64>,
    hashes: Vec<i64>,
    metas: Vec<Vec<u8>>,
}

impl StateArrays {
    fn len(&self) -> usize {
        self.tables.len()
    }
}

/// The one statement a transaction's flush runs (per [`BULK_ROWS_MAX`] rows): new rows ($1-$6),
/// replaced rows ($7-$12), how many rows the chunk numbers ($13), the HLC to persist ($14,
/// NULL: unchanged) and whether to bump `fp_gen` ($15, see reconcile.rs), whose new value it
/// returns (NULL: not bumped). Parts with empty arrays do nothing.
///
/// The chunk's rows take a contiguous range of sequence numbers reserved with one `setval`, in
/// the order their changes were made: driftless's write transactions are serialized (advisory
/// lock), so nobody else draws from the sequence meanwhile and rows commit in sequence order.
/// A replaced row's new number is above every number in use, so the unique index on `seq`
/// never sees two rows with one number.
fn flush_sql(ds: &str) -> String {
    let seq = quote_literal(&format!("{ds}.log_seq"));
    format!(
        "WITH seq_range AS (\
           SELECT pg_catalog.setval({seq}, pg_catalog.nextval({seq}) + $13::pg_catalog.int8 - 1) \
           - $13::pg_catalog.int8 AS base WHERE $13::pg_catalog.int8 > 0), \
         new_rows AS (\
           INSERT INTO {ds}.rows (tbl, bucket, pk, seq, h, meta) \
           SELECT u.tbl, u.bucket, u.pk, r.base + u.o, u.h, u.meta FROM seq_range AS r, unnest(\
           $1::pg_catalog.int4[], $2::pg_catalog.int4[], $3::pg_catalog.bytea[], \
           $4::pg_catalog.int8[], $5::pg_catalog.int8[], $6::pg_catalog.bytea[]) \
           AS u(tbl, bucket, pk, o, h, meta)), \
         old_rows AS (\
           UPDATE {ds}.rows AS s SET seq = r.base + u.o, h = u.h, meta = u.meta \
           FROM seq_range AS r, unnest(\
           $7::pg_catalog.int4[], $8::pg_catalog.int4[], $9::pg_catalog.bytea[], \
           $10::pg_catalog.int8[], $11::pg_catalog.int8[], $12::pg_catalog.bytea[]) \
           AS u(tbl, bucket, pk, o, h, meta) \
           WHERE s.tbl = u.tbl AND s.bucket = u.bucket AND s.pk = u.pk), \
         clock AS (\
           INSERT INTO {ds}.meta (key, ival) SELECT 'hlc', $14::pg_catalog.int8 \
           WHERE $14::pg_catalog.int8 IS NOT NULL \
           ON CONFLICT (key) DO UPDATE SET ival = EXCLUDED.ival), \
         generation AS (\
           UPDATE {ds}.meta SET ival = ival + 1 WHERE key = 'fp_gen' AND $15::pg_catalog.bool \
           RETURNING ival) \
         SELECT (SELECT ival FROM generation), (SELECT base FROM seq_range)"
    )
}

/// The current user rows of some keys, by `(table id, key)` (`Err`: not representable).
pub(crate) type CurrentRows = HashMap<(i32, PrimaryKey), Result<Option<UserRow>, String>>;

/// A stored row's metadata as read: `(seq, item hash, meta)`.
pub(crate) type StoredRow = (i64, i64, Vec<u8>);

impl<C: Clock> PostgresStore<C> {
    /// Decodes stored metadata, reloading the node table once if it names a node this process
    /// has not seen (another process interned it).
    pub(crate) fn decode_meta(
        &mut self,
        synced: &Synced,
        key: &PrimaryKey,
        seq: i64,
        meta: &[u8],
    ) -> Result<RowMeta, Error> {
        match RowMeta::decode(meta, seq as u64, &self.nodes) {
            Ok(decoded) => Ok(decoded),
            Err(_) => {
                self.load_nodes()?;
                RowMeta::decode(meta, seq as u64, &self.nodes).map_err(|e| {
                    StoreError::Corrupt(format!("row state of {} {key}: {e}", synced.schema.name))
                        .into()
                })
            }
        }
    }

    /// The stored metadata of `keys` of one table (`None`: never seen), one query per
    /// [`BULK_ROWS_MAX`] keys.
    pub(crate) fn read_stored(
        &mut self,
        synced: &Synced,
        keys: &[&PrimaryKey],
    ) -> Result<Vec<Option<StoredRow>>, Error> {
        let sql = format!(
            "SELECT u.i, s.seq, s.h, s.meta FROM unnest($2::pg_catalog.int4[], \
             $3::pg_catalog.bytea[]) WITH ORDINALITY AS u(bucket, pk, i) JOIN {}.rows AS s \
             ON s.tbl = $1 AND s.bucket = u.bucket AND s.pk = u.pk",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let mut out = vec![None; keys.len()];
        for (c, chunk) in keys.chunks(BULK_ROWS_MAX).enumerate() {
            let buckets: Vec<i32> = chunk
                .iter()
                .map(|k| driftless_store::fingerprint::fine_bucket(k) as i32)
                .collect();
            let pks: Vec<&[u8]> = chunk.iter().map(|k| k.as_bytes()).collect();
            for row in self.client.query(&stmt, &[&synced.id, &buckets, &pks])? {
                let i: i64 = row.get(0);
                out[c * BULK_ROWS_MAX + (i - 1) as usize] =
                    Some((row.get(1), row.get(2), row.get(3)));
            }
        }
        Ok(out)
    }

    /// Rebuilds full row states from stored metadata, reading the user rows whose values the
    /// metadata does not hold (unless `rows` already has them: the table's current rows).
    /// Returns each key's state with the table row it was rebuilt from.
    pub(crate) fn rebuild_states(
        &mut self,
        synced: &Synced,
        keys: &[&PrimaryKey],
        stored: Vec<Option<StoredRow>>,
        rows: Option<&[Result<Option<UserRow>, String>]>,
    ) -> Result<Vec<(RowState, Option<UserRow>)>, Error> {
        let mut decoded = Vec::with_capacity(keys.len());
        let mut need: Vec<usize> = Vec::new();
        for (i, (key, stored)) in keys.iter().zip(stored).enumerate() {
            let meta = match stored {
                Some((seq, _, bytes)) => Some(self.decode_meta(synced, key, seq, &bytes)?),
                None => None,
            };
            if rows.is_none()
                && meta
                    .as_ref()
                    .is_some_and(|m| !m.columns_from_table(synced).is_empty())
            {
                need.push(i);
            }
            decoded.push(meta);
        }
        let mut read: HashMap<usize, Option<UserRow>> = HashMap::new();
        if !need.is_empty() {
            let wanted: Vec<&PrimaryKey> = need.iter().map(|&i| keys[i]).collect();
            for (i, row) in need.iter().zip(self.read_user_rows(synced, &wanted)?) {
                // a value driftless cannot represent: refused at capture; read as missing
                read.insert(*i, row.unwrap_or(None));
            }
        }
        let mut out = Vec::with_capacity(keys.len());
        for (i, meta) in decoded.into_iter().enumerate() {
            let row: Option<UserRow> = match rows {
                Some(rows) => rows[i].clone().unwrap_or(None),
                None => read.remove(&i).flatten(),
            };
            let state = match meta {
                None => RowState::new(),
                Some(meta) => meta
                    .into_state(synced, |column| {
                        row.as_ref()
                            .and_then(|r| r.iter().find(|(c, _)| c == column))
                            .map(|(_, v)| v.clone())
                    })
                    .map_err(|e| {
                        StoreError::Corrupt(format!(
                            "row state of {} {}: {e}",
                            synced.schema.name, keys[i]
                        ))
                    })?,
            };
            out.push((state, row));
        }
        Ok(out)
    }

    /// Loads the merge states of `keys` not yet in the transaction's cache, a few queries per
    /// table.
    pub(crate) fn load_states(&mut self, keys: &[(TableName, PrimaryKey)]) -> Result<(), Error> {
        self.load_states_with(keys, None)
    }

    /// [`Self::load_states`] where `rows` (by key) holds the table's current rows of some of
    /// them (stamping has just read them): those are not read again.
    pub(crate) fn load_states_with(
        &mut self,
        keys: &[(TableName, PrimaryKey)],
        rows: Option<&CurrentRows>,
    ) -> Result<(), Error> {
        let mut missing: Vec<&(TableName, PrimaryKey)> = keys
            .iter()
            .filter(|k| !self.tx.states.contains_key(*k))
            .collect();
        missing.sort();
        missing.dedup();
        let mut by_table: Vec<(Arc<Synced>, Vec<PrimaryKey>)> = Vec::new();
        for (table, key) in missing {
            let Some(synced) = self.synced(table) else {
                // not synced (any more): an empty state
                self.tx.states.insert(
                    (table.clone(), key.clone()),
                    fresh(RowState::new(), None, None),
                );
                continue;
            };
            match by_table.iter_mut().find(|(s, _)| s.id == synced.id) {
                Some((_, list)) => list.push(key.clone()),
                None => by_table.push((synced, vec![key.clone()])),
            }
        }
        for (synced, keys) in by_table {
            let refs: Vec<&PrimaryKey> = keys.iter().collect();
            let stored = self.read_stored(&synced, &refs)?;
            let places: Vec<Option<(i64, i64)>> = stored
                .iter()
                .map(|s| s.as_ref().map(|s| (s.0, s.1)))
                .collect();
            let given: Option<Vec<Result<Option<UserRow>, String>>> = rows.map(|rows| {
                keys.iter()
                    .map(|k| {
                        rows.get(&(synced.id, k.clone()))
                            .cloned()
                            .unwrap_or(Ok(None))
                    })
                    .collect()
            });
            let states = self.rebuild_states(&synced, &refs, stored, given.as_deref())?;
            for ((key, (state, row)), place) in keys.into_iter().zip(states).zip(places) {
                self.tx
                    .states
                    .insert((synced.schema.name.clone(), key), fresh(state, place, row));
            }
        }
        Ok(())
    }

    /// A loaded row state (see [`Self::load_states`]).
    pub(crate) fn cached_state(
        &mut self,
        table: &TableName,
        key: &PrimaryKey,
    ) -> Result<RowState, Error> {
        let id = (table.clone(), key.clone());
        if !self.tx.states.contains_key(&id) {
            self.load_states(std::slice::from_ref(&id))?;
        }
        Ok(self.tx.states[&id].state.clone())
    }

    /// Replaces a row's state; written back when the transaction flushes, at the row's new
    /// place in the log.
    pub(crate) fn set_state(&mut self, table: &TableName, key: &PrimaryKey, state: RowState) {
        self.tx.touches += 1;
        let touched = self.tx.touches;
        let entry = self
            .tx
            .states
            .entry((table.clone(), key.clone()))
            .or_insert_with(|| fresh(RowState::new(), None, None));
        entry.state = state;
        entry.dirty = true;
        entry.touched = touched;
    }

    /// Records what the table shows for a row after stamping (its values are exact: no need to
    /// keep them in the metadata).
    pub(crate) fn set_table_row(
        &mut self,
        table: &TableName,
        key: &PrimaryKey,
        row: Option<UserRow>,
    ) {
        if let Some(entry) = self.tx.states.get_mut(&(table.clone(), key.clone())) {
            entry.table_row = row;
        }
    }

    /// Notes a change this transaction made or applied. Storage format 2 keeps no log of
    /// changes (a row's state is its log entry); only test builds of the fault-injection
    /// harness (`fault-injection` feature and `DRIFTLESS_HISTORY=1`) keep them all, in
    /// `history`, for its checker.
    pub(crate) fn note_change(&mut self, change: &Change) {
        if history_enabled() {
            self.tx.history.push((
                change.table.clone(),
                change.key.clone(),
                encode_change(change),
            ));
        }
    }

    /// The row metadata to store for `state`: [`RowMeta::from_state`], plus every value the
    /// table will not give back exactly (`table_row`, what it showed when loaded or stamped, or
    /// the column's known canonical form), so a rebuilt state always equals the merged one.
    pub(crate) fn meta_for(
        &mut self,
        synced: &Synced,
        key: &PrimaryKey,
        state: &RowState,
        table_row: Option<&UserRow>,
    ) -> Result<Vec<u8>, Error> {
        let mut meta =
            RowMeta::from_state(state, 0, &synced.schema.rules, synced).map_err(|e| {
                StoreError::Corrupt(format!("state of {} {key}: {e}", synced.schema.name))
            })?;
        if state.is_live() {
            for (column, cell) in state.cells() {
                let CellState::Register { value, .. } = cell else {
                    continue;
                };
                let Some(id) = synced.id_of(column) else {
                    continue;
                };
                let Some(CellMeta::Register {
                    value: kept @ None, ..
                }) = meta.cells.get_mut(&id)
                else {
                    continue;
                };
                let shown = table_row
                    .and_then(|r| r.iter().find(|(c, _)| c == column))
                    .map(|(_, v)| v);
                let exact = shown == Some(value)
                    || synced
                        .values
                        .iter()
                        .find(|c| &c.name == column)
                        .and_then(|c| canonical_local(c.kind, value))
                        .is_some_and(|local| &local == value);
                if !exact {
                    *kept = Some(value.clone());
                }
            }
        }
        Ok(meta.encode(&mut self.nodes))
    }

    /// Writes the transaction's changed states (each at a new sequence number, in the order of
    /// their changes), the nodes it interned and the HLC: one statement (`flush_sql`) per
    /// [`BULK_ROWS_MAX`] rows, so a batch costs one round trip here, not five. What the states
    /// change in the top-level fingerprints (a fingerprint is the XOR of its rows' item hashes,
    /// so replacing a hash is one XOR) is kept in the transaction and folded into the
    /// in-memory fingerprints once it commits.
    ///
    /// Rows never seen before (no hash when loaded) are plain inserts and the others plain
    /// updates, not `INSERT ... ON CONFLICT`: every state is loaded before it is replaced
    /// (the fingerprint delta needs its old hash anyway), and driftless's writers are
    /// serialized, so which rows exist is known; a speculative insert costs about a quarter
    /// more than a plain one.
    pub(crate) fn flush(&mut self) -> Result<(), Error> {
        let mut dirty: Vec<(u64, TableName, PrimaryKey)> = self
            .tx
            .states
            .iter()
            .filter(|(_, c)| c.dirty)
            .map(|((t, k), c)| (c.touched, t.clone(), k.clone()))
            .collect();
        dirty.sort_by_key(|(touched, _, _)| *touched);
        // (new rows, replaced rows) per chunk, in change order, and what each adds to the tail
        // of the log: (row, its changes) by ordinal, and the numbers the rows leave
        let mut chunks: Vec<(StateArrays, StateArrays)> = Vec::new();
        type Placed = (Vec<((TableName, PrimaryKey), Vec<Change>)>, Vec<u64>);
        let mut placed: Vec<Placed> = Vec::new();
        for (n, (_, table, key)) in dirty.into_iter().enumerate() {
            let Some(synced) = self.synced(&table) else {
                continue;
            };
            let id = (table, key);
            let (state, table_row, old_hash, old_seq) = {
                let c = &self.tx.states[&id];
                (c.state.clone(), c.table_row.clone(), c.old_hash, c.seq)
            };
            let key = &id.1;
            let meta = self.meta_for(&synced, key, &state, table_row.as_ref())?;
            let hash = driftless_store::fingerprint::item_hash(key, &encode_row_state(&state));
            let bucket = driftless_store::fingerprint::fine_bucket(key);
            let top = driftless_store::fingerprint::top_of(bucket);
            *self
                .tx
                .top_deltas
                .entry(id.0.clone())
                .or_default()
                .entry(top)
                .or_insert(0) ^= hash ^ old_hash.unwrap_or(0);
            if n % BULK_ROWS_MAX == 0 {
                chunks.push(Default::default());
                placed.push(Default::default());
            }
            let (served, moved_from) = placed.last_mut().expect("pushed above");
            served.push((
                id.clone(),
                state.to_changes(&id.0, key, synced.schema.fingerprint),
            ));
            moved_from.extend(old_seq.map(|s| s as u64));
            let (new_rows, old_rows) = chunks.last_mut().expect("pushed above");
            let ordinal = (new_rows.len() + old_rows.len() + 1) as i64;
            let rows = if old_hash.is_some() {
                old_rows
            } else {
                new_rows
            };
            rows.tables.push(synced.id);
            rows.buckets.push(bucket as i32);
            rows.pks.push(key.as_bytes().to_vec());
            rows.ordinals.push(ordinal);
            rows.hashes.push(hash);
            rows.metas.push(meta);
            let cached = self.tx.states.get_mut(&id).expect("dirty entry");
            cached.old_hash = Some(hash);
            cached.dirty = false;
        }
        for (index, node) in self.nodes.take_fresh() {
            let sql = format!("INSERT INTO {}.nodes (id, node) VALUES ($1, $2)", self.ds);
            let stmt = self.stmt(&sql)?;
            self.client
                .execute(&stmt, &[&(index as i32), &node.to_bytes().as_slice()])?;
        }
        self.flush_history()?;
        let hlc = self.hlc.last().as_u64();
        let mut hlc_param = (hlc != self.hlc_saved).then_some(hlc as i64);
        let states_written = !chunks.is_empty();
        if chunks.is_empty() && hlc_param.is_none() {
            return Ok(());
        }
        if chunks.is_empty() {
            chunks.push(Default::default());
        }
        let sql = flush_sql(&self.ds);
        let stmt = self.stmt(&sql)?;
        let mut placed = placed.into_iter();
        for (i, (new_rows, old_rows)) in chunks.iter().enumerate() {
            let bump = states_written && i == 0;
            let count = (new_rows.len() + old_rows.len()) as i64;
            let row = self.client.query_one(
                &stmt,
                &[
                    &new_rows.tables,
                    &new_rows.buckets,
                    &new_rows.pks,
                    &new_rows.ordinals,
                    &new_rows.hashes,
                    &new_rows.metas,
                    &old_rows.tables,
                    &old_rows.buckets,
                    &old_rows.pks,
                    &old_rows.ordinals,
                    &old_rows.hashes,
                    &old_rows.metas,
                    &count,
                    &hlc_param.take(),
                    &bump,
                ],
            )?;
            if count > 0 {
                // rows took base + 1 ..= base + count, in ordinal order
                let base: i64 = row
                    .get::<_, Option<i64>>(1)
                    .ok_or_else(|| StoreError::Corrupt("no sequence range reserved".into()))?;
                let (served, moved_from) = placed.next().unwrap_or_default();
                let mut rows = Vec::with_capacity(served.len());
                for (ordinal, (id, changes)) in served.into_iter().enumerate() {
                    let seq = base + ordinal as i64 + 1;
                    if let Some(cached) = self.tx.states.get_mut(&id) {
                        cached.seq = Some(seq);
                    }
                    rows.push((seq as u64, changes));
                }
                self.tx.tail.push(driftless_store::tail::TailChunk {
                    first: base as u64 + 1,
                    last: (base + count) as u64,
                    rows,
                    moved_from,
                });
                // a transaction that wrote more than the tail holds leaves only its newest
                // chunks (the next one then does not follow on, so the tail restarts there)
                while self.tx.tail.iter().map(|c| c.rows.len()).sum::<usize>()
                    > driftless_store::tail::TAIL_ROWS_MAX
                    && self.tx.tail.len() > 1
                {
                    self.tx.tail.remove(0);
                }
            }
            if bump {
                match row.get::<_, Option<i64>>(0) {
                    // (a second flush in one transaction keeps the first one's "before")
                    Some(after) => {
                        let before = self.tx.fp_gen.map_or(after - 1, |(b, _)| b);
                        self.tx.fp_gen = Some((before, after));
                    }
                    // no counter: nothing is known, every cached fingerprint is dropped
                    None => self.tx.fp_gen = Some((i64::MIN, i64::MIN)),
                }
            }
        }
        self.hlc_saved = hlc;
        Ok(())
    }

    /// Test builds of the fault-injection harness: appends the transaction's changes to
    /// `history` (see [`Self::note_change`]).
    fn flush_history(&mut self) -> Result<(), Error> {
        if self.tx.history.is_empty() {
            return Ok(());
        }
        let history = std::mem::take(&mut self.tx.history);
        self.client.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {}.history (seq bigint GENERATED ALWAYS AS IDENTITY \
             PRIMARY KEY, tbl text NOT NULL, pk bytea NOT NULL, change bytea NOT NULL)",
            self.ds
        ))?;
        let sql = format!(
            "INSERT INTO {}.history (tbl, pk, change) SELECT u.t, u.p, u.c FROM unnest($1::pg_catalog.text[], \
             $2::pg_catalog.bytea[], $3::pg_catalog.bytea[]) WITH ORDINALITY AS u(t, p, c, n) ORDER BY n",
            self.ds
        );
        let tables: Vec<&str> = history.iter().map(|(t, _, _)| t.as_str()).collect();
        let pks: Vec<&[u8]> = history.iter().map(|(_, k, _)| k.as_bytes()).collect();
        let changes: Vec<&[u8]> = history.iter().map(|(_, _, c)| c.as_slice()).collect();
        self.client.execute(&sql, &[&tables, &pks, &changes])?;
        Ok(())
    }
}
