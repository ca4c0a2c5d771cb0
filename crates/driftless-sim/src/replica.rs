//! An in-memory replica: row states, a hybrid logical clock and a change log, driven by the merge
//! code of `driftless-core`. The reference implementation real stores are compared with.

use crate::oracle::{Expected, Written};
use crate::workload::{LocalOp, Workload};
use driftless_core::codec::encode_row_state;
use driftless_core::hlc::ManualClock;
use driftless_core::{
    Change, ClockError, ColumnKind, ColumnName, ConflictRecord, Effect, Hlc, LocalWriteError,
    MergeError, NodeId, PrimaryKey, RowState, TableName, Value, Version,
};
use std::collections::BTreeMap;
use std::time::Duration;

/// Why a received change was not applied now.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// Stamped too far ahead of our clock: hold it and retry later.
    #[error("held: {0}")]
    Held(ClockError),
    #[error("invalid change: {0}")]
    Invalid(MergeError),
}

/// One replica held in memory.
#[derive(Debug)]
pub struct MemReplica {
    pub node: NodeId,
    pub clock: ManualClock,
    hlc: Hlc<ManualClock>,
    rows: BTreeMap<(TableName, PrimaryKey), RowState>,
    /// Every change this replica made or applied with an effect, in order: what it serves to
    /// peers (relaying keeps the original origin and version).
    pub log: Vec<Change>,
    pub conflicts: Vec<ConflictRecord>,
}

impl MemReplica {
    pub fn new(node: NodeId, wall_ms: u64, max_clock_offset: Duration) -> Self {
        let clock = ManualClock::new(wall_ms);
        MemReplica {
            node,
            hlc: Hlc::new(clock.clone(), max_clock_offset),
            clock,
            rows: BTreeMap::new(),
            log: Vec::new(),
            conflicts: Vec::new(),
        }
    }

    pub fn row(&self, table: &TableName, key: &PrimaryKey) -> Option<&RowState> {
        self.rows.get(&(table.clone(), key.clone()))
    }

    pub fn visible(
        &self,
        table: &TableName,
        key: &PrimaryKey,
    ) -> Option<BTreeMap<ColumnName, Value>> {
        self.row(table, key).and_then(RowState::visible)
    }

    /// Performs a client write, as a store's capture would: stamps it with the HLC, applies it and
    /// logs it. Returns what the oracle needs to know.
    pub fn perform(
        &mut self,
        op: &LocalOp,
        workload: &Workload,
    ) -> Result<Written, LocalWriteError> {
        let spec = workload.table(op.table()).expect("known table");
        let state = self.row(op.table(), op.key()).cloned().unwrap_or_default();
        let timestamp = self.hlc.now().expect("simulated clocks stay in range");
        let version = Version::new(timestamp, self.node);
        let (table, key) = (op.table(), op.key());
        let mut counter_deltas = BTreeMap::new();
        let change = match op {
            LocalOp::Insert { cells, .. } => {
                for (column, value) in cells {
                    if spec.rules.kind(column) == ColumnKind::Counter {
                        counter_deltas.insert(column.clone(), value.as_integer().unwrap_or(0));
                    }
                }
                state.local_insert(
                    table,
                    key,
                    version,
                    cells.clone(),
                    &spec.rules,
                    spec.fingerprint,
                )?
            }
            LocalOp::Update { cells, .. } => {
                let visible = state.visible().unwrap_or_default();
                for (column, value) in cells {
                    if spec.rules.kind(column) == ColumnKind::Counter {
                        let old = visible.get(column).and_then(Value::as_integer).unwrap_or(0);
                        counter_deltas
                            .insert(column.clone(), value.as_integer().unwrap_or(0) - old);
                    }
                }
                state.local_update(
                    table,
                    key,
                    version,
                    cells.clone(),
                    &spec.rules,
                    spec.fingerprint,
                )?
            }
            LocalOp::Delete { .. } => state.local_delete(table, key, version, spec.fingerprint)?,
        };
        self.apply(&change, workload)
            .map_err(LocalWriteError::Invalid)?;
        Ok(Written {
            change,
            counter_deltas,
        })
    }

    fn apply(&mut self, change: &Change, workload: &Workload) -> Result<Effect, MergeError> {
        let rules = workload.rules(&change.table);
        let state = self
            .rows
            .entry((change.table.clone(), change.key.clone()))
            .or_default();
        let outcome = state.apply(change, rules)?;
        if outcome.effect == Effect::Applied {
            self.log.push(change.clone());
        }
        self.conflicts.extend(outcome.conflicts);
        Ok(outcome.effect)
    }

    /// Applies a change received from a peer: the clock first (refusing one too far ahead), then
    /// the merge.
    pub fn receive(
        &mut self,
        change: &Change,
        workload: &Workload,
    ) -> Result<Effect, ReceiveError> {
        self.hlc
            .update(change.version.timestamp)
            .map_err(ReceiveError::Held)?;
        self.apply(change, workload).map_err(ReceiveError::Invalid)
    }

    /// The canonical bytes of every row state, in key order: equal iff the replicas are
    /// byte-identical.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for ((table, key), state) in &self.rows {
            out.extend_from_slice(table.as_str().as_bytes());
            out.push(0);
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(&encode_row_state(state));
        }
        out
    }

    /// Visible contents in the oracle's shape.
    pub fn contents(&self) -> Expected {
        self.rows
            .iter()
            .filter_map(|(k, state)| state.visible().map(|row| (k.clone(), row)))
            .collect()
    }
}
