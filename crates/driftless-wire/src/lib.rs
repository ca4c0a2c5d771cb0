//! The peer protocol: the messages two nodes exchange, their binary encoding, and the framing
//! that carries them over a byte stream (TCP, usually inside TLS).
//!
//! A frame is `[u32 length][u8 tag][u8 flags][payload]`, all big-endian; `length` counts the
//! bytes after itself. The length is checked against [`FRAME_BYTES_MAX`] *before* any buffer is
//! allocated, and a compressed batch's declared size against [`BATCH_RAW_BYTES_MAX`] before it
//! is decompressed, so a broken or hostile peer cannot make us allocate what it claims.
//!
//! The conversation (both sides run it at once, full duplex):
//! 1. each side sends [`Hello`] (protocol version, node id and name, token, table fingerprints,
//!    how far it has applied the other's log) and reads the other's;
//! 2. each side streams its change log to the other as [`Batch`]es, at most a window of them
//!    unacknowledged (flow control), and answers every batch it applied with an [`Ack`];
//! 3. a side whose log no longer reaches back to the other's cursor sends snapshot batches and
//!    then [`Message::SnapshotDone`];
//! 4. either side may close with [`Message::Goodbye`] and a reason.

use driftless_core::codec::{DecodeError, Decoder, Encoder};
use driftless_core::{Change, NodeId, PrimaryKey, SchemaFingerprint, TableName};
use driftless_store::LogSeq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Version of this protocol. A peer speaking another version is refused with a clear reason.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest frame accepted, in bytes after the length prefix.
pub const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Largest uncompressed batch payload accepted.
pub const BATCH_RAW_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most changes one batch may carry (the store's apply limit).
pub const BATCH_CHANGES_MAX: usize = driftless_store::APPLY_BATCH_CHANGES_MAX;
/// Most tables one hello may list.
pub const HELLO_TABLES_MAX: usize = 4096;
/// Longest token or text field accepted.
pub const TEXT_BYTES_MAX: usize = 4096;

const TAG_HELLO: u8 = 1;
const TAG_BATCH: u8 = 2;
const TAG_ACK: u8 = 3;
const TAG_SNAPSHOT_DONE: u8 = 4;
const TAG_HEARTBEAT: u8 = 5;
const TAG_GOODBYE: u8 = 6;
const TAG_DIGEST: u8 = 7;
const TAG_RECON_REQUEST: u8 = 8;
const TAG_RECON_RESPONSE: u8 = 9;
/// Most keys, items or fingerprints one reconciliation message may carry.
pub const RECON_ITEMS_MAX: usize = 1 << 20;
const FLAG_LZ4: u8 = 1;

/// Payloads smaller than this are sent uncompressed (compression would not pay for itself).
const COMPRESS_BYTES_MIN: usize = 512;

/// The first message of each side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol: u16,
    pub node: NodeId,
    /// The node's configured name (its identity in configs, certificates and metrics).
    pub name: String,
    /// Bearer token, if the other side requires one.
    pub token: Option<String>,
    /// The synced tables and their schema fingerprints.
    pub tables: Vec<(TableName, SchemaFingerprint)>,
    /// How far the sender has applied the receiver's log: where the receiver should start.
    pub cursor: LogSeq,
    /// The sender's own log head.
    pub log_head: LogSeq,
}

/// Whether a batch continues the log or is part of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// Log entries; after applying, the receiver's cursor is `next`.
    Log,
    /// Snapshot rows; the receiver's cursor does not move until `SnapshotDone`.
    Snapshot,
}

/// Changes from the sender's log.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub kind: BatchKind,
    /// Where this batch starts: the cursor the receiver must be at to apply it (for `Log`).
    /// A batch that does not continue the receiver's cursor is a duplicate (skipped) or a gap
    /// (the link is closed and resumes from the stored cursor), never applied out of order.
    pub after: LogSeq,
    /// Cursor after this batch (for `Log`): the sequence of its last entry, even if entries
    /// were filtered out (e.g. changes that originated at the receiver).
    pub next: LogSeq,
    /// The sender's log head when the batch was read (for backlog figures).
    pub head: LogSeq,
    /// Correlates the batch's spans in both nodes' traces.
    pub trace_id: u64,
    pub changes: Vec<Change>,
}

/// A message of the peer protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello(Hello),
    Batch(Batch),
    /// The receiver has durably applied the sender's log up to this position.
    Ack {
        applied_through: LogSeq,
    },
    /// The snapshot is complete; stream the log after `resume_after`.
    SnapshotDone {
        resume_after: LogSeq,
    },
    /// Nothing to send; the sender's log head (keeps idle links alive and backlog current).
    Heartbeat {
        log_head: LogSeq,
    },
    /// The sender closes the link, and says why.
    Goodbye {
        reason: String,
    },
    /// The sender's reconciliation fingerprints (one per top bucket) of each table, taken when
    /// its log head was `head` and it had applied the receiver's log up to `cursor`. The
    /// receiver compares them with its own only when both sides had applied everything of each
    /// other (otherwise they may differ legitimately).
    Digest {
        head: LogSeq,
        cursor: LogSeq,
        tables: Vec<TableDigestWire>,
    },
    /// A reconciliation step for `table`; answered by a `ReconResponse` with the same `id`.
    ReconRequest {
        id: u64,
        table: TableName,
        request: ReconRequest,
    },
    ReconResponse {
        id: u64,
        reply: ReconReply,
    },
}

/// A step of a reconciliation, sent by the node that runs it (see docs/reconciliation.md).
#[derive(Debug, Clone, PartialEq)]
pub enum ReconRequest {
    /// The initiator's fingerprint of every top bucket.
    Top { fingerprints: Vec<i64> },
    /// The initiator's rows `(fine bucket, key, item hash)` in `buckets` (fine buckets whose
    /// fingerprints differ). With `repair`, the responder answers with its row states.
    Items {
        buckets: Vec<u32>,
        items: Vec<(u32, PrimaryKey, i64)>,
        repair: bool,
    },
    /// Row states the responder lacks or holds differently; it merges them.
    Repair { changes: Vec<Change> },
    /// Check the responder's own table content against its merge state (writes made behind
    /// driftless's back), one chunk of keys after `after`; with `repair`, restore it.
    Verify {
        after: Option<PrimaryKey>,
        repair: bool,
    },
}

/// The responder's answer to a [`ReconRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum ReconReply {
    /// Fine-bucket fingerprints under each top bucket that differed.
    Fine { buckets: Vec<(u32, Vec<i64>)> },
    /// The comparison of items: keys only the initiator has (`wanted`), keys whose states
    /// differ, how many keys only the responder has, and (with repair) the responder's states
    /// for the differing keys and the keys only it has.
    Rows {
        wanted: Vec<PrimaryKey>,
        differing: Vec<PrimaryKey>,
        only_here: Vec<PrimaryKey>,
        changes: Vec<Change>,
    },
    /// The repair was merged: how many changes had an effect.
    Repaired { applied: u64 },
    /// The request could not be served (unknown table, limits).
    Refused { reason: String },
    /// One chunk of the responder's local check: rows checked, restored and adopted, and the
    /// key to continue after (`None`: the table is done).
    Verified {
        checked: u64,
        restored: u64,
        adopted: u64,
        next: Option<PrimaryKey>,
    },
}

/// One table's fingerprints in a [`Message::Digest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDigestWire {
    pub table: TableName,
    pub fingerprints: Vec<i64>,
}

/// Errors reading or writing messages.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("frame of {claimed} bytes refused: the limit is {max} bytes")]
    FrameTooLarge { claimed: usize, max: usize },
    #[error("batch of {claimed} uncompressed bytes refused: the limit is {max} bytes")]
    BatchTooLarge { claimed: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
}

impl From<DecodeError> for WireError {
    fn from(e: DecodeError) -> Self {
        WireError::Malformed(e.to_string())
    }
}

fn encode_payload(message: &Message) -> (u8, Vec<u8>) {
    let mut e = Encoder::with_capacity(256);
    let tag = match message {
        Message::Hello(h) => {
            e.u32(usize::from(h.protocol));
            e.node(h.node);
            e.bytes(h.name.as_bytes());
            match &h.token {
                None => e.u8(0),
                Some(t) => {
                    e.u8(1);
                    e.bytes(t.as_bytes());
                }
            }
            e.u32(h.tables.len());
            for (table, fingerprint) in &h.tables {
                e.bytes(table.as_str().as_bytes());
                e.u64(fingerprint.0);
            }
            e.u64(h.cursor.0);
            e.u64(h.log_head.0);
            TAG_HELLO
        }
        Message::Batch(b) => {
            e.u8(match b.kind {
                BatchKind::Log => 1,
                BatchKind::Snapshot => 2,
            });
            e.u64(b.after.0);
            e.u64(b.next.0);
            e.u64(b.head.0);
            e.u64(b.trace_id);
            e.u32(b.changes.len());
            for change in &b.changes {
                e.change(change);
            }
            TAG_BATCH
        }
        Message::Ack { applied_through } => {
            e.u64(applied_through.0);
            TAG_ACK
        }
        Message::SnapshotDone { resume_after } => {
            e.u64(resume_after.0);
            TAG_SNAPSHOT_DONE
        }
        Message::Heartbeat { log_head } => {
            e.u64(log_head.0);
            TAG_HEARTBEAT
        }
        Message::Goodbye { reason } => {
            let reason: String = reason.chars().take(TEXT_BYTES_MAX / 4).collect();
            e.bytes(reason.as_bytes());
            TAG_GOODBYE
        }
        Message::Digest {
            head,
            cursor,
            tables,
        } => {
            e.u64(head.0);
            e.u64(cursor.0);
            e.u32(tables.len());
            for t in tables {
                e.bytes(t.table.as_str().as_bytes());
                put_i64s(&mut e, &t.fingerprints);
            }
            TAG_DIGEST
        }
        Message::ReconRequest { id, table, request } => {
            e.u64(*id);
            e.bytes(table.as_str().as_bytes());
            match request {
                ReconRequest::Top { fingerprints } => {
                    e.u8(1);
                    put_i64s(&mut e, fingerprints);
                }
                ReconRequest::Items {
                    buckets,
                    items,
                    repair,
                } => {
                    e.u8(2);
                    e.u32(buckets.len());
                    for b in buckets {
                        e.u32(*b as usize);
                    }
                    e.u32(items.len());
                    for (bucket, key, hash) in items {
                        e.u32(*bucket as usize);
                        e.bytes(key.as_bytes());
                        e.u64(*hash as u64);
                    }
                    e.u8(u8::from(*repair));
                }
                ReconRequest::Repair { changes } => {
                    e.u8(3);
                    put_changes(&mut e, changes);
                }
                ReconRequest::Verify { after, repair } => {
                    e.u8(4);
                    put_optional_key(&mut e, after.as_ref());
                    e.u8(u8::from(*repair));
                }
            }
            TAG_RECON_REQUEST
        }
        Message::ReconResponse { id, reply } => {
            e.u64(*id);
            match reply {
                ReconReply::Fine { buckets } => {
                    e.u8(1);
                    e.u32(buckets.len());
                    for (top, fps) in buckets {
                        e.u32(*top as usize);
                        put_i64s(&mut e, fps);
                    }
                }
                ReconReply::Rows {
                    wanted,
                    differing,
                    only_here,
                    changes,
                } => {
                    e.u8(2);
                    for keys in [wanted, differing, only_here] {
                        e.u32(keys.len());
                        for k in keys {
                            e.bytes(k.as_bytes());
                        }
                    }
                    put_changes(&mut e, changes);
                }
                ReconReply::Repaired { applied } => {
                    e.u8(3);
                    e.u64(*applied);
                }
                ReconReply::Refused { reason } => {
                    e.u8(4);
                    e.bytes(reason.as_bytes());
                }
                ReconReply::Verified {
                    checked,
                    restored,
                    adopted,
                    next,
                } => {
                    e.u8(5);
                    e.u64(*checked);
                    e.u64(*restored);
                    e.u64(*adopted);
                    put_optional_key(&mut e, next.as_ref());
                }
            }
            TAG_RECON_RESPONSE
        }
    };
    (tag, e.finish())
}

fn put_i64s(e: &mut Encoder, values: &[i64]) {
    e.u32(values.len());
    for v in values {
        e.u64(*v as u64);
    }
}

fn put_changes(e: &mut Encoder, changes: &[Change]) {
    e.u32(changes.len());
    for c in changes {
        e.change(c);
    }
}

fn get_i64s(d: &mut Decoder<'_>) -> Result<Vec<i64>, WireError> {
    let n = d.count(RECON_ITEMS_MAX, 8)?;
    (0..n).map(|_| Ok(d.u64()? as i64)).collect()
}

fn get_key(d: &mut Decoder<'_>) -> Result<PrimaryKey, WireError> {
    let bytes = d.bytes(driftless_core::key::KEY_ENCODED_BYTES_MAX)?;
    PrimaryKey::from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))
}

fn put_optional_key(e: &mut Encoder, key: Option<&PrimaryKey>) {
    match key {
        None => e.u8(0),
        Some(key) => {
            e.u8(1);
            e.bytes(key.as_bytes());
        }
    }
}

fn get_optional_key(d: &mut Decoder<'_>) -> Result<Option<PrimaryKey>, WireError> {
    match d.u8()? {
        0 => Ok(None),
        1 => Ok(Some(get_key(d)?)),
        other => Err(WireError::Malformed(format!("optional key marker {other}"))),
    }
}

fn get_keys(d: &mut Decoder<'_>) -> Result<Vec<PrimaryKey>, WireError> {
    let n = d.count(RECON_ITEMS_MAX, 5)?;
    (0..n).map(|_| get_key(d)).collect()
}

fn get_changes(d: &mut Decoder<'_>) -> Result<Vec<Change>, WireError> {
    let n = d.count(BATCH_CHANGES_MAX, 40)?;
    (0..n).map(|_| Ok(d.change()?)).collect()
}

fn get_bucket(d: &mut Decoder<'_>) -> Result<u32, WireError> {
    u32::try_from(d.u32()?).map_err(|_| WireError::Malformed("bucket out of range".into()))
}

fn decode_payload(tag: u8, payload: &[u8]) -> Result<Message, WireError> {
    let mut d = Decoder::new(payload);
    let message = match tag {
        TAG_HELLO => {
            let protocol = d.u32()?;
            let protocol = u16::try_from(protocol)
                .map_err(|_| WireError::Malformed(format!("protocol version {protocol}")))?;
            let node = d.node()?;
            let name = d.text(TEXT_BYTES_MAX)?.to_owned();
            let token = match d.u8()? {
                0 => None,
                1 => Some(d.text(TEXT_BYTES_MAX)?.to_owned()),
                other => return Err(WireError::Malformed(format!("token tag {other}"))),
            };
            let n = d.count(HELLO_TABLES_MAX, 13)?;
            let mut tables = Vec::with_capacity(n);
            for _ in 0..n {
                let name = d.text(driftless_core::ids::NAME_BYTES_MAX)?;
                let table =
                    TableName::new(name).map_err(|e| WireError::Malformed(e.to_string()))?;
                tables.push((table, SchemaFingerprint(d.u64()?)));
            }
            Message::Hello(Hello {
                protocol,
                node,
                name,
                token,
                tables,
                cursor: LogSeq(d.u64()?),
                log_head: LogSeq(d.u64()?),
            })
        }
        TAG_BATCH => {
            let kind = match d.u8()? {
                1 => BatchKind::Log,
                2 => BatchKind::Snapshot,
                other => return Err(WireError::Malformed(format!("batch kind {other}"))),
            };
            let after = LogSeq(d.u64()?);
            let next = LogSeq(d.u64()?);
            let head = LogSeq(d.u64()?);
            let trace_id = d.u64()?;
            // the smallest encoded change is well over 40 bytes
            let n = d.count(BATCH_CHANGES_MAX, 40)?;
            let mut changes = Vec::with_capacity(n);
            for _ in 0..n {
                changes.push(d.change()?);
            }
            Message::Batch(Batch {
                kind,
                after,
                next,
                head,
                trace_id,
                changes,
            })
        }
        TAG_ACK => Message::Ack {
            applied_through: LogSeq(d.u64()?),
        },
        TAG_SNAPSHOT_DONE => Message::SnapshotDone {
            resume_after: LogSeq(d.u64()?),
        },
        TAG_HEARTBEAT => Message::Heartbeat {
            log_head: LogSeq(d.u64()?),
        },
        TAG_GOODBYE => Message::Goodbye {
            reason: d.text(TEXT_BYTES_MAX)?.to_owned(),
        },
        TAG_DIGEST => {
            let head = LogSeq(d.u64()?);
            let cursor = LogSeq(d.u64()?);
            let n = d.count(HELLO_TABLES_MAX, 9)?;
            let mut tables = Vec::with_capacity(n);
            for _ in 0..n {
                let name = d.text(driftless_core::ids::NAME_BYTES_MAX)?;
                let table =
                    TableName::new(name).map_err(|e| WireError::Malformed(e.to_string()))?;
                let fingerprints = get_i64s(&mut d)?;
                tables.push(TableDigestWire {
                    table,
                    fingerprints,
                });
            }
            Message::Digest {
                head,
                cursor,
                tables,
            }
        }
        TAG_RECON_REQUEST => {
            let id = d.u64()?;
            let name = d.text(driftless_core::ids::NAME_BYTES_MAX)?;
            let table = TableName::new(name).map_err(|e| WireError::Malformed(e.to_string()))?;
            let request = match d.u8()? {
                1 => ReconRequest::Top {
                    fingerprints: get_i64s(&mut d)?,
                },
                2 => {
                    let n = d.count(RECON_ITEMS_MAX, 4)?;
                    let buckets = (0..n)
                        .map(|_| get_bucket(&mut d))
                        .collect::<Result<_, _>>()?;
                    let n = d.count(RECON_ITEMS_MAX, 17)?;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        let bucket = get_bucket(&mut d)?;
                        let key = get_key(&mut d)?;
                        items.push((bucket, key, d.u64()? as i64));
                    }
                    let repair = d.u8()? != 0;
                    ReconRequest::Items {
                        buckets,
                        items,
                        repair,
                    }
                }
                3 => ReconRequest::Repair {
                    changes: get_changes(&mut d)?,
                },
                4 => ReconRequest::Verify {
                    after: get_optional_key(&mut d)?,
                    repair: d.u8()? != 0,
                },
                other => return Err(WireError::Malformed(format!("reconciliation step {other}"))),
            };
            Message::ReconRequest { id, table, request }
        }
        TAG_RECON_RESPONSE => {
            let id = d.u64()?;
            let reply = match d.u8()? {
                1 => {
                    let n = d.count(RECON_ITEMS_MAX, 8)?;
                    let mut buckets = Vec::with_capacity(n);
                    for _ in 0..n {
                        let top = get_bucket(&mut d)?;
                        buckets.push((top, get_i64s(&mut d)?));
                    }
                    ReconReply::Fine { buckets }
                }
                2 => ReconReply::Rows {
                    wanted: get_keys(&mut d)?,
                    differing: get_keys(&mut d)?,
                    only_here: get_keys(&mut d)?,
                    changes: get_changes(&mut d)?,
                },
                3 => ReconReply::Repaired { applied: d.u64()? },
                4 => ReconReply::Refused {
                    reason: d.text(TEXT_BYTES_MAX)?.to_owned(),
                },
                5 => ReconReply::Verified {
                    checked: d.u64()?,
                    restored: d.u64()?,
                    adopted: d.u64()?,
                    next: get_optional_key(&mut d)?,
                },
                other => {
                    return Err(WireError::Malformed(format!(
                        "reconciliation reply {other}"
                    )));
                }
            };
            Message::ReconResponse { id, reply }
        }
        other => return Err(WireError::UnknownTag(other)),
    };
    d.finish()?;
    Ok(message)
}

/// Encodes a message as one frame (length prefix included). Batches are compressed with LZ4
/// when that makes them smaller.
pub fn encode_frame(message: &Message) -> Result<Vec<u8>, WireError> {
    let (tag, payload) = encode_payload(message);
    let compressible = matches!(tag, TAG_BATCH | TAG_RECON_REQUEST | TAG_RECON_RESPONSE);
    let (flags, body) = if compressible && payload.len() >= COMPRESS_BYTES_MIN {
        if payload.len() > BATCH_RAW_BYTES_MAX {
            return Err(WireError::BatchTooLarge {
                claimed: payload.len(),
                max: BATCH_RAW_BYTES_MAX,
            });
        }
        let compressed = lz4_flex::compress_prepend_size(&payload);
        if compressed.len() < payload.len() {
            (FLAG_LZ4, compressed)
        } else {
            (0, payload)
        }
    } else {
        (0, payload)
    };
    let length = body.len() + 2;
    if length > FRAME_BYTES_MAX {
        return Err(WireError::FrameTooLarge {
            claimed: length,
            max: FRAME_BYTES_MAX,
        });
    }
    let mut frame = Vec::with_capacity(4 + length);
    frame.extend_from_slice(&(length as u32).to_be_bytes());
    frame.push(tag);
    frame.push(flags);
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decodes the bytes of one frame after its length prefix.
pub fn decode_frame_body(body: &[u8]) -> Result<Message, WireError> {
    let [tag, flags, payload @ ..] = body else {
        return Err(WireError::Malformed("frame shorter than its header".into()));
    };
    match *flags {
        0 => decode_payload(*tag, payload),
        FLAG_LZ4 => {
            let declared: [u8; 4] = payload
                .get(..4)
                .ok_or_else(|| WireError::Malformed("compressed frame without size".into()))?
                .try_into()
                .expect("4 bytes");
            let declared = u32::from_le_bytes(declared) as usize;
            if declared > BATCH_RAW_BYTES_MAX {
                return Err(WireError::BatchTooLarge {
                    claimed: declared,
                    max: BATCH_RAW_BYTES_MAX,
                });
            }
            let raw = lz4_flex::decompress_size_prepended(payload)
                .map_err(|e| WireError::Malformed(format!("bad compressed batch: {e}")))?;
            decode_payload(*tag, &raw)
        }
        other => Err(WireError::Malformed(format!(
            "unknown frame flags {other:#x}"
        ))),
    }
}

/// Reads one message. The claimed length is checked before anything is allocated.
pub async fn read_message<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Message, WireError> {
    let mut prefix = [0u8; 4];
    match reader.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let length = u32::from_be_bytes(prefix) as usize;
    if length > FRAME_BYTES_MAX {
        return Err(WireError::FrameTooLarge {
            claimed: length,
            max: FRAME_BYTES_MAX,
        });
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).await?;
    decode_frame_body(&body)
}

/// Writes one message and flushes it.
pub async fn write_message<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
) -> Result<(), WireError> {
    let frame = encode_frame(message)?;
    writer.write_all(&frame).await?;
    writer.flush().await?;
    Ok(())
}
