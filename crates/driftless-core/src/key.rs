//! Primary keys: typed key parts and their order-preserving byte encoding.
//!
//! The encoding is the identity of a row everywhere (store metadata, the change log, the wire,
//! reconciliation ranges). Its defining property: comparing two encodings byte by byte gives the
//! same answer as comparing the decoded key tuples. Reconciliation splits tables into key ranges
//! over these bytes, so this property is load-bearing.
//!
//! Layout, per part (parts are simply concatenated; each part is self-delimiting and no encoding
//! of a part is a prefix of another, so tuple order is preserved):
//! - integer: `0x10`, then the 8 big-endian bytes of the value with its sign bit flipped;
//! - text:    `0x20`, then the UTF-8 bytes with every `0x00` written as `0x00 0xFF`, then `0x00 0x01`;
//! - blob:    `0x30`, then the bytes escaped the same way, then `0x00 0x01`.
//!
//! The type order integer < text < blob is SQLite's. Real numbers and NULL are not valid key parts
//! (floating-point keys do not round-trip between stores; NULL is not a value for a key).

use std::fmt;

const TAG_INTEGER: u8 = 0x10;
const TAG_TEXT: u8 = 0x20;
const TAG_BLOB: u8 = 0x30;
const ESCAPE: u8 = 0x00;
const ESCAPED_ZERO: u8 = 0xFF;
const TERMINATOR: u8 = 0x01;

/// Most parts a composite key may have.
pub const KEY_PARTS_MAX: usize = 16;
/// Longest encoded key accepted, in bytes. Keeps a hostile or broken peer from sending huge keys.
pub const KEY_ENCODED_BYTES_MAX: usize = 8 * 1024;

/// One component of a primary key. Derived `Ord` equals the order of the encoding.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyPart {
    Integer(i64),
    Text(String),
    Blob(Vec<u8>),
}

/// Errors from building or decoding a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a primary key needs at least one part")]
    NoParts,
    #[error("a primary key has {count} parts; the limit is {KEY_PARTS_MAX}")]
    TooManyParts { count: usize },
    #[error("the encoded key is {len} bytes; the limit is {KEY_ENCODED_BYTES_MAX}")]
    TooLong { len: usize },
    #[error("malformed key encoding at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: &'static str },
}

/// An encoded primary key. Ordering and equality are those of the bytes, which equal the order
/// of the key tuples (see the module docs).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PrimaryKey(Box<[u8]>);

impl PrimaryKey {
    /// Encodes key parts. Fails on zero parts, too many parts or an oversized encoding.
    pub fn from_parts(parts: &[KeyPart]) -> Result<Self, KeyError> {
        if parts.is_empty() {
            return Err(KeyError::NoParts);
        }
        if parts.len() > KEY_PARTS_MAX {
            return Err(KeyError::TooManyParts { count: parts.len() });
        }
        let mut out = Vec::with_capacity(16);
        for part in parts {
            match part {
                KeyPart::Integer(v) => {
                    out.push(TAG_INTEGER);
                    out.extend_from_slice(&((*v as u64) ^ (1 << 63)).to_be_bytes());
                }
                KeyPart::Text(s) => encode_escaped(&mut out, TAG_TEXT, s.as_bytes()),
                KeyPart::Blob(b) => encode_escaped(&mut out, TAG_BLOB, b),
            }
            if out.len() > KEY_ENCODED_BYTES_MAX {
                return Err(KeyError::TooLong { len: out.len() });
            }
        }
        Ok(PrimaryKey(out.into_boxed_slice()))
    }

    /// A key of a single integer part (the common `INTEGER PRIMARY KEY`).
    pub fn integer(v: i64) -> Self {
        PrimaryKey::from_parts(&[KeyPart::Integer(v)]).expect("one integer part always encodes")
    }

    /// Validates bytes received from storage or the wire and wraps them.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        decode(bytes)?;
        Ok(PrimaryKey(bytes.into()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Decodes the parts. Cannot fail: every `PrimaryKey` was validated when built.
    pub fn parts(&self) -> Vec<KeyPart> {
        decode(&self.0).expect("PrimaryKey holds a validated encoding")
    }
}

impl fmt::Debug for PrimaryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrimaryKey{:?}", self.parts())
    }
}

impl fmt::Display for PrimaryKey {
    /// Human form for logs and the CLI: `(1, 'abc', x'00ff')`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(")?;
        for (i, part) in self.parts().iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match part {
                KeyPart::Integer(v) => write!(f, "{v}")?,
                KeyPart::Text(s) => write!(f, "'{}'", s.replace('\'', "''"))?,
                KeyPart::Blob(b) => {
                    f.write_str("x'")?;
                    for byte in b {
                        write!(f, "{byte:02x}")?;
                    }
                    f.write_str("'")?;
                }
            }
        }
        f.write_str(")")
    }
}

fn encode_escaped(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    for &b in bytes {
        out.push(b);
        if b == ESCAPE {
            out.push(ESCAPED_ZERO);
        }
    }
    out.push(ESCAPE);
    out.push(TERMINATOR);
}

fn decode(bytes: &[u8]) -> Result<Vec<KeyPart>, KeyError> {
    if bytes.len() > KEY_ENCODED_BYTES_MAX {
        return Err(KeyError::TooLong { len: bytes.len() });
    }
    let malformed = |offset, reason| KeyError::Malformed { offset, reason };
    let mut parts = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if parts.len() == KEY_PARTS_MAX {
            return Err(KeyError::TooManyParts {
                count: parts.len() + 1,
            });
        }
        let tag = bytes[at];
        at += 1;
        match tag {
            TAG_INTEGER => {
                let raw: [u8; 8] = bytes
                    .get(at..at + 8)
                    .ok_or(malformed(at, "truncated integer"))?
                    .try_into()
                    .expect("slice of 8");
                parts.push(KeyPart::Integer(
                    (u64::from_be_bytes(raw) ^ (1 << 63)) as i64,
                ));
                at += 8;
            }
            TAG_TEXT | TAG_BLOB => {
                let mut raw = Vec::new();
                loop {
                    let b = *bytes.get(at).ok_or(malformed(at, "unterminated string"))?;
                    at += 1;
                    if b != ESCAPE {
                        raw.push(b);
                        continue;
                    }
                    match bytes.get(at) {
                        Some(&ESCAPED_ZERO) => raw.push(0),
                        Some(&TERMINATOR) => {
                            at += 1;
                            break;
                        }
                        _ => return Err(malformed(at, "bad escape")),
                    }
                    at += 1;
                }
                if tag == TAG_TEXT {
                    let text =
                        String::from_utf8(raw).map_err(|_| malformed(at, "text is not UTF-8"))?;
                    parts.push(KeyPart::Text(text));
                } else {
                    parts.push(KeyPart::Blob(raw));
                }
            }
            _ => return Err(malformed(at - 1, "unknown part tag")),
        }
    }
    if parts.is_empty() {
        return Err(KeyError::NoParts);
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn part() -> impl Strategy<Value = KeyPart> {
        prop_oneof![
            any::<i64>().prop_map(KeyPart::Integer),
            prop_oneof![
                Just(i64::MIN),
                Just(-1i64),
                Just(0),
                Just(1),
                Just(i64::MAX)
            ]
            .prop_map(KeyPart::Integer),
            "[a\\x00\\x01\\xff-\\u{10FFFF}]{0,6}".prop_map(KeyPart::Text),
            proptest::collection::vec(
                prop_oneof![Just(0u8), Just(1), Just(0xff), any::<u8>()],
                0..6
            )
            .prop_map(KeyPart::Blob),
        ]
    }

    fn key_parts() -> impl Strategy<Value = Vec<KeyPart>> {
        proptest::collection::vec(part(), 1..4)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn encoding_round_trips(parts in key_parts()) {
            let key = PrimaryKey::from_parts(&parts).unwrap();
            prop_assert_eq!(key.parts(), parts.clone());
            prop_assert_eq!(PrimaryKey::from_bytes(key.as_bytes()).unwrap(), key);
        }

        #[test]
        fn byte_order_equals_key_order(a in key_parts(), b in key_parts()) {
            let ka = PrimaryKey::from_parts(&a).unwrap();
            let kb = PrimaryKey::from_parts(&b).unwrap();
            prop_assert_eq!(ka.as_bytes().cmp(kb.as_bytes()), a.cmp(&b));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(key) = PrimaryKey::from_bytes(&bytes) {
                // Anything accepted must re-encode to exactly the same bytes (canonical form).
                let again = PrimaryKey::from_parts(&key.parts()).unwrap();
                prop_assert_eq!(again.as_bytes(), &bytes[..]);
            }
        }
    }

    #[test]
    fn integer_order_crosses_zero() {
        let keys: Vec<_> = [i64::MIN, -2, -1, 0, 1, i64::MAX]
            .iter()
            .map(|&v| PrimaryKey::integer(v))
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn limits_are_enforced() {
        assert_eq!(PrimaryKey::from_parts(&[]), Err(KeyError::NoParts));
        let many = vec![KeyPart::Integer(1); KEY_PARTS_MAX + 1];
        assert!(matches!(
            PrimaryKey::from_parts(&many),
            Err(KeyError::TooManyParts { .. })
        ));
        let long = KeyPart::Blob(vec![7; KEY_ENCODED_BYTES_MAX]);
        assert!(matches!(
            PrimaryKey::from_parts(&[long]),
            Err(KeyError::TooLong { .. })
        ));
        assert!(PrimaryKey::from_bytes(&[0x20, b'a']).is_err());
        assert!(PrimaryKey::from_bytes(&[0x99]).is_err());
        assert!(PrimaryKey::from_bytes(&[]).is_err());
    }

    #[test]
    fn display_is_readable() {
        let key = PrimaryKey::from_parts(&[
            KeyPart::Integer(-3),
            KeyPart::Text("o'k".into()),
            KeyPart::Blob(vec![0, 255]),
        ])
        .unwrap();
        assert_eq!(key.to_string(), "(-3, 'o''k', x'00ff')");
    }
}
