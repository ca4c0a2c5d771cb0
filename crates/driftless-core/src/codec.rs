//! The canonical binary encoding of changes and row states (log records, wire, digests).
//!
//! Fixed-width big-endian integers, length-prefixed strings and blobs, one tag byte per enum.
//! Canonical: one value has exactly one encoding, so equal states have equal bytes and digests.
//! Decoding validates everything (names, keys, lengths against the limits) before allocating, so
//! bytes from a broken or hostile peer produce a [`DecodeError`], never a panic or a huge buffer.

use crate::change::{CellWrite, Change, ChangeOp, SchemaFingerprint};
use crate::hlc::Timestamp;
use crate::ids::{ColumnName, NodeId, TableName};
use crate::key::PrimaryKey;
use crate::merge::{CellState, CounterPart, RowState};
use crate::value::{VALUE_BYTES_MAX, Value};
use crate::version::{CausalLength, Version};
use std::collections::BTreeMap;

/// Most cells one change or row may carry. SQLite's default column limit is 2000.
pub const CELLS_MAX: usize = 2000;
/// Most counter parts (distinct writer nodes) one counter cell may carry.
pub const COUNTER_PARTS_MAX: usize = 65_536;

/// Starting capacity of an encoded change or row state: a row of a few columns with versions
/// takes 200-400 bytes, and growing a buffer by doubling from empty reallocates six times.
const RECORD_BYTES_TYPICAL: usize = 512;

/// Bytes that are not a valid encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed record at byte {offset}: {reason}")]
pub struct DecodeError {
    pub offset: usize,
    pub reason: String,
}

/// Appends canonical encodings to a byte buffer.
#[derive(Debug, Default)]
pub struct Encoder {
    out: Vec<u8>,
}

impl Encoder {
    pub fn new() -> Self {
        Encoder::default()
    }
    pub fn finish(self) -> Vec<u8> {
        self.out
    }
    pub fn with_capacity(bytes: usize) -> Self {
        Encoder {
            out: Vec::with_capacity(bytes),
        }
    }
    pub fn len(&self) -> usize {
        self.out.len()
    }
    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }
    pub fn u8(&mut self, v: u8) {
        self.out.push(v);
    }
    pub fn u32(&mut self, v: usize) {
        let v = u32::try_from(v).expect("lengths are bounded far below u32::MAX");
        self.out.extend_from_slice(&v.to_be_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len());
        self.out.extend_from_slice(v);
    }
    pub fn node(&mut self, v: NodeId) {
        self.out.extend_from_slice(&v.to_bytes());
    }
    pub fn version(&mut self, v: Version) {
        self.u64(v.timestamp.as_u64());
        self.out.extend_from_slice(&v.node.to_bytes());
    }
    pub fn opt_version(&mut self, v: Option<Version>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.version(v);
            }
        }
    }
    pub fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.u8(0),
            Value::Integer(i) => {
                self.u8(1);
                self.u64(*i as u64);
            }
            Value::Real(r) => {
                self.u8(2);
                self.u64(r.to_bits());
            }
            Value::Text(t) => {
                self.u8(3);
                self.bytes(t.as_bytes());
            }
            Value::Blob(b) => {
                self.u8(4);
                self.bytes(b);
            }
        }
    }
    pub fn change(&mut self, c: &Change) {
        self.bytes(c.table.as_str().as_bytes());
        self.bytes(c.key.as_bytes());
        self.version(c.version);
        self.u64(c.causal_length.0);
        self.u64(c.schema.0);
        match &c.op {
            ChangeOp::Upsert(cells) => {
                self.u8(1);
                self.u32(cells.len());
                for cell in cells {
                    self.bytes(cell.column.as_str().as_bytes());
                    self.value(&cell.value);
                    self.opt_version(cell.base);
                }
            }
            ChangeOp::Delete { base } => {
                self.u8(2);
                self.opt_version(*base);
            }
        }
    }
    pub fn row_state(&mut self, r: &RowState) {
        self.u64(r.causal_length().0);
        self.opt_version(r.version());
        self.opt_version(r.delete_base());
        self.u32(r.cells().len());
        for (column, cell) in r.cells() {
            self.bytes(column.as_str().as_bytes());
            match cell {
                CellState::Register {
                    value,
                    version,
                    base,
                } => {
                    self.u8(1);
                    self.value(value);
                    self.version(*version);
                    self.opt_version(*base);
                }
                CellState::Counter(parts) => {
                    self.u8(2);
                    self.u32(parts.len());
                    for (node, part) in parts {
                        self.out.extend_from_slice(&node.to_bytes());
                        self.u64(part.total as u64);
                        self.version(part.version);
                    }
                }
            }
        }
    }
}

/// Reads canonical encodings from a byte slice.
#[derive(Debug)]
pub struct Decoder<'a> {
    input: &'a [u8],
    at: usize,
}

impl<'a> Decoder<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        Decoder { input, at: 0 }
    }
    pub fn fail<T>(&self, reason: impl Into<String>) -> Result<T, DecodeError> {
        Err(DecodeError {
            offset: self.at,
            reason: reason.into(),
        })
    }
    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.input.len() - self.at
    }

    /// Fails unless every byte was consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.at != self.input.len() {
            return self.fail(format!("{} trailing bytes", self.input.len() - self.at));
        }
        Ok(())
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.input.len() - self.at < n {
            return self.fail(format!(
                "needs {n} more bytes, has {}",
                self.input.len() - self.at
            ));
        }
        let slice = &self.input[self.at..self.at + n];
        self.at += n;
        Ok(slice)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<usize, DecodeError> {
        let raw = self.take(4)?;
        Ok(u32::from_be_bytes(raw.try_into().expect("4 bytes")) as usize)
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let raw = self.take(8)?;
        Ok(u64::from_be_bytes(raw.try_into().expect("8 bytes")))
    }
    pub fn node(&mut self) -> Result<NodeId, DecodeError> {
        let raw = self.take(16)?;
        Ok(NodeId::from_bytes(raw.try_into().expect("16 bytes")))
    }
    /// A count of items each at least `min_item_bytes` long, checked against `max` and against
    /// the bytes left, so a forged count cannot make us allocate.
    pub fn count(&mut self, max: usize, min_item_bytes: usize) -> Result<usize, DecodeError> {
        let n = self.u32()?;
        if n > max {
            return self.fail(format!("count {n} exceeds the limit {max}"));
        }
        if n.saturating_mul(min_item_bytes) > self.input.len() - self.at {
            return self.fail(format!("count {n} is larger than the bytes left"));
        }
        Ok(n)
    }
    pub fn bytes(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let n = self.count(max, 1)?;
        self.take(n)
    }
    pub fn text(&mut self, max: usize) -> Result<&'a str, DecodeError> {
        let raw = self.bytes(max)?;
        match std::str::from_utf8(raw) {
            Ok(t) => Ok(t),
            Err(_) => self.fail("text is not UTF-8"),
        }
    }
    pub fn column(&mut self) -> Result<ColumnName, DecodeError> {
        let text = self.text(crate::ids::NAME_BYTES_MAX)?;
        ColumnName::new(text).or_else(|e| self.fail(e.to_string()))
    }
    pub fn version(&mut self) -> Result<Version, DecodeError> {
        let timestamp = Timestamp::from_u64(self.u64()?);
        Ok(Version::new(timestamp, self.node()?))
    }
    pub fn opt_version(&mut self) -> Result<Option<Version>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.version()?)),
            tag => self.fail(format!("bad option tag {tag}")),
        }
    }
    pub fn value(&mut self) -> Result<Value, DecodeError> {
        Ok(match self.u8()? {
            0 => Value::Null,
            1 => Value::Integer(self.u64()? as i64),
            2 => Value::Real(f64::from_bits(self.u64()?)),
            3 => Value::Text(self.text(VALUE_BYTES_MAX)?.to_owned()),
            4 => Value::Blob(self.bytes(VALUE_BYTES_MAX)?.to_vec()),
            tag => return self.fail(format!("unknown value tag {tag}")),
        })
    }
    pub fn change(&mut self) -> Result<Change, DecodeError> {
        let table = self.text(crate::ids::NAME_BYTES_MAX)?;
        let table = TableName::new(table).or_else(|e| self.fail(e.to_string()))?;
        let key = self.bytes(crate::key::KEY_ENCODED_BYTES_MAX)?;
        let key = PrimaryKey::from_bytes(key).or_else(|e| self.fail(e.to_string()))?;
        let version = self.version()?;
        let causal_length = CausalLength(self.u64()?);
        let schema = SchemaFingerprint(self.u64()?);
        let op = match self.u8()? {
            1 => {
                // smallest cell: 4-byte name length + 1-byte name + value tag + option tag
                let n = self.count(CELLS_MAX, 7)?;
                let mut cells = Vec::with_capacity(n);
                for _ in 0..n {
                    cells.push(CellWrite {
                        column: self.column()?,
                        value: self.value()?,
                        base: self.opt_version()?,
                    });
                }
                ChangeOp::Upsert(cells)
            }
            2 => ChangeOp::Delete {
                base: self.opt_version()?,
            },
            tag => return self.fail(format!("unknown change op {tag}")),
        };
        Ok(Change {
            table,
            key,
            version,
            causal_length,
            op,
            schema,
        })
    }
    pub fn row_state(&mut self) -> Result<RowState, DecodeError> {
        let causal_length = CausalLength(self.u64()?);
        let version = self.opt_version()?;
        let delete_base = self.opt_version()?;
        let n = self.count(CELLS_MAX, 6)?;
        let mut cells = BTreeMap::new();
        for _ in 0..n {
            let column = self.column()?;
            let cell = match self.u8()? {
                1 => CellState::Register {
                    value: self.value()?,
                    version: self.version()?,
                    base: self.opt_version()?,
                },
                2 => {
                    let n = self.count(COUNTER_PARTS_MAX, 48)?;
                    let mut parts = BTreeMap::new();
                    for _ in 0..n {
                        let node = self.node()?;
                        let total = self.u64()? as i64;
                        let version = self.version()?;
                        parts.insert(node, CounterPart { total, version });
                    }
                    CellState::Counter(parts)
                }
                tag => return self.fail(format!("unknown cell tag {tag}")),
            };
            if cells.insert(column.clone(), cell).is_some() {
                return self.fail(format!("column {column} appears twice"));
            }
        }
        RowState::from_parts(causal_length, version, delete_base, cells)
            .or_else(|reason| self.fail(reason))
    }
}

/// Encodes one change on its own.
pub fn encode_change(change: &Change) -> Vec<u8> {
    // (most records fit: one allocation instead of a doubling series)
    let mut e = Encoder::with_capacity(RECORD_BYTES_TYPICAL);
    e.change(change);
    e.finish()
}

/// Decodes exactly one change from `bytes`.
pub fn decode_change(bytes: &[u8]) -> Result<Change, DecodeError> {
    let mut d = Decoder::new(bytes);
    let change = d.change()?;
    d.finish()?;
    Ok(change)
}

/// Encodes one row state on its own (canonical: equal states give equal bytes).
pub fn encode_row_state(row: &RowState) -> Vec<u8> {
    let mut e = Encoder::with_capacity(RECORD_BYTES_TYPICAL);
    e.row_state(row);
    e.finish()
}

/// Decodes exactly one row state from `bytes`.
pub fn decode_row_state(bytes: &[u8]) -> Result<RowState, DecodeError> {
    let mut d = Decoder::new(bytes);
    let row = d.row_state()?;
    d.finish()?;
    Ok(row)
}
