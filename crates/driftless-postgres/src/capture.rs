//! Stamping captured local writes: turning the triggers' records into versioned changes.
//!
//! The triggers record `(table, operation, primary key)` and, for an update, the mask of the
//! columns it changed, atomically with the client's write. Stamping gathers the records of each
//! row (several writes between two stamps become one change), reads the rows' current values
//! (many at once) and makes the changes with fresh HLC versions. Storage format 2 keeps no copy
//! of the values the table holds, so the masks, not a comparison, say which columns changed.
//!
//! Every write transaction of driftless (apply included) stamps all pending writes visible in
//! its REPEATABLE READ snapshot first. A client write committed after that snapshot stays
//! pending for a later stamp, which gives it a version above everything this transaction
//! applied; and if the transaction writes a row such a client write touched, PostgreSQL fails it
//! with a serialization error and it runs again, stamping that write first. So a remote value
//! never overwrites a local value it was not compared with (see docs/postgres.md).

use crate::meta::KEY_COLUMNS_MAX;
use crate::rowio::{RowWrite, UserRow};
use crate::schema::{OP_DELETE, OP_UPDATE, Synced, mask_bit};
use crate::store::{Error, PostgresStore};
use driftless_core::{Clock, PrimaryKey, RowState, Value, Version};
use driftless_store::capture::{self, CapturedOp, Recorded};
use driftless_store::rowmeta::ColumnIds;
use driftless_store::{CaptureReport, StoreError};
use std::collections::HashMap;
use std::sync::Arc;

/// Stamping deletes every record it stamps, from the low end of `pending`'s primary key. Until
/// the table is vacuumed those deletions stay in the index as dead entries, and every read of
/// the low or high end (`commit_token`, polled every millisecond, and the next round's
/// `ORDER BY seq`) walks over all of them: after a backlog of 300,000 records a `commit_token`
/// took about 1 ms instead of 0.1 ms, and it grows with the backlog. autovacuum may be off or
/// late, so stamping vacuums `pending` itself once it has deleted this many records while a
/// backlog remains (a vacuum scans the whole table, backlog included: every 10,000 records of a
/// 1M-record backlog, that was most of the origin's time, 57 s of 80 s in the bench)...
pub(crate) const PENDING_VACUUM_AFTER: u64 = 200_000;
/// ... or this many when a round found no more records (the poller is caught up and will keep
/// reading both ends of an otherwise empty index). Vacuuming a few thousand dead records
/// takes about a millisecond.
pub(crate) const PENDING_VACUUM_CAUGHT_UP: u64 = 500;

struct Pending {
    seq: i64,
    table: Option<Arc<Synced>>,
    op: i16,
    cols: Option<i64>,
    key: Result<PrimaryKey, String>,
}

fn captured_op(op: i16) -> CapturedOp {
    match op {
        OP_DELETE => CapturedOp::Delete,
        OP_UPDATE => CapturedOp::Update,
        _ => CapturedOp::Insert,
    }
}

/// The records of one row, as stamping reads them. A record made by a trigger installed
/// before the table gained a column has no bit for it: `new_columns` makes a column with no
/// cell in the row's state and a value that is not NULL count as changed, always (PostgreSQL
/// replaces a trigger function without a lock, so which records predate it is not known).
fn recorded_row() -> Recorded {
    Recorded {
        new_columns: true,
        ..Recorded::default()
    }
}

impl<C: Clock> PostgresStore<C> {
    /// Stamps up to `limit` pending local writes inside the current transaction. Returns how
    /// many records it consumed.
    pub(crate) fn capture_in_tx(
        &mut self,
        limit: usize,
        report: &mut CaptureReport,
    ) -> Result<usize, Error> {
        let pending = self.read_pending(limit)?;
        // Every record visible in this transaction's snapshot stamped? Only then do the states
        // it writes hold no value of a write still waiting (a state is rebuilt from the row as
        // it is now, which a later record of the same row may already have changed).
        self.tx.drained = pending.len() < limit;
        if pending.is_empty() {
            return Ok(0);
        }
        // The records of each row, in the order rows were first written.
        let mut rows: Vec<(Arc<Synced>, PrimaryKey, Recorded)> = Vec::new();
        let mut at: HashMap<(i32, PrimaryKey), usize> = HashMap::new();
        for entry in &pending {
            let Some(table) = &entry.table else {
                continue; // the table is no longer synced
            };
            match &entry.key {
                Ok(key) => {
                    let i = *at.entry((table.id, key.clone())).or_insert_with(|| {
                        rows.push((table.clone(), key.clone(), recorded_row()));
                        rows.len() - 1
                    });
                    rows[i]
                        .2
                        .add(captured_op(entry.op), entry.cols.map(|m| m as u64));
                }
                Err(reason) => {
                    self.dead_letter_local(table.schema.name.as_str(), reason)?;
                    report.refused += 1;
                }
            }
        }
        // Read every current row the records need, then load their states from them: a few
        // queries per table.
        let mut by_table: Vec<(Arc<Synced>, Vec<PrimaryKey>)> = Vec::new();
        for (table, key, _) in &rows {
            match by_table.iter_mut().find(|(s, _)| s.id == table.id) {
                Some((_, keys)) => keys.push(key.clone()),
                None => by_table.push((table.clone(), vec![key.clone()])),
            }
        }
        let mut current: HashMap<(i32, PrimaryKey), Result<Option<UserRow>, String>> =
            HashMap::new();
        for (table, keys) in &by_table {
            let refs: Vec<&PrimaryKey> = keys.iter().collect();
            let read = self.read_user_rows(table, &refs)?;
            for (key, row) in keys.iter().zip(read) {
                current.insert((table.id, key.clone()), row);
            }
            let ids: Vec<_> = keys
                .iter()
                .map(|k| (table.schema.name.clone(), k.clone()))
                .collect();
            self.load_states_with(&ids, Some(&current))?;
        }
        for (table, key, recorded) in &rows {
            let row = current.remove(&(table.id, key.clone())).unwrap_or(Ok(None));
            self.stamp_recorded(table, key, recorded, row, report)?;
        }
        let seqs: Vec<i64> = pending.iter().map(|p| p.seq).collect();
        let sql = format!(
            "DELETE FROM {}.pending WHERE seq = ANY($1::pg_catalog.int8[])",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        self.client.execute(&stmt, &[&seqs])?;
        // (counted even if the transaction rolls back: an early vacuum is harmless)
        self.pending_removed += seqs.len() as u64;
        Ok(pending.len())
    }

    /// Vacuums `pending` when stamping has left enough dead records in it (see
    /// [`PENDING_VACUUM_AFTER`]). Runs outside any transaction (VACUUM cannot run inside one).
    /// `INDEX_CLEANUP ON`: the dead index entries are what the reads walk over, and PostgreSQL
    /// would otherwise skip index cleanup for a few dead tuples; `TRUNCATE false`: truncating
    /// takes an exclusive lock that would block the clients' triggers; `SKIP_LOCKED`: never
    /// wait. Best effort: a failure only means the reads stay slower until the next attempt.
    pub(crate) fn vacuum_pending_if_due(&mut self, caught_up: bool) {
        let due = self.pending_removed >= PENDING_VACUUM_AFTER
            || (caught_up && self.pending_removed >= PENDING_VACUUM_CAUGHT_UP);
        if !due || self.client.is_closed() {
            return;
        }
        let sql = format!(
            "VACUUM (INDEX_CLEANUP ON, TRUNCATE false, PROCESS_TOAST false, SKIP_LOCKED) \
             {}.pending",
            self.ds
        );
        if self.client.batch_execute(&sql).is_ok() {
            self.pending_removed = 0;
        }
    }

    /// Stamps every pending local write (in bounded rounds) inside the current transaction.
    pub(crate) fn capture_all_in_tx(&mut self, report: &mut CaptureReport) -> Result<(), Error> {
        while self.capture_in_tx(driftless_store::CAPTURE_BATCH_ROWS_MAX, report)?
            == driftless_store::CAPTURE_BATCH_ROWS_MAX
        {}
        Ok(())
    }

    fn read_pending(&mut self, limit: usize) -> Result<Vec<Pending>, Error> {
        let keys: String = (0..KEY_COLUMNS_MAX).map(|i| format!(", k{i}")).collect();
        let sql = format!(
            "SELECT seq, tbl, op, cols{keys} FROM {}.pending ORDER BY seq LIMIT $1",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let rows = self.client.query(&stmt, &[&(limit as i64)])?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i32 = row.get(1);
            let table = self.synced.iter().find(|s| s.id == id).cloned();
            let key = match &table {
                None => Err(String::new()),
                Some(t) => {
                    let mut parts = Vec::with_capacity(t.keys.len());
                    let mut error = None;
                    for (i, column) in t.keys.iter().enumerate() {
                        let text: Option<String> = row.get(4 + i);
                        match text.map(|text| column.kind.key_from_text(&text)) {
                            Some(Ok(part)) => parts.push(part),
                            Some(Err(e)) => error = Some(e),
                            None => error = Some("a primary-key column is NULL".into()),
                        }
                    }
                    let name = t.schema.name.as_str();
                    match error {
                        Some(e) => Err(format!("local write to {name} not captured: {e}")),
                        None => PrimaryKey::from_parts(&parts)
                            .map_err(|e| format!("local write to {name} not captured: {e}")),
                    }
                }
            };
            out.push(Pending {
                seq: row.get(0),
                table,
                op: row.get(2),
                cols: row.get(3),
                key,
            });
        }
        Ok(out)
    }

    /// Stamps the recorded local writes to `key`, whose row currently holds `current` (used by
    /// capture, and by the local check to adopt content written behind driftless's back:
    /// `Recorded { all_columns: true, .. }`).
    pub(crate) fn stamp_recorded(
        &mut self,
        synced: &Synced,
        key: &PrimaryKey,
        recorded: &Recorded,
        current: Result<Option<UserRow>, String>,
        report: &mut CaptureReport,
    ) -> Result<(), Error> {
        let schema = &synced.schema;
        let table = &schema.name;
        let loaded = self.cached_state(table, key)?;
        let current = match current {
            Ok(current) => current,
            Err(reason) => {
                self.dead_letter_local(
                    table.as_str(),
                    &format!("local write to {table} {key}: {reason}"),
                )?;
                report.refused += 1;
                return Ok(());
            }
        };
        // Columns that show the merge state's value in this column's form count as unchanged.
        let shown_now = match &current {
            Some(row) => Some(self.in_state_form(synced, &loaded, row.clone())?),
            None => None,
        };
        let stamps = capture::plan_recorded(recorded, &loaded, shown_now.as_deref(), |c| {
            synced.id_of(c).map(mask_bit)
        });
        if stamps.is_empty() {
            self.set_table_row(table, key, current);
            return Ok(());
        }
        let mut state = loaded;
        let mut changed = false;
        let (hlc, node) = (&mut self.hlc, self.node);
        let made = capture::stamp_all(stamps, &mut state, schema, key, || {
            Ok(Version::new(hlc.now()?, node))
        })?;
        for stamped in made {
            match stamped {
                capture::Stamped::Made(change, conflicts) => {
                    self.record_conflicts(&conflicts)?;
                    self.note_change(&change);
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
        let mut now = current;
        // A local write can lose at once (priority, max, min columns): set the row back to the
        // winning values so the table shows what every replica will converge to.
        let shown = match &now {
            Some(row) => Some(self.in_state_form(synced, &state, row.clone())?),
            None => None,
        };
        if state.is_live() && !capture::matches_row(&state, shown.as_deref()) {
            let write = RowWrite {
                key: key.clone(),
                visible: state.visible(),
                recreate: false,
            };
            let restore_error = |reason: String| StoreError::Schema {
                table: table.to_string(),
                reason: format!("cannot restore the winning value of {key}: {reason}"),
            };
            match self.write_user_rows(synced, std::slice::from_ref(&write)) {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => return Err(restore_error(reason).into()),
                Err(e) if e.is_data_problem() => return Err(restore_error(e.describe()).into()),
                Err(e) => return Err(e),
            }
            report.reverted += 1;
            now = self
                .read_user_rows(synced, &[key])?
                .pop()
                .unwrap_or(Ok(None))
                .unwrap_or(None);
        }
        self.set_state(table, key, state);
        self.set_table_row(table, key, now);
        Ok(())
    }

    /// The row with every value that shows the merge state's value (in the column's form, see
    /// `shows`) replaced by the state's value, so the store-independent capture decision
    /// (`driftless_store::capture`), which compares exactly, sees only real edits.
    pub(crate) fn in_state_form(
        &mut self,
        synced: &Synced,
        state: &RowState,
        row: UserRow,
    ) -> Result<UserRow, Error> {
        let visible = state.visible().unwrap_or_default();
        let mut out = Vec::with_capacity(row.len());
        for (i, (column, value)) in row.into_iter().enumerate() {
            let held = visible.get(&column).unwrap_or(&Value::Null);
            if &value != held && self.shows(&synced.values[i], &value, held)? {
                out.push((column, held.clone()));
            } else {
                out.push((column, value));
            }
        }
        Ok(out)
    }

    pub(crate) fn dead_letter_local(&mut self, table: &str, reason: &str) -> Result<(), Error> {
        let sql = format!(
            "INSERT INTO {}.dead_letters (tbl, reason, at_ms) VALUES ($1, $2, $3)",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let now = self.now_ms() as i64;
        self.client.execute(&stmt, &[&table, &reason, &now])?;
        Ok(())
    }
}
