//! Algebraic properties of the merge: applying changes is a join (idempotent, commutative,
//! associative), state merge agrees with change application, and the codec round-trips.
//! Changes here are arbitrary valid changes to one row, not a coherent history: the join must
//! hold even for inputs no honest writer would produce.

use driftless_core::codec::{decode_change, decode_row_state, encode_change, encode_row_state};
use driftless_core::{
    CausalLength, CellWrite, Change, ChangeOp, ColumnKind, ColumnName, NodeId, PrimaryKey,
    RowState, SchemaFingerprint, TableName, TableRules, Timestamp, Value, Version,
};
use proptest::prelude::*;

fn table() -> TableName {
    TableName::new("t").unwrap()
}
fn key() -> PrimaryKey {
    PrimaryKey::integer(7)
}
fn col(name: &str) -> ColumnName {
    ColumnName::new(name).unwrap()
}
fn rules() -> TableRules {
    TableRules::new()
        .with_column(col("c"), ColumnKind::Counter)
        .with_column(col("hi"), ColumnKind::Max)
        .with_column(col("lo"), ColumnKind::Min)
        .with_priority([NodeId::new(2)])
}

fn version() -> impl Strategy<Value = Version> {
    (0u64..4, 0u64..2, 0u128..3)
        .prop_map(|(ms, l, n)| Version::new(Timestamp::new(ms, l), NodeId::new(n)))
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        (-2i64..3).prop_map(Value::Integer),
        (-2i64..2).prop_map(|v| Value::Real(v as f64 / 2.0)),
        "[ab]{0,2}".prop_map(Value::Text),
        proptest::collection::vec(0u8..2, 0..2).prop_map(Value::Blob),
    ]
}

fn cell() -> impl Strategy<Value = CellWrite> {
    (
        prop_oneof![Just("a"), Just("b"), Just("c"), Just("hi"), Just("lo")],
        value(),
        -3i64..5,
        proptest::option::of(version()),
    )
        .prop_map(|(name, v, n, base)| CellWrite {
            column: col(name),
            value: if name == "c" { Value::Integer(n) } else { v },
            base,
        })
}

fn change() -> impl Strategy<Value = Change> {
    (
        1u64..5,
        version(),
        proptest::collection::vec(cell(), 0..4),
        proptest::option::of(version()),
    )
        .prop_map(|(length, version, mut cells, base)| {
            cells.sort_by(|a, b| a.column.cmp(&b.column));
            cells.dedup_by(|a, b| a.column == b.column);
            let op = if length % 2 == 1 {
                ChangeOp::Upsert(cells)
            } else {
                ChangeOp::Delete { base }
            };
            Change {
                table: table(),
                key: key(),
                version,
                causal_length: CausalLength(length),
                op,
                schema: SchemaFingerprint(3),
            }
        })
}

fn fold(changes: &[Change]) -> RowState {
    let mut state = RowState::new();
    for c in changes {
        state.apply(c, &rules()).expect("valid change");
    }
    state
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn order_does_not_matter(changes in proptest::collection::vec(change(), 0..8), seed in any::<u64>()) {
        let mut shuffled = changes.clone();
        // deterministic permutation from the seed
        let mut s = seed;
        for i in (1..shuffled.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (s >> 33) as usize % (i + 1));
        }
        prop_assert_eq!(fold(&changes), fold(&shuffled));
    }

    #[test]
    fn applying_twice_is_applying_once(changes in proptest::collection::vec(change(), 0..8)) {
        let once = fold(&changes);
        let twice: Vec<Change> = changes.iter().chain(changes.iter()).cloned().collect();
        prop_assert_eq!(fold(&twice), once.clone());
        let mut again = once.clone();
        for c in &changes {
            prop_assert_ne!(again.apply(c, &rules()).unwrap().effect, driftless_core::Effect::Applied);
        }
        prop_assert_eq!(again, once);
    }

    #[test]
    fn state_merge_is_a_join(
        a in proptest::collection::vec(change(), 0..5),
        b in proptest::collection::vec(change(), 0..5),
        c in proptest::collection::vec(change(), 0..5),
    ) {
        let (sa, sb, sc) = (fold(&a), fold(&b), fold(&c));
        let merge = |x: &RowState, y: &RowState| {
            let mut m = x.clone();
            m.merge(y, &table(), &key(), &rules()).unwrap();
            m
        };
        // merge(a, a) = a
        prop_assert_eq!(merge(&sa, &sa), sa.clone());
        // merge(a, b) = merge(b, a)
        prop_assert_eq!(merge(&sa, &sb), merge(&sb, &sa));
        // merge(merge(a, b), c) = merge(a, merge(b, c))
        prop_assert_eq!(merge(&merge(&sa, &sb), &sc), merge(&sa, &merge(&sb, &sc)));
        // merging states equals applying all their changes
        let all: Vec<Change> = a.iter().chain(&b).cloned().collect();
        prop_assert_eq!(merge(&sa, &sb), fold(&all));
    }

    #[test]
    fn to_changes_rebuilds_the_state(changes in proptest::collection::vec(change(), 0..8)) {
        let state = fold(&changes);
        let rebuilt = fold(&state.to_changes(&table(), &key(), SchemaFingerprint(3)));
        prop_assert_eq!(rebuilt, state);
    }

    #[test]
    fn codec_round_trips(changes in proptest::collection::vec(change(), 0..8)) {
        for c in &changes {
            prop_assert_eq!(&decode_change(&encode_change(c)).unwrap(), c);
        }
        let state = fold(&changes);
        prop_assert_eq!(decode_row_state(&encode_row_state(&state)).unwrap(), state);
    }

    #[test]
    fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
        let _ = decode_change(&bytes);
        let _ = decode_row_state(&bytes);
    }
}

#[test]
fn a_forged_count_does_not_allocate() {
    // A change header followed by an upsert claiming 2000 cells but carrying none.
    let c = Change {
        table: table(),
        key: key(),
        version: Version::default(),
        causal_length: CausalLength(1),
        op: ChangeOp::Upsert(vec![]),
        schema: SchemaFingerprint(0),
    };
    let mut bytes = encode_change(&c);
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&2000u32.to_be_bytes());
    let err = decode_change(&bytes).unwrap_err();
    assert!(err.reason.contains("larger than the bytes left"), "{err}");
    bytes[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(
        decode_change(&bytes)
            .unwrap_err()
            .reason
            .contains("exceeds the limit")
    );
}
