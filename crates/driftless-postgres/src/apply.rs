//! Applying remote changes: merge, write the winners, ledger, dead letters, clock holds, log and
//! cursor, in one transaction per batch.
//!
//! The batch is merged in memory: every row state it touches is loaded with one query, all
//! changes are merged in order, and the final row images are written with one lock, one delete
//! and one upsert statement per table (and column set). If that bulk write hits a constraint
//! (or a value the column refuses), it is rolled back to a savepoint and the batch is applied
//! again one change at a time, each in its own savepoint, so only the offending changes become
//! dead letters and the rest of the batch still applies.

use crate::rowio::{BULK_ROWS_MAX, RowWrite, encode_version};
use crate::schema::Synced;
use crate::store::{Error, PostgresStore};
use crate::types::{key_to_wire, to_wire};
use driftless_core::codec::{decode_change, encode_change};
use driftless_core::{
    ApplyOutcome, CausalLength, Change, Clock, ClockError, Effect, NodeId, PrimaryKey, RowState,
    TableName,
};
use driftless_store::{
    APPLY_BATCH_CHANGES_MAX, ApplyReport, CaptureReport, DeadLetterId, DeadLetterReason, LogSeq,
    StoreError,
};
use std::collections::HashMap;
use std::sync::Arc;

/// Why one change was not applied.
pub(crate) enum Refusal {
    /// Stamped too far ahead of our clock: hold it.
    Held(ClockError),
    /// Cannot be applied here: dead-letter it with this reason.
    Dead(DeadLetterReason, String),
}

/// One row touched by a batch, merged in memory.
struct Track {
    synced: Arc<Synced>,
    state: RowState,
    initial_live: bool,
    initial_length: CausalLength,
    applied: bool,
}

impl<C: Clock> PostgresStore<C> {
    pub(crate) fn apply_batch_impl(
        &mut self,
        from: NodeId,
        changes: &[Change],
        cursor: LogSeq,
    ) -> Result<ApplyReport, StoreError> {
        if changes.len() > APPLY_BATCH_CHANGES_MAX {
            return Err(StoreError::BatchTooLarge {
                len: changes.len(),
                max: APPLY_BATCH_CHANGES_MAX,
            });
        }
        self.write_tx(|store| {
            let mut report = ApplyReport::default();
            // Local writes first, so every one of them is merged before any remote value can
            // touch its row.
            // (A batch with no changes only moves the cursor: e.g. the sender filtered out
            // changes that originated here. Nothing to protect, so nothing to stamp.)
            if !changes.is_empty() {
                let mut captured = CaptureReport::default();
                store.capture_all_in_tx(&mut captured)?;
                report.captured = captured.changes.len();
                report.captured_tables = captured.changes.iter().map(|c| c.table.clone()).collect();
            }
            store.apply_many(Some(from), changes, &mut report)?;
            let sql = format!(
                "INSERT INTO {}.cursors (peer, seq) VALUES ($1, $2)
                 ON CONFLICT (peer) DO UPDATE SET seq = EXCLUDED.seq",
                store.ds
            );
            let stmt = store.stmt(&sql)?;
            store
                .client
                .execute(&stmt, &[&from.to_bytes().as_slice(), &(cursor.0 as i64)])?;
            Ok(report)
        })
    }

    /// Applies `changes` in order inside the current transaction: in bulk when possible, one
    /// by one when the bulk write hits a constraint. Problems with a change itself become dead
    /// letters or holds; only store failures are errors.
    pub(crate) fn apply_many(
        &mut self,
        from: Option<NodeId>,
        changes: &[Change],
        report: &mut ApplyReport,
    ) -> Result<(), Error> {
        let mut ready: Vec<(usize, Arc<Synced>)> = Vec::with_capacity(changes.len());
        let mut refused = Vec::new();
        for (i, change) in changes.iter().enumerate() {
            match self.precheck(change) {
                Ok(synced) => ready.push((i, synced)),
                Err(refusal) => refused.push((i, refusal)),
            }
        }
        let ids: Vec<(TableName, PrimaryKey)> = ready
            .iter()
            .map(|(i, _)| (changes[*i].table.clone(), changes[*i].key.clone()))
            .collect();
        self.load_states(&ids)?;
        let mut fast = ApplyReport::default();
        if self.apply_fast(changes, &ready, &mut fast)? {
            for (i, refusal) in refused {
                self.refuse(from, &changes[i], refusal, report)?;
            }
            report.add(&fast);
            return Ok(());
        }
        // one at a time, in order (so dead letters are listed in the order of the batch)
        for change in changes {
            self.apply_one(from, change, report)?;
        }
        Ok(())
    }

    /// The bulk path. Returns `false` (having written nothing) when the batch must be applied
    /// one change at a time instead.
    fn apply_fast(
        &mut self,
        changes: &[Change],
        ready: &[(usize, Arc<Synced>)],
        report: &mut ApplyReport,
    ) -> Result<bool, Error> {
        let mut rows: HashMap<(TableName, PrimaryKey), Track> = HashMap::new();
        let mut order: Vec<(TableName, PrimaryKey)> = Vec::new();
        let mut outcomes: Vec<(usize, ApplyOutcome)> = Vec::with_capacity(ready.len());
        for (i, synced) in ready {
            let change = &changes[*i];
            let id = (change.table.clone(), change.key.clone());
            if !rows.contains_key(&id) {
                let state = self.tx.states[&id].state.clone();
                order.push(id.clone());
                rows.insert(
                    id.clone(),
                    Track {
                        synced: synced.clone(),
                        initial_live: state.is_live(),
                        initial_length: state.causal_length(),
                        state,
                        applied: false,
                    },
                );
            }
            let track = rows.get_mut(&id).expect("inserted above");
            match track.state.apply(change, &synced.schema.rules) {
                Ok(outcome) => {
                    track.applied |= outcome.effect == Effect::Applied;
                    outcomes.push((*i, outcome));
                }
                // a malformed change: the one-by-one path dead-letters it
                Err(_) => return Ok(false),
            }
        }
        let mut writes: Vec<(Arc<Synced>, Vec<RowWrite>)> = Vec::new();
        for id in &order {
            let track = &rows[id];
            if !track.applied {
                continue;
            }
            let write = RowWrite {
                key: id.1.clone(),
                visible: track.state.visible(),
                recreate: track.initial_live
                    && track.state.is_live()
                    && track.initial_length != track.state.causal_length(),
            };
            match writes.iter_mut().find(|(s, _)| s.id == track.synced.id) {
                Some((_, list)) => list.push(write),
                None => writes.push((track.synced.clone(), vec![write])),
            }
        }
        if !writes.is_empty() {
            self.client.batch_execute("SAVEPOINT driftless_batch")?;
            for (synced, list) in &writes {
                for chunk in list.chunks(BULK_ROWS_MAX) {
                    let failed = match self.write_user_rows(synced, chunk) {
                        Ok(Ok(())) => false,
                        Ok(Err(_)) => true,
                        Err(e) if e.is_data_problem() => true,
                        Err(e) => return Err(e),
                    };
                    if failed {
                        self.client.batch_execute(
                            "ROLLBACK TO driftless_batch; RELEASE driftless_batch",
                        )?;
                        return Ok(false);
                    }
                }
            }
            self.client.batch_execute("RELEASE driftless_batch")?;
        }
        let mut applied_keys = Vec::new();
        for id in order {
            let track = rows.remove(&id).expect("tracked");
            if track.applied {
                self.set_state(&id.0, &id.1, track.state);
                applied_keys.push(id);
            }
        }
        let mut conflicts = Vec::new();
        for (i, outcome) in outcomes {
            match outcome.effect {
                Effect::Applied => {
                    self.note_change(&changes[i]);
                    report.applied += 1;
                }
                Effect::Duplicate => report.duplicates += 1,
                Effect::Superseded => report.superseded += 1,
            }
            conflicts.extend(outcome.conflicts);
        }
        for (table, rule) in self.record_conflicts(&conflicts)? {
            report.conflicts += 1;
            report.conflict_rules.push((table, rule));
        }
        if self.dead_letters_present && !applied_keys.is_empty() {
            self.retry_rows_dead_letters(&applied_keys, report)?;
        }
        Ok(true)
    }

    /// The checks that do not need the row: clock, table, columns, and that every value and key
    /// part fits its column.
    pub(crate) fn precheck(&mut self, change: &Change) -> Result<Arc<Synced>, Refusal> {
        if let Err(e) = self.hlc.update(change.version.timestamp) {
            return Err(match e {
                ClockError::TooFarAhead { .. } => Refusal::Held(e),
                ClockError::Exhausted => Refusal::Dead(DeadLetterReason::Clock, e.to_string()),
            });
        }
        let Some(synced) = self.synced(&change.table) else {
            return Err(Refusal::Dead(
                DeadLetterReason::UnknownTable,
                format!(
                    "unknown table {}: it is not synced on this replica",
                    change.table
                ),
            ));
        };
        let parts = change.key.parts();
        if parts.len() != synced.keys.len() {
            return Err(Refusal::Dead(
                DeadLetterReason::Invalid,
                format!(
                    "key {} has {} parts; table {} has {} key columns here",
                    change.key,
                    parts.len(),
                    change.table,
                    synced.keys.len()
                ),
            ));
        }
        for (part, column) in parts.iter().zip(&synced.keys) {
            if let Err(reason) = key_to_wire(column.kind, &column.declared, part) {
                return Err(Refusal::Dead(
                    DeadLetterReason::Invalid,
                    format!("key {} of table {}: {reason}", change.key, change.table),
                ));
            }
        }
        for cell in change.cells() {
            let Some(column) = synced.values.iter().find(|c| c.name == cell.column) else {
                let reason = if synced.keys.iter().any(|c| c.name == cell.column) {
                    (
                        DeadLetterReason::Invalid,
                        format!(
                            "column {} of table {} is part of the primary key here and cannot be \
                             written as a value",
                            cell.column, change.table
                        ),
                    )
                } else {
                    (
                        DeadLetterReason::UnknownColumn,
                        format!(
                            "unknown column {} in table {} (the change was made under schema {}, \
                             this replica has {}); add the column, then retry",
                            cell.column, change.table, change.schema, synced.schema.fingerprint
                        ),
                    )
                };
                return Err(Refusal::Dead(reason.0, reason.1));
            };
            if let Err(reason) = to_wire(column.kind, &column.declared, &cell.value) {
                return Err(Refusal::Dead(
                    DeadLetterReason::Constraint,
                    format!(
                        "cannot write {} {}: column {}: {reason}",
                        change.table, change.key, cell.column
                    ),
                ));
            }
        }
        Ok(synced)
    }

    fn refuse(
        &mut self,
        from: Option<NodeId>,
        change: &Change,
        refusal: Refusal,
        report: &mut ApplyReport,
    ) -> Result<(), Error> {
        match refusal {
            Refusal::Held(e) => {
                self.hold(from, change, &e.to_string())?;
                report.held += 1;
            }
            Refusal::Dead(kind, reason) => {
                self.dead_letter(from, change, &reason)?;
                report.dead_lettered += 1;
                report
                    .dead_letter_reasons
                    .push((change.table.to_string(), kind));
            }
        }
        Ok(())
    }

    /// Applies one change inside the current transaction, writing its row in a savepoint.
    pub(crate) fn apply_one(
        &mut self,
        from: Option<NodeId>,
        change: &Change,
        report: &mut ApplyReport,
    ) -> Result<(), Error> {
        match self.try_apply(change, report)? {
            Ok(()) => Ok(()),
            Err(refusal) => self.refuse(from, change, refusal, report),
        }
    }

    fn try_apply(
        &mut self,
        change: &Change,
        report: &mut ApplyReport,
    ) -> Result<Result<(), Refusal>, Error> {
        let synced = match self.precheck(change) {
            Ok(synced) => synced,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let mut state = self.cached_state(&change.table, &change.key)?;
        let before_length = state.causal_length();
        let was_live = state.is_live();
        let outcome = match state.apply(change, &synced.schema.rules) {
            Ok(outcome) => outcome,
            Err(e) => {
                return Ok(Err(Refusal::Dead(
                    DeadLetterReason::Invalid,
                    format!("invalid change: {e}"),
                )));
            }
        };
        match outcome.effect {
            Effect::Duplicate => report.duplicates += 1,
            Effect::Superseded => report.superseded += 1,
            Effect::Applied => {
                let write = RowWrite {
                    key: change.key.clone(),
                    visible: state.visible(),
                    recreate: was_live && state.is_live() && before_length != state.causal_length(),
                };
                self.client.batch_execute("SAVEPOINT driftless_apply")?;
                let failure = match self.write_user_rows(&synced, std::slice::from_ref(&write)) {
                    Ok(Ok(())) => None,
                    Ok(Err(reason)) => Some(reason),
                    Err(e) if e.is_data_problem() => Some(e.describe()),
                    Err(e) => return Err(e),
                };
                if let Some(reason) = failure {
                    self.client
                        .batch_execute("ROLLBACK TO driftless_apply; RELEASE driftless_apply")?;
                    return Ok(Err(Refusal::Dead(
                        DeadLetterReason::Constraint,
                        format!("cannot write {} {}: {reason}", change.table, change.key),
                    )));
                }
                self.client.batch_execute("RELEASE driftless_apply")?;
                self.set_state(&change.table, &change.key, state);
                self.note_change(change);
                report.applied += 1;
            }
        }
        for (table, rule) in self.record_conflicts(&outcome.conflicts)? {
            report.conflicts += 1;
            report.conflict_rules.push((table, rule));
        }
        if outcome.effect == Effect::Applied && self.dead_letters_present {
            self.retry_rows_dead_letters(&[(change.table.clone(), change.key.clone())], report)?;
        }
        Ok(Ok(()))
    }

    fn dead_letter(
        &mut self,
        from: Option<NodeId>,
        change: &Change,
        reason: &str,
    ) -> Result<(), Error> {
        let sql = format!(
            "INSERT INTO {}.dead_letters (tbl, pk, version, from_peer, change, reason, at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let from = from.map(|f| f.to_bytes().to_vec());
        let now = self.now_ms() as i64;
        self.client.execute(
            &stmt,
            &[
                &change.table.as_str(),
                &change.key.as_bytes(),
                &encode_version(change.version),
                &from,
                &encode_change(change),
                &reason,
                &now,
            ],
        )?;
        self.dead_letters_present = true;
        Ok(())
    }

    fn hold(&mut self, from: Option<NodeId>, change: &Change, reason: &str) -> Result<(), Error> {
        let sql = format!(
            "INSERT INTO {}.held (from_peer, change, reason, at_ms) VALUES ($1, $2, $3, $4)",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let now = self.now_ms() as i64;
        self.client.execute(
            &stmt,
            &[
                &from.unwrap_or_default().to_bytes().as_slice(),
                &encode_change(change),
                &reason,
                &now,
            ],
        )?;
        Ok(())
    }

    /// After changes to some rows applied, dead letters of the same rows may now apply too
    /// (e.g. an update that arrived before its row's insert).
    fn retry_rows_dead_letters(
        &mut self,
        keys: &[(TableName, PrimaryKey)],
        report: &mut ApplyReport,
    ) -> Result<(), Error> {
        let sql = format!(
            "SELECT d.id FROM {}.dead_letters AS d JOIN unnest($1::pg_catalog.text[], \
             $2::pg_catalog.bytea[]) AS u(tbl, pk) ON d.tbl = u.tbl AND d.pk = u.pk \
             WHERE d.change IS NOT NULL ORDER BY d.id",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let mut ids = Vec::new();
        for chunk in keys.chunks(BULK_ROWS_MAX) {
            let tables: Vec<&str> = chunk.iter().map(|(t, _)| t.as_str()).collect();
            let pks: Vec<&[u8]> = chunk.iter().map(|(_, k)| k.as_bytes()).collect();
            for row in self.client.query(&stmt, &[&tables, &pks])? {
                ids.push(DeadLetterId(row.get(0)));
            }
        }
        for id in ids {
            self.retry_one(id, report)?;
        }
        Ok(())
    }

    /// Retries one dead letter: it leaves the table if it applies, else stays with its new
    /// reason and one more attempt counted.
    pub(crate) fn retry_one(
        &mut self,
        id: DeadLetterId,
        report: &mut ApplyReport,
    ) -> Result<(), Error> {
        let sql = format!(
            "SELECT change, from_peer, attempts FROM {}.dead_letters WHERE id = $1",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let row = self.client.query_opt(&stmt, &[&id.0])?;
        let Some(row) = row else { return Ok(()) };
        let bytes: Option<Vec<u8>> = row.get(0);
        let from: Option<Vec<u8>> = row.get(1);
        let attempts: i32 = row.get(2);
        let Some(bytes) = bytes else {
            return Ok(()); // a local capture refusal with no change to retry
        };
        let change = decode_change(&bytes)
            .map_err(|e| StoreError::Corrupt(format!("dead letter {id}: {e}")))?;
        // Remove first, so the retry of the row's other dead letters (after a success) does
        // not pick this one up again.
        let sql = format!("DELETE FROM {}.dead_letters WHERE id = $1", self.ds);
        let stmt = self.stmt(&sql)?;
        self.client.execute(&stmt, &[&id.0])?;
        let mut inner = ApplyReport::default();
        let reason = match self.try_apply(&change, &mut inner)? {
            Ok(()) => {
                report.add(&inner);
                report.retried += 1;
                return Ok(());
            }
            Err(Refusal::Held(e)) => e.to_string(),
            Err(Refusal::Dead(_, reason)) => reason,
        };
        let sql = format!(
            "INSERT INTO {}.dead_letters
             (id, tbl, pk, version, from_peer, change, reason, attempts, at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            self.ds
        );
        let stmt = self.stmt(&sql)?;
        let now = self.now_ms() as i64;
        self.client.execute(
            &stmt,
            &[
                &id.0,
                &change.table.as_str(),
                &change.key.as_bytes(),
                &encode_version(change.version),
                &from,
                &bytes,
                &reason,
                &(attempts + 1),
                &now,
            ],
        )?;
        report.dead_lettered += 1;
        Ok(())
    }
}
