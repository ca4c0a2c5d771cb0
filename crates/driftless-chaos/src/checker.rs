//! The checker: given every replica read from its file after quiescence and every client
//! operation with its outcome, counts what went wrong.
//!
//! - divergent replicas: canonical dumps that differ from the most common one;
//! - phantom values: rows or values no client wrote (a value of a failed write counts too);
//! - counters: initial value plus the acknowledged increments (bounds when outcomes are unknown);
//! - lost acknowledged writes: the last acknowledged write of a node to a cell is not in that
//!   node's change log as one of its own changes (it was never captured);
//! - model mismatches: a replica's cell differs from the winner computed by the reference model
//!   (`driftless_sim::Oracle`) over every node's own captured changes;
//! - duplicate effects: a change logged twice by one replica, or a counter above its bound.

use crate::inspect::{Replica, Rows, dump, integer_key};
use crate::schema::{COUNTER_INITIAL, COUNTER_ROWS, HOT_ITEMS, initial_value, oracle_workload};
use crate::workload::{ClientOp, OpKind, Outcome};
use driftless_core::{Change, ChangeOp, ColumnKind, NodeId, Value};
use driftless_sim::{Oracle, Written};
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// Most problem descriptions kept per history (the counts are exact regardless).
const PROBLEMS_MAX: usize = 30;

/// What the checker found in one history. Every count is zero in a correct run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    pub divergent_replicas: u64,
    pub lost_acked_writes: u64,
    pub phantom_values: u64,
    pub duplicate_effects: u64,
    pub counter_mismatches: u64,
    pub model_mismatches: u64,
    pub dead_letters: u64,
    pub corrupt_replicas: u64,
    pub undecodable_log_entries: u64,
    /// Examples, readable, at most [`PROBLEMS_MAX`].
    pub problems: Vec<String>,
}

impl Verdict {
    pub fn failed(&self) -> bool {
        self.divergent_replicas
            + self.lost_acked_writes
            + self.phantom_values
            + self.duplicate_effects
            + self.counter_mismatches
            + self.model_mismatches
            + self.dead_letters
            + self.corrupt_replicas
            + self.undecodable_log_entries
            > 0
    }

    pub fn problem(&mut self, text: String) {
        if self.problems.len() < PROBLEMS_MAX {
            self.problems.push(text);
        }
    }

    /// One line of counts.
    pub fn counts(&self) -> String {
        format!(
            "divergent={} lost={} phantom={} duplicate={} counter={} model={} dead_letters={} corrupt={} undecodable={}",
            self.divergent_replicas,
            self.lost_acked_writes,
            self.phantom_values,
            self.duplicate_effects,
            self.counter_mismatches,
            self.model_mismatches,
            self.dead_letters,
            self.corrupt_replicas,
            self.undecodable_log_entries
        )
    }
}

fn acknowledged(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Ok | Outcome::Unknown(_))
}

/// Checks the replicas (`replicas[i]` is node `nodes[i]`'s) against the client history.
pub fn check(nodes: &[NodeId], replicas: &[Replica], ops: &[ClientOp]) -> Verdict {
    let mut v = Verdict::default();
    check_divergence(replicas, &mut v);
    check_phantoms(replicas, ops, &mut v);
    check_counters(replicas, ops, &mut v);
    check_captured(replicas, ops, &mut v);
    check_model(nodes, replicas, &mut v);
    for (i, r) in replicas.iter().enumerate() {
        v.duplicate_effects += r.duplicate_log_entries;
        if r.duplicate_log_entries > 0 {
            v.problem(format!(
                "n{i}: {} log entries are byte-identical to earlier ones (a change applied twice)",
                r.duplicate_log_entries
            ));
        }
        v.dead_letters += r.dead_letters;
        if r.dead_letters > 0 {
            v.problem(format!("n{i}: {} dead letters", r.dead_letters));
        }
        if r.integrity != "ok" {
            v.corrupt_replicas += 1;
            v.problem(format!("n{i}: integrity_check says {:?}", r.integrity));
        }
        v.undecodable_log_entries += r.undecodable_log_entries;
    }
    v
}

fn check_divergence(replicas: &[Replica], v: &mut Verdict) {
    let dumps: Vec<String> = replicas.iter().map(dump).collect();
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, d) in dumps.iter().enumerate() {
        groups.entry(d).or_default().push(i);
    }
    let Some(largest) = groups.values().max_by_key(|g| g.len()) else {
        return;
    };
    v.divergent_replicas = (replicas.len() - largest.len()) as u64;
    let reference = largest[0];
    let lines = |d: &str| d.lines().map(str::to_owned).collect::<BTreeSet<String>>();
    let reference_lines = lines(&dumps[reference]);
    for (i, d) in dumps.iter().enumerate() {
        if largest.contains(&i) {
            continue;
        }
        let own = lines(d);
        let only_here: Vec<_> = own.difference(&reference_lines).take(4).collect();
        let only_there: Vec<_> = reference_lines.difference(&own).take(4).collect();
        v.problem(format!(
            "n{i} diverges from n{reference}: only on n{i}: {only_here:?}; only on n{reference}: {only_there:?}"
        ));
    }
}

fn check_phantoms(replicas: &[Replica], ops: &[ClientOp], v: &mut Verdict) {
    let mut ids: HashSet<i64> = (0..HOT_ITEMS).collect();
    let mut values: HashSet<String> = HashSet::new();
    let mut failed_values: HashSet<String> = HashSet::new();
    for id in 0..HOT_ITEMS {
        values.insert(initial_value("a", id));
        values.insert(initial_value("b", id));
    }
    for op in ops.iter().filter(|o| o.table == "items") {
        let written = acknowledged(&op.outcome);
        if written && op.kind == OpKind::ColdInsert {
            ids.insert(op.key);
        }
        for (_, text) in &op.cells {
            if written {
                values.insert(text.clone());
            } else {
                failed_values.insert(text.clone());
            }
        }
    }
    for (i, r) in replicas.iter().enumerate() {
        for (id, cells) in &r.items {
            if !ids.contains(id) {
                v.phantom_values += 1;
                v.problem(format!("n{i}: items({id}) was never inserted by a client"));
            }
            for (column, value) in ["a", "b"].iter().zip(cells) {
                let ok = matches!(value, Value::Text(t) if values.contains(t));
                if !ok {
                    v.phantom_values += 1;
                    let why = match value {
                        Value::Text(t) if failed_values.contains(t) => {
                            " (written by a client whose write failed or matched no row)"
                        }
                        _ => "",
                    };
                    v.problem(format!(
                        "n{i}: items({id}).{column} = {value:?} was written by no client{why}"
                    ));
                }
            }
        }
        for id in r
            .counters
            .keys()
            .filter(|id| !(0..COUNTER_ROWS).contains(*id))
        {
            v.phantom_values += 1;
            v.problem(format!("n{i}: counters({id}) was never inserted"));
        }
    }
}

fn check_counters(replicas: &[Replica], ops: &[ClientOp], v: &mut Verdict) {
    for id in 0..COUNTER_ROWS {
        let mut exact = COUNTER_INITIAL;
        let (mut lo, mut hi) = (0, 0);
        for op in ops
            .iter()
            .filter(|o| o.kind == OpKind::Increment && o.key == id)
        {
            match op.outcome {
                Outcome::Ok => exact += op.delta,
                Outcome::Unknown(_) => {
                    lo += op.delta.min(0);
                    hi += op.delta.max(0);
                }
                _ => {}
            }
        }
        let (lo, hi) = (exact + lo, exact + hi);
        for (i, r) in replicas.iter().enumerate() {
            let value = r.counters.get(&id).and_then(|c| c.first());
            match value.and_then(Value::as_integer) {
                Some(x) if (lo..=hi).contains(&x) => {}
                Some(x) => {
                    v.counter_mismatches += 1;
                    if x > hi {
                        v.duplicate_effects += 1;
                    }
                    v.problem(format!(
                        "n{i}: counters({id}) = {x}, acknowledged increments give {lo}..={hi}"
                    ));
                }
                None => {
                    v.counter_mismatches += 1;
                    v.problem(format!("n{i}: counters({id}) is {value:?}"));
                }
            }
        }
    }
}

/// The last acknowledged write of each node to each `items` cell must be one of that node's
/// own changes in its log.
fn check_captured(replicas: &[Replica], ops: &[ClientOp], v: &mut Verdict) {
    for (i, r) in replicas.iter().enumerate() {
        // (key, column) -> the text that must have been captured; None if the last write was a
        // delete or its outcome is unknown (then nothing is required).
        let mut last: BTreeMap<(i64, &str), Option<&str>> = BTreeMap::new();
        let mut own: Vec<&ClientOp> = ops
            .iter()
            .filter(|o| o.node == i && o.table == "items")
            .collect();
        own.sort_by_key(|o| o.n);
        for op in own {
            match (&op.outcome, op.kind) {
                (Outcome::Ok, OpKind::Delete) => {
                    for column in ["a", "b"] {
                        last.insert((op.key, column), None);
                    }
                }
                (Outcome::Ok, _) => {
                    for (column, text) in &op.cells {
                        last.insert((op.key, column), Some(text));
                    }
                }
                (Outcome::Unknown(_), _) => {
                    for column in ["a", "b"] {
                        last.insert((op.key, column), None);
                    }
                }
                _ => {}
            }
        }
        let captured: HashSet<(i64, &str, &str)> = r
            .local_changes
            .iter()
            .filter(|c| c.table.as_str() == "items")
            .flat_map(|c| {
                let key = integer_key(c);
                c.cells().iter().filter_map(move |cell| match &cell.value {
                    Value::Text(t) => Some((key?, cell.column.as_str(), t.as_str())),
                    _ => None,
                })
            })
            .collect();
        for ((key, column), text) in last {
            if let Some(text) = text
                && !captured.contains(&(key, column, text))
            {
                v.lost_acked_writes += 1;
                v.problem(format!(
                    "n{i}: the acknowledged write items({key}).{column} = {text:?} is not among n{i}'s own changes in its change history"
                ));
            }
        }
    }
}

/// Counter cells carry their origin's running total: the model wants increments.
fn written_with_deltas(changes: Vec<Change>) -> Vec<Written> {
    let workload = oracle_workload();
    let mut ordered: Vec<Change> = changes;
    ordered.sort_by_key(|c| c.version);
    let mut totals: BTreeMap<(String, Vec<u8>, NodeId, u64, String), i64> = BTreeMap::new();
    ordered
        .into_iter()
        .map(|change| {
            let mut counter_deltas = BTreeMap::new();
            if let ChangeOp::Upsert(cells) = &change.op {
                let rules = workload.rules(&change.table);
                for cell in cells {
                    if rules.kind(&cell.column) != ColumnKind::Counter {
                        continue;
                    }
                    let total = cell.value.as_integer().unwrap_or(0);
                    let slot = (
                        change.table.as_str().to_owned(),
                        change.key.as_bytes().to_vec(),
                        change.origin(),
                        change.causal_length.0,
                        cell.column.as_str().to_owned(),
                    );
                    let before = totals.insert(slot, total).unwrap_or(0);
                    counter_deltas.insert(cell.column.clone(), total - before);
                }
            }
            Written {
                change,
                counter_deltas,
            }
        })
        .collect()
}

fn check_model(nodes: &[NodeId], replicas: &[Replica], v: &mut Verdict) {
    let workload = oracle_workload();
    let mut oracle = Oracle::new();
    let all: Vec<Change> = replicas
        .iter()
        .zip(nodes)
        .flat_map(|(r, id)| {
            r.local_changes
                .iter()
                .filter(|c| c.origin() == *id)
                .cloned()
        })
        .collect();
    for written in written_with_deltas(all) {
        oracle.record(written);
    }
    let mut expected: BTreeMap<&str, Rows> = BTreeMap::new();
    for ((table, key), row) in oracle.expected(&workload) {
        let spec = workload.table(&table).expect("known table");
        let Some(id) = (match key.parts().as_slice() {
            [driftless_core::KeyPart::Integer(k)] => Some(*k),
            _ => None,
        }) else {
            continue;
        };
        let values = spec
            .columns
            .iter()
            .map(|(c, _, _)| row.get(c).cloned().unwrap_or(Value::Null))
            .collect();
        let name = if table.as_str() == "items" {
            "items"
        } else {
            "counters"
        };
        expected.entry(name).or_default().insert(id, values);
    }
    for (i, r) in replicas.iter().enumerate() {
        for (name, actual) in [("items", &r.items), ("counters", &r.counters)] {
            let empty = Rows::new();
            let want = expected.get(name).unwrap_or(&empty);
            let keys: BTreeSet<i64> = want.keys().chain(actual.keys()).copied().collect();
            for key in keys {
                let (w, a) = (want.get(&key), actual.get(&key));
                if w == a {
                    continue;
                }
                let differing = match (w, a) {
                    (Some(w), Some(a)) => w.iter().zip(a).filter(|(x, y)| x != y).count() as u64,
                    _ => 1,
                };
                v.model_mismatches += differing;
                v.problem(format!(
                    "n{i}: {name}({key}) is {a:?}, the reference model over all captured changes says {w:?}"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::COUNTER_INITIAL;
    use driftless_core::{
        CausalLength, CellWrite, ColumnName, PrimaryKey, SchemaFingerprint, TableName, Timestamp,
        Version,
    };

    const NODE: NodeId = NodeId::new(7);

    fn text(t: &str) -> Value {
        Value::Text(t.to_owned())
    }

    fn change(table: &str, key: i64, ms: u64, cells: &[(&str, Value)]) -> Change {
        Change {
            table: TableName::new(table).expect("table"),
            key: PrimaryKey::integer(key),
            version: Version::new(Timestamp::new(ms, 0), NODE),
            causal_length: CausalLength(1),
            op: ChangeOp::Upsert(
                cells
                    .iter()
                    .map(|(c, v)| CellWrite {
                        column: ColumnName::new(c).expect("column"),
                        value: v.clone(),
                        base: None,
                    })
                    .collect(),
            ),
            schema: SchemaFingerprint(0),
        }
    }

    fn op(
        n: u64,
        kind: OpKind,
        table: &'static str,
        key: i64,
        cells: &[(&'static str, &str)],
    ) -> ClientOp {
        ClientOp {
            node: 0,
            n,
            at_ms: n,
            kind,
            table,
            key,
            cells: cells.iter().map(|(c, v)| (*c, (*v).to_owned())).collect(),
            delta: if kind == OpKind::Increment { 5 } else { 0 },
            outcome: Outcome::Ok,
        }
    }

    /// One node that inserted the initial rows, updated items(0).a and incremented counter 0,
    /// all captured.
    fn clean() -> (Replica, Vec<ClientOp>) {
        let mut replica = Replica {
            integrity: "ok".into(),
            ..Replica::default()
        };
        for id in 0..HOT_ITEMS {
            let (a, b) = (initial_value("a", id), initial_value("b", id));
            replica
                .local_changes
                .push(change("items", id, 1, &[("a", text(&a)), ("b", text(&b))]));
            replica.items.insert(id, vec![text(&a), text(&b)]);
        }
        for id in 0..COUNTER_ROWS {
            replica.local_changes.push(change(
                "counters",
                id,
                1,
                &[("counter", Value::Integer(COUNTER_INITIAL))],
            ));
            replica
                .counters
                .insert(id, vec![Value::Integer(COUNTER_INITIAL)]);
        }
        replica
            .local_changes
            .push(change("items", 0, 2, &[("a", text("n0:1:a"))]));
        replica
            .items
            .insert(0, vec![text("n0:1:a"), text(&initial_value("b", 0))]);
        replica.local_changes.push(change(
            "counters",
            0,
            3,
            &[("counter", Value::Integer(COUNTER_INITIAL + 5))],
        ));
        replica
            .counters
            .insert(0, vec![Value::Integer(COUNTER_INITIAL + 5)]);
        let ops = vec![
            op(1, OpKind::Update, "items", 0, &[("a", "n0:1:a")]),
            op(2, OpKind::Increment, "counters", 0, &[]),
        ];
        (replica, ops)
    }

    #[test]
    fn a_clean_history_passes() {
        let (replica, ops) = clean();
        let v = check(&[NODE], &[replica], &ops);
        assert!(!v.failed(), "{v:?}");
    }

    #[test]
    fn an_uncaptured_acknowledged_write_is_lost() {
        let (mut replica, ops) = clean();
        replica
            .local_changes
            .retain(|c| c.version.timestamp != Timestamp::new(2, 0));
        let v = check(&[NODE], &[replica], &ops);
        assert_eq!(v.lost_acked_writes, 1, "{v:?}");
        // and the table holds a value the captured changes do not explain
        assert_eq!(v.model_mismatches, 1, "{v:?}");
    }

    #[test]
    fn values_of_failed_writes_are_phantoms_and_extra_increments_are_duplicates() {
        let (mut replica, mut ops) = clean();
        ops[0].outcome = Outcome::Failed("database or disk is full".into());
        replica
            .counters
            .insert(0, vec![Value::Integer(COUNTER_INITIAL + 10)]);
        let v = check(&[NODE], &[replica], &ops);
        assert_eq!(v.phantom_values, 1, "{v:?}");
        assert_eq!(v.counter_mismatches, 1, "{v:?}");
        assert_eq!(v.duplicate_effects, 1, "{v:?}");
    }

    #[test]
    fn replicas_that_differ_are_divergent() {
        let (replica, ops) = clean();
        let mut other = replica.clone();
        other.items.remove(&3);
        let v = check(&[NODE, NodeId::new(8)], &[replica, other], &ops);
        assert_eq!(v.divergent_replicas, 1, "{v:?}");
    }
}
