//! Upgrading a database written by storage format 1 (driftless before 0.2) to format 2, in place,
//! inside the transaction that opens it: all of it happens or none of it.
//!
//! Format 1 kept every row's full merge state (values included) in `_driftless_rows` and every
//! change in `_driftless_log`. The conversion:
//! - gives each row the sequence number of its newest surviving log entry, so a peer's cursor
//!   means the same after the upgrade (it is sent exactly the rows that changed after it); rows
//!   whose entries were all retired get distinct numbers at or below the old log floor, where a
//!   peer that still needs them is re-bootstrapped anyway;
//! - stores each state as format-2 metadata, keeping its item hash (unchanged: reconciliation
//!   with nodes not yet upgraded keeps working);
//! - turns the capture records of writes not yet stamped into records with an exact
//!   changed-columns mask, computed against the old state's values (format 2's triggers record
//!   the mask; the old ones did not);
//! - keeps cursors, acknowledgements, conflicts, dead letters and held changes as they are.

use crate::meta;
use crate::rowio::{key_part_from_sql, read_user_row};
use crate::schema::{OP_INSERT, OP_UPDATE, db, mask_bit};
use crate::store::SqliteStore;
use driftless_core::codec::decode_row_state;
use driftless_core::{Clock, KeyPart, PrimaryKey, Value};
use driftless_store::StoreError;
use driftless_store::rowmeta::{ColumnIds, RowMeta, UpgradeSeqs};
use rusqlite::{Connection, params};
use std::collections::HashMap;

/// A format-1 database found at open, its old tables renamed out of the way.
#[derive(Debug)]
pub struct Legacy;

fn has_column(conn: &Connection, table: &str, column: &str) -> Result<bool, StoreError> {
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
            params![table, column],
            |r| r.get(0),
        )
        .map_err(db)?;
    Ok(n > 0)
}

/// Before the format-2 tables are created: moves format 1's row table aside and adds the
/// column-mask column to the capture records. Returns whether a conversion must follow.
pub fn prepare(conn: &Connection) -> Result<Option<Legacy>, StoreError> {
    let mut legacy = None;
    if has_column(conn, "_driftless_rows", "state")? {
        conn.execute_batch("ALTER TABLE _driftless_rows RENAME TO _driftless_rows_v1")
            .map_err(db)?;
        legacy = Some(Legacy);
    }
    let pending_exists: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = '_driftless_pending'",
            [],
            |r| r.get(0),
        )
        .map_err(db)?;
    if pending_exists > 0 && !has_column(conn, "_driftless_pending", "cols")? {
        conn.execute_batch("ALTER TABLE _driftless_pending ADD COLUMN cols INTEGER")
            .map_err(db)?;
    }
    if let Some(format) = meta_format(conn)?
        && format > meta::FORMAT
    {
        return Err(StoreError::Schema {
            table: "_driftless_meta".into(),
            reason: format!(
                "this database was written by a newer driftless (storage format {format}); this \
                 one reads formats 1 and {}: run the newer release",
                meta::FORMAT
            ),
        });
    }
    Ok(legacy)
}

fn meta_format(conn: &Connection) -> Result<Option<i64>, StoreError> {
    let exists: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = '_driftless_meta'",
            [],
            |r| r.get(0),
        )
        .map_err(db)?;
    if exists == 0 {
        return Ok(None);
    }
    meta::get_i64(conn, "format").map_err(db)
}

/// Converts the renamed format-1 tables into format 2 (see the module docs).
pub fn convert<C: Clock>(store: &mut SqliteStore<C>, _legacy: Legacy) -> Result<(), StoreError> {
    let conn = &store.conn;
    let floor = meta::get_i64(conn, "log_floor").map_err(db)?.unwrap_or(0);
    let log_exists: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = '_driftless_log'",
            [],
            |r| r.get(0),
        )
        .map_err(db)?;
    let mut newest: HashMap<(String, Vec<u8>), i64> = HashMap::new();
    let mut head = floor;
    if log_exists > 0 {
        let mut stmt = conn
            .prepare("SELECT tbl, pk, max(seq) FROM _driftless_log GROUP BY tbl, pk")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)?)))
            .map_err(db)?;
        for row in rows {
            let (tbl, pk, seq) = row.map_err(db)?;
            head = head.max(seq);
            newest.insert((tbl, pk), seq);
        }
    }
    let old: Vec<(String, Vec<u8>, Vec<u8>, i64)> = {
        let mut stmt = conn
            .prepare("SELECT tbl, pk, state, h FROM _driftless_rows_v1 ORDER BY tbl, pk")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(db)?;
        rows.collect::<Result<_, _>>().map_err(db)?
    };
    let mut seqs_for = UpgradeSeqs::new(floor, head);
    let mut old_states = HashMap::new();
    for (tbl, pk, bytes, h) in old {
        let table = driftless_core::TableName::new(&tbl)
            .map_err(|e| StoreError::Corrupt(format!("table name {tbl:?}: {e}")))?;
        let Some(synced) = store.synced(&table) else {
            return Err(StoreError::Schema {
                table: tbl,
                reason: "holds driftless state from before the upgrade to storage format 2 but \
                         is not configured; list it under [[tables]] for the upgrade (nothing \
                         was changed)"
                    .into(),
            });
        };
        let key = PrimaryKey::from_bytes(&pk)
            .map_err(|e| StoreError::Corrupt(format!("row key in {tbl}: {e}")))?;
        let state = decode_row_state(&bytes)
            .map_err(|e| StoreError::Corrupt(format!("row state of {tbl} {key}: {e}")))?;
        let seq = seqs_for.seq_for(newest.get(&(tbl.clone(), pk.clone())).copied());
        let meta = RowMeta::from_state(&state, seq as u64, &synced.schema.rules, synced.as_ref())
            .map_err(|e| StoreError::Corrupt(format!("row state of {tbl} {key}: {e}")))?
            .encode(&mut store.nodes);
        store
            .conn
            .prepare_cached(
                "INSERT INTO _driftless_rows (seq, tbl, bucket, pk, h, meta) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    seq,
                    synced.id,
                    driftless_store::fingerprint::fine_bucket(&key),
                    pk,
                    h,
                    meta
                ])
            })
            .map_err(db)?;
        old_states.insert((synced.id, pk), state);
    }
    exact_masks(store, &old_states)?;
    store
        .conn
        .execute_batch(
            "DROP TABLE _driftless_rows_v1; DROP TABLE IF EXISTS _driftless_log;
             DELETE FROM _driftless_meta WHERE key = 'compact_position';",
        )
        .map_err(db)?;
    // every remaining record now carries an exact mask
    store.masks_untrusted_through = 0;
    meta::set(&store.conn, "masks_untrusted_through", 0).map_err(db)?;
    Ok(())
}

/// Gives each capture record of a row with a live old state the mask of the columns whose
/// value differs from that state (format 1 found them by this comparison when stamping).
fn exact_masks<C: Clock>(
    store: &SqliteStore<C>,
    old_states: &HashMap<(i64, Vec<u8>), driftless_core::RowState>,
) -> Result<(), StoreError> {
    let keys: String = (0..crate::meta::KEY_COLUMNS_MAX)
        .map(|i| format!(", k{i}"))
        .collect();
    let records: Vec<(i64, i64, Vec<rusqlite::types::Value>)> = {
        let mut stmt = store
            .conn
            .prepare(&format!(
                "SELECT seq, tbl{keys} FROM _driftless_pending WHERE op IN ({OP_INSERT}, {OP_UPDATE})"
            ))
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                let mut parts = Vec::new();
                for i in 0..crate::meta::KEY_COLUMNS_MAX {
                    parts.push(r.get::<_, rusqlite::types::Value>(2 + i)?);
                }
                Ok((r.get(0)?, r.get(1)?, parts))
            })
            .map_err(db)?;
        rows.collect::<Result<_, _>>().map_err(db)?
    };
    for (seq, tbl, parts) in records {
        let Some(synced) = store.synced.iter().find(|s| s.id == tbl).cloned() else {
            continue;
        };
        let key_len = synced.schema.key_columns().len();
        let key_parts: Result<Vec<KeyPart>, String> = parts[..key_len]
            .iter()
            .map(|v| key_part_from_sql(rusqlite::types::ValueRef::from(v)))
            .collect();
        let Ok(key) = key_parts.and_then(|p| PrimaryKey::from_parts(&p).map_err(|e| e.to_string()))
        else {
            continue; // refused when stamped, as before
        };
        let Some(state) = old_states.get(&(tbl, key.as_bytes().to_vec())) else {
            continue;
        };
        let Some(visible) = state.visible() else {
            continue; // not live: stamping inserts the row with every column anyway
        };
        let Ok(Some(row)) = read_user_row(&store.conn, &synced, &key) else {
            continue; // gone (a delete record follows) or unreadable (refused when stamped)
        };
        let mut mask = 0u64;
        for (column, value) in &row {
            if visible.get(column).unwrap_or(&Value::Null) != value
                && let Some(id) = synced.id_of(column)
            {
                mask |= 1 << mask_bit(id);
            }
        }
        store
            .conn
            .execute(
                "UPDATE _driftless_pending SET op = ?1, cols = ?2 WHERE seq = ?3",
                params![OP_UPDATE, mask as i64, seq],
            )
            .map_err(db)?;
    }
    Ok(())
}
