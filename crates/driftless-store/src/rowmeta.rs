//! Storage format 2's per-row metadata: a row's merge state without the values its own table
//! already holds, in a compact encoding. The adapter stores it with the local sequence number
//! of the row's last change, so "the changes after cursor C" are the rows stored after C and
//! the states are the log.
//!
//! A row is always served whole ([`RowState::to_changes`]), never as the cells that changed
//! after the cursor: a peer reads rows in sequence order while they move to the head, so a row
//! that moved before the peer reached its old place was never read there, and cells older
//! than the cursor may still be missing on the peer.
//!
//! What is stored, and why:
//! - causal length, the row's version, a deleted row's delete base;
//! - per cell: its column by a small per-table id (never by name), its version only where it
//!   differs from the row's, its base if any, and the value only where the merge needs an old value the table no longer
//!   shows after a local write: `max` and `min` cells, every cell of a table with a priority
//!   rule, and counter parts (a counter's visible value is their sum, not any one of them); and
//!   a value the table cannot hold as written (a NaN real: SQLite stores NULL);
//! - node ids interned to small integers per store ([`NodeInterner`]).
//!
//! `lww` values live only in the user's table: a node reads them back from the row when it
//! rebuilds the full [`RowState`] ([`RowMeta::into_state`]). The two agree because every
//! write to the table goes through stamping or apply, which update both in one transaction.

use driftless_core::codec::{Decoder, Encoder};
use driftless_core::{
    CausalLength, CellState, ColumnKind, ColumnName, CounterPart, NodeId, RowState, TableRules,
    Timestamp, Value, Version,
};
use std::collections::{BTreeMap, HashMap};

/// Most cells a stored row may hold (SQLite's column limit is 2000).
pub const CELLS_MAX: usize = driftless_core::codec::CELLS_MAX;
/// Most counter parts one stored cell may hold.
pub const COUNTER_PARTS_MAX: usize = driftless_core::codec::COUNTER_PARTS_MAX;
/// Most distinct nodes one store interns (far above any fleet; bounds a corrupt table).
pub const NODES_MAX: usize = 1 << 24;

/// Malformed stored metadata.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("row metadata at byte {offset}: {reason}")]
pub struct MetaError {
    pub offset: usize,
    pub reason: String,
}

/// Node ids interned to small integers, per store. The adapter loads the table into it and
/// writes back [`NodeInterner::take_fresh`] in the transaction that used them.
#[derive(Debug, Clone, Default)]
pub struct NodeInterner {
    nodes: Vec<NodeId>,
    index: HashMap<NodeId, u32>,
    fresh: Vec<(u32, NodeId)>,
}

impl NodeInterner {
    /// Builds the interner from stored `(index, node)` pairs; indexes must be 0, 1, 2, ...
    pub fn from_stored(mut stored: Vec<(u32, NodeId)>) -> Result<Self, String> {
        stored.sort();
        let mut interner = NodeInterner::default();
        for (i, (index, node)) in stored.into_iter().enumerate() {
            if index as usize != i || interner.index.contains_key(&node) {
                return Err(format!("node table is not dense at index {index}"));
            }
            interner.nodes.push(node);
            interner.index.insert(node, index);
        }
        Ok(interner)
    }

    pub fn index_of(&mut self, node: NodeId) -> u32 {
        if let Some(i) = self.index.get(&node) {
            return *i;
        }
        let i = u32::try_from(self.nodes.len()).expect("bounded by NODES_MAX");
        self.nodes.push(node);
        self.index.insert(node, i);
        self.fresh.push((i, node));
        i
    }

    /// How many nodes are interned (stored or fresh).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node(&self, index: u32) -> Option<NodeId> {
        self.nodes.get(index as usize).copied()
    }

    /// Nodes interned since the last call: the adapter stores them.
    pub fn take_fresh(&mut self) -> Vec<(u32, NodeId)> {
        std::mem::take(&mut self.fresh)
    }

    /// Forgets the nodes interned since the last [`Self::take_fresh`] (their transaction
    /// rolled back).
    pub fn roll_back(&mut self) {
        for (i, node) in std::mem::take(&mut self.fresh) {
            self.index.remove(&node);
            self.nodes.truncate(i as usize);
        }
    }
}

/// Sequence numbers for the rows of a format-1 database converted to format 2 (both adapters'
/// upgrade): a row keeps the number of its newest surviving log entry, so a peer's cursor means
/// the same after the upgrade; rows whose entries were all retired take distinct numbers from 1
/// up to the old log floor (a peer that still needs them re-bootstraps anyway), then above the
/// old head.
#[derive(Debug, Clone)]
pub struct UpgradeSeqs {
    floor: i64,
    packed: i64,
    next: i64,
}

impl UpgradeSeqs {
    /// `head`: the highest surviving log entry (at least `floor`).
    pub fn new(floor: i64, head: i64) -> Self {
        UpgradeSeqs {
            floor,
            packed: 1,
            next: head.max(floor) + 1,
        }
    }

    /// The number of a row whose newest surviving entry is `newest`.
    pub fn seq_for(&mut self, newest: Option<i64>) -> i64 {
        match newest {
            Some(seq) => seq,
            None if self.packed <= self.floor => {
                self.packed += 1;
                self.packed - 1
            }
            None => {
                self.next += 1;
                self.next - 1
            }
        }
    }
}

/// One stored cell.
#[derive(Debug, Clone, PartialEq)]
pub enum CellMeta {
    /// `lww`, `max`, `min`: `value` is `None` where the table holds it.
    Register {
        version: Version,
        base: Option<Version>,
        value: Option<Value>,
    },
    Counter(BTreeMap<NodeId, CounterPart>),
}

/// A row's stored metadata, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct RowMeta {
    /// Local sequence number of the row's last change (its position in the change feed).
    pub seq: u64,
    pub causal_length: CausalLength,
    pub version: Option<Version>,
    pub delete_base: Option<Version>,
    /// By column id.
    pub cells: BTreeMap<u32, CellMeta>,
}

/// How a table's columns map to the small ids stored in metadata.
pub trait ColumnIds {
    fn id_of(&self, column: &ColumnName) -> Option<u32>;
    fn name_of(&self, id: u32) -> Option<&ColumnName>;
}

/// Whether a cell of `column` holding `value` keeps its value in the metadata (see the module
/// docs): `max`, `min`, priority and counter cells always, and a NaN real in any column,
/// because SQLite stores NaN as NULL and would give a different value back.
pub fn stores_value(rules: &TableRules, column: &ColumnName, value: &Value) -> bool {
    let unrepresentable = matches!(value, Value::Real(r) if r.is_nan());
    unrepresentable
        || match rules.kind(column) {
            ColumnKind::Max | ColumnKind::Min => true,
            ColumnKind::Lww => rules.has_priority(),
            ColumnKind::Counter => true,
        }
}

impl RowMeta {
    /// The metadata of `state`, stored at sequence number `seq`.
    pub fn from_state(
        state: &RowState,
        seq: u64,
        rules: &TableRules,
        columns: &impl ColumnIds,
    ) -> Result<Self, String> {
        let mut cells = BTreeMap::new();
        for (column, cell) in state.cells() {
            let id = columns
                .id_of(column)
                .ok_or_else(|| format!("column {column} has no id"))?;
            let meta = match cell {
                CellState::Register {
                    value,
                    version,
                    base,
                } => CellMeta::Register {
                    version: *version,
                    base: *base,
                    value: stores_value(rules, column, value).then(|| value.clone()),
                },
                CellState::Counter(parts) => CellMeta::Counter(parts.clone()),
            };
            cells.insert(id, meta);
        }
        Ok(RowMeta {
            seq,
            causal_length: state.causal_length(),
            version: state.version(),
            delete_base: state.delete_base(),
            cells,
        })
    }

    /// The columns whose value must be read from the user's table to rebuild the state.
    pub fn columns_from_table<'c>(&self, columns: &'c impl ColumnIds) -> Vec<&'c ColumnName> {
        self.cells
            .iter()
            .filter(|(_, c)| matches!(c, CellMeta::Register { value: None, .. }))
            .filter_map(|(id, _)| columns.name_of(*id))
            .collect()
    }

    /// Rebuilds the full merge state, taking the values the metadata does not hold from the
    /// table (`table_value`, `None` when the row or column is missing there: NULL then). Cells
    /// of columns the table no longer has (dropped) are left out.
    pub fn into_state(
        self,
        columns: &impl ColumnIds,
        mut table_value: impl FnMut(&ColumnName) -> Option<Value>,
    ) -> Result<RowState, String> {
        let mut cells = BTreeMap::new();
        for (id, cell) in self.cells {
            let Some(column) = columns.name_of(id) else {
                continue;
            };
            let state = match cell {
                CellMeta::Register {
                    version,
                    base,
                    value,
                } => CellState::Register {
                    value: match value {
                        Some(v) => v,
                        None => table_value(column).unwrap_or(Value::Null),
                    },
                    version,
                    base,
                },
                CellMeta::Counter(parts) => CellState::Counter(parts),
            };
            cells.insert(column.clone(), state);
        }
        RowState::from_parts(self.causal_length, self.version, self.delete_base, cells)
            .map_err(str::to_owned)
    }

    /// Whether every version the row is served with (its own, every cell's, every counter
    /// part's) was made by `node`: then a peer that is `node` needs nothing of it.
    pub fn only_from(&self, node: NodeId) -> bool {
        self.version.is_none_or(|v| v.node == node)
            && self.cells.values().all(|cell| match cell {
                CellMeta::Register { version, .. } => version.node == node,
                CellMeta::Counter(parts) => parts.values().all(|p| p.version.node == node),
            })
    }

    pub fn encode(&self, nodes: &mut NodeInterner) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        let plain: Vec<u32> = self
            .cells
            .iter()
            .filter(|(_, c)| self.is_plain(c))
            .map(|(id, _)| *id)
            .collect();
        let other = self.cells.len() - plain.len();
        let header = u8::from(self.version.is_some())
            | u8::from(self.delete_base.is_some()) << 1
            | u8::from(!plain.is_empty()) << 2
            | u8::from(other > 0) << 3;
        out.push(header);
        varint(&mut out, self.causal_length.0);
        if let Some(v) = self.version {
            version(&mut out, v, nodes);
        }
        if let Some(v) = self.delete_base {
            version(&mut out, v, nodes);
        }
        if !plain.is_empty() {
            varint(&mut out, plain.len() as u64);
            for id in &plain {
                varint(&mut out, u64::from(*id));
            }
        }
        if other > 0 {
            varint(&mut out, other as u64);
            for (id, cell) in &self.cells {
                if self.is_plain(cell) {
                    continue;
                }
                varint(&mut out, u64::from(*id));
                match cell {
                    CellMeta::Register {
                        version: v,
                        base,
                        value,
                    } => {
                        let same = Some(*v) == self.version;
                        let flags = u8::from(same)
                            | u8::from(base.is_some()) << 1
                            | u8::from(value.is_some()) << 2;
                        out.push(flags);
                        if !same {
                            version(&mut out, *v, nodes);
                        }
                        if let Some(b) = base {
                            version(&mut out, *b, nodes);
                        }
                        if let Some(value) = value {
                            let mut e = Encoder::new();
                            e.value(value);
                            out.extend_from_slice(&e.finish());
                        }
                    }
                    CellMeta::Counter(parts) => {
                        out.push(1 << 3);
                        varint(&mut out, parts.len() as u64);
                        for (node, part) in parts {
                            varint(&mut out, u64::from(nodes.index_of(*node)));
                            varint(&mut out, zigzag(part.total));
                            version(&mut out, part.version, nodes);
                        }
                    }
                }
            }
        }
        out
    }

    fn is_plain(&self, cell: &CellMeta) -> bool {
        matches!(cell, CellMeta::Register { version, base: None, value: None }
            if Some(*version) == self.version)
    }

    /// Decodes metadata stored for a row whose sequence number is `seq`.
    pub fn decode(bytes: &[u8], seq: u64, nodes: &NodeInterner) -> Result<Self, MetaError> {
        let mut r = Reader {
            bytes,
            at: 0,
            nodes,
        };
        let header = r.u8()?;
        if header & !0x0f != 0 {
            return r.fail(format!("unknown header bits {header:#x}"));
        }
        let causal_length = CausalLength(r.varint()?);
        let version = r.version_if(header & 1 != 0)?;
        let delete_base = r.version_if(header & 2 != 0)?;
        let mut cells = BTreeMap::new();
        if header & 4 != 0 {
            let Some(row_version) = version else {
                return r.fail("plain cells without a row version");
            };
            let n = r.count(CELLS_MAX)?;
            for _ in 0..n {
                let id = r.id()?;
                let cell = CellMeta::Register {
                    version: row_version,
                    base: None,
                    value: None,
                };
                if cells.insert(id, cell).is_some() {
                    return r.fail(format!("column id {id} appears twice"));
                }
            }
        }
        if header & 8 != 0 {
            let n = r.count(CELLS_MAX)?;
            for _ in 0..n {
                let id = r.id()?;
                let flags = r.u8()?;
                let cell = if flags & 8 != 0 {
                    let n = r.count(COUNTER_PARTS_MAX)?;
                    let mut parts = BTreeMap::new();
                    for _ in 0..n {
                        let node = r.node()?;
                        let total = unzigzag(r.varint()?);
                        let version = r.version()?;
                        parts.insert(node, CounterPart { total, version });
                    }
                    CellMeta::Counter(parts)
                } else {
                    let v = if flags & 1 != 0 {
                        match version {
                            Some(v) => v,
                            None => {
                                return r.fail("a cell at the row version of a row without one");
                            }
                        }
                    } else {
                        r.version()?
                    };
                    let base = r.version_if(flags & 2 != 0)?;
                    let value = if flags & 4 != 0 {
                        Some(r.value()?)
                    } else {
                        None
                    };
                    CellMeta::Register {
                        version: v,
                        base,
                        value,
                    }
                };
                if flags & !0x0f != 0 {
                    return r.fail(format!("unknown cell flags {flags:#x}"));
                }
                if cells.insert(id, cell).is_some() {
                    return r.fail(format!("column id {id} appears twice"));
                }
            }
        }
        if r.at != bytes.len() {
            return r.fail(format!("{} trailing bytes", bytes.len() - r.at));
        }
        Ok(RowMeta {
            seq,
            causal_length,
            version,
            delete_base,
            cells,
        })
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn version(out: &mut Vec<u8>, v: Version, nodes: &mut NodeInterner) {
    out.extend_from_slice(&v.timestamp.as_u64().to_le_bytes());
    varint(out, u64::from(nodes.index_of(v.node)));
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    nodes: &'a NodeInterner,
}

impl Reader<'_> {
    fn fail<T>(&self, reason: impl Into<String>) -> Result<T, MetaError> {
        Err(MetaError {
            offset: self.at,
            reason: reason.into(),
        })
    }
    fn u8(&mut self) -> Result<u8, MetaError> {
        match self.bytes.get(self.at) {
            Some(b) => {
                self.at += 1;
                Ok(*b)
            }
            None => self.fail("ends early"),
        }
    }
    fn varint(&mut self) -> Result<u64, MetaError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        self.fail("varint longer than 10 bytes")
    }
    fn count(&mut self, max: usize) -> Result<usize, MetaError> {
        let n = self.varint()?;
        // every item takes at least one byte
        if n > max as u64 || n as usize > self.bytes.len() - self.at {
            return self.fail(format!("count {n} is over the limit or the bytes left"));
        }
        Ok(n as usize)
    }
    fn id(&mut self) -> Result<u32, MetaError> {
        let v = self.varint()?;
        u32::try_from(v).or_else(|_| self.fail(format!("column id {v} out of range")))
    }
    fn node(&mut self) -> Result<NodeId, MetaError> {
        let i = self.varint()?;
        match u32::try_from(i).ok().and_then(|i| self.nodes.node(i)) {
            Some(n) => Ok(n),
            None => self.fail(format!("unknown node index {i}")),
        }
    }
    fn version(&mut self) -> Result<Version, MetaError> {
        let Some(raw) = self.bytes.get(self.at..self.at + 8) else {
            return self.fail("ends early");
        };
        self.at += 8;
        let ts = Timestamp::from_u64(u64::from_le_bytes(raw.try_into().expect("8 bytes")));
        Ok(Version::new(ts, self.node()?))
    }
    /// A version that is present only when its flag says so.
    fn version_if(&mut self, present: bool) -> Result<Option<Version>, MetaError> {
        if present {
            Ok(Some(self.version()?))
        } else {
            Ok(None)
        }
    }
    fn value(&mut self) -> Result<Value, MetaError> {
        let rest = &self.bytes[self.at..];
        let mut d = Decoder::new(rest);
        let value = d.value().or_else(|e| self.fail(e.reason))?;
        self.at += rest.len() - d.remaining();
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use driftless_core::{PrimaryKey, TableName};

    struct Cols(Vec<ColumnName>);
    impl ColumnIds for Cols {
        fn id_of(&self, column: &ColumnName) -> Option<u32> {
            self.0.iter().position(|c| c == column).map(|i| i as u32)
        }
        fn name_of(&self, id: u32) -> Option<&ColumnName> {
            self.0.get(id as usize)
        }
    }

    fn col(n: &str) -> ColumnName {
        ColumnName::new(n).unwrap()
    }

    fn v(ts: u64, node: u128) -> Version {
        Version::new(Timestamp::new(ts, 0), NodeId::new(node))
    }

    #[test]
    fn an_inserted_row_costs_a_few_bytes_and_round_trips_with_values_from_the_table() {
        let cols = Cols(vec![col("a"), col("b"), col("c"), col("d")]);
        let rules = TableRules::new();
        let table = TableName::new("t").unwrap();
        let key = PrimaryKey::integer(7);
        let cells: Vec<_> = cols
            .0
            .iter()
            .map(|c| (c.clone(), Value::Text(format!("{c}!"))))
            .collect();
        let change = RowState::new()
            .local_insert(
                &table,
                &key,
                v(1_700_000_000_000, 9),
                cells,
                &rules,
                Default::default(),
            )
            .unwrap();
        let mut state = RowState::new();
        state.apply(&change, &rules).unwrap();
        let meta = RowMeta::from_state(&state, 42, &rules, &cols).unwrap();
        let mut nodes = NodeInterner::default();
        let bytes = meta.encode(&mut nodes);
        assert!(bytes.len() <= 16, "{} bytes", bytes.len());
        let back = RowMeta::decode(&bytes, 42, &nodes).unwrap();
        assert_eq!(back, meta);
        let rebuilt = back
            .into_state(&cols, |c| Some(Value::Text(format!("{c}!"))))
            .unwrap();
        assert_eq!(rebuilt, state);
    }

    #[test]
    fn every_cell_shape_round_trips_and_corrupt_bytes_are_refused() {
        let cols = Cols(vec![col("n"), col("hits"), col("peak")]);
        let rules = TableRules::new()
            .with_column(col("hits"), ColumnKind::Counter)
            .with_column(col("peak"), ColumnKind::Max);
        let mut cells = BTreeMap::new();
        cells.insert(
            col("n"),
            CellState::Register {
                value: Value::Integer(3),
                version: v(10, 1),
                base: Some(v(5, 2)),
            },
        );
        cells.insert(
            col("hits"),
            CellState::Counter(BTreeMap::from([
                (
                    NodeId::new(1),
                    CounterPart {
                        total: -4,
                        version: v(11, 1),
                    },
                ),
                (
                    NodeId::new(2),
                    CounterPart {
                        total: 9,
                        version: v(12, 2),
                    },
                ),
            ])),
        );
        cells.insert(
            col("peak"),
            CellState::Register {
                value: Value::Real(2.5),
                version: v(12, 2),
                base: None,
            },
        );
        let state = RowState::from_parts(CausalLength(3), Some(v(12, 2)), None, cells).unwrap();
        let meta = RowMeta::from_state(&state, 100, &rules, &cols).unwrap();
        let mut nodes = NodeInterner::default();
        let bytes = meta.encode(&mut nodes);
        let back = RowMeta::decode(&bytes, 100, &nodes).unwrap();
        assert_eq!(back, meta);
        assert_eq!(back.columns_from_table(&cols), vec![&col("n")]);
        let rebuilt = back.into_state(&cols, |_| Some(Value::Integer(3))).unwrap();
        assert_eq!(rebuilt, state);
        for cut in 0..bytes.len() {
            assert!(
                RowMeta::decode(&bytes[..cut], 100, &nodes).is_err(),
                "cut {cut}"
            );
        }
        assert!(RowMeta::decode(&bytes, 100, &NodeInterner::default()).is_err());
        // a NaN in a plain lww column is kept: the table would give NULL back
        let nan_cols = Cols(vec![col("x")]);
        let mut cells = BTreeMap::new();
        cells.insert(
            col("x"),
            CellState::Register {
                value: Value::Real(f64::NAN),
                version: v(30, 1),
                base: None,
            },
        );
        let nan = RowState::from_parts(CausalLength(1), Some(v(30, 1)), None, cells).unwrap();
        let meta = RowMeta::from_state(&nan, 8, &TableRules::new(), &nan_cols).unwrap();
        let back = RowMeta::decode(&meta.encode(&mut nodes), 8, &nodes).unwrap();
        assert!(back.columns_from_table(&nan_cols).is_empty());
        let rebuilt = back.into_state(&nan_cols, |_| Some(Value::Null)).unwrap();
        assert!(matches!(
            rebuilt.visible().unwrap()[&col("x")],
            Value::Real(r) if r.is_nan()
        ));
        // a deleted row
        let gone = RowState::from_parts(
            CausalLength(4),
            Some(v(20, 1)),
            Some(v(12, 2)),
            BTreeMap::new(),
        )
        .unwrap();
        let meta = RowMeta::from_state(&gone, 7, &rules, &cols).unwrap();
        let bytes = meta.encode(&mut nodes);
        assert_eq!(RowMeta::decode(&bytes, 7, &nodes).unwrap(), meta);
    }

    #[test]
    fn the_interner_hands_out_dense_indexes_and_forgets_rolled_back_ones() {
        let mut nodes = NodeInterner::from_stored(vec![(0, NodeId::new(5))]).unwrap();
        assert_eq!(nodes.index_of(NodeId::new(5)), 0);
        assert_eq!(nodes.index_of(NodeId::new(6)), 1);
        nodes.roll_back();
        assert_eq!(nodes.node(1), None);
        assert_eq!(nodes.index_of(NodeId::new(7)), 1);
        assert_eq!(nodes.take_fresh(), vec![(1, NodeId::new(7))]);
        assert!(NodeInterner::from_stored(vec![(1, NodeId::new(5))]).is_err());
    }
}
