//! Stamping captured local writes: turning the triggers' records into versioned changes.
//!
//! The triggers record `(table, operation, primary key)` and, for an update, which columns it
//! changed, in commit order, atomically with the user's write. Stamping gathers the records of
//! each row (several writes between two stamps become one change), reads the row's current
//! values and makes the change with a fresh HLC version. Every apply transaction stamps
//! all pending writes first, under the same write lock, so a local write is always merged with
//! its true place in history: it can never be overwritten by a remote value it has not been
//! compared with.

use crate::meta::KEY_COLUMNS_MAX;
use crate::rowio::{
    key_part_from_sql, load_state, read_user_row, record_history, table_shows, write_user_row,
};
use crate::schema::{OP_CHECK, OP_DELETE, OP_UPDATE, Synced, db, mask_bit};
use crate::store::SqliteStore;
use driftless_core::{Clock, PrimaryKey, Version};
use driftless_store::capture::{self, CapturedOp, Recorded};
use driftless_store::rowmeta::ColumnIds;
use driftless_store::{CaptureReport, StoreError};
use rusqlite::params;
use std::collections::HashMap;
use std::sync::Arc;

struct Pending {
    seq: i64,
    table: Option<Arc<Synced>>,
    op: i64,
    cols: Option<i64>,
    key: Result<PrimaryKey, String>,
}

fn captured_op(op: i64) -> CapturedOp {
    match op {
        OP_DELETE => CapturedOp::Delete,
        OP_UPDATE => CapturedOp::Update,
        OP_CHECK => CapturedOp::Check,
        _ => CapturedOp::Insert,
    }
}

impl<C: Clock> SqliteStore<C> {
    /// Stamps up to `limit` pending local writes inside the current transaction (those recorded
    /// before it began). Returns how many records it consumed.
    pub(crate) fn capture_in_tx(
        &mut self,
        limit: usize,
        report: &mut CaptureReport,
    ) -> Result<usize, StoreError> {
        let pending = self.read_pending(limit)?;
        // Every record this transaction may stamp stamped? Only then do the states it writes
        // hold no value of a write still waiting (a state is rebuilt from the row as it is
        // now, which a later record of the same row may already have changed).
        self.tail_drained = pending.len() < limit;
        let Some(last) = pending.last().map(|p| p.seq) else {
            return Ok(0);
        };
        // The records of each row, in the order rows were first written.
        let mut rows: Vec<(Arc<Synced>, PrimaryKey, Recorded)> = Vec::new();
        let mut at: HashMap<(i64, PrimaryKey), usize> = HashMap::new();
        for entry in &pending {
            let Some(table) = &entry.table else {
                continue; // the table is no longer synced
            };
            match &entry.key {
                Ok(key) => {
                    let i = *at.entry((table.id, key.clone())).or_insert_with(|| {
                        rows.push((table.clone(), key.clone(), Recorded::default()));
                        rows.len() - 1
                    });
                    let recorded = &mut rows[i].2;
                    recorded.add(captured_op(entry.op), entry.cols.map(|m| m as u64));
                    recorded.new_columns |= entry.seq <= self.masks_untrusted_through;
                }
                Err(reason) => {
                    self.dead_letter_local(table.schema.name.as_str(), reason)?;
                    report.refused += 1;
                }
            }
        }
        for (table, key, recorded) in &rows {
            self.stamp_recorded(table, key, recorded, report)?;
        }
        // The records are deleted when the transaction ends (see `write_tx`).
        self.pending_done = last;
        Ok(pending.len())
    }

    /// Stamps every pending local write (in bounded rounds) inside the current transaction.
    pub(crate) fn capture_all_in_tx(
        &mut self,
        report: &mut CaptureReport,
    ) -> Result<(), StoreError> {
        while self.capture_in_tx(driftless_store::CAPTURE_BATCH_ROWS_MAX, report)? > 0 {}
        Ok(())
    }

    fn read_pending(&self, limit: usize) -> Result<Vec<Pending>, StoreError> {
        let keys: String = (0..KEY_COLUMNS_MAX).map(|i| format!(", k{i}")).collect();
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT seq, tbl, op, cols{keys} FROM _driftless_pending
                 WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3"
            ))
            .map_err(db)?;
        let rows = stmt
            .query_map(
                rusqlite::params![self.pending_done, self.pending_mark, limit as i64],
                |r| {
                    let id: i64 = r.get(1)?;
                    let table = self.synced.iter().find(|s| s.id == id).cloned();
                    let key_len = table.as_ref().map_or(0, |s| s.schema.key_columns().len());
                    let mut parts = Vec::with_capacity(key_len);
                    let mut error = None;
                    for i in 0..key_len {
                        match key_part_from_sql(r.get_ref(4 + i)?) {
                            Ok(part) => parts.push(part),
                            Err(e) => error = Some(e),
                        }
                    }
                    let name = table
                        .as_ref()
                        .map_or("?", |s| s.schema.name.as_str())
                        .to_owned();
                    let key = match error {
                        Some(e) => Err(format!("local write to {name} not captured: {e}")),
                        None if key_len == 0 => Err(String::new()),
                        None => PrimaryKey::from_parts(&parts)
                            .map_err(|e| format!("local write to {name} not captured: {e}")),
                    };
                    Ok(Pending {
                        seq: r.get(0)?,
                        table,
                        op: r.get(2)?,
                        cols: r.get(3)?,
                        key,
                    })
                },
            )
            .map_err(db)?;
        rows.collect::<Result<_, _>>().map_err(db)
    }

    /// Stamps the recorded local writes to `key` (used by capture, and by the local check to
    /// adopt content written behind driftless's back: `Recorded { all_columns: true, .. }`).
    pub(crate) fn stamp_recorded(
        &mut self,
        synced: &Synced,
        key: &PrimaryKey,
        recorded: &Recorded,
        report: &mut CaptureReport,
    ) -> Result<(), StoreError> {
        let schema = &synced.schema;
        let table = &schema.name;
        let current = match read_user_row(&self.conn, synced, key) {
            Ok(current) => current,
            // A value driftless cannot represent (e.g. text that is not UTF-8): refuse this one
            // write, visibly, without blocking the writes queued behind it.
            Err(StoreError::Schema { reason, .. }) => {
                self.dead_letter_local(
                    table.as_str(),
                    &format!("local write to {table} {key}: {reason}"),
                )?;
                report.refused += 1;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let loaded = load_state(
            &self.conn,
            synced,
            key,
            &self.nodes,
            Some(current.as_deref()),
        )?;
        let stamps = capture::plan_recorded(recorded, &loaded.state, current.as_deref(), |c| {
            synced.id_of(c).map(mask_bit)
        });
        if stamps.is_empty() {
            return Ok(());
        }
        let mut state = loaded.state.clone();
        let mut changed = false;
        let (hlc, node) = (&mut self.hlc, self.node);
        let made = capture::stamp_all(stamps, &mut state, schema, key, || {
            Ok(Version::new(hlc.now()?, node))
        })?;
        for stamped in made {
            match stamped {
                capture::Stamped::Made(change, conflicts) => {
                    self.record_conflicts(&conflicts)?;
                    record_history(&self.conn, &change)?;
                    report.changes.push(change);
                    changed = true;
                }
                capture::Stamped::Refused(reason) => {
                    self.dead_letter_local(
                        table.as_str(),
                        &format!("local write to {table} {key}: {reason}"),
                    )?;
                    report.refused += 1;
                }
            }
        }
        if !changed {
            return Ok(());
        }
        // A local write can lose at once (priority, max, min columns): set the row back to the
        // winning values so the table shows what every replica will converge to.
        if state.is_live() && !capture::matches_row_by(&state, current.as_deref(), table_shows) {
            write_user_row(&self.conn, synced, key, state.visible().as_ref(), false).map_err(
                |reason| StoreError::Schema {
                    table: table.to_string(),
                    reason: format!("cannot restore the winning value of {key}: {reason}"),
                },
            )?;
            report.reverted += 1;
        }
        self.save_row_state(synced, key, &loaded, &state)?;
        Ok(())
    }

    pub(crate) fn dead_letter_local(&self, table: &str, reason: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO _driftless_dead_letters (tbl, reason, at_ms) VALUES (?1, ?2, ?3)",
                params![table, reason, self.now_ms() as i64],
            )
            .map_err(db)?;
        Ok(())
    }
}
