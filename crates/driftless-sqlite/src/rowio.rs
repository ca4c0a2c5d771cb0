//! Reading and writing rows: user rows by primary key, row merge states (metadata plus the
//! values the table holds), and the conversions between SQLite values and driftless values.

use crate::schema::{Synced, db, upsert_sql};
use driftless_core::codec::encode_row_state;
use driftless_core::{Change, ColumnName, KeyPart, PrimaryKey, RowState, Value};
use driftless_store::StoreError;
use driftless_store::rowmeta::{NodeInterner, RowMeta};
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};
use std::collections::BTreeMap;

/// A SQLite value as a driftless value. Text that is not UTF-8 is refused rather than mangled
/// (a lossy conversion would replicate a value nobody wrote).
pub fn from_sql(value: ValueRef<'_>) -> Result<Value, String> {
    Ok(match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(r) => Value::Real(r),
        ValueRef::Text(t) => Value::Text(
            String::from_utf8(t.to_vec())
                .map_err(|_| "text value is not valid UTF-8".to_owned())?,
        ),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    })
}

pub fn to_sql(value: &Value) -> Result<SqlValue, String> {
    Ok(match value {
        Value::Null => SqlValue::Null,
        Value::Integer(i) => SqlValue::Integer(*i),
        Value::Real(r) => SqlValue::Real(*r),
        Value::Text(t) => SqlValue::Text(t.clone()),
        Value::Blob(b) => SqlValue::Blob(b.clone()),
        other => return Err(format!("SQLite cannot store a {} value", other.type_name())),
    })
}

/// Whether a value read from a SQLite table shows `held`, a value driftless wrote there: the
/// same value, or NULL for a NaN real (SQLite stores NaN as NULL; the metadata keeps the NaN).
pub fn table_shows(table: &Value, held: &Value) -> bool {
    table == held || (table.is_null() && matches!(held, Value::Real(r) if r.is_nan()))
}

pub fn key_part_from_sql(value: ValueRef<'_>) -> Result<KeyPart, String> {
    Ok(match value {
        ValueRef::Integer(i) => KeyPart::Integer(i),
        ValueRef::Text(t) => KeyPart::Text(
            String::from_utf8(t.to_vec()).map_err(|_| "key text is not valid UTF-8".to_owned())?,
        ),
        ValueRef::Blob(b) => KeyPart::Blob(b.to_vec()),
        ValueRef::Null => return Err("a primary-key column is NULL".into()),
        ValueRef::Real(r) => {
            return Err(format!(
                "a primary-key column holds the real number {r}; real keys are not supported"
            ));
        }
    })
}

pub fn key_part_to_sql(part: &KeyPart) -> SqlValue {
    match part {
        KeyPart::Integer(i) => SqlValue::Integer(*i),
        KeyPart::Text(t) => SqlValue::Text(t.clone()),
        KeyPart::Blob(b) => SqlValue::Blob(b.clone()),
    }
}

/// The non-key columns of a user row, or `None` if the row does not exist.
pub fn read_user_row(
    conn: &Connection,
    table: &Synced,
    key: &PrimaryKey,
) -> Result<Option<Vec<(ColumnName, Value)>>, StoreError> {
    let schema = &table.schema;
    let mut stmt = conn.prepare_cached(&table.select_row).map_err(db)?;
    let parts: Vec<SqlValue> = key.parts().iter().map(key_part_to_sql).collect();
    let row = stmt
        .query_row(params_from_iter(parts), |r| {
            let mut values = Vec::with_capacity(schema.columns.len());
            for (i, c) in schema.value_columns().enumerate() {
                values.push((c.name.clone(), from_sql(r.get_ref(i)?)));
            }
            Ok(values)
        })
        .optional()
        .map_err(db)?;
    let Some(row) = row else { return Ok(None) };
    let mut out = Vec::with_capacity(row.len());
    for (column, value) in row {
        let value = value.map_err(|reason| StoreError::Schema {
            table: schema.name.to_string(),
            reason: format!("column {column}: {reason}"),
        })?;
        out.push((column, value));
    }
    Ok(Some(out))
}

/// Makes the user row match `visible` (`None` = the row must not exist). With `recreate`, an
/// existing row is deleted first, so columns the new life has not written take their defaults
/// instead of keeping values from the previous life. Errors carry SQLite's message (constraint
/// violations) for the dead-letter table.
pub fn write_user_row(
    conn: &Connection,
    table: &Synced,
    key: &PrimaryKey,
    visible: Option<&BTreeMap<ColumnName, Value>>,
    recreate: bool,
) -> Result<(), String> {
    let schema = &table.schema;
    let mut values: Vec<SqlValue> = key.parts().iter().map(key_part_to_sql).collect();
    if visible.is_none() || recreate {
        let mut stmt = conn
            .prepare_cached(&table.delete_row)
            .map_err(|e| e.to_string())?;
        stmt.execute(params_from_iter(values.iter()))
            .map_err(|e| e.to_string())?;
    }
    let Some(visible) = visible else {
        return Ok(());
    };
    let mut present = Vec::new();
    for column in schema.value_columns() {
        if let Some(value) = visible.get(&column.name) {
            present.push(column.name.as_str());
            values.push(to_sql(value)?);
        }
    }
    let partial;
    let sql = if present.len() == schema.value_columns().count() {
        &table.upsert_all
    } else {
        partial = upsert_sql(schema, &present);
        &partial
    };
    let mut stmt = conn.prepare_cached(sql).map_err(|e| e.to_string())?;
    stmt.execute(params_from_iter(values))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// What a row held before a change: its full merge state (values from the table where the
/// metadata has none) and where it is stored (`None`: never seen).
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub state: RowState,
    /// `(seq, item hash)` of the stored row.
    pub stored: Option<(i64, i64)>,
}

/// A row's stored metadata: `(seq, item hash, meta)`, `None` if the row was never seen.
pub fn load_meta(
    conn: &Connection,
    table: &Synced,
    key: &PrimaryKey,
) -> Result<Option<(i64, i64, Vec<u8>)>, StoreError> {
    let bucket = driftless_store::fingerprint::fine_bucket(key);
    let mut stmt = conn
        .prepare_cached(
            "SELECT seq, h, meta FROM _driftless_rows WHERE tbl = ?1 AND bucket = ?2 AND pk = ?3",
        )
        .map_err(db)?;
    stmt.query_row(params![table.id, bucket, key.as_bytes()], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
    .optional()
    .map_err(db)
}

/// Decodes a row's stored metadata (stored at sequence number `seq`).
pub fn decode_meta(
    table: &Synced,
    key: &PrimaryKey,
    seq: i64,
    meta: &[u8],
    nodes: &NodeInterner,
) -> Result<RowMeta, StoreError> {
    RowMeta::decode(meta, seq as u64, nodes)
        .map_err(|e| StoreError::Corrupt(format!("row state of {} {key}: {e}", table.schema.name)))
}

/// Rebuilds a row's full merge state from its metadata and, for the values the metadata does
/// not hold, from `row` (the table's current values; `None` if the row is not there).
pub fn rebuild(
    table: &Synced,
    key: &PrimaryKey,
    decoded: RowMeta,
    row: Option<&[(ColumnName, Value)]>,
) -> Result<RowState, StoreError> {
    decoded
        .into_state(table, |column| {
            row.and_then(|r| r.iter().find(|(c, _)| c == column))
                .map(|(_, v)| v.clone())
        })
        .map_err(|e| StoreError::Corrupt(format!("row state of {} {key}: {e}", table.schema.name)))
}

/// Loads a row's merge state, reading the table row only when the metadata needs values from
/// it. `row` may pass the table row when the caller already read it.
pub fn load_state(
    conn: &Connection,
    table: &Synced,
    key: &PrimaryKey,
    nodes: &NodeInterner,
    row: Option<Option<&[(ColumnName, Value)]>>,
) -> Result<Loaded, StoreError> {
    let Some((seq, h, meta)) = load_meta(conn, table, key)? else {
        return Ok(Loaded::default());
    };
    let decoded = decode_meta(table, key, seq, &meta, nodes)?;
    let read;
    let row = match row {
        Some(row) => row,
        None if decoded.columns_from_table(table).is_empty() => None,
        None => {
            read = read_user_row(conn, table, key)?;
            read.as_deref()
        }
    };
    let state = rebuild(table, key, decoded, row)?;
    Ok(Loaded {
        state,
        stored: Some((seq, h)),
    })
}

/// The item hash of a row's state (the same in every adapter: over the full state, values
/// included).
pub fn state_hash(key: &PrimaryKey, state: &RowState) -> i64 {
    driftless_store::fingerprint::item_hash(key, &encode_row_state(state))
}

/// Saves a row's merge state under sequence number `seq` (its new place in the log). Returns
/// `(top bucket, fingerprint delta)`: the caller folds the delta into the top bucket's
/// fingerprint (the XOR of its rows' item hashes) before the transaction commits, so many
/// writes to one bucket cost one fingerprint update.
pub fn save_state(
    conn: &Connection,
    table: &Synced,
    key: &PrimaryKey,
    loaded: &Loaded,
    state: &RowState,
    seq: i64,
    nodes: &mut NodeInterner,
) -> Result<(usize, i64), StoreError> {
    let meta = RowMeta::from_state(state, seq as u64, &table.schema.rules, table)
        .map_err(|e| StoreError::Corrupt(format!("state of {} {key}: {e}", table.schema.name)))?
        .encode(nodes);
    let hash = state_hash(key, state);
    let bucket = driftless_store::fingerprint::fine_bucket(key);
    match loaded.stored {
        Some((old_seq, _)) => {
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE _driftless_rows SET seq = ?1, h = ?2, meta = ?3 WHERE seq = ?4",
                )
                .map_err(db)?;
            stmt.execute(params![seq, hash, meta, old_seq])
                .map_err(db)?;
        }
        None => {
            let mut stmt = conn
                .prepare_cached(
                    "INSERT INTO _driftless_rows (seq, tbl, bucket, pk, h, meta)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(db)?;
            stmt.execute(params![seq, table.id, bucket, key.as_bytes(), hash, meta])
                .map_err(db)?;
        }
    }
    let old_hash = loaded.stored.map_or(0, |(_, h)| h);
    Ok((
        driftless_store::fingerprint::top_of(bucket),
        hash ^ old_hash,
    ))
}

/// Folds fingerprint deltas into the top buckets' fingerprints.
pub fn flush_fingerprints(
    conn: &Connection,
    deltas: &std::collections::HashMap<(String, usize), i64>,
) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO _driftless_fingerprints (tbl, bucket, fp) VALUES (?1, ?2, ?3)
             ON CONFLICT (tbl, bucket) DO UPDATE SET fp = (fp | excluded.fp) & ~(fp & excluded.fp)",
        )
        .map_err(db)?;
    for ((table, top), delta) in deltas {
        if *delta != 0 {
            stmt.execute(params![table, *top as i64, delta])
                .map_err(db)?;
        }
    }
    Ok(())
}

/// Test builds of the fault-injection harness (`fault-injection` feature, and
/// `DRIFTLESS_HISTORY=1` in the environment) keep every change this replica made or applied in
/// `_driftless_history`, in order: storage format 2 keeps only each row's latest state, and the
/// harness's checker needs the full history of acknowledged writes. Never in a release build.
#[cfg(feature = "fault-injection")]
pub fn record_history(conn: &Connection, change: &Change) -> Result<(), StoreError> {
    use std::sync::OnceLock;
    static ON: OnceLock<bool> = OnceLock::new();
    if !*ON.get_or_init(|| std::env::var("DRIFTLESS_HISTORY").is_ok_and(|v| v == "1")) {
        return Ok(());
    }
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS _driftless_history (
            seq INTEGER PRIMARY KEY, tbl TEXT NOT NULL, pk BLOB NOT NULL, change BLOB NOT NULL)",
    )
    .map_err(db)?;
    conn.prepare_cached("INSERT INTO _driftless_history (tbl, pk, change) VALUES (?1, ?2, ?3)")
        .and_then(|mut s| {
            s.execute(params![
                change.table.as_str(),
                change.key.as_bytes(),
                driftless_core::codec::encode_change(change)
            ])
        })
        .map_err(db)?;
    Ok(())
}

#[cfg(not(feature = "fault-injection"))]
pub fn record_history(_conn: &Connection, _change: &Change) -> Result<(), StoreError> {
    Ok(())
}
