//! The merge rules: row state as a join-semilattice, applying changes to it, and turning local
//! writes into changes.
//!
//! A row's state is `(causal length, life version, cells)`. Applying a change is a join: the
//! result does not depend on the order, grouping or repetition of the changes applied
//! (commutative, associative, idempotent). That single property is what makes replicas converge
//! whatever the transport does. The rules, in order:
//! 1. A higher causal length wins outright: the cells of an older life of the row are dropped.
//! 2. Within one life, each cell merges by its column kind: `lww` by (priority rank, version),
//!    `max`/`min` by value then version, `counter` by keeping each origin's latest cumulative
//!    contribution.
//! 3. Ties on the full version with different content (impossible unless a store was edited
//!    behind driftless's back) break on the value, so even drift resolves deterministically.

use crate::change::{CellWrite, Change, ChangeOp, SchemaFingerprint};
use crate::conflict::{ConflictRecord, ConflictRule, ConflictSide};
use crate::ids::{ColumnName, NodeId, TableName};
use crate::key::PrimaryKey;
use crate::rules::{ColumnKind, TableRules};
use crate::value::Value;
use crate::version::{CausalLength, Version};
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// One node's contribution to a counter cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterPart {
    /// Sum of all increments this node made to the cell in the current life of the row.
    pub total: i64,
    /// Version of the node's latest write to the cell.
    pub version: Version,
}

/// The merge state of one cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CellState {
    /// `lww`, `max` and `min` columns: the winning write so far.
    Register {
        value: Value,
        version: Version,
        base: Option<Version>,
    },
    /// `counter` columns: per-origin contributions; the visible value is their sum.
    Counter(BTreeMap<NodeId, CounterPart>),
}

impl CellState {
    /// The value users see.
    pub fn visible(&self) -> Value {
        match self {
            CellState::Register { value, .. } => value.clone(),
            // Wrapping keeps the sum independent of the order of the parts even on overflow.
            CellState::Counter(parts) => Value::Integer(
                parts
                    .values()
                    .fold(0i64, |sum, part| sum.wrapping_add(part.total)),
            ),
        }
    }

    /// Highest version that contributed to this cell.
    pub fn max_version(&self) -> Version {
        match self {
            CellState::Register { version, .. } => *version,
            CellState::Counter(parts) => parts
                .values()
                .map(|p| p.version)
                .max()
                .expect("a counter cell has at least one part"),
        }
    }
}

/// The full merge state of one row.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RowState {
    causal_length: CausalLength,
    /// Highest version among the changes of the current life (`None` only when never seen).
    version: Option<Version>,
    /// For a deleted row: what the winning delete had seen (see [`ChangeOp::Delete`]).
    delete_base: Option<Version>,
    /// Cells of the current life; always empty for a deleted row.
    cells: BTreeMap<ColumnName, CellState>,
}

/// A change that cannot be merged because it is malformed. The store adapter dead-letters it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("an upsert must carry an odd causal length, got {0}")]
    UpsertWithEvenLength(u64),
    #[error("a delete must carry an even, non-zero causal length, got {0}")]
    DeleteWithOddLength(u64),
    #[error("column {0} appears twice in one change")]
    DuplicateColumn(ColumnName),
    #[error("counter column {column} needs an integer, got {found}")]
    CounterNotInteger {
        column: ColumnName,
        found: &'static str,
    },
}

/// A local write that makes no sense for the row's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalWriteError {
    #[error("cannot insert: the row already exists")]
    RowExists,
    #[error("cannot update or delete: the row does not exist")]
    RowMissing,
    #[error(transparent)]
    Invalid(#[from] MergeError),
}

/// What applying one change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The state changed.
    Applied,
    /// Everything in the change was already in the state (a duplicate delivery).
    Duplicate,
    /// The state already held newer information; nothing changed.
    Superseded,
}

/// The result of applying one change: its effect and the conflicts it resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub effect: Effect,
    pub conflicts: Vec<ConflictRecord>,
}

/// Running tally for one application: did anything change, was everything already known.
#[derive(Default)]
struct Tally {
    changed: bool,
    news: bool,
}

impl Tally {
    fn effect(&self) -> Effect {
        if self.changed {
            Effect::Applied
        } else if self.news {
            Effect::Superseded
        } else {
            Effect::Duplicate
        }
    }
    fn record(&mut self, order: Ordering) {
        match order {
            Ordering::Greater => self.changed = true,
            Ordering::Less => self.news = true,
            Ordering::Equal => {}
        }
    }
}

impl RowState {
    /// A row never seen.
    pub fn new() -> Self {
        RowState::default()
    }

    /// Rebuilds a state from its stored parts. Fails if the parts break an invariant.
    pub fn from_parts(
        causal_length: CausalLength,
        version: Option<Version>,
        delete_base: Option<Version>,
        cells: BTreeMap<ColumnName, CellState>,
    ) -> Result<Self, &'static str> {
        if (causal_length == CausalLength::ABSENT) != version.is_none() {
            return Err("a row has a version exactly when its causal length is non-zero");
        }
        if !causal_length.is_live() && !cells.is_empty() {
            return Err("a deleted or absent row has no cells");
        }
        if causal_length.is_live() && delete_base.is_some() {
            return Err("a live row has no delete base");
        }
        if cells
            .values()
            .any(|c| matches!(c, CellState::Counter(parts) if parts.is_empty()))
        {
            return Err("a counter cell has at least one part");
        }
        if let Some(version) = version
            && cells.values().any(|c| c.max_version() > version)
        {
            return Err("no cell is newer than its row");
        }
        Ok(RowState {
            causal_length,
            version,
            delete_base,
            cells,
        })
    }

    pub fn causal_length(&self) -> CausalLength {
        self.causal_length
    }
    pub fn is_live(&self) -> bool {
        self.causal_length.is_live()
    }
    pub fn version(&self) -> Option<Version> {
        self.version
    }
    pub fn delete_base(&self) -> Option<Version> {
        self.delete_base
    }
    pub fn cells(&self) -> &BTreeMap<ColumnName, CellState> {
        &self.cells
    }

    /// Whether `version` still contributes to this state (as the row's version, a cell's
    /// version or a counter part's version). A log entry whose version is not referenced is
    /// superseded: dropping it loses nothing (see log compaction in the store adapters).
    pub fn references(&self, version: Version) -> bool {
        self.version == Some(version)
            || self.cells.values().any(|cell| match cell {
                CellState::Register { version: v, .. } => *v == version,
                CellState::Counter(parts) => parts.values().any(|p| p.version == version),
            })
    }

    /// The row as users see it, or `None` if it does not exist. Columns never written in the
    /// current life are absent (a store shows them as NULL or their default).
    pub fn visible(&self) -> Option<BTreeMap<ColumnName, Value>> {
        self.is_live().then(|| {
            self.cells
                .iter()
                .map(|(column, cell)| (column.clone(), cell.visible()))
                .collect()
        })
    }

    /// Merges one change into the state. Pure and deterministic; see the module docs.
    pub fn apply(
        &mut self,
        change: &Change,
        rules: &TableRules,
    ) -> Result<ApplyOutcome, MergeError> {
        validate(change, rules)?;
        let mut conflicts = Vec::new();
        let effect = match &change.op {
            ChangeOp::Upsert(cells) => self.apply_upsert(change, cells, rules, &mut conflicts),
            ChangeOp::Delete { base } => self.apply_delete(change, *base, &mut conflicts),
        };
        Ok(ApplyOutcome { effect, conflicts })
    }

    fn apply_upsert(
        &mut self,
        change: &Change,
        cells: &[CellWrite],
        rules: &TableRules,
        conflicts: &mut Vec<ConflictRecord>,
    ) -> Effect {
        let length = change.causal_length;
        if length < self.causal_length {
            // An update of an earlier life. If the row was deleted right after that life and the
            // delete had not seen this update, the delete discarded a concurrent write.
            let concurrent_with_delete = !self.is_live()
                && length.next() == self.causal_length
                && self.delete_base < Some(change.version);
            if concurrent_with_delete {
                let winner = ConflictSide {
                    version: self.version.expect("a deleted row has a version"),
                    value: None,
                };
                for cell in cells {
                    conflicts.push(ConflictRecord {
                        table: change.table.clone(),
                        key: change.key.clone(),
                        column: cell.column.clone(),
                        rule: ConflictRule::DeleteWins,
                        winner: winner.clone(),
                        loser: ConflictSide {
                            version: change.version,
                            value: Some(cell.value.clone()),
                        },
                    });
                }
            }
            return Effect::Superseded;
        }
        let mut tally = Tally::default();
        if length > self.causal_length {
            // A new life of the row: the cells of the old life are gone.
            *self = RowState {
                causal_length: length,
                version: Some(change.version),
                delete_base: None,
                cells: BTreeMap::new(),
            };
            tally.changed = true;
        } else if Some(change.version) > self.version {
            // Only a newer version moves the row's version; an older one is judged by its cells.
            self.version = Some(change.version);
            tally.changed = true;
        }
        for cell in cells {
            let order = self.merge_cell(change, cell, rules, conflicts);
            tally.record(order);
        }
        tally.effect()
    }

    /// Merges one cell write of the current life. Returns `Greater` if the state changed,
    /// `Less` if the write lost, `Equal` if it was already there.
    fn merge_cell(
        &mut self,
        change: &Change,
        write: &CellWrite,
        rules: &TableRules,
        conflicts: &mut Vec<ConflictRecord>,
    ) -> Ordering {
        let kind = rules.kind(&write.column);
        let version = change.version;
        let Some(cell) = self.cells.get_mut(&write.column) else {
            let state = match kind {
                ColumnKind::Counter => CellState::Counter(BTreeMap::from([(
                    version.node,
                    CounterPart {
                        total: write.value.as_integer().expect("validated"),
                        version,
                    },
                )])),
                _ => CellState::Register {
                    value: write.value.clone(),
                    version,
                    base: write.base,
                },
            };
            self.cells.insert(write.column.clone(), state);
            return Ordering::Greater;
        };
        match cell {
            CellState::Counter(parts) => {
                let total = write.value.as_integer().expect("validated");
                match parts.get_mut(&version.node) {
                    None => {
                        parts.insert(version.node, CounterPart { total, version });
                        Ordering::Greater
                    }
                    Some(part) => {
                        let order = version.cmp(&part.version).then(total.cmp(&part.total));
                        if order == Ordering::Greater {
                            *part = CounterPart { total, version };
                        }
                        order
                    }
                }
            }
            CellState::Register {
                value: held_value,
                version: held_version,
                base: held_base,
            } => {
                let rank = |v: &Version| rules.rank(v.node);
                let order = match kind {
                    ColumnKind::Max => (&write.value, version).cmp(&(&*held_value, *held_version)),
                    ColumnKind::Min => (&*held_value, version).cmp(&(&write.value, *held_version)),
                    _ => (rank(&version), version, &write.value).cmp(&(
                        rank(held_version),
                        *held_version,
                        &*held_value,
                    )),
                }
                // Equal versions and values differ in base only with tampered input; still break
                // the tie so the state never depends on arrival order.
                .then(write.base.cmp(held_base));
                if order == Ordering::Equal {
                    return Ordering::Equal;
                }
                let rule = match kind {
                    ColumnKind::Max => ConflictRule::Max,
                    ColumnKind::Min => ConflictRule::Min,
                    _ if rank(&version) != rank(held_version) => ConflictRule::Priority,
                    _ => ConflictRule::Lww,
                };
                let incoming = ConflictSide {
                    version,
                    value: Some(write.value.clone()),
                };
                let held = ConflictSide {
                    version: *held_version,
                    value: Some(held_value.clone()),
                };
                let same_value = write.value == *held_value;
                if order == Ordering::Greater {
                    // The incoming write wins. It is a conflict only if its author had not seen
                    // the value it replaces here.
                    if !same_value && write.base < Some(*held_version) {
                        conflicts.push(conflict(change, write, rule, incoming, held));
                    }
                    *held_value = write.value.clone();
                    *held_version = version;
                    *held_base = write.base;
                } else if !same_value && *held_base < Some(version) {
                    conflicts.push(conflict(change, write, rule, held, incoming));
                }
                order
            }
        }
    }

    fn apply_delete(
        &mut self,
        change: &Change,
        base: Option<Version>,
        conflicts: &mut Vec<ConflictRecord>,
    ) -> Effect {
        let length = change.causal_length;
        match length.cmp(&self.causal_length) {
            Ordering::Less => Effect::Superseded,
            Ordering::Equal => match Some(change.version).cmp(&self.version) {
                Ordering::Greater => {
                    self.version = Some(change.version);
                    self.delete_base = base;
                    Effect::Applied
                }
                Ordering::Equal if self.delete_base == base => Effect::Duplicate,
                // Same version, different base: only possible with tampered input. Keep the
                // larger base so the result is still order-independent.
                Ordering::Equal => {
                    let larger = self.delete_base.max(base);
                    let changed = larger != self.delete_base;
                    self.delete_base = larger;
                    if changed {
                        Effect::Applied
                    } else {
                        Effect::Superseded
                    }
                }
                Ordering::Less => Effect::Superseded,
            },
            Ordering::Greater => {
                if self.is_live() && length == self.causal_length.next() {
                    self.report_unseen_cells(change, base, conflicts);
                }
                *self = RowState {
                    causal_length: length,
                    version: Some(change.version),
                    delete_base: base,
                    cells: BTreeMap::new(),
                };
                Effect::Applied
            }
        }
    }

    /// A delete is about to drop this life: report the writes its author had not seen.
    fn report_unseen_cells(
        &self,
        change: &Change,
        base: Option<Version>,
        conflicts: &mut Vec<ConflictRecord>,
    ) {
        let winner = ConflictSide {
            version: change.version,
            value: None,
        };
        for (column, cell) in &self.cells {
            let unseen: Vec<(Version, Value)> = match cell {
                CellState::Register { value, version, .. } => {
                    vec![(*version, value.clone())]
                }
                CellState::Counter(parts) => parts
                    .values()
                    .map(|p| (p.version, Value::Integer(p.total)))
                    .collect(),
            };
            for (version, value) in unseen {
                if base < Some(version) {
                    conflicts.push(ConflictRecord {
                        table: change.table.clone(),
                        key: change.key.clone(),
                        column: column.clone(),
                        rule: ConflictRule::DeleteWins,
                        winner: winner.clone(),
                        loser: ConflictSide {
                            version,
                            value: Some(value),
                        },
                    });
                }
            }
        }
    }

    /// Decomposes the state into changes that rebuild it exactly when applied to an empty row
    /// (in any order). Used for snapshots, log compaction and reconciliation repairs.
    pub fn to_changes(
        &self,
        table: &TableName,
        key: &PrimaryKey,
        schema: SchemaFingerprint,
    ) -> Vec<Change> {
        let Some(version) = self.version else {
            return Vec::new();
        };
        let change = |version, causal_length, op| Change {
            table: table.clone(),
            key: key.clone(),
            version,
            causal_length,
            op,
            schema,
        };
        if !self.is_live() {
            return vec![change(
                version,
                self.causal_length,
                ChangeOp::Delete {
                    base: self.delete_base,
                },
            )];
        }
        let mut groups: BTreeMap<Version, Vec<CellWrite>> = BTreeMap::new();
        groups.entry(version).or_default();
        for (column, cell) in &self.cells {
            match cell {
                CellState::Register {
                    value,
                    version,
                    base,
                } => groups.entry(*version).or_default().push(CellWrite {
                    column: column.clone(),
                    value: value.clone(),
                    base: *base,
                }),
                CellState::Counter(parts) => {
                    for part in parts.values() {
                        groups.entry(part.version).or_default().push(CellWrite {
                            column: column.clone(),
                            value: Value::Integer(part.total),
                            base: None,
                        });
                    }
                }
            }
        }
        groups
            .into_iter()
            .map(|(version, cells)| change(version, self.causal_length, ChangeOp::Upsert(cells)))
            .collect()
    }

    /// Joins another replica's state of the same row into this one.
    pub fn merge(
        &mut self,
        other: &RowState,
        table: &TableName,
        key: &PrimaryKey,
        rules: &TableRules,
    ) -> Result<Vec<ConflictRecord>, MergeError> {
        let mut conflicts = Vec::new();
        for change in other.to_changes(table, key, SchemaFingerprint::default()) {
            conflicts.extend(self.apply(&change, rules)?.conflicts);
        }
        Ok(conflicts)
    }

    /// The change for a local insert of a row that does not exist (or was deleted). `cells`
    /// should list every column: a new life of the row starts from nothing.
    pub fn local_insert(
        &self,
        table: &TableName,
        key: &PrimaryKey,
        version: Version,
        cells: Vec<(ColumnName, Value)>,
        rules: &TableRules,
        schema: SchemaFingerprint,
    ) -> Result<Change, LocalWriteError> {
        if self.is_live() {
            return Err(LocalWriteError::RowExists);
        }
        let writes = cells
            .into_iter()
            .map(|(column, value)| CellWrite {
                column,
                value,
                base: None,
            })
            .collect();
        let change = Change {
            table: table.clone(),
            key: key.clone(),
            version,
            causal_length: self.causal_length.next(),
            op: ChangeOp::Upsert(writes),
            schema,
        };
        validate(&change, rules)?;
        Ok(change)
    }

    /// The change for a local update setting columns to new visible values. For a counter column
    /// the new value is turned into this node's new cumulative contribution (old contribution
    /// plus the difference the user made), which is what lets concurrent increments add up.
    pub fn local_update(
        &self,
        table: &TableName,
        key: &PrimaryKey,
        version: Version,
        cells: Vec<(ColumnName, Value)>,
        rules: &TableRules,
        schema: SchemaFingerprint,
    ) -> Result<Change, LocalWriteError> {
        if !self.is_live() {
            return Err(LocalWriteError::RowMissing);
        }
        let mut writes = Vec::with_capacity(cells.len());
        for (column, value) in cells {
            let held = self.cells.get(&column);
            let write = match rules.kind(&column) {
                ColumnKind::Counter => {
                    let new = value.as_integer().ok_or(MergeError::CounterNotInteger {
                        column: column.clone(),
                        found: value.type_name(),
                    })?;
                    let (visible, own) = match held {
                        Some(CellState::Counter(parts)) => (
                            parts
                                .values()
                                .fold(0i64, |sum, part| sum.wrapping_add(part.total)),
                            parts.get(&version.node).map_or(0, |part| part.total),
                        ),
                        _ => (0, 0),
                    };
                    CellWrite {
                        column,
                        value: Value::Integer(own.wrapping_add(new.wrapping_sub(visible))),
                        base: None,
                    }
                }
                _ => CellWrite {
                    column,
                    value,
                    base: held.map(CellState::max_version),
                },
            };
            writes.push(write);
        }
        let change = Change {
            table: table.clone(),
            key: key.clone(),
            version,
            causal_length: self.causal_length,
            op: ChangeOp::Upsert(writes),
            schema,
        };
        validate(&change, rules)?;
        Ok(change)
    }

    /// The change for a local delete of an existing row.
    pub fn local_delete(
        &self,
        table: &TableName,
        key: &PrimaryKey,
        version: Version,
        schema: SchemaFingerprint,
    ) -> Result<Change, LocalWriteError> {
        if !self.is_live() {
            return Err(LocalWriteError::RowMissing);
        }
        Ok(Change {
            table: table.clone(),
            key: key.clone(),
            version,
            causal_length: self.causal_length.next(),
            op: ChangeOp::Delete { base: self.version },
            schema,
        })
    }
}

fn conflict(
    change: &Change,
    write: &CellWrite,
    rule: ConflictRule,
    winner: ConflictSide,
    loser: ConflictSide,
) -> ConflictRecord {
    ConflictRecord {
        table: change.table.clone(),
        key: change.key.clone(),
        column: write.column.clone(),
        rule,
        winner,
        loser,
    }
}

/// Checks the shape of a change before any of it is merged, so a bad change changes nothing.
fn validate(change: &Change, rules: &TableRules) -> Result<(), MergeError> {
    let length = change.causal_length.0;
    match &change.op {
        ChangeOp::Upsert(cells) => {
            if !change.causal_length.is_live() {
                return Err(MergeError::UpsertWithEvenLength(length));
            }
            let mut seen = std::collections::BTreeSet::new();
            for cell in cells {
                if !seen.insert(&cell.column) {
                    return Err(MergeError::DuplicateColumn(cell.column.clone()));
                }
                if rules.kind(&cell.column) == ColumnKind::Counter
                    && cell.value.as_integer().is_none()
                {
                    return Err(MergeError::CounterNotInteger {
                        column: cell.column.clone(),
                        found: cell.value.type_name(),
                    });
                }
            }
        }
        ChangeOp::Delete { .. } => {
            if change.causal_length.is_live() || length == 0 {
                return Err(MergeError::DeleteWithOddLength(length));
            }
        }
    }
    Ok(())
}
