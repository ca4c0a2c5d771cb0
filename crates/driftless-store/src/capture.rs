//! The store-independent part of capture: which change a recorded local write becomes, given the
//! row's merge state and what the table holds now. Every adapter's stamping uses it, so SQLite
//! and PostgreSQL capture the same writes the same way.

use crate::types::TableSchema;
use driftless_core::{Change, ColumnName, LocalWriteError, PrimaryKey, RowState, Value, Version};

/// The operation a capture trigger recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapturedOp {
    Insert,
    Update,
    Delete,
    /// The row may have been deleted without a delete record (SQLite's `INSERT OR REPLACE`
    /// removing a row through a UNIQUE conflict): what the table holds now decides.
    Check,
}

/// What a recorded write turns into.
#[derive(Debug, Clone, PartialEq)]
pub enum Stamp {
    /// Nothing to replicate: a no-op update, a delete of a row already deleted, or a row
    /// written and deleted again before stamping (the delete's own record follows).
    Nothing,
    Delete,
    /// A new life of the row with every column.
    Insert(Vec<(ColumnName, Value)>),
    /// The columns whose values differ from the merge state.
    Update(Vec<(ColumnName, Value)>),
}

/// Decides what a recorded write becomes. `current` is the row's non-key columns as the table
/// holds them now (`None` if the row does not exist). Several writes to a row between two stamps
/// become one change: intermediate values are never replicated.
pub fn plan(op: CapturedOp, state: &RowState, current: Option<&[(ColumnName, Value)]>) -> Stamp {
    match (op, current) {
        (CapturedOp::Delete, _) if state.is_live() => Stamp::Delete,
        (CapturedOp::Delete, _) => Stamp::Nothing,
        (CapturedOp::Check, None) if state.is_live() => Stamp::Delete,
        (_, None) => Stamp::Nothing,
        (_, Some(row)) if !state.is_live() => Stamp::Insert(row.to_vec()),
        (_, Some(row)) => {
            let visible = state.visible().unwrap_or_default();
            let changed: Vec<(ColumnName, Value)> = row
                .iter()
                .filter(|(c, v)| visible.get(c).unwrap_or(&Value::Null) != v)
                .cloned()
                .collect();
            if changed.is_empty() {
                Stamp::Nothing
            } else {
                Stamp::Update(changed)
            }
        }
    }
}

/// Builds the change for a planned stamp with its version (`Stamp::Nothing` has no change).
pub fn build(
    stamp: Stamp,
    state: &RowState,
    schema: &TableSchema,
    key: &PrimaryKey,
    version: Version,
) -> Option<Result<Change, LocalWriteError>> {
    let table = &schema.name;
    Some(match stamp {
        Stamp::Nothing => return None,
        Stamp::Delete => state.local_delete(table, key, version, schema.fingerprint),
        Stamp::Insert(cells) => state.local_insert(
            table,
            key,
            version,
            cells,
            &schema.rules,
            schema.fingerprint,
        ),
        Stamp::Update(cells) => state.local_update(
            table,
            key,
            version,
            cells,
            &schema.rules,
            schema.fingerprint,
        ),
    })
}

/// Whether the table row shows exactly the merge state's visible values (a local write that lost
/// at once, on a `max`/`min`/priority column, makes them differ until the row is set back).
pub fn matches_row(state: &RowState, row: Option<&[(ColumnName, Value)]>) -> bool {
    match (state.visible(), row) {
        (None, None) => true,
        (Some(visible), Some(row)) => row
            .iter()
            .all(|(c, v)| visible.get(c).unwrap_or(&Value::Null) == v),
        _ => false,
    }
}
