//! The worked examples of docs/semantics.md, one test each. If a rule changes, the doc and the
//! test change together.

use driftless_core::{
    ColumnKind, ColumnName, ConflictRule, Effect, NodeId, PrimaryKey, RowState, SchemaFingerprint,
    TableName, TableRules, Timestamp, Value, Version,
};
use std::collections::BTreeMap;

const PHONE: NodeId = NodeId::new(0xA);
const TABLET: NodeId = NodeId::new(0xB);
const HQ: NodeId = NodeId::new(0xC);

fn col(name: &str) -> ColumnName {
    ColumnName::new(name).unwrap()
}
fn at(ms: u64, node: NodeId) -> Version {
    Version::new(Timestamp::new(ms, 0), node)
}
fn table() -> TableName {
    TableName::new("items").unwrap()
}
fn key() -> PrimaryKey {
    PrimaryKey::integer(1)
}
const SCHEMA: SchemaFingerprint = SchemaFingerprint(1);

/// Two replicas of one row, each able to write locally and receive the other's changes.
struct Pair {
    rules: TableRules,
    a: RowState,
    b: RowState,
}

impl Pair {
    fn new(rules: TableRules) -> Self {
        Pair {
            rules,
            a: RowState::new(),
            b: RowState::new(),
        }
    }
    fn visible(state: &RowState) -> Option<BTreeMap<ColumnName, Value>> {
        state.visible()
    }
}

fn row(cells: &[(&str, Value)]) -> Option<BTreeMap<ColumnName, Value>> {
    Some(cells.iter().map(|(c, v)| (col(c), v.clone())).collect())
}

fn insert(
    state: &RowState,
    v: Version,
    cells: &[(&str, Value)],
    rules: &TableRules,
) -> driftless_core::Change {
    state
        .local_insert(
            &table(),
            &key(),
            v,
            cells.iter().map(|(c, v)| (col(c), v.clone())).collect(),
            rules,
            SCHEMA,
        )
        .unwrap()
}
fn update(
    state: &RowState,
    v: Version,
    cells: &[(&str, Value)],
    rules: &TableRules,
) -> driftless_core::Change {
    state
        .local_update(
            &table(),
            &key(),
            v,
            cells.iter().map(|(c, v)| (col(c), v.clone())).collect(),
            rules,
            SCHEMA,
        )
        .unwrap()
}

/// A synced row both devices have: price 10, name "tea".
fn synced_pair(rules: TableRules) -> Pair {
    let mut pair = Pair::new(rules);
    let c = insert(
        &pair.a,
        at(100, PHONE),
        &[("name", "tea".into()), ("price", 10.into())],
        &pair.rules,
    );
    pair.a.apply(&c, &pair.rules).unwrap();
    pair.b.apply(&c, &pair.rules).unwrap();
    pair
}

#[test]
fn concurrent_edits_to_different_columns_both_survive() {
    let mut p = synced_pair(TableRules::new());
    let on_phone = update(&p.a, at(200, PHONE), &[("price", 12.into())], &p.rules);
    let on_tablet = update(
        &p.b,
        at(150, TABLET),
        &[("name", "green tea".into())],
        &p.rules,
    );
    p.a.apply(&on_phone, &p.rules).unwrap();
    p.b.apply(&on_tablet, &p.rules).unwrap();
    let x = p.a.apply(&on_tablet, &p.rules).unwrap();
    let y = p.b.apply(&on_phone, &p.rules).unwrap();
    assert!(x.conflicts.is_empty() && y.conflicts.is_empty());
    let expected = row(&[("name", "green tea".into()), ("price", 12.into())]);
    assert_eq!(Pair::visible(&p.a), expected);
    assert_eq!(p.a, p.b);
}

#[test]
fn concurrent_edits_to_one_cell_later_hlc_wins_and_loser_is_in_the_ledger() {
    let mut p = synced_pair(TableRules::new());
    let on_phone = update(&p.a, at(200, PHONE), &[("price", 12.into())], &p.rules);
    let on_tablet = update(&p.b, at(300, TABLET), &[("price", 11.into())], &p.rules);
    p.a.apply(&on_phone, &p.rules).unwrap();
    p.b.apply(&on_tablet, &p.rules).unwrap();
    let at_phone = p.a.apply(&on_tablet, &p.rules).unwrap();
    let at_tablet = p.b.apply(&on_phone, &p.rules).unwrap();
    assert_eq!(p.a, p.b);
    assert_eq!(p.a.visible().unwrap()[&col("price")], Value::Integer(11));
    for outcome in [&at_phone, &at_tablet] {
        assert_eq!(outcome.conflicts.len(), 1, "{outcome:?}");
        let c = &outcome.conflicts[0];
        assert_eq!(c.rule, ConflictRule::Lww);
        assert_eq!(c.column, col("price"));
        assert_eq!(
            (c.winner.version, c.winner.value.clone()),
            (at(300, TABLET), Some(11.into()))
        );
        assert_eq!(
            (c.loser.version, c.loser.value.clone()),
            (at(200, PHONE), Some(12.into()))
        );
    }
}

#[test]
fn equal_hlc_breaks_the_tie_on_node_id() {
    let mut p = synced_pair(TableRules::new());
    let on_phone = update(&p.a, at(200, PHONE), &[("price", 12.into())], &p.rules);
    let on_tablet = update(&p.b, at(200, TABLET), &[("price", 11.into())], &p.rules);
    for c in [&on_phone, &on_tablet] {
        p.a.apply(c, &p.rules).unwrap();
    }
    for c in [&on_tablet, &on_phone] {
        p.b.apply(c, &p.rules).unwrap();
    }
    assert_eq!(p.a, p.b);
    // TABLET (0xB) > PHONE (0xA)
    assert_eq!(p.a.visible().unwrap()[&col("price")], Value::Integer(11));
}

#[test]
fn a_sequential_overwrite_is_not_a_conflict() {
    let mut p = synced_pair(TableRules::new());
    let first = update(&p.a, at(200, PHONE), &[("price", 12.into())], &p.rules);
    p.a.apply(&first, &p.rules).unwrap();
    p.b.apply(&first, &p.rules).unwrap();
    // the tablet saw 12 and then wrote 13: it knew what it replaced
    let second = update(&p.b, at(300, TABLET), &[("price", 13.into())], &p.rules);
    p.b.apply(&second, &p.rules).unwrap();
    assert!(p.a.apply(&second, &p.rules).unwrap().conflicts.is_empty());
    // and the old one arriving late (another path) is superseded quietly
    let late = p.b.apply(&first, &p.rules).unwrap();
    assert_eq!(late.effect, Effect::Superseded);
    assert!(late.conflicts.is_empty());
}

#[test]
fn causality_a_write_made_after_seeing_another_wins_even_with_a_slow_wall_clock() {
    use driftless_core::hlc::{Hlc, ManualClock};
    use std::time::Duration;
    let mut p = synced_pair(TableRules::new());
    // the phone's wall clock says 5000, the tablet's only 1000 (4 s behind)
    let mut phone = Hlc::new(ManualClock::new(5_000), Duration::from_secs(10));
    let mut tablet = Hlc::new(ManualClock::new(1_000), Duration::from_secs(10));
    let v1 = Version::new(phone.now().unwrap(), PHONE);
    let first = update(&p.a, v1, &[("price", 12.into())], &p.rules);
    p.a.apply(&first, &p.rules).unwrap();
    // the tablet receives it: its HLC moves past the phone's write
    tablet.update(first.version.timestamp).unwrap();
    p.b.apply(&first, &p.rules).unwrap();
    let v2 = Version::new(tablet.now().unwrap(), TABLET);
    assert!(v2 > v1);
    let second = update(&p.b, v2, &[("price", 13.into())], &p.rules);
    p.b.apply(&second, &p.rules).unwrap();
    p.a.apply(&second, &p.rules).unwrap();
    assert_eq!(p.a.visible().unwrap()[&col("price")], Value::Integer(13));
    assert_eq!(p.a, p.b);
}

#[test]
fn delete_wins_over_a_concurrent_update() {
    let mut p = synced_pair(TableRules::new());
    let delete =
        p.a.local_delete(&table(), &key(), at(200, PHONE), SCHEMA)
            .unwrap();
    let edit = update(&p.b, at(300, TABLET), &[("price", 9.into())], &p.rules);
    p.a.apply(&delete, &p.rules).unwrap();
    p.b.apply(&edit, &p.rules).unwrap();
    let at_phone = p.a.apply(&edit, &p.rules).unwrap();
    let at_tablet = p.b.apply(&delete, &p.rules).unwrap();
    assert_eq!(p.a, p.b);
    assert_eq!(
        p.a.visible(),
        None,
        "the delete wins although the update has a later HLC"
    );
    for outcome in [&at_phone, &at_tablet] {
        assert_eq!(outcome.conflicts.len(), 1, "{outcome:?}");
        assert_eq!(outcome.conflicts[0].rule, ConflictRule::DeleteWins);
        assert_eq!(outcome.conflicts[0].loser.value, Some(9.into()));
        assert_eq!(outcome.conflicts[0].winner.value, None);
    }
}

#[test]
fn an_insert_after_seeing_the_delete_brings_the_row_back_without_its_old_values() {
    let mut p = synced_pair(TableRules::new());
    let delete =
        p.a.local_delete(&table(), &key(), at(200, PHONE), SCHEMA)
            .unwrap();
    p.a.apply(&delete, &p.rules).unwrap();
    p.b.apply(&delete, &p.rules).unwrap();
    let reinsert = insert(
        &p.b,
        at(300, TABLET),
        &[("name", "chai".into()), ("price", 4.into())],
        &p.rules,
    );
    p.b.apply(&reinsert, &p.rules).unwrap();
    // an update of the OLD life, made at the phone before it saw the delete, arrives late
    let stale = {
        let old = synced_pair(TableRules::new()).a;
        update(&old, at(400, PHONE), &[("price", 99.into())], &p.rules)
    };
    p.a.apply(&reinsert, &p.rules).unwrap();
    p.a.apply(&stale, &p.rules).unwrap();
    p.b.apply(&stale, &p.rules).unwrap();
    assert_eq!(p.a, p.b);
    assert_eq!(
        p.a.visible(),
        row(&[("name", "chai".into()), ("price", 4.into())])
    );
    assert_eq!(p.a.causal_length().0, 3);
}

#[test]
fn concurrent_counter_increments_add_up() {
    let rules = TableRules::new().with_column(col("stock"), ColumnKind::Counter);
    let mut p = Pair::new(rules);
    let c = insert(&p.a, at(100, PHONE), &[("stock", 10.into())], &p.rules);
    p.a.apply(&c, &p.rules).unwrap();
    p.b.apply(&c, &p.rules).unwrap();
    // the phone sells 3 (sets 7), the tablet sells 2 (sets 8), concurrently
    let sale_a = update(&p.a, at(200, PHONE), &[("stock", 7.into())], &p.rules);
    let sale_b = update(&p.b, at(200, TABLET), &[("stock", 8.into())], &p.rules);
    p.a.apply(&sale_a, &p.rules).unwrap();
    p.b.apply(&sale_b, &p.rules).unwrap();
    assert!(p.a.apply(&sale_b, &p.rules).unwrap().conflicts.is_empty());
    p.b.apply(&sale_a, &p.rules).unwrap();
    // applying a counter change twice changes nothing
    assert_eq!(
        p.b.apply(&sale_a, &p.rules).unwrap().effect,
        Effect::Duplicate
    );
    assert_eq!(p.a, p.b);
    assert_eq!(p.a.visible(), row(&[("stock", 5.into())]));
}

#[test]
fn max_keeps_the_high_water_mark_and_min_the_low_one() {
    let rules = TableRules::new()
        .with_column(col("best"), ColumnKind::Max)
        .with_column(col("first_seen"), ColumnKind::Min);
    let mut p = Pair::new(rules);
    let c = insert(
        &p.a,
        at(100, PHONE),
        &[("best", 50.into()), ("first_seen", 900.into())],
        &p.rules,
    );
    p.a.apply(&c, &p.rules).unwrap();
    p.b.apply(&c, &p.rules).unwrap();
    let on_phone = update(
        &p.a,
        at(300, PHONE),
        &[("best", 70.into()), ("first_seen", 850.into())],
        &p.rules,
    );
    let on_tablet = update(
        &p.b,
        at(200, TABLET),
        &[("best", 80.into()), ("first_seen", 800.into())],
        &p.rules,
    );
    p.a.apply(&on_phone, &p.rules).unwrap();
    p.b.apply(&on_tablet, &p.rules).unwrap();
    let x = p.a.apply(&on_tablet, &p.rules).unwrap();
    p.b.apply(&on_phone, &p.rules).unwrap();
    assert_eq!(p.a, p.b);
    assert_eq!(
        p.a.visible(),
        row(&[("best", 80.into()), ("first_seen", 800.into())])
    );
    let rules: Vec<_> = x.conflicts.iter().map(|c| c.rule).collect();
    assert_eq!(rules, vec![ConflictRule::Max, ConflictRule::Min]);
}

#[test]
fn priority_the_authoritative_node_wins_even_when_older() {
    let rules = TableRules::new().with_priority([HQ]);
    let mut hq = RowState::new();
    let mut edge = RowState::new();
    let c = insert(&hq, at(100, HQ), &[("enabled", 1.into())], &rules);
    hq.apply(&c, &rules).unwrap();
    edge.apply(&c, &rules).unwrap();
    // the edge writes later (HLC 500) than the authority (HLC 200), concurrently
    let from_edge = update(&edge, at(500, PHONE), &[("enabled", 0.into())], &rules);
    let from_hq = update(&hq, at(200, HQ), &[("enabled", 2.into())], &rules);
    // the edge's own write loses at once: the cell was last written by an authority
    let local = edge.apply(&from_edge, &rules).unwrap();
    assert_eq!(local.conflicts[0].rule, ConflictRule::Priority);
    assert_eq!(edge.visible(), row(&[("enabled", 1.into())]));
    hq.apply(&from_hq, &rules).unwrap();
    edge.apply(&from_hq, &rules).unwrap();
    let at_hq = hq.apply(&from_edge, &rules).unwrap();
    assert_eq!(hq, edge);
    assert_eq!(hq.visible(), row(&[("enabled", 2.into())]));
    assert_eq!(at_hq.conflicts[0].rule, ConflictRule::Priority);
    assert_eq!(at_hq.conflicts[0].loser.version, at(500, PHONE));
    // without an authority's value in the cell, ordinary LWW applies between other nodes
    let rules_b = TableRules::new().with_priority([HQ]);
    let mut plain = RowState::new();
    let c = insert(&plain, at(100, PHONE), &[("enabled", 1.into())], &rules_b);
    plain.apply(&c, &rules_b).unwrap();
    let later = update(&plain, at(600, TABLET), &[("enabled", 5.into())], &rules_b);
    plain.apply(&later, &rules_b).unwrap();
    assert_eq!(plain.visible(), row(&[("enabled", 5.into())]));
}

#[test]
fn malformed_changes_are_refused_whole() {
    let rules = TableRules::new().with_column(col("stock"), ColumnKind::Counter);
    let state = RowState::new();
    let mut c = insert(&state, at(100, PHONE), &[("stock", 1.into())], &rules);
    if let driftless_core::ChangeOp::Upsert(cells) = &mut c.op {
        cells[0].value = Value::Text("many".into());
    }
    let mut target = RowState::new();
    assert!(target.apply(&c, &rules).is_err());
    assert_eq!(
        target,
        RowState::new(),
        "nothing of a refused change is applied"
    );
    let mut even = insert(&state, at(100, PHONE), &[("x", 1.into())], &rules);
    even.causal_length.0 = 2;
    assert!(target.apply(&even, &rules).is_err());
}
