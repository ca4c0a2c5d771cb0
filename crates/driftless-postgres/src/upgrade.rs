//! Upgrading a database set up by storage format 1 (install version 2) to format 2, in place,
//! inside the transaction that opens it: all of it happens or none of it.
//!
//! Format 1 kept every row's full merge state (values included) in `row_states` and every change
//! in `log`. The conversion, the same as the SQLite adapter's:
//! - gives each row the sequence number of its newest surviving log entry, so a peer's cursor
//!   means the same after the upgrade (it is sent exactly the rows that changed after it); rows
//!   whose entries were all retired get distinct numbers at or below the old log floor, where a
//!   peer that still needs them is re-bootstrapped anyway (and above the head once those run
//!   out);
//! - stores each state as format-2 metadata (`rows`), keeping its item hash (unchanged:
//!   reconciliation with nodes not yet upgraded keeps working);
//! - turns the capture records of writes not yet stamped into records with an exact
//!   changed-columns mask, computed against the old state's values (format 2's triggers record
//!   the mask; the old ones did not);
//! - keeps cursors, acknowledgements, conflicts, dead letters and held changes as they are.

use crate::meta::KEY_COLUMNS_MAX;
use crate::schema::{OP_INSERT, OP_UPDATE, mask_bit};
use crate::store::{Error, PostgresStore};
use driftless_core::codec::decode_row_state;
use driftless_core::{Clock, PrimaryKey, RowState, TableName, Value};
use driftless_store::StoreError;
use driftless_store::rowmeta::{ColumnIds, UpgradeSeqs};
use std::collections::HashMap;

/// Old states converted per round trip.
const CONVERT_CHUNK_ROWS: i64 = 10_000;

impl<C: Clock> PostgresStore<C> {
    fn legacy_refusal(table: &str) -> Error {
        StoreError::Schema {
            table: table.to_owned(),
            reason: "holds driftless state from before the upgrade to storage format 2 but is \
                     not configured; list it under [[tables]] for the upgrade (nothing was \
                     changed)"
                .into(),
        }
        .into()
    }
}

/// Converts format 1's `row_states` and `log` (see the module docs). Runs after the format-2
/// DDL and the schema refresh, in the install transaction.
pub(crate) fn convert<C: Clock>(store: &mut PostgresStore<C>) -> Result<(), Error> {
    let ds = store.ds.clone();
    let floor = store
        .meta
        .get_i64(&mut store.client, "log_floor")?
        .unwrap_or(0);
    let mut newest: HashMap<(String, Vec<u8>), i64> = HashMap::new();
    let mut head = floor;
    for row in store.client.query(
        &format!("SELECT tbl, pk, max(seq) FROM {ds}.log GROUP BY tbl, pk"),
        &[],
    )? {
        let seq: i64 = row.get(2);
        head = head.max(seq);
        newest.insert((row.get(0), row.get(1)), seq);
    }
    let mut seqs_for = UpgradeSeqs::new(floor, head);
    let mut old_states: HashMap<(i32, Vec<u8>), RowState> = HashMap::new();
    let mut last: (String, Vec<u8>) = (String::new(), Vec::new());
    let insert = format!(
        "INSERT INTO {ds}.rows (tbl, bucket, pk, seq, h, meta) SELECT * FROM unnest(\
         $1::pg_catalog.int4[], $2::pg_catalog.int4[], $3::pg_catalog.bytea[], \
         $4::pg_catalog.int8[], $5::pg_catalog.int8[], $6::pg_catalog.bytea[])"
    );
    loop {
        let rows = store.client.query(
            &format!(
                "SELECT tbl, pk, state, h FROM {ds}.row_states WHERE (tbl, pk) > ($1, $2) \
                 ORDER BY tbl, pk LIMIT $3"
            ),
            &[&last.0, &last.1, &CONVERT_CHUNK_ROWS],
        )?;
        let count = rows.len() as i64;
        let (mut tables, mut buckets, mut pks, mut seqs, mut hashes, mut metas) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for row in rows {
            let tbl: String = row.get(0);
            let pk: Vec<u8> = row.get(1);
            let bytes: Vec<u8> = row.get(2);
            let h: i64 = row.get(3);
            let table = TableName::new(&tbl)
                .map_err(|e| StoreError::Corrupt(format!("table name {tbl:?}: {e}")))?;
            let Some(synced) = store.synced(&table) else {
                return Err(PostgresStore::<C>::legacy_refusal(&tbl));
            };
            let key = PrimaryKey::from_bytes(&pk)
                .map_err(|e| StoreError::Corrupt(format!("row key in {tbl}: {e}")))?;
            let state = decode_row_state(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("row state of {tbl} {key}: {e}")))?;
            let seq = seqs_for.seq_for(newest.get(&(tbl.clone(), pk.clone())).copied());
            let meta = store.meta_for(&synced, &key, &state, None)?;
            tables.push(synced.id);
            buckets.push(driftless_store::fingerprint::fine_bucket(&key) as i32);
            pks.push(pk.clone());
            seqs.push(seq);
            hashes.push(h);
            metas.push(meta);
            old_states.insert((synced.id, pk.clone()), state);
            last = (tbl, pk);
        }
        if !tables.is_empty() {
            store
                .client
                .execute(&insert, &[&tables, &buckets, &pks, &seqs, &hashes, &metas])?;
        }
        if count < CONVERT_CHUNK_ROWS {
            break;
        }
    }
    exact_masks(store, &old_states)?;
    store.client.batch_execute(&format!(
        "SELECT pg_catalog.setval('{seq}', greatest((SELECT last_value FROM {ds}.log_seq), \
           (SELECT coalesce(max(seq), 0) FROM {ds}.rows), 1)); \
         DROP TABLE {ds}.row_states; DROP TABLE IF EXISTS {ds}.log; \
         DELETE FROM {ds}.meta WHERE key = 'compact_position';",
        seq = format!("{ds}.log_seq").replace('\'', "''"),
    ))?;
    Ok(())
}

/// Gives each capture record of a row with a live old state the mask of the columns whose
/// value differs from that state (format 1 found them by this comparison when stamping).
fn exact_masks<C: Clock>(
    store: &mut PostgresStore<C>,
    old_states: &HashMap<(i32, Vec<u8>), RowState>,
) -> Result<(), Error> {
    let keys: String = (0..KEY_COLUMNS_MAX).map(|i| format!(", k{i}")).collect();
    let records = store.client.query(
        &format!(
            "SELECT seq, tbl{keys} FROM {}.pending WHERE op IN ({OP_INSERT}, {OP_UPDATE}) \
             AND cols IS NULL ORDER BY seq",
            store.ds
        ),
        &[],
    )?;
    let update = format!(
        "UPDATE {}.pending SET op = {OP_UPDATE}, cols = $1 WHERE seq = $2",
        store.ds
    );
    for record in records {
        let seq: i64 = record.get(0);
        let tbl: i32 = record.get(1);
        let Some(synced) = store.synced.iter().find(|s| s.id == tbl).cloned() else {
            continue;
        };
        let mut parts = Vec::with_capacity(synced.keys.len());
        for (i, column) in synced.keys.iter().enumerate() {
            let text: Option<String> = record.get(2 + i);
            match text.map(|t| column.kind.key_from_text(&t)) {
                Some(Ok(part)) => parts.push(part),
                _ => break,
            }
        }
        let Ok(key) = PrimaryKey::from_parts(&parts) else {
            continue; // refused when stamped, as before
        };
        let Some(visible) = old_states
            .get(&(tbl, key.as_bytes().to_vec()))
            .and_then(RowState::visible)
        else {
            continue; // not live: stamping inserts the row with every column anyway
        };
        let Some(Ok(Some(row))) = store.read_user_rows(&synced, &[&key])?.pop() else {
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
        store.client.execute(&update, &[&(mask as i64), &seq])?;
    }
    Ok(())
}
