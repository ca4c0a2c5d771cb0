//! The store-independent part of capture: which change a recorded local write becomes, given the
//! row's merge state and what the table holds now. Every adapter's stamping uses it, so SQLite
//! and PostgreSQL capture the same writes the same way.

use crate::types::{StoreError, TableSchema};
use driftless_core::{
    Change, ClockError, ColumnName, ConflictRecord, LocalWriteError, PrimaryKey, RowState, Value,
    Version,
};

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

/// What the capture records of one row between two stamps add up to, in storage format 2
/// (the triggers record which columns an update changed, because no copy of the old values is
/// kept to compare with).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recorded {
    /// An insert was recorded (or a record whose column mask cannot be trusted): every column
    /// counts as written. An `INSERT OR REPLACE` of an existing row is such an insert.
    pub all_columns: bool,
    /// A delete was recorded (the row may have been inserted again after it).
    pub deleted: bool,
    /// Union of the updates' changed-column masks (bit per column id, see the adapter).
    pub mask: u64,
    /// Some records were made by triggers installed before the table gained columns: their
    /// masks cover the older columns only, so a column with no cell in the row's state and a
    /// value that is not NULL counts as changed too.
    pub new_columns: bool,
}

impl Recorded {
    /// Adds one record: `op`, and for an update its mask (`None`: not trusted, or not an
    /// update).
    pub fn add(&mut self, op: CapturedOp, mask: Option<u64>) {
        match op {
            CapturedOp::Insert => self.all_columns = true,
            CapturedOp::Delete => self.deleted = true,
            CapturedOp::Update => match mask {
                Some(m) => self.mask |= m,
                None => self.all_columns = true,
            },
            CapturedOp::Check => {}
        }
    }
}

/// Decides what the records of a row become, given its merge state and what the table holds
/// now (`None`: the row is gone). `bit` maps a column to its mask bit. Several writes between
/// two stamps become at most one change per life: intermediate values are never replicated.
pub fn plan_recorded(
    recorded: &Recorded,
    state: &RowState,
    current: Option<&[(ColumnName, Value)]>,
    bit: impl Fn(&ColumnName) -> Option<u32>,
) -> Vec<Stamp> {
    match current {
        None if state.is_live() => vec![Stamp::Delete],
        None => Vec::new(),
        Some(row) if !state.is_live() => vec![Stamp::Insert(row.to_vec())],
        // deleted and written again: a new life of the row
        Some(row) if recorded.deleted => vec![Stamp::Delete, Stamp::Insert(row.to_vec())],
        Some(row) => {
            let changed: Vec<(ColumnName, Value)> = row
                .iter()
                .filter(|(c, v)| {
                    recorded.all_columns
                        || bit(c).is_some_and(|b| recorded.mask & (1 << b) != 0)
                        || (recorded.new_columns && !v.is_null() && !state.cells().contains_key(c))
                })
                .cloned()
                .collect();
            if changed.is_empty() {
                Vec::new()
            } else {
                vec![Stamp::Update(changed)]
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

/// One planned stamp, made: the change and the conflicts merging it recorded, or why the write
/// is refused (the adapter dead-letters it with this reason).
#[derive(Debug)]
pub enum Stamped {
    Made(Change, Vec<ConflictRecord>),
    Refused(LocalWriteError),
}

/// Makes the planned stamps of one row in order, each with a fresh version from `version`, and
/// merges each into `state` (so a second stamp, the insert after a delete, builds on the
/// first). Errors: the clock, or a change of our own that the merge refuses (a corrupt state).
pub fn stamp_all(
    stamps: Vec<Stamp>,
    state: &mut RowState,
    schema: &TableSchema,
    key: &PrimaryKey,
    mut version: impl FnMut() -> Result<Version, ClockError>,
) -> Result<Vec<Stamped>, StoreError> {
    let mut out = Vec::with_capacity(stamps.len());
    for stamp in stamps {
        let change = match build(stamp, state, schema, key, version()?) {
            None => continue,
            Some(Ok(change)) => change,
            Some(Err(reason)) => {
                out.push(Stamped::Refused(reason));
                continue;
            }
        };
        let outcome = state
            .apply(&change, &schema.rules)
            .map_err(|e| StoreError::Corrupt(format!("own change refused by merge: {e}")))?;
        out.push(Stamped::Made(change, outcome.conflicts));
    }
    Ok(out)
}

/// Whether the table row shows exactly the merge state's visible values (a local write that lost
/// at once, on a `max`/`min`/priority column, makes them differ until the row is set back).
pub fn matches_row(state: &RowState, row: Option<&[(ColumnName, Value)]>) -> bool {
    matches_row_by(state, row, |table, held| table == held)
}

/// [`matches_row`] with the adapter's comparison: `shows(table value, state value)` says
/// whether the table shows the state's value (a store may hold some values in another form).
pub fn matches_row_by(
    state: &RowState,
    row: Option<&[(ColumnName, Value)]>,
    shows: impl Fn(&Value, &Value) -> bool,
) -> bool {
    match (state.visible(), row) {
        (None, None) => true,
        (Some(visible), Some(row)) => row
            .iter()
            .all(|(c, v)| shows(v, visible.get(c).unwrap_or(&Value::Null))),
        _ => false,
    }
}

/// One cell where a table disagrees with its row's merge state: the state's value and the
/// table's (`None` where the row is missing on that side).
pub type DriftCell = (ColumnName, Option<Value>, Option<Value>);

/// How a table row differs from what its merge state shows (the local check's rule, see
/// docs/reconciliation.md): `None` when they agree, otherwise the differing cells (empty when
/// only the row's existence differs and it has no value columns). `same(i, table, state)` says
/// whether the table's value of column `i` shows the state's value; an adapter whose column
/// types have several spellings of one value (PostgreSQL) compares its own way.
pub fn drift<E>(
    visible: Option<&std::collections::BTreeMap<ColumnName, Value>>,
    row: Option<&[(ColumnName, Value)]>,
    mut same: impl FnMut(usize, &Value, &Value) -> Result<bool, E>,
) -> Result<Option<Vec<DriftCell>>, E> {
    let differs: Vec<DriftCell> = match (visible, row) {
        (None, None) => return Ok(None),
        (Some(v), Some(r)) => {
            let mut out = Vec::new();
            for (i, (column, value)) in r.iter().enumerate() {
                let held = v.get(column).unwrap_or(&Value::Null);
                if !same(i, value, held)? {
                    out.push((column.clone(), v.get(column).cloned(), Some(value.clone())));
                }
            }
            if out.is_empty() {
                return Ok(None);
            }
            out
        }
        (Some(v), None) => v
            .iter()
            .map(|(c, value)| (c.clone(), Some(value.clone()), None))
            .collect(),
        (None, Some(r)) => r
            .iter()
            .map(|(c, value)| (c.clone(), None, Some(value.clone())))
            .collect(),
    };
    Ok(Some(differs))
}

/// The conflict-ledger entries of restoring a drifted row from its merge state: rule `drift`,
/// the state's value wins, the table's loses, both under the state's version.
pub fn drift_conflicts(
    table: &driftless_core::TableName,
    key: &PrimaryKey,
    version: Version,
    cells: Vec<DriftCell>,
) -> Vec<driftless_core::ConflictRecord> {
    cells
        .into_iter()
        .map(|(column, winner, loser)| driftless_core::ConflictRecord {
            table: table.clone(),
            key: key.clone(),
            column,
            rule: driftless_core::ConflictRule::Drift,
            winner: driftless_core::ConflictSide {
                version,
                value: winner,
            },
            loser: driftless_core::ConflictSide {
                version,
                value: loser,
            },
        })
        .collect()
}

/// The local check walks a table in chunks of the user table's keys (in key byte order). A
/// chunk that came back full ends at its last key (more may follow); a short one runs to the end
/// of the table. Returns where the next chunk starts (`None`: the table is done).
pub fn chunk_end(user_keys: &[PrimaryKey], full: bool) -> Option<PrimaryKey> {
    if full {
        user_keys.last().cloned()
    } else {
        None
    }
}

/// The keys a chunk checks: its user-table keys and every merge state's key in the same range
/// (a row deleted behind driftless's back has a state and no row), sorted, each once.
pub fn chunk_keys(user_keys: Vec<PrimaryKey>, state_keys: Vec<PrimaryKey>) -> Vec<PrimaryKey> {
    let mut keys = user_keys;
    keys.extend(state_keys);
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn col(name: &str) -> ColumnName {
        ColumnName::new(name).unwrap()
    }

    #[test]
    fn drift_names_each_differing_cell_and_a_row_present_on_one_side_only() {
        let exact = |_: usize, a: &Value, b: &Value| Ok::<_, ()>(a == b);
        let state: BTreeMap<ColumnName, Value> = [
            (col("a"), Value::Integer(1)),
            (col("b"), Value::Text("x".into())),
        ]
        .into();
        let same_row = vec![
            (col("a"), Value::Integer(1)),
            (col("b"), Value::Text("x".into())),
        ];
        assert_eq!(drift(Some(&state), Some(&same_row), exact), Ok(None));
        assert_eq!(drift(None, None, exact), Ok(None));
        let edited = vec![
            (col("a"), Value::Integer(2)),
            (col("b"), Value::Text("x".into())),
        ];
        assert_eq!(
            drift(Some(&state), Some(&edited), exact),
            Ok(Some(vec![(
                col("a"),
                Some(Value::Integer(1)),
                Some(Value::Integer(2))
            )]))
        );
        // deleted behind our back: every state value is a differing cell
        assert_eq!(drift(Some(&state), None, exact).unwrap().unwrap().len(), 2);
        // inserted behind our back; and a key-only row (no value columns) still counts
        assert_eq!(drift(None, Some(&edited), exact).unwrap().unwrap().len(), 2);
        assert_eq!(
            drift(Some(&BTreeMap::new()), None, exact),
            Ok(Some(Vec::new()))
        );
        // the adapter's comparison decides (e.g. two spellings of one value)
        let lenient = |_: usize, _: &Value, _: &Value| Ok::<_, ()>(true);
        assert_eq!(drift(Some(&state), Some(&edited), lenient), Ok(None));
    }

    #[test]
    fn recorded_writes_become_one_change_per_life_with_the_masked_columns() {
        let rules = driftless_core::TableRules::new();
        let table = driftless_core::TableName::new("t").unwrap();
        let key = PrimaryKey::integer(1);
        let v = |t| {
            Version::new(
                driftless_core::Timestamp::new(t, 0),
                driftless_core::NodeId::new(1),
            )
        };
        let row = vec![(col("a"), Value::Integer(1)), (col("b"), Value::Integer(2))];
        let mut live = RowState::new();
        let insert = live
            .local_insert(&table, &key, v(1), row.clone(), &rules, Default::default())
            .unwrap();
        live.apply(&insert, &rules).unwrap();
        let bit = |c: &ColumnName| Some(if c.as_str() == "a" { 0 } else { 1 });
        let mut r = Recorded::default();
        r.add(CapturedOp::Update, Some(0b10));
        assert_eq!(
            plan_recorded(&r, &live, Some(&row), bit),
            vec![Stamp::Update(vec![(col("b"), Value::Integer(2))])]
        );
        // a no-op update, and a check of a row that is still there: nothing
        assert!(plan_recorded(&Recorded::default(), &live, Some(&row), bit).is_empty());
        // a mask made before column c was added: c counts when it has a value and no cell
        let mut r = Recorded::default();
        r.add(CapturedOp::Update, Some(0b01));
        r.new_columns = true;
        let wider = vec![
            (col("a"), Value::Integer(1)),
            (col("b"), Value::Integer(2)),
            (col("c"), Value::Integer(3)),
        ];
        assert_eq!(
            plan_recorded(&r, &live, Some(&wider), bit),
            vec![Stamp::Update(vec![
                (col("a"), Value::Integer(1)),
                (col("c"), Value::Integer(3))
            ])]
        );
        // an untrusted mask or an insert over a live row: every column
        let mut r = Recorded::default();
        r.add(CapturedOp::Update, None);
        assert_eq!(
            plan_recorded(&r, &live, Some(&row), bit),
            vec![Stamp::Update(row.clone())]
        );
        // deleted, then inserted again: a new life
        let mut r = Recorded::default();
        r.add(CapturedOp::Delete, None);
        r.add(CapturedOp::Insert, None);
        assert_eq!(
            plan_recorded(&r, &live, Some(&row), bit),
            vec![Stamp::Delete, Stamp::Insert(row.clone())]
        );
        // gone now: a delete if it existed, else nothing; new: an insert
        assert_eq!(plan_recorded(&r, &live, None, bit), vec![Stamp::Delete]);
        assert!(plan_recorded(&r, &RowState::new(), None, bit).is_empty());
        assert_eq!(
            plan_recorded(&Recorded::default(), &RowState::new(), Some(&row), bit),
            vec![Stamp::Insert(row)]
        );
    }

    #[test]
    fn a_chunk_ends_at_its_last_key_only_when_full_and_checks_each_key_once() {
        let k = PrimaryKey::integer;
        assert_eq!(chunk_end(&[k(1), k(5)], true), Some(k(5)));
        assert_eq!(chunk_end(&[k(1), k(5)], false), None);
        assert_eq!(chunk_end(&[], true), None);
        assert_eq!(
            chunk_keys(vec![k(1), k(5)], vec![k(3), k(5), k(1)]),
            vec![k(1), k(3), k(5)]
        );
    }
}
