//! Decoding what both adapters keep in their conflict ledger and dead-letter tables: versions
//! and values in the core codec, rules by name. One place, so a stored row reads the same from
//! every store.

use crate::types::{StoreError, StoredConflict};
use driftless_core::codec::Decoder;
use driftless_core::{
    ColumnName, ConflictRecord, ConflictRule, ConflictSide, PrimaryKey, TableName, Value, Version,
};

/// A stored version (`codec` encoding).
pub fn version_from(bytes: &[u8]) -> Result<Version, StoreError> {
    Decoder::new(bytes)
        .version()
        .map_err(|e| StoreError::Corrupt(format!("stored version: {e}")))
}

/// A stored value (`codec` encoding); `None` stands for a missing side (no row).
pub fn value_from(bytes: Option<Vec<u8>>) -> Result<Option<Value>, StoreError> {
    bytes
        .map(|b| {
            Decoder::new(&b)
                .value()
                .map_err(|e| StoreError::Corrupt(format!("stored value: {e}")))
        })
        .transpose()
}

/// A rule stored by its name.
pub fn rule_from(name: &str) -> Result<ConflictRule, StoreError> {
    ConflictRule::from_name(name)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown conflict rule {name:?}")))
}

/// One row of a conflict ledger as the adapters store it.
#[derive(Debug, Clone)]
pub struct ConflictRow {
    pub id: i64,
    pub table: String,
    pub pk: Vec<u8>,
    pub column: String,
    pub rule: String,
    pub winner_version: Vec<u8>,
    pub winner_value: Option<Vec<u8>>,
    pub loser_version: Vec<u8>,
    pub loser_value: Option<Vec<u8>>,
    pub at_ms: i64,
}

impl ConflictRow {
    /// The ledger entry, or why the stored row is unreadable.
    pub fn decode(self) -> Result<StoredConflict, StoreError> {
        let id = self.id;
        let corrupt = |e: String| StoreError::Corrupt(format!("conflict {id}: {e}"));
        Ok(StoredConflict {
            id,
            record: ConflictRecord {
                table: TableName::new(&self.table).map_err(|e| corrupt(e.to_string()))?,
                key: PrimaryKey::from_bytes(&self.pk).map_err(|e| corrupt(e.to_string()))?,
                column: ColumnName::new(&self.column).map_err(|e| corrupt(e.to_string()))?,
                rule: rule_from(&self.rule)?,
                winner: ConflictSide {
                    version: version_from(&self.winner_version)?,
                    value: value_from(self.winner_value)?,
                },
                loser: ConflictSide {
                    version: version_from(&self.loser_version)?,
                    value: value_from(self.loser_value)?,
                },
            },
            at_ms: self.at_ms as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_reads_back_by_its_name_and_unknown_ones_are_corrupt() {
        for rule in [
            ConflictRule::Lww,
            ConflictRule::Priority,
            ConflictRule::Max,
            ConflictRule::Min,
            ConflictRule::DeleteWins,
            ConflictRule::Drift,
        ] {
            assert_eq!(rule_from(rule.as_str()).unwrap(), rule);
        }
        assert!(matches!(rule_from("sum"), Err(StoreError::Corrupt(_))));
        assert!(matches!(version_from(&[1]), Err(StoreError::Corrupt(_))));
    }
}
