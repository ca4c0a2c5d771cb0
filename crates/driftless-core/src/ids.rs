//! Identifier newtypes: node ids (128-bit) and validated table and column names.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Identity of one driftless node (one replica of a data store). 128 bits, so ids chosen at
/// random never collide in practice; shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId(u128);

impl NodeId {
    pub const fn new(raw: u128) -> Self {
        NodeId(raw)
    }
    pub const fn get(self) -> u128 {
        self.0
    }
    /// Big-endian bytes: byte order equals numeric order.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        NodeId(u128::from_be_bytes(bytes))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = NameError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(NameError::BadNodeId(text.chars().take(64).collect()));
        }
        u128::from_str_radix(text, 16)
            .map(NodeId)
            .map_err(|_| NameError::BadNodeId(text.to_owned()))
    }
}

/// Errors from validating names and ids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a {what} name must not be empty")]
    Empty { what: &'static str },
    #[error("{what} name is {len} bytes long; the limit is {max} bytes")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} name {name:?} contains a NUL or control character")]
    ControlCharacter { what: &'static str, name: String },
    #[error("{0:?} is not a node id: expected 32 hex digits")]
    BadNodeId(String),
}

/// Longest table or column name accepted, in bytes. PostgreSQL truncates identifiers at 63
/// bytes; SQLite has no limit. 255 leaves room for schema-qualified names without letting a
/// hostile peer send megabyte identifiers.
pub const NAME_BYTES_MAX: usize = 255;

fn validate(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(NameError::TooLong {
            what,
            len: name.len(),
            max: NAME_BYTES_MAX,
        });
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::ControlCharacter {
            what,
            name: name.to_owned(),
        });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $what:literal) => {
        $(#[$doc])*
        ///
        /// Cheap to clone (shared string). Valid: 1..=255 bytes, no control characters.
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $ty(Arc<str>);

        impl $ty {
            pub fn new(name: impl AsRef<str>) -> Result<Self, NameError> {
                let name = name.as_ref();
                validate($what, name)?;
                Ok($ty(Arc::from(name)))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }

        impl FromStr for $ty {
            type Err = NameError;
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                $ty::new(text)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// Name of a synced table, exactly as the store spells it.
    TableName,
    "table"
);
name_type!(
    /// Name of a column of a synced table, exactly as the store spells it.
    ColumnName,
    "column"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_round_trips_through_hex() {
        let id = NodeId::new(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let text = id.to_string();
        assert_eq!(text, "0123456789abcdef0011223344556677");
        assert_eq!(text.parse::<NodeId>().unwrap(), id);
        assert!("xyz".parse::<NodeId>().is_err());
        assert!("0123456789abcdef001122334455667".parse::<NodeId>().is_err());
    }

    #[test]
    fn names_are_validated() {
        assert!(TableName::new("items").is_ok());
        assert_eq!(TableName::new(""), Err(NameError::Empty { what: "table" }));
        assert!(matches!(
            ColumnName::new("a\0b"),
            Err(NameError::ControlCharacter { .. })
        ));
        assert!(matches!(
            ColumnName::new("x".repeat(256)),
            Err(NameError::TooLong { len: 256, .. })
        ));
    }
}
