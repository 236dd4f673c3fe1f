//! The client against the frames a server sends, decoded from bytes.

use super::*;

fn decoded(bytes: &[u8]) -> Result<ServerFrame, ClientError> {
    match codec::decode_frame(bytes, 1 << 20) {
        Ok(Decoded::Frame(frame, _)) => server_frame(&frame),
        other => panic!("not a frame: {other:?}"),
    }
}

#[test]
fn a_dispatch_is_typed_with_its_ttl_if_any() {
    let mut bytes = Vec::new();
    crate::outgoing::encode_dispatch(
        &mut bytes,
        &crate::request::QueueName::new(b"jobs").unwrap(),
        b"body",
        crate::id::MessageId::from_u128(255),
        Some(42),
    );
    let frame = decoded(&bytes).unwrap();
    assert_eq!(frame.kind(), "dispatch");
    let dispatch = frame.into_dispatch().unwrap();
    assert_eq!(dispatch.queue, "jobs");
    assert_eq!(dispatch.content, b"body");
    assert_eq!(dispatch.id, format!("{:032x}", 255));
    assert_eq!(dispatch.ttl, Some(42));
}

#[test]
fn a_frame_only_clients_send_is_a_clear_error() {
    let mut bytes = Vec::new();
    codec::encode_frame(
        &mut bytes,
        MessageType::Ack,
        &[(PacketType::Queue, b"q"), (PacketType::MessageId, b"x")],
    );
    let error = decoded(&bytes).unwrap_err();
    assert!(matches!(error, ClientError::Protocol(_)), "{error:?}");
    assert_eq!(
        error.to_string(),
        "unexpected data from the server: message type 004 (ack), which only clients send"
    );
}

#[test]
fn an_unexpected_frame_says_what_came_instead() {
    let error = ClientError::Unexpected {
        expected: "dispatch",
        got: "receipt",
    };
    assert_eq!(
        error.to_string(),
        "the server sent a receipt frame where a dispatch was expected"
    );
}

fn from_server(frame: crate::outgoing::Outgoing) -> Result<ServerFrame, ClientError> {
    let mut bytes = Vec::new();
    frame.encode(&mut bytes, Dialect::V12);
    match codec::decode_frame_in(&bytes, 1 << 20, Dialect::V12) {
        Ok(Decoded::Frame(frame, _)) => server_frame(&frame),
        other => panic!("not a frame: {other:?}"),
    }
}

#[test]
fn v12_frames_are_typed() {
    use crate::outgoing::{Dispatch as Sent, Outgoing};
    use crate::refusal::ErrorCode;
    let queue = crate::request::QueueName::new(b"jobs").unwrap();
    let id = crate::id::MessageId::from_u128(9);
    assert_eq!(
        from_server(Outgoing::Welcome {
            version: Version::V1_2,
            features: Features::served(true, false),
        })
        .unwrap(),
        ServerFrame::Welcome {
            version: Version::V1_2,
            features: Features::served(true, false)
        }
    );
    assert_eq!(
        from_server(Outgoing::Receipt {
            queue: queue.clone(),
            id
        })
        .unwrap(),
        ServerFrame::Receipt {
            queue: "jobs".into(),
            id: id.to_string()
        }
    );
    assert_eq!(
        from_server(Outgoing::Error {
            code: ErrorCode::QueueFull,
            text: "queue full".into()
        })
        .unwrap(),
        ServerFrame::Error {
            code: 429,
            text: "queue full".into()
        }
    );
    assert_eq!(
        from_server(Outgoing::Counts {
            queue: queue.clone(),
            ready: 4,
            delayed: 3,
            in_flight: 2,
            consumers: 1
        })
        .unwrap(),
        ServerFrame::Counts {
            queue: "jobs".into(),
            ready: 4,
            delayed: 3,
            in_flight: 2,
            consumers: 1
        }
    );
    assert_eq!(
        from_server(Outgoing::Flushed {
            queue: queue.clone(),
            count: 7
        })
        .unwrap(),
        ServerFrame::Flushed {
            queue: "jobs".into(),
            count: 7
        }
    );
    let dispatch = from_server(Outgoing::Dispatch(Sent {
        queue,
        id,
        content: std::sync::Arc::from(&b"x"[..]),
        ttl_remaining: None,
        deliveries: 2,
    }))
    .unwrap()
    .into_dispatch()
    .unwrap();
    assert_eq!((dispatch.deliveries, dispatch.ttl), (Some(2), None));
}

#[test]
fn malformed_v12_packets_from_the_server_are_protocol_errors() {
    let q = (PacketType::Queue, &b"q"[..]);
    for (t, packets) in [
        (
            MessageType::Counts,
            vec![q, (PacketType::Counts, &b"1 2 3"[..])],
        ),
        (
            MessageType::Counts,
            vec![q, (PacketType::Counts, b"1 2 3 x")],
        ),
        (MessageType::Flushed, vec![q, (PacketType::Count, b"-1")]),
        (
            MessageType::Error,
            vec![
                (PacketType::ErrorCode, &b"4000"[..]),
                (PacketType::Content, b""),
            ],
        ),
        (
            MessageType::Welcome,
            vec![
                (PacketType::Version, &b"12"[..]),
                (PacketType::Features, b""),
            ],
        ),
        (
            MessageType::Dispatch,
            vec![
                q,
                (PacketType::Content, b""),
                (PacketType::MessageId, b"i"),
                (PacketType::Deliveries, b"4294967296"),
            ],
        ),
    ] {
        let mut bytes = Vec::new();
        codec::encode_frame(&mut bytes, t, &packets);
        let error = match codec::decode_frame_in(&bytes, 1 << 20, Dialect::V12) {
            Ok(Decoded::Frame(frame, _)) => server_frame(&frame).unwrap_err(),
            other => panic!("{other:?}"),
        };
        assert!(matches!(error, ClientError::Protocol(_)), "{t}: {error:?}");
    }
}
