//! Reading and writing rows, many at a time: user rows by primary key (and what a column shows
//! for a value) and conflict ledger entries. Row merge states are in `states.rs`.
//!
//! Every statement here takes its rows as SQL arrays (`unnest($1::int8[], $2::text[], ...)`), so
//! a batch of 10,000 changes costs a handful of round trips, not 10,000.

use crate::schema::{PgColumn, Synced};
use crate::store::{Error, PostgresStore};
use crate::types::{
    WireArray, WireValue, canonical_local, key_part_from_wire, key_to_wire, read_wire, to_wire,
};
use driftless_core::codec::Encoder;
use driftless_core::{
    Clock, ColumnName, ConflictRecord, ConflictRule, PrimaryKey, TableName, Value,
};
use driftless_store::StoreError;
use postgres::types::ToSql;
use std::collections::BTreeMap;

/// Most rows one bulk statement carries (bounds statement size and server memory).
pub const BULK_ROWS_MAX: usize = 10_000;

/// One user row to make match its merge state.
#[derive(Debug, Clone)]
pub(crate) struct RowWrite {
    pub key: PrimaryKey,
    /// `None`: the row must not exist.
    pub visible: Option<BTreeMap<ColumnName, Value>>,
    /// Delete an existing row first, so columns the new life has not written take their
    /// defaults instead of keeping values from the previous life.
    pub recreate: bool,
}

/// A user row's non-key values, in the table's value-column order.
pub(crate) type UserRow = Vec<(ColumnName, Value)>;

fn params(arrays: &[WireArray]) -> Vec<&(dyn ToSql + Sync)> {
    arrays.iter().map(WireArray::as_sql).collect()
}

pub(crate) fn encode_version(version: driftless_core::Version) -> Vec<u8> {
    let mut e = Encoder::new();
    e.version(version);
    e.finish()
}

fn encode_value(value: &Option<Value>) -> Option<Vec<u8>> {
    value.as_ref().map(|v| {
        let mut e = Encoder::new();
        e.value(v);
        e.finish()
    })
}

/// The key arrays of `keys` for `synced`'s bulk statements. Keys whose parts do not fit the key
/// columns are left out and reported with their index.
pub(crate) fn key_arrays(
    synced: &Synced,
    keys: &[&PrimaryKey],
) -> (Vec<WireArray>, Vec<usize>, Vec<(usize, String)>) {
    let mut arrays: Vec<WireArray> = synced
        .keys
        .iter()
        .map(|c| WireArray::new(c.kind.write_wire()))
        .collect();
    let mut included = Vec::with_capacity(keys.len());
    let mut refused = Vec::new();
    'keys: for (i, key) in keys.iter().enumerate() {
        let parts = key.parts();
        if parts.len() != synced.keys.len() {
            refused.push((
                i,
                format!(
                    "key {key} has {} parts; table {} has {} key columns",
                    parts.len(),
                    synced.schema.name,
                    synced.keys.len()
                ),
            ));
            continue;
        }
        let mut wires = Vec::with_capacity(parts.len());
        for (part, column) in parts.iter().zip(&synced.keys) {
            match key_to_wire(column.kind, &column.declared, part) {
                Ok(w) => wires.push(w),
                Err(reason) => {
                    refused.push((i, format!("key {key}: {reason}")));
                    continue 'keys;
                }
            }
        }
        for (array, wire) in arrays.iter_mut().zip(wires) {
            array.push(wire);
        }
        included.push(i);
    }
    (arrays, included, refused)
}

impl<C: Clock> PostgresStore<C> {
    /// The current rows of `keys` in `synced`: for each key its non-key values, `Ok(None)` if
    /// the row does not exist, `Err` if the key cannot even be expressed in this table.
    pub(crate) fn read_user_rows(
        &mut self,
        synced: &Synced,
        keys: &[&PrimaryKey],
    ) -> Result<Vec<Result<Option<UserRow>, String>>, Error> {
        let mut out: Vec<Result<Option<UserRow>, String>> = vec![Ok(None); keys.len()];
        let stmt = self.stmt(&synced.read_rows)?;
        for start in (0..keys.len()).step_by(BULK_ROWS_MAX) {
            let end = (start + BULK_ROWS_MAX).min(keys.len());
            let (arrays, included, refused) = key_arrays(synced, &keys[start..end]);
            for (i, reason) in refused {
                out[start + i] = Err(reason);
            }
            if included.is_empty() {
                continue;
            }
            let rows = self.client.query(&stmt, &params(&arrays))?;
            for row in rows {
                let ordinal: i64 = row.get(0);
                let index = start + included[(ordinal - 1) as usize];
                let mut values = Vec::with_capacity(synced.values.len());
                for (n, column) in synced.values.iter().enumerate() {
                    let wire = read_wire(&row, n + 1, column.kind.read_wire())?;
                    values.push((column.name.clone(), wire.into_value()));
                }
                out[index] = Ok(Some(values));
            }
        }
        Ok(out)
    }

    /// Makes the user rows of `synced` match `rows` (one per key): locks the rows first (under
    /// REPEATABLE READ this fails if a client changed one since the snapshot: the caller's
    /// transaction then runs again), deletes, then upserts grouped by the set of columns
    /// present. `Ok(Err(reason))`: a value cannot be stored in its column; nothing was written.
    pub(crate) fn write_user_rows(
        &mut self,
        synced: &Synced,
        rows: &[RowWrite],
    ) -> Result<Result<(), String>, Error> {
        if rows.is_empty() {
            return Ok(Ok(()));
        }
        // Convert everything first, so a value that does not fit writes nothing.
        let keys: Vec<&PrimaryKey> = rows.iter().map(|r| &r.key).collect();
        let (arrays, included, refused) = key_arrays(synced, &keys);
        if let Some((_, reason)) = refused.into_iter().next() {
            return Ok(Err(reason));
        }
        debug_assert_eq!(included.len(), rows.len());
        // upsert groups: present value columns -> (key arrays, value arrays)
        let mut groups: BTreeMap<Vec<usize>, (Vec<WireArray>, Vec<WireArray>)> = BTreeMap::new();
        let mut deletes: Vec<&PrimaryKey> = Vec::new();
        for row in rows {
            if row.visible.is_none() || row.recreate {
                deletes.push(&row.key);
            }
            let Some(visible) = &row.visible else {
                continue;
            };
            let present: Vec<usize> = synced
                .values
                .iter()
                .enumerate()
                .filter(|(_, c)| visible.contains_key(&c.name))
                .map(|(i, _)| i)
                .collect();
            let mut wires = Vec::with_capacity(present.len());
            for &i in &present {
                let column = &synced.values[i];
                match to_wire(column.kind, &column.declared, &visible[&column.name]) {
                    Ok(w) => wires.push(w),
                    Err(reason) => {
                        return Ok(Err(format!("column {}: {reason}", column.name)));
                    }
                }
            }
            let (key_arrays, value_arrays) = groups.entry(present.clone()).or_insert_with(|| {
                (
                    synced
                        .keys
                        .iter()
                        .map(|c| WireArray::new(c.kind.write_wire()))
                        .collect(),
                    present
                        .iter()
                        .map(|&i| WireArray::new(synced.values[i].kind.write_wire()))
                        .collect(),
                )
            });
            for (array, wire) in key_arrays.iter_mut().zip(key_wires(synced, &row.key)) {
                array.push(wire);
            }
            for (array, wire) in value_arrays.iter_mut().zip(wires) {
                array.push(wire);
            }
        }
        let stmt = self.stmt(&synced.lock_rows)?;
        self.client.query(&stmt, &params(&arrays))?;
        if !deletes.is_empty() {
            let (delete_arrays, _, _) = key_arrays(synced, &deletes);
            let stmt = self.stmt(&synced.delete_rows)?;
            self.client.execute(&stmt, &params(&delete_arrays))?;
        }
        for (present, (mut key_arrays, value_arrays)) in groups {
            let sql = synced.upsert_sql(&present);
            let stmt = self.stmt(&sql)?;
            key_arrays.extend(value_arrays);
            self.client.execute(&stmt, &params(&key_arrays))?;
        }
        Ok(Ok(()))
    }

    /// Whether a column showing `shown` holds what writing `value` to it leaves there: equal,
    /// or equal once `value` takes the column's form (an integer in a `double precision`
    /// column shows as a real, a timestamp written as `2024-01-31T10:00` shows as
    /// `2024-01-31 10:00:00`). Values from other stores may arrive in such forms; they must not
    /// look like local edits.
    pub(crate) fn shows(
        &mut self,
        column: &PgColumn,
        shown: &Value,
        value: &Value,
    ) -> Result<bool, Error> {
        if shown == value {
            return Ok(true);
        }
        if let Some(local) = canonical_local(column.kind, value) {
            return Ok(&local == shown);
        }
        let Ok(wire) = to_wire(column.kind, &column.declared, value) else {
            return Ok(false);
        };
        let param: Box<dyn ToSql + Sync> = match wire {
            WireValue::Null => return Ok(shown.is_null()),
            WireValue::Int(i) => Box::new(i),
            WireValue::Float(f) => Box::new(f),
            WireValue::Bool(b) => Box::new(b),
            WireValue::Text(t) => Box::new(t),
            WireValue::Bytes(b) => Box::new(b),
        };
        let stmt = self.stmt(&Synced::canonical_sql(column))?;
        // The cast may fail (a value written under an older column type): not what is shown.
        self.client.batch_execute("SAVEPOINT driftless_canonical")?;
        match self.client.query_one(&stmt, &[param.as_ref()]) {
            Ok(row) => {
                self.client.batch_execute("RELEASE driftless_canonical")?;
                let wire = read_wire(&row, 0, column.kind.read_wire())?;
                Ok(&wire.into_value() == shown)
            }
            Err(e)
                if e.code()
                    .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23")) =>
            {
                self.client.batch_execute(
                    "ROLLBACK TO driftless_canonical; RELEASE driftless_canonical",
                )?;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Stores conflicts in the ledger (each once). Returns the table and rule of the new ones.
    pub(crate) fn record_conflicts(
        &mut self,
        conflicts: &[ConflictRecord],
    ) -> Result<Vec<(TableName, ConflictRule)>, Error> {
        if conflicts.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "INSERT INTO {}.conflicts (tbl, pk, col, rule, winner_version, winner_value, \
             loser_version, loser_value, at_ms) SELECT u.*, $9 FROM unnest(\
             $1::pg_catalog.text[], $2::pg_catalog.bytea[], $3::pg_catalog.text[], \
             $4::pg_catalog.text[], $5::pg_catalog.bytea[], $6::pg_catalog.bytea[], \
             $7::pg_catalog.bytea[], $8::pg_catalog.bytea[]) AS u \
             ON CONFLICT (tbl, pk, col, loser_version) DO NOTHING RETURNING tbl, rule",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let mut added = Vec::new();
        let now = self.now_ms() as i64;
        for chunk in conflicts.chunks(BULK_ROWS_MAX) {
            let tables: Vec<&str> = chunk.iter().map(|c| c.table.as_str()).collect();
            let pks: Vec<&[u8]> = chunk.iter().map(|c| c.key.as_bytes()).collect();
            let columns: Vec<&str> = chunk.iter().map(|c| c.column.as_str()).collect();
            let rules: Vec<&str> = chunk.iter().map(|c| c.rule.as_str()).collect();
            let winner_versions: Vec<Vec<u8>> = chunk
                .iter()
                .map(|c| encode_version(c.winner.version))
                .collect();
            let winner_values: Vec<Option<Vec<u8>>> = chunk
                .iter()
                .map(|c| encode_value(&c.winner.value))
                .collect();
            let loser_versions: Vec<Vec<u8>> = chunk
                .iter()
                .map(|c| encode_version(c.loser.version))
                .collect();
            let loser_values: Vec<Option<Vec<u8>>> =
                chunk.iter().map(|c| encode_value(&c.loser.value)).collect();
            let rows = self.client.query(
                &stmt,
                &[
                    &tables,
                    &pks,
                    &columns,
                    &rules,
                    &winner_versions,
                    &winner_values,
                    &loser_versions,
                    &loser_values,
                    &now,
                ],
            )?;
            for row in rows {
                let table: String = row.get(0);
                let rule: String = row.get(1);
                let table = TableName::new(&table)
                    .map_err(|e| StoreError::Corrupt(format!("conflict table: {e}")))?;
                added.push((table, driftless_store::ledger::rule_from(&rule)?));
            }
        }
        Ok(added)
    }
}

/// The key wire values of one key (already checked to fit).
fn key_wires(synced: &Synced, key: &PrimaryKey) -> Vec<WireValue> {
    key.parts()
        .iter()
        .zip(&synced.keys)
        .map(|(part, column)| {
            key_to_wire(column.kind, &column.declared, part).unwrap_or(WireValue::Null)
        })
        .collect()
}

/// Reads a key from `row` columns `0..keys.len()` (read with the key columns' read expressions).
pub(crate) fn key_from_row(
    synced: &Synced,
    row: &postgres::Row,
) -> Result<Result<PrimaryKey, String>, Error> {
    let mut parts = Vec::with_capacity(synced.keys.len());
    for (i, column) in synced.keys.iter().enumerate() {
        let wire = read_wire(row, i, column.kind.read_wire())?;
        match key_part_from_wire(wire) {
            Ok(p) => parts.push(p),
            Err(e) => return Ok(Err(e)),
        }
    }
    Ok(PrimaryKey::from_parts(&parts).map_err(|e| e.to_string()))
}
