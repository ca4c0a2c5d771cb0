//! The mapping between PostgreSQL column types and driftless values (`Null`, `Integer`, `Real`,
//! `Text`, `Blob`), in both directions, and the wire types values travel in between.
//!
//! | PostgreSQL | driftless value | text form |
//! |---|---|---|
//! | `smallint`, `integer`, `bigint` | `Integer` | |
//! | `boolean` | `Integer` 0 / 1 | |
//! | `real`, `double precision` | `Real` | |
//! | `numeric` | `Text` | the exact decimal as PostgreSQL prints it (`12.50`, `NaN`) |
//! | `text`, `varchar`, `char(n)` | `Text` | `char(n)` without its padding |
//! | `bytea` | `Blob` | |
//! | `date` | `Text` | `2024-01-31` |
//! | `timestamp` | `Text` | `2024-01-31 13:45:00.25` (SQLite's `datetime()` form) |
//! | `timestamptz` | `Text` | the UTC instant, `2024-01-31 13:45:00.25+00:00` |
//! | `uuid` | `Text` | canonical lowercase, `a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11` |
//! | `json`, `jsonb` | `Text` | the document as PostgreSQL prints it |
//!
//! Domains over these types map like their base type. Any other type is refused when the store
//! opens, naming table, column and type. Nothing here loses information: a value whose type
//! cannot hold it (text with a NUL byte, an integer in a `uuid` column, ...) is refused with a
//! reason (the change becomes a dead letter) instead of being converted approximately.
//!
//! Reads use a fixed SQL expression per type (so the text forms never depend on the session's
//! `DateStyle` or `TimeZone`, which the store pins anyway); writes bind one of five wire types
//! (`int8`, `float8`, `bool`, `text`, `bytea`) and cast them to the column's type in SQL.

use driftless_core::{KeyPart, Value};
use postgres::types::ToSql;

/// PostgreSQL's built-in type oids (stable across versions).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// The supported PostgreSQL column types, by how driftless maps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgKind {
    /// `smallint`, `integer`, `bigint`
    Int,
    Bool,
    Float4,
    Float8,
    Numeric,
    /// `text`, `varchar`
    Text,
    /// `char(n)`
    Bpchar,
    Bytea,
    Date,
    Timestamp,
    Timestamptz,
    Uuid,
    Json,
    Jsonb,
}

/// The types values travel in between driftless and PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Int,
    Float,
    Bool,
    Text,
    Bytes,
}

impl Wire {
    /// The SQL array type of a parameter carrying a column of this wire type.
    pub fn array_type(self) -> &'static str {
        match self {
            Wire::Int => "pg_catalog.int8[]",
            Wire::Float => "pg_catalog.float8[]",
            Wire::Bool => "pg_catalog.bool[]",
            Wire::Text => "pg_catalog.text[]",
            Wire::Bytes => "pg_catalog.bytea[]",
        }
    }
}

/// The supported types, for error messages.
pub const SUPPORTED_TYPES: &str = "smallint, integer, bigint, boolean, real, double precision, \
    numeric, text, varchar, char(n), bytea, date, timestamp, timestamptz, uuid, json, jsonb \
    (and domains over them)";

impl PgKind {
    /// The kind of a base (non-domain) type, `None` if driftless cannot sync it.
    pub fn from_base_oid(oid: u32) -> Option<PgKind> {
        Some(match oid {
            oid::INT2 | oid::INT4 | oid::INT8 => PgKind::Int,
            oid::BOOL => PgKind::Bool,
            oid::FLOAT4 => PgKind::Float4,
            oid::FLOAT8 => PgKind::Float8,
            oid::NUMERIC => PgKind::Numeric,
            oid::TEXT | oid::VARCHAR => PgKind::Text,
            oid::BPCHAR => PgKind::Bpchar,
            oid::BYTEA => PgKind::Bytea,
            oid::DATE => PgKind::Date,
            oid::TIMESTAMP => PgKind::Timestamp,
            oid::TIMESTAMPTZ => PgKind::Timestamptz,
            oid::UUID => PgKind::Uuid,
            oid::JSON => PgKind::Json,
            oid::JSONB => PgKind::Jsonb,
            _ => return None,
        })
    }

    /// The wire type a value of this column is read in.
    pub fn read_wire(self) -> Wire {
        match self {
            PgKind::Int | PgKind::Bool => Wire::Int,
            PgKind::Float4 | PgKind::Float8 => Wire::Float,
            PgKind::Bytea => Wire::Bytes,
            _ => Wire::Text,
        }
    }

    /// The wire type a value for this column is bound in.
    pub fn write_wire(self) -> Wire {
        match self {
            PgKind::Bool => Wire::Bool,
            other => other.read_wire(),
        }
    }

    /// The SQL expression reading `column` (already quoted/qualified) in its wire type and
    /// canonical text form.
    pub fn read_expr(self, column: &str) -> String {
        match self {
            PgKind::Int => format!("({column})::pg_catalog.int8"),
            PgKind::Bool => format!("({column})::pg_catalog.int4::pg_catalog.int8"),
            PgKind::Float4 | PgKind::Float8 => format!("({column})::pg_catalog.float8"),
            PgKind::Bytea => format!("({column})::pg_catalog.bytea"),
            PgKind::Date => format!(
                "CASE WHEN pg_catalog.isfinite({column}) AND ({column}) >= '0001-01-01'::pg_catalog.date \
                 THEN pg_catalog.to_char({column}, 'YYYY-MM-DD') ELSE ({column})::pg_catalog.text END"
            ),
            PgKind::Timestamp => format!(
                "CASE WHEN pg_catalog.isfinite({column}) AND ({column}) >= '0001-01-01'::pg_catalog.timestamp \
                 THEN pg_catalog.rtrim(pg_catalog.rtrim(pg_catalog.to_char({column}, 'YYYY-MM-DD HH24:MI:SS.US'), '0'), '.') \
                 ELSE ({column})::pg_catalog.text END"
            ),
            PgKind::Timestamptz => format!(
                "CASE WHEN pg_catalog.isfinite({column}) AND ({column}) >= '0001-01-01 00:00:00+00'::pg_catalog.timestamptz \
                 THEN pg_catalog.rtrim(pg_catalog.rtrim(pg_catalog.to_char(({column}) AT TIME ZONE 'UTC', \
                 'YYYY-MM-DD HH24:MI:SS.US'), '0'), '.') || '+00:00' ELSE ({column})::pg_catalog.text END"
            ),
            _ => format!("({column})::pg_catalog.text"),
        }
    }

    /// Whether a primary-key column may have this type. Keys must map to integer, text or blob
    /// key parts whose order and equality agree with PostgreSQL's; numeric, float and date/time
    /// keys have several text forms for one value, so they are refused.
    pub fn can_be_key(self) -> bool {
        matches!(
            self,
            PgKind::Int
                | PgKind::Bool
                | PgKind::Text
                | PgKind::Bpchar
                | PgKind::Bytea
                | PgKind::Uuid
        )
    }

    /// The text the capture trigger records for a key column (`NEW."id"` ...). Fixed forms, so
    /// they do not depend on the writing session's settings.
    pub fn trigger_key_expr(self, column: &str) -> String {
        match self {
            PgKind::Bool => format!("({column})::pg_catalog.int4::pg_catalog.text"),
            PgKind::Bytea => format!("pg_catalog.encode({column}, 'hex')"),
            _ => format!("({column})::pg_catalog.text"),
        }
    }

    /// Decodes a key part recorded by the trigger.
    pub fn key_from_text(self, text: &str) -> Result<KeyPart, String> {
        match self {
            PgKind::Int | PgKind::Bool => text
                .parse::<i64>()
                .map(KeyPart::Integer)
                .map_err(|e| format!("bad integer key {text:?}: {e}")),
            PgKind::Bytea => decode_hex(text).map(KeyPart::Blob),
            _ => Ok(KeyPart::Text(text.to_owned())),
        }
    }

    /// The driftless value a wire value read from this column stands for.
    pub fn is_textual(self) -> bool {
        self.read_wire() == Wire::Text
    }
}

fn decode_hex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err(format!("bad hex key {text:?}"));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&text[i..i + 2], 16)
                .map_err(|e| format!("bad hex key {text:?}: {e}"))
        })
        .collect()
}

/// One value bound for (or read from) a column, in its wire type.
#[derive(Debug, Clone, PartialEq)]
pub enum WireValue {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    Bytes(Vec<u8>),
}

impl WireValue {
    /// The driftless value of a wire value read from a column.
    pub fn into_value(self) -> Value {
        match self {
            WireValue::Null => Value::Null,
            WireValue::Int(i) => Value::Integer(i),
            WireValue::Float(f) => Value::Real(f),
            WireValue::Bool(b) => Value::Integer(i64::from(b)),
            WireValue::Text(t) => Value::Text(t),
            WireValue::Bytes(b) => Value::Blob(b),
        }
    }
}

/// Largest integer every `f64` represents exactly, so `Integer` → `double precision` is exact.
const F64_EXACT_INT_MAX: i64 = 1 << 53;

fn text_ok(text: &str) -> Result<(), String> {
    if text.contains('\0') {
        return Err("PostgreSQL text cannot hold a NUL (0x00) character".into());
    }
    Ok(())
}

/// The wire value to bind for `value` in a column of `kind` (declared as `declared`), or why the
/// column cannot hold it exactly.
pub fn to_wire(kind: PgKind, declared: &str, value: &Value) -> Result<WireValue, String> {
    let refuse = || {
        Err(format!(
            "a {} value cannot be stored exactly in a column of type {declared}",
            value.type_name()
        ))
    };
    Ok(match (kind, value) {
        (_, Value::Null) => WireValue::Null,
        (PgKind::Int, Value::Integer(i)) => WireValue::Int(*i),
        (PgKind::Bool, Value::Integer(i @ (0 | 1))) => WireValue::Bool(*i == 1),
        (PgKind::Float4 | PgKind::Float8, Value::Real(r)) => WireValue::Float(*r),
        (PgKind::Float4 | PgKind::Float8, Value::Integer(i))
            if (-F64_EXACT_INT_MAX..=F64_EXACT_INT_MAX).contains(i) =>
        {
            WireValue::Float(*i as f64)
        }
        (PgKind::Numeric, Value::Integer(i)) => WireValue::Text(i.to_string()),
        (PgKind::Numeric, Value::Real(r)) => WireValue::Text(real_as_decimal(*r)),
        (PgKind::Text | PgKind::Bpchar, Value::Integer(i)) => WireValue::Text(i.to_string()),
        (
            PgKind::Numeric
            | PgKind::Text
            | PgKind::Bpchar
            | PgKind::Date
            | PgKind::Timestamp
            | PgKind::Timestamptz
            | PgKind::Uuid
            | PgKind::Json
            | PgKind::Jsonb,
            Value::Text(t),
        ) => {
            text_ok(t)?;
            WireValue::Text(t.clone())
        }
        (PgKind::Bytea, Value::Blob(b)) => WireValue::Bytes(b.clone()),
        _ => return refuse(),
    })
}

/// The shortest decimal that reads back as exactly `r` (PostgreSQL `numeric` accepts exponents
/// and `NaN`/`Infinity`).
fn real_as_decimal(r: f64) -> String {
    if r.is_nan() {
        "NaN".into()
    } else if r.is_infinite() {
        if r > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        format!("{r:?}")
    }
}

/// The wire value of a key part for a key column of `kind`.
pub fn key_to_wire(kind: PgKind, declared: &str, part: &KeyPart) -> Result<WireValue, String> {
    Ok(match (kind, part) {
        (PgKind::Int, KeyPart::Integer(i)) => WireValue::Int(*i),
        (PgKind::Bool, KeyPart::Integer(i @ (0 | 1))) => WireValue::Bool(*i == 1),
        (PgKind::Text | PgKind::Bpchar | PgKind::Uuid, KeyPart::Text(t)) => {
            text_ok(t)?;
            WireValue::Text(t.clone())
        }
        (PgKind::Bytea, KeyPart::Blob(b)) => WireValue::Bytes(b.clone()),
        _ => {
            return Err(format!(
                "key part {part:?} does not fit a key column of type {declared}"
            ));
        }
    })
}

/// The value a column of `kind` shows after `value` was written to it, when that can be told
/// without asking the server. `None`: ask the server (numeric, char(n), date/time, uuid, json).
pub fn canonical_local(kind: PgKind, value: &Value) -> Option<Value> {
    Some(match (kind, value) {
        (_, Value::Null) => Value::Null,
        (PgKind::Int | PgKind::Bool, Value::Integer(i)) => Value::Integer(*i),
        (PgKind::Float8, Value::Real(r)) => Value::Real(*r),
        (PgKind::Float8, Value::Integer(i)) => Value::Real(*i as f64),
        (PgKind::Float4, Value::Real(r)) => Value::Real(f64::from(*r as f32)),
        (PgKind::Float4, Value::Integer(i)) => Value::Real(f64::from(*i as f32)),
        (PgKind::Text, Value::Text(t)) => Value::Text(t.clone()),
        (PgKind::Text, Value::Integer(i)) => Value::Text(i.to_string()),
        (PgKind::Bytea, Value::Blob(b)) => Value::Blob(b.clone()),
        _ => return None,
    })
}

/// A column of values for one multi-row statement: one SQL array parameter.
#[derive(Debug)]
pub enum WireArray {
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
    Text(Vec<Option<String>>),
    Bytes(Vec<Option<Vec<u8>>>),
}

impl WireArray {
    pub fn new(wire: Wire) -> Self {
        match wire {
            Wire::Int => WireArray::Int(Vec::new()),
            Wire::Float => WireArray::Float(Vec::new()),
            Wire::Bool => WireArray::Bool(Vec::new()),
            Wire::Text => WireArray::Text(Vec::new()),
            Wire::Bytes => WireArray::Bytes(Vec::new()),
        }
    }

    /// Appends a value; a value of another wire type is a programming error.
    pub fn push(&mut self, value: WireValue) {
        match (self, value) {
            (WireArray::Int(v), WireValue::Int(x)) => v.push(Some(x)),
            (WireArray::Float(v), WireValue::Float(x)) => v.push(Some(x)),
            (WireArray::Bool(v), WireValue::Bool(x)) => v.push(Some(x)),
            (WireArray::Text(v), WireValue::Text(x)) => v.push(Some(x)),
            (WireArray::Bytes(v), WireValue::Bytes(x)) => v.push(Some(x)),
            (WireArray::Int(v), WireValue::Null) => v.push(None),
            (WireArray::Float(v), WireValue::Null) => v.push(None),
            (WireArray::Bool(v), WireValue::Null) => v.push(None),
            (WireArray::Text(v), WireValue::Null) => v.push(None),
            (WireArray::Bytes(v), WireValue::Null) => v.push(None),
            (array, value) => panic!("wire type mismatch: {value:?} into {array:?}"),
        }
    }

    pub fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            WireArray::Int(v) => v,
            WireArray::Float(v) => v,
            WireArray::Bool(v) => v,
            WireArray::Text(v) => v,
            WireArray::Bytes(v) => v,
        }
    }
}

/// Reads column `index` of `row` in wire type `wire`.
pub fn read_wire(
    row: &postgres::Row,
    index: usize,
    wire: Wire,
) -> Result<WireValue, postgres::Error> {
    Ok(match wire {
        Wire::Int => row
            .try_get::<_, Option<i64>>(index)?
            .map_or(WireValue::Null, WireValue::Int),
        Wire::Float => row
            .try_get::<_, Option<f64>>(index)?
            .map_or(WireValue::Null, WireValue::Float),
        Wire::Bool => row
            .try_get::<_, Option<bool>>(index)?
            .map_or(WireValue::Null, WireValue::Bool),
        Wire::Text => row
            .try_get::<_, Option<String>>(index)?
            .map_or(WireValue::Null, WireValue::Text),
        Wire::Bytes => row
            .try_get::<_, Option<Vec<u8>>>(index)?
            .map_or(WireValue::Null, WireValue::Bytes),
    })
}

/// A wire value read from a key column as a key part.
pub fn key_part_from_wire(value: WireValue) -> Result<KeyPart, String> {
    Ok(match value {
        WireValue::Int(i) => KeyPart::Integer(i),
        WireValue::Bool(b) => KeyPart::Integer(i64::from(b)),
        WireValue::Text(t) => KeyPart::Text(t),
        WireValue::Bytes(b) => KeyPart::Blob(b),
        WireValue::Null => return Err("a primary-key column is NULL".into()),
        WireValue::Float(f) => return Err(format!("a primary-key column holds the real {f}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_that_do_not_fit_are_refused_not_converted() {
        assert!(to_wire(PgKind::Int, "integer", &Value::Text("1".into())).is_err());
        assert!(to_wire(PgKind::Int, "integer", &Value::Real(1.0)).is_err());
        assert!(to_wire(PgKind::Bool, "boolean", &Value::Integer(2)).is_err());
        assert!(to_wire(PgKind::Float8, "double precision", &Value::Integer(1 << 60)).is_err());
        assert!(to_wire(PgKind::Text, "text", &Value::Text("a\0b".into())).is_err());
        assert!(to_wire(PgKind::Uuid, "uuid", &Value::Blob(vec![0; 16])).is_err());
        assert_eq!(
            to_wire(PgKind::Numeric, "numeric", &Value::Real(0.1)).unwrap(),
            WireValue::Text("0.1".into())
        );
        assert_eq!(
            to_wire(PgKind::Float8, "double precision", &Value::Integer(3)).unwrap(),
            WireValue::Float(3.0)
        );
    }

    #[test]
    fn trigger_key_text_decodes() {
        assert_eq!(
            PgKind::Bytea.key_from_text("00ff").unwrap(),
            KeyPart::Blob(vec![0, 255])
        );
        assert_eq!(
            PgKind::Int.key_from_text("-5").unwrap(),
            KeyPart::Integer(-5)
        );
        assert_eq!(
            PgKind::Bool.key_from_text("1").unwrap(),
            KeyPart::Integer(1)
        );
        assert!(PgKind::Bytea.key_from_text("0").is_err());
    }
}
