//! Round trips of every message, and refusal of oversized or malformed frames before allocation.

use driftless_core::{
    CausalLength, CellWrite, Change, ChangeOp, ColumnName, NodeId, PrimaryKey, SchemaFingerprint,
    TableName, Timestamp, Value, Version,
};
use driftless_store::LogSeq;
use driftless_wire::*;

fn change(i: i64) -> Change {
    Change {
        table: TableName::new("items").unwrap(),
        key: PrimaryKey::integer(i),
        version: Version::new(Timestamp::new(1_000 + i as u64, 0), NodeId::new(7)),
        causal_length: CausalLength(1),
        op: ChangeOp::Upsert(vec![CellWrite {
            column: ColumnName::new("name").unwrap(),
            value: Value::Text(format!("item number {i} with a repetitive description")),
            base: None,
        }]),
        schema: SchemaFingerprint(9),
    }
}

fn messages() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            node: NodeId::new(42),
            name: "edge-1".into(),
            token: Some("s3cret".into()),
            tables: vec![(TableName::new("items").unwrap(), SchemaFingerprint(5))],
            cursor: LogSeq(10),
            log_head: LogSeq(99),
        }),
        Message::Batch(Batch {
            kind: BatchKind::Log,
            after: LogSeq(0),
            next: LogSeq(100),
            head: LogSeq(120),
            trace_id: 77,
            changes: (0..100).map(change).collect(),
        }),
        Message::Batch(Batch {
            kind: BatchKind::Snapshot,
            after: LogSeq(0),
            next: LogSeq(0),
            head: LogSeq(1),
            trace_id: 1,
            changes: vec![change(1)],
        }),
        Message::Ack {
            applied_through: LogSeq(5),
        },
        Message::SnapshotDone {
            resume_after: LogSeq(6),
        },
        Message::Heartbeat {
            log_head: LogSeq(7),
        },
        Message::Goodbye {
            reason: "bye".into(),
        },
        Message::Digest {
            head: LogSeq(3),
            cursor: LogSeq(2),
            tables: vec![TableDigestWire {
                table: TableName::new("items").unwrap(),
                fingerprints: vec![1, -2, i64::MAX],
            }],
        },
        recon(ReconRequest::Top {
            fingerprints: vec![0, -1, 5],
        }),
        recon(ReconRequest::Items {
            buckets: vec![3, 70_000],
            items: vec![
                (3, PrimaryKey::integer(-4), -9),
                (70_000, PrimaryKey::integer(8), 11),
            ],
            repair: true,
        }),
        recon(ReconRequest::Repair {
            changes: vec![change(3)],
        }),
        recon(ReconRequest::Verify {
            after: None,
            repair: false,
        }),
        recon(ReconRequest::Verify {
            after: Some(PrimaryKey::integer(12)),
            repair: true,
        }),
        reply(ReconReply::Fine {
            buckets: vec![(4, vec![1, 2, 3])],
        }),
        reply(ReconReply::Rows {
            wanted: vec![PrimaryKey::integer(1)],
            differing: vec![PrimaryKey::integer(2)],
            only_here: vec![],
            changes: vec![change(2)],
        }),
        reply(ReconReply::Repaired { applied: 9 }),
        reply(ReconReply::Refused {
            reason: "no".into(),
        }),
        reply(ReconReply::Verified {
            checked: 5_000,
            restored: 2,
            adopted: 1,
            next: Some(PrimaryKey::integer(5_000)),
        }),
        reply(ReconReply::Verified {
            checked: 3,
            restored: 0,
            adopted: 0,
            next: None,
        }),
    ]
}

fn recon(request: ReconRequest) -> Message {
    Message::ReconRequest {
        id: 17,
        table: TableName::new("items").unwrap(),
        request,
    }
}

fn reply(reply: ReconReply) -> Message {
    Message::ReconResponse { id: 17, reply }
}

#[tokio::test]
async fn every_message_round_trips_through_a_stream() {
    let mut buffer = Vec::new();
    for m in messages() {
        write_message(&mut buffer, &m).await.unwrap();
    }
    let mut reader = &buffer[..];
    for m in messages() {
        assert_eq!(read_message(&mut reader).await.unwrap(), m);
    }
    assert!(matches!(
        read_message(&mut reader).await,
        Err(WireError::Closed)
    ));
}

#[test]
fn large_batches_are_compressed() {
    let batch = &messages()[1];
    let frame = encode_frame(batch).unwrap();
    assert_eq!(frame[5], 1, "LZ4 flag set");
    let raw: usize = (0..100)
        .map(|i| driftless_core::codec::encode_change(&change(i)).len())
        .sum();
    assert!(frame.len() < raw / 2, "{} vs {raw}", frame.len());
}

#[tokio::test]
async fn a_frame_claiming_one_gib_is_refused_without_allocating() {
    // Only the 4-byte header is sent: if the reader tried to allocate and fill 1 GiB it would
    // fail with an EOF instead of this error.
    let header = (1u32 << 30).to_be_bytes();
    let mut reader = &header[..];
    match read_message(&mut reader).await {
        Err(WireError::FrameTooLarge { claimed, max }) => {
            assert_eq!(claimed, 1 << 30);
            assert_eq!(max, FRAME_BYTES_MAX);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_compressed_batch_claiming_too_much_is_refused_before_decompressing() {
    let mut body = vec![TAG_BATCH_FOR_TEST, 1];
    body.extend_from_slice(&(u32::MAX).to_le_bytes());
    body.extend_from_slice(&[0; 8]);
    assert!(matches!(
        decode_frame_body(&body),
        Err(WireError::BatchTooLarge { .. })
    ));
}

const TAG_BATCH_FOR_TEST: u8 = 2;

#[test]
fn malformed_frames_get_clear_errors() {
    assert!(matches!(
        decode_frame_body(&[]),
        Err(WireError::Malformed(_))
    ));
    assert!(matches!(
        decode_frame_body(&[99, 0]),
        Err(WireError::UnknownTag(99))
    ));
    assert!(matches!(
        decode_frame_body(&[3, 7, 0]),
        Err(WireError::Malformed(_))
    ));
    // an ack with trailing garbage
    assert!(matches!(
        decode_frame_body(&[3, 0, 0, 0, 0, 0, 0, 0, 0, 1, 9]),
        Err(WireError::Malformed(_))
    ));
    // a batch claiming 10,000 changes with no bytes behind the claim
    let mut body = vec![2, 0, 1];
    body.extend_from_slice(&[0; 32]); // after, next, head, trace id
    body.extend_from_slice(&10_000u32.to_be_bytes());
    let err = decode_frame_body(&body).unwrap_err();
    assert!(
        err.to_string().contains("larger than the bytes left"),
        "{err}"
    );
}

#[test]
fn random_bytes_never_panic() {
    let mut r = driftless_sim::Rng::new(1);
    let mut rng = move || r.next_u64();
    for _ in 0..20_000 {
        let len = (rng() % 64) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng() as u8).collect();
        let _ = decode_frame_body(&bytes);
    }
    // and mutations of valid frames
    for m in messages() {
        let frame = encode_frame(&m).unwrap();
        for _ in 0..2_000 {
            let mut body = frame[4..].to_vec();
            let at = (rng() as usize) % body.len();
            body[at] ^= 1 << (rng() % 8);
            let _ = decode_frame_body(&body);
        }
    }
}
