//! The reference model: the state every replica must reach, computed straight from the history of
//! client writes by the documented rules (docs/semantics.md), without the merge code under test.

use crate::workload::Workload;
use driftless_core::{
    Change, ChangeOp, ColumnKind, ColumnName, NodeId, PrimaryKey, TableName, Value, Version,
};
use std::collections::{BTreeMap, BTreeSet};

/// One acknowledged client write: the change it produced at its origin, and for counter columns
/// the increment the client made (new visible value minus the value it saw).
#[derive(Debug, Clone)]
pub struct Written {
    pub change: Change,
    pub counter_deltas: BTreeMap<ColumnName, i64>,
}

/// Expected visible contents: live rows only, each column's value.
pub type Expected = BTreeMap<(TableName, PrimaryKey), BTreeMap<ColumnName, Value>>;

/// Collects every acknowledged write and computes the expected final state.
#[derive(Debug, Default)]
pub struct Oracle {
    history: Vec<Written>,
}

impl Oracle {
    pub fn new() -> Self {
        Oracle::default()
    }

    pub fn record(&mut self, written: Written) {
        self.history.push(written);
    }

    pub fn history(&self) -> &[Written] {
        &self.history
    }

    /// The rules, applied to the whole history at once:
    /// - a row exists iff the largest causal length written for it is odd;
    /// - only writes made in that last life count;
    /// - `lww`: the write with the largest (authority, version) wins;
    /// - `max`/`min`: the largest/smallest value wins (ties: larger version);
    /// - `counter`: the sum of all increments made in that life.
    pub fn expected(&self, workload: &Workload) -> Expected {
        let mut rows: BTreeMap<(TableName, PrimaryKey), Vec<&Written>> = BTreeMap::new();
        for w in &self.history {
            rows.entry((w.change.table.clone(), w.change.key.clone()))
                .or_default()
                .push(w);
        }
        let mut expected = Expected::new();
        for ((table, key), writes) in rows {
            let last_life = writes
                .iter()
                .map(|w| w.change.causal_length)
                .max()
                .expect("non-empty");
            if !last_life.is_live() {
                continue;
            }
            let spec = workload.table(&table).expect("known table");
            let authorities: BTreeSet<NodeId> = spec.rules.priority_nodes().collect();
            let mut row = BTreeMap::new();
            let life: Vec<_> = writes
                .iter()
                .filter(|w| w.change.causal_length == last_life)
                .collect();
            for (column, _, kind) in &spec.columns {
                let candidates: Vec<(Version, &Value)> = life
                    .iter()
                    .filter_map(|w| match &w.change.op {
                        ChangeOp::Upsert(cells) => cells
                            .iter()
                            .find(|c| &c.column == column)
                            .map(|c| (w.change.version, &c.value)),
                        ChangeOp::Delete { .. } => None,
                    })
                    .collect();
                if candidates.is_empty() {
                    continue;
                }
                let value = match kind {
                    ColumnKind::Lww => candidates
                        .iter()
                        .max_by_key(|(v, _)| (authorities.contains(&v.node), *v))
                        .map(|(_, value)| (*value).clone()),
                    ColumnKind::Max => candidates
                        .iter()
                        .max_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)))
                        .map(|(_, value)| (*value).clone()),
                    ColumnKind::Min => candidates
                        .iter()
                        .min_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))
                        .map(|(_, value)| (*value).clone()),
                    ColumnKind::Counter => Some(Value::Integer(
                        life.iter()
                            .filter_map(|w| w.counter_deltas.get(column))
                            .fold(0i64, |sum, d| sum.wrapping_add(*d)),
                    )),
                };
                row.insert(column.clone(), value.expect("non-empty candidates"));
            }
            expected.insert((table, key), row);
        }
        expected
    }
}
