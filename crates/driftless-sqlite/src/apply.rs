//! Applying remote changes: merge, write the winners, ledger, dead letters, clock holds, the
//! row's new place in the log, and the cursor, in one transaction per batch.

use crate::rowio::{load_state, record_history, write_user_row};
use crate::schema::db;
use crate::store::SqliteStore;
use driftless_core::codec::{Encoder, decode_change, encode_change};
use driftless_core::{Change, Clock, ClockError, ConflictRecord, Effect, NodeId};
use driftless_store::{
    APPLY_BATCH_CHANGES_MAX, ApplyReport, CaptureReport, DeadLetterId, DeadLetterReason, LogSeq,
    StoreError,
};
use rusqlite::{OptionalExtension, params};

/// Why one change was not applied.
enum Refusal {
    /// Stamped too far ahead of our clock: hold it.
    Held(ClockError),
    /// Cannot be applied here: dead-letter it with this reason.
    Dead(DeadLetterReason, String),
}

pub(crate) fn encode_version(version: driftless_core::Version) -> Vec<u8> {
    let mut e = Encoder::new();
    e.version(version);
    e.finish()
}

fn encode_value(value: &Option<driftless_core::Value>) -> Option<Vec<u8>> {
    value.as_ref().map(|v| {
        let mut e = Encoder::new();
        e.value(v);
        e.finish()
    })
}

impl<C: Clock> SqliteStore<C> {
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
            for change in changes {
                store.apply_one(Some(from), change, &mut report)?;
            }
            store
                .conn
                .execute(
                    "INSERT INTO _driftless_cursors (peer, seq) VALUES (?1, ?2)
                     ON CONFLICT (peer) DO UPDATE SET seq = excluded.seq",
                    params![from.to_bytes().to_vec(), cursor.0 as i64],
                )
                .map_err(db)?;
            Ok(report)
        })
    }

    /// Applies one change inside the current transaction. Problems with the change itself
    /// become dead letters or holds; only store failures are errors.
    pub(crate) fn apply_one(
        &mut self,
        from: Option<NodeId>,
        change: &Change,
        report: &mut ApplyReport,
    ) -> Result<(), StoreError> {
        match self.try_apply(change, report)? {
            Ok(()) => Ok(()),
            Err(Refusal::Held(e)) => {
                self.hold(from, change, &e.to_string())?;
                report.held += 1;
                Ok(())
            }
            Err(Refusal::Dead(kind, reason)) => {
                self.dead_letter(from, change, &reason)?;
                report.dead_lettered += 1;
                report
                    .dead_letter_reasons
                    .push((change.table.to_string(), kind));
                Ok(())
            }
        }
    }

    fn try_apply(
        &mut self,
        change: &Change,
        report: &mut ApplyReport,
    ) -> Result<Result<(), Refusal>, StoreError> {
        if let Err(e) = self.hlc.update(change.version.timestamp) {
            return Ok(Err(match e {
                ClockError::TooFarAhead { .. } => Refusal::Held(e),
                ClockError::Exhausted => Refusal::Dead(DeadLetterReason::Clock, e.to_string()),
            }));
        }
        let Some(synced) = self.synced(&change.table) else {
            return Ok(Err(Refusal::Dead(
                DeadLetterReason::UnknownTable,
                format!(
                    "unknown table {}: it is not synced on this replica",
                    change.table
                ),
            )));
        };
        let schema = &synced.schema;
        for cell in change.cells() {
            match schema.column(&cell.column) {
                None => {
                    return Ok(Err(Refusal::Dead(
                        DeadLetterReason::UnknownColumn,
                        format!(
                            "unknown column {} in table {} (the change was made under schema {}, \
                         this replica has {}); add the column, then retry",
                            cell.column, change.table, change.schema, schema.fingerprint
                        ),
                    )));
                }
                Some(c) if c.primary_key.is_some() => {
                    return Ok(Err(Refusal::Dead(
                        DeadLetterReason::Invalid,
                        format!(
                            "column {} of table {} is part of the primary key here and cannot be \
                         written as a value",
                            cell.column, change.table
                        ),
                    )));
                }
                Some(_) => {}
            }
        }
        let loaded = load_state(&self.conn, &synced, &change.key, &self.nodes, None)?;
        let mut state = loaded.state.clone();
        let before_length = state.causal_length();
        let was_live = state.is_live();
        let outcome = match state.apply(change, &schema.rules) {
            Ok(outcome) => outcome,
            Err(e) => {
                return Ok(Err(Refusal::Dead(
                    DeadLetterReason::Invalid,
                    format!("invalid change: {e}"),
                )));
            }
        };
        #[cfg(feature = "fault-injection")]
        if outcome.effect == Effect::Applied && injected_fault_drops_this_change() {
            // Deliberately lose the change: nothing written, but the batch (and cursor) go on.
            return Ok(Ok(()));
        }
        match outcome.effect {
            Effect::Duplicate => report.duplicates += 1,
            Effect::Superseded => report.superseded += 1,
            Effect::Applied => {
                let recreate =
                    was_live && state.is_live() && before_length != state.causal_length();
                // A failing statement (constraint violation) is backed out by SQLite on its own
                // and the transaction stays usable, so a single-statement row write needs no
                // savepoint; only the two-statement recreate (delete, then insert) does.
                if recreate {
                    self.run_cached("SAVEPOINT driftless_apply")?;
                }
                let written = write_user_row(
                    &self.conn,
                    &synced,
                    &change.key,
                    state.visible().as_ref(),
                    recreate,
                );
                if let Err(reason) = written {
                    if recreate {
                        self.run_cached("ROLLBACK TO driftless_apply")?;
                        self.run_cached("RELEASE driftless_apply")?;
                    }
                    return Ok(Err(Refusal::Dead(
                        DeadLetterReason::Constraint,
                        format!("cannot write {} {}: {reason}", change.table, change.key),
                    )));
                }
                if recreate {
                    self.run_cached("RELEASE driftless_apply")?;
                }
                self.save_row_state(&synced, &change.key, &loaded, &state)?;
                record_history(&self.conn, change)?;
                report.applied += 1;
            }
        }
        for c in self.record_conflicts(&outcome.conflicts)? {
            report.conflicts += 1;
            report.conflict_rules.push((c.table.clone(), c.rule));
        }
        if outcome.effect == Effect::Applied && self.dead_letters_present {
            self.retry_row_dead_letters(change, report)?;
        }
        Ok(Ok(()))
    }

    fn run_cached(&self, sql: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map(|_| ())
            .map_err(db)
    }

    /// Stores conflicts in the ledger (each once). Returns the ones that were new.
    pub(crate) fn record_conflicts<'c>(
        &self,
        conflicts: &'c [ConflictRecord],
    ) -> Result<Vec<&'c ConflictRecord>, StoreError> {
        let mut added = Vec::new();
        let now = self.now_ms() as i64;
        for c in conflicts {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO _driftless_conflicts
                     (tbl, pk, col, rule, winner_version, winner_value, loser_version, loser_value, at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(db)?;
            let inserted = stmt
                .execute(params![
                    c.table.as_str(),
                    c.key.as_bytes(),
                    c.column.as_str(),
                    c.rule.as_str(),
                    encode_version(c.winner.version),
                    encode_value(&c.winner.value),
                    encode_version(c.loser.version),
                    encode_value(&c.loser.value),
                    now
                ])
                .map_err(db)?;
            if inserted > 0 {
                added.push(c);
            }
        }
        Ok(added)
    }

    fn dead_letter(
        &self,
        from: Option<NodeId>,
        change: &Change,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO _driftless_dead_letters (tbl, pk, version, from_peer, change, reason, at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    change.table.as_str(),
                    change.key.as_bytes(),
                    encode_version(change.version),
                    from.map(|f| f.to_bytes().to_vec()),
                    encode_change(change),
                    reason,
                    self.now_ms() as i64
                ],
            )
            .map_err(db)?;
        Ok(())
    }

    fn hold(&self, from: Option<NodeId>, change: &Change, reason: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO _driftless_held (from_peer, change, reason, at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![
                    from.unwrap_or_default().to_bytes().to_vec(),
                    encode_change(change),
                    reason,
                    self.now_ms() as i64
                ],
            )
            .map_err(db)?;
        Ok(())
    }

    /// After a change to a row applied, dead letters of the same row may now apply too (e.g. an
    /// update that arrived before its row's insert).
    fn retry_row_dead_letters(
        &mut self,
        change: &Change,
        report: &mut ApplyReport,
    ) -> Result<(), StoreError> {
        let ids: Vec<i64> = {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT id FROM _driftless_dead_letters WHERE tbl = ?1 AND pk = ?2 AND change IS NOT NULL",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map(params![change.table.as_str(), change.key.as_bytes()], |r| {
                    r.get(0)
                })
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)?
        };
        for id in ids {
            self.retry_one(DeadLetterId(id), report)?;
        }
        Ok(())
    }

    /// Retries one dead letter: it leaves the table if it applies, else stays with its new
    /// reason and one more attempt counted.
    pub(crate) fn retry_one(
        &mut self,
        id: DeadLetterId,
        report: &mut ApplyReport,
    ) -> Result<(), StoreError> {
        type Row = (Option<Vec<u8>>, Option<Vec<u8>>, i64);
        let row: Option<Row> = self
            .conn
            .query_row(
                "SELECT change, from_peer, attempts FROM _driftless_dead_letters WHERE id = ?1",
                [id.0],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(db)?;
        let Some((Some(bytes), from, attempts)) = row else {
            return Ok(()); // gone, or a local capture refusal with no change to retry
        };
        let change = decode_change(&bytes)
            .map_err(|e| StoreError::Corrupt(format!("dead letter {id}: {e}")))?;
        // Remove first, so the retry of the row's other dead letters (after a success) does
        // not pick this one up again.
        self.conn
            .execute("DELETE FROM _driftless_dead_letters WHERE id = ?1", [id.0])
            .map_err(db)?;
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
        self.conn
            .execute(
                "INSERT INTO _driftless_dead_letters
                 (id, tbl, pk, version, from_peer, change, reason, attempts, at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    id.0,
                    change.table.as_str(),
                    change.key.as_bytes(),
                    encode_version(change.version),
                    from,
                    bytes,
                    reason,
                    attempts + 1,
                    self.now_ms() as i64
                ],
            )
            .map_err(db)?;
        report.dead_lettered += 1;
        Ok(())
    }
}

/// With the `fault-injection` feature and `DRIFTLESS_FAULT=drop-every-N` (N >= 1) in the
/// environment, every N-th applied change is silently dropped. Only for proving that the
/// fault-injection checker catches lost writes.
#[cfg(feature = "fault-injection")]
fn injected_fault_drops_this_change() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static APPLIED: AtomicU64 = AtomicU64::new(0);
    let Some(every) = std::env::var("DRIFTLESS_FAULT")
        .ok()
        .and_then(|v| {
            v.strip_prefix("drop-every-")
                .and_then(|n| n.parse::<u64>().ok())
        })
        .filter(|n| *n > 0)
    else {
        return false;
    };
    APPLIED.fetch_add(1, Ordering::Relaxed) % every == every - 1
}
