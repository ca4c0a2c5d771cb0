//! Typed cell values and their total order.
//!
//! The order is SQLite's (NULL < numbers < text < blob, integers and reals compared by numeric
//! value) made total: an integer and a real of equal numeric value order integer first, reals use
//! IEEE total order (so `-0.0 < 0.0` and NaN sorts above every number). A total order is what the
//! `max`/`min` column kinds and deterministic tie-breaks need: every replica must pick the same
//! winner, bit for bit.

use std::cmp::Ordering;
use std::fmt;

/// Longest text or blob value accepted, in bytes. Stores allow more (SQLite 1 GB, PostgreSQL
/// 1 GB); driftless bounds it so one change cannot exhaust a peer's memory. The wire frame limit
/// is derived from it.
pub const VALUE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// One cell value. New variants (PostgreSQL types) will be added; match with a wildcard outside
/// this crate.
#[derive(Clone)]
#[non_exhaustive]
pub enum Value {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Value {
    fn type_rank(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Integer(_) | Value::Real(_) => 1,
            Value::Text(_) => 2,
            Value::Blob(_) => 3,
        }
    }

    /// The name used in error messages and the dead-letter table.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Integer(_) => "integer",
            Value::Real(_) => "real",
            Value::Text(_) => "text",
            Value::Blob(_) => "blob",
        }
    }

    pub fn as_integer(&self) -> Option<i64> {
        match self {
            Value::Integer(v) => Some(*v),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

/// Compares an integer with a real by exact numeric value (no rounding through f64).
fn cmp_integer_real(i: i64, r: f64) -> Ordering {
    if r.is_nan() {
        return if r.is_sign_negative() {
            Ordering::Greater
        } else {
            Ordering::Less
        };
    }
    // i64 fits exactly in i128, and every finite f64 in the i64 range truncates exactly to i128.
    if r >= 9.3e18 {
        return Ordering::Less;
    }
    if r <= -9.3e18 {
        return Ordering::Greater;
    }
    let trunc = r.trunc();
    match (i as i128).cmp(&(trunc as i128)) {
        Ordering::Equal => 0.0f64.partial_cmp(&(r - trunc)).expect("finite"),
        other => other,
    }
}

impl Ord for Value {
    fn cmp(&self, other: &Self) -> Ordering {
        use Value::*;
        match (self, other) {
            (Null, Null) => Ordering::Equal,
            (Integer(a), Integer(b)) => a.cmp(b),
            (Real(a), Real(b)) => a.total_cmp(b),
            (Integer(a), Real(b)) => cmp_integer_real(*a, *b).then(Ordering::Less),
            (Real(a), Integer(b)) => cmp_integer_real(*b, *a).reverse().then(Ordering::Greater),
            (Text(a), Text(b)) => a.cmp(b),
            (Blob(a), Blob(b)) => a.cmp(b),
            _ => self.type_rank().cmp(&other.type_rank()),
        }
    }
}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Equality is bit-for-bit identity (consistent with `Ord`): `Real(0.0) != Real(-0.0)` and
/// `Integer(1) != Real(1.0)`. Replicas must agree on bits, not on numeric closeness.
impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Value {}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("Null"),
            Value::Integer(v) => write!(f, "Integer({v})"),
            Value::Real(v) => write!(f, "Real({v:?})"),
            Value::Text(v) => write!(f, "Text({v:?})"),
            Value::Blob(v) => write!(f, "Blob({} bytes)", v.len()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Integer(v) => write!(f, "{v}"),
            Value::Real(v) => write!(f, "{v:?}"),
            Value::Text(v) => write!(f, "'{}'", v.replace('\'', "''")),
            Value::Blob(v) => {
                f.write_str("x'")?;
                for byte in v {
                    write!(f, "{byte:02x}")?;
                }
                f.write_str("'")
            }
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Integer(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Real(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Blob(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::Integer),
            (-3i64..3).prop_map(Value::Integer),
            any::<f64>().prop_map(Value::Real),
            (-3i64..3).prop_map(|v| Value::Real(v as f64 + 0.5)),
            (-3i64..3).prop_map(|v| Value::Real(v as f64)),
            "[a-c]{0,3}".prop_map(Value::Text),
            proptest::collection::vec(0u8..3, 0..3).prop_map(Value::Blob),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn order_is_total_and_consistent(a in value(), b in value(), c in value()) {
            prop_assert_eq!(a.cmp(&b), b.cmp(&a).reverse());
            prop_assert_eq!(a.cmp(&a), Ordering::Equal);
            if a <= b && b <= c {
                prop_assert!(a <= c);
            }
        }
    }

    #[test]
    fn sqlite_type_order() {
        let ordered = [
            Value::Null,
            Value::Integer(-5),
            Value::Real(-4.5),
            Value::Integer(1),
            Value::Real(1.0),
            Value::Real(1.5),
            Value::Integer(i64::MAX),
            Value::Real(f64::INFINITY),
            Value::Text("a".into()),
            Value::Blob(vec![0]),
        ];
        assert!(ordered.windows(2).all(|w| w[0] < w[1]), "{ordered:?}");
        assert_ne!(Value::Real(0.0), Value::Real(-0.0));
    }
}
