//! Reading and writing rows: user rows by primary key, row merge states, log entries, and the
//! conversions between SQLite values and driftless values.

use crate::schema::{Synced, db, upsert_sql};
use driftless_core::codec::{decode_row_state, encode_change, encode_row_state};
use driftless_core::{Change, ColumnName, KeyPart, PrimaryKey, RowState, Value};
use driftless_store::{LogSeq, StoreError};
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

/// A row's merge state and its current item hash (`None` if the row was never seen).
pub fn load_state(
    conn: &Connection,
    table: &str,
    key: &PrimaryKey,
) -> Result<(RowState, Option<i64>), StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT state, h FROM _driftless_rows WHERE tbl = ?1 AND pk = ?2")
        .map_err(db)?;
    let row: Option<(Vec<u8>, i64)> = stmt
        .query_row(params![table, key.as_bytes()], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(db)?;
    match row {
        None => Ok((RowState::new(), None)),
        Some((bytes, h)) => decode_row_state(&bytes)
            .map(|state| (state, Some(h)))
            .map_err(|e| StoreError::Corrupt(format!("row state of {table} {key}: {e}"))),
    }
}

/// Saves a row's merge state. Returns `(top bucket, fingerprint delta)`: the caller folds the
/// delta into the top bucket's fingerprint (the XOR of its rows' item hashes) before the
/// transaction commits, so many writes to one bucket cost one fingerprint update.
pub fn save_state(
    conn: &Connection,
    table: &str,
    key: &PrimaryKey,
    old_hash: Option<i64>,
    state: &RowState,
) -> Result<(usize, i64), StoreError> {
    let bytes = encode_row_state(state);
    let hash = driftless_store::fingerprint::item_hash(key, &bytes);
    let bucket = driftless_store::fingerprint::fine_bucket(key);
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO _driftless_rows (tbl, pk, state, bucket, h) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (tbl, pk) DO UPDATE SET state = excluded.state, h = excluded.h",
        )
        .map_err(db)?;
    stmt.execute(params![table, key.as_bytes(), bytes, bucket, hash])
        .map_err(db)?;
    Ok((
        driftless_store::fingerprint::top_of(bucket),
        hash ^ old_hash.unwrap_or(0),
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

pub fn append_log(conn: &Connection, change: &Change) -> Result<LogSeq, StoreError> {
    let mut stmt = conn
        .prepare_cached("INSERT INTO _driftless_log (tbl, pk, change) VALUES (?1, ?2, ?3)")
        .map_err(db)?;
    stmt.execute(params![
        change.table.as_str(),
        change.key.as_bytes(),
        encode_change(change)
    ])
    .map_err(db)?;
    Ok(LogSeq(conn.last_insert_rowid() as u64))
}
