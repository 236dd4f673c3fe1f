//! Request validation: names, numbers, dialect gating, and the bytes `Request::encode` writes.

use super::*;
use crate::codec::{self, decode_frame, Decoded};

fn request(bytes: &[u8]) -> Result<Request, RequestError> {
    match decode_frame(bytes, 1 << 20) {
        Ok(Decoded::Frame(frame, _)) => Request::from_frame(&frame, Dialect::V10),
        other => panic!("not a frame: {other:?}"),
    }
}

fn frame(t: MessageType, packets: &[(PacketType, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    codec::encode_frame(&mut out, t, packets);
    out
}

#[test]
fn queue_names() {
    assert!(QueueName::new(b"orders").is_ok());
    assert!(QueueName::new("zürich-ünïcode".as_bytes()).is_ok());
    assert!(QueueName::new(&[b'a'; 255]).is_ok());
    assert_eq!(
        QueueName::new(&[b'a'; 256]),
        Err(RequestError::QueueName(QueueNameProblem::Length(256)))
    );
    assert_eq!(
        QueueName::new(b""),
        Err(RequestError::QueueName(QueueNameProblem::Length(0)))
    );
    assert_eq!(
        QueueName::new(b"a\nb"),
        Err(RequestError::QueueName(QueueNameProblem::ControlCharacter))
    );
    assert_eq!(
        QueueName::new(b"\xff"),
        Err(RequestError::QueueName(QueueNameProblem::NotUtf8))
    );
}

#[test]
fn send_in_both_dialects() {
    let v10 = request(&frame(
        MessageType::Send,
        &[(PacketType::Queue, b"q"), (PacketType::Content, b"body")],
    ))
    .unwrap();
    assert!(!v10.shows_v11());
    let v11 = request(&frame(
        MessageType::Send,
        &[
            (PacketType::Queue, b"q"),
            (PacketType::Content, b"body"),
            (PacketType::Ttl, b"60"),
        ],
    ))
    .unwrap();
    assert!(v11.shows_v11());
    assert!(matches!(v11, Request::Send { ttl: Some(60), .. }));
}

#[test]
fn numbers_must_be_decimal() {
    let bad = request(&frame(
        MessageType::Consume,
        &[(PacketType::Queue, b"q"), (PacketType::Count, b"ten")],
    ));
    assert!(matches!(
        bad,
        Err(RequestError::NotANumber {
            packet: PacketType::Count,
            ..
        })
    ));
    let bad = request(&frame(
        MessageType::Requeue,
        &[
            (PacketType::Queue, b"q"),
            (PacketType::MessageId, b"x"),
            (PacketType::Ttl, b"-1"),
        ],
    ));
    assert!(matches!(
        bad,
        Err(RequestError::NotANumber {
            packet: PacketType::Ttl,
            ..
        })
    ));
}

#[test]
fn huge_numbers_saturate() {
    let huge = request(&frame(
        MessageType::Consume,
        &[
            (PacketType::Queue, b"q"),
            (PacketType::Count, b"99999999999999999999999"),
        ],
    ));
    assert!(matches!(
        huge,
        Ok(Request::Consume {
            count: u64::MAX,
            ..
        })
    ));
    assert_eq!(saturating_decimal(b"18446744073709551615"), Some(u64::MAX));
    assert_eq!(saturating_decimal(b"18446744073709551616"), Some(u64::MAX));
    assert_eq!(saturating_decimal(&[b'9'; 4000]), Some(u64::MAX));
    assert_eq!(saturating_decimal(b"00000000000000000000000042"), Some(42));
    assert_eq!(saturating_decimal(b"1e30"), None);
    assert_eq!(saturating_decimal(b""), None);
}

#[test]
fn clients_cannot_dispatch() {
    let bytes = frame(
        MessageType::Dispatch,
        &[
            (PacketType::Queue, b"q"),
            (PacketType::Content, b"c"),
            (PacketType::MessageId, b"i"),
        ],
    );
    assert_eq!(
        request(&bytes),
        Err(RequestError::ServerOnly(MessageType::Dispatch))
    );
}

#[test]
fn foreign_ids_are_kept_as_unknown() {
    let ack = request(&frame(
        MessageType::Ack,
        &[
            (PacketType::Queue, b"q"),
            (PacketType::MessageId, b"not-ours"),
        ],
    ))
    .unwrap();
    assert!(matches!(ack, Request::Ack { id: None, .. }));
}

// ---- v1.2 ----

fn request_in(bytes: &[u8], dialect: Dialect) -> Result<Request, RequestError> {
    match codec::decode_frame_in(bytes, 1 << 20, dialect) {
        Ok(Decoded::Frame(frame, _)) => Request::from_frame(&frame, dialect),
        other => panic!("not a frame: {other:?}"),
    }
}

fn v12(t: MessageType, packets: &[(PacketType, &[u8])]) -> Result<Request, RequestError> {
    request_in(&frame(t, packets), Dialect::V12)
}

fn q(name: &str) -> QueueName {
    QueueName::new(name.as_bytes()).unwrap()
}

#[test]
fn v12_requests_parse() {
    use PacketType::*;
    assert_eq!(
        v12(
            MessageType::Send,
            &[
                (Queue, b"jobs"),
                (Content, b"x"),
                (Ttl, b"60"),
                (Delay, b"5000")
            ]
        ),
        Ok(Request::Send {
            queue: q("jobs"),
            content: Arc::from(&b"x"[..]),
            ttl: Some(60),
            delay: Some(5000),
        })
    );
    assert_eq!(
        v12(
            MessageType::Consume,
            &[(Queue, b"jobs"), (Count, b"3"), (Lease, b"30000")]
        ),
        Ok(Request::Consume {
            queue: q("jobs"),
            count: 3,
            lease: Some(30000),
        })
    );
    let id = crate::id::MessageId::from_u128(0xabc);
    assert_eq!(
        v12(
            MessageType::Requeue,
            &[
                (Queue, b"jobs"),
                (MessageId, &id.to_hex()),
                (Ttl, b"0"),
                (Delay, b"0")
            ]
        ),
        Ok(Request::Requeue {
            queue: q("jobs"),
            id: Some(id),
            ttl: 0,
            delay: Some(0),
        })
    );
    assert_eq!(
        v12(
            MessageType::Touch,
            &[(Queue, b"jobs"), (MessageId, &id.to_hex())]
        ),
        Ok(Request::Touch {
            queue: q("jobs"),
            id: Some(id)
        })
    );
    assert_eq!(
        v12(MessageType::Stats, &[(Queue, b"jobs")]),
        Ok(Request::Stats { queue: q("jobs") })
    );
    assert_eq!(
        v12(MessageType::Flush, &[(Queue, b"jobs")]),
        Ok(Request::Flush { queue: q("jobs") })
    );
    assert_eq!(
        v12(
            MessageType::Hello,
            &[
                (Version, b"1.2"),
                (Token, b"s3cret"),
                (Features, b"durable x-new")
            ]
        ),
        Ok(Request::Hello {
            version: crate::hello::Version::V1_2,
            token: Some(Arc::from(&b"s3cret"[..])),
            features: [crate::hello::Feature::Durable].into_iter().collect(),
        })
    );
}

#[test]
fn a_hello_decodes_in_every_dialect_and_needs_a_version() {
    let hello = b"H0100701P06000000000000000000000000000031.2";
    for dialect in Dialect::ALL {
        assert!(matches!(
            request_in(hello, dialect),
            Ok(Request::Hello { features, token: None, .. }) if features.is_empty()
        ));
    }
    for bad in [&b"1"[..], b"", b"1.2.3", b"one"] {
        let bytes = frame(MessageType::Hello, &[(PacketType::Version, bad)]);
        assert!(
            matches!(
                request_in(&bytes, Dialect::V10),
                Err(RequestError::Version(_))
            ),
            "{bad:?}"
        );
    }
    let bytes = frame(
        MessageType::Hello,
        &[
            (PacketType::Version, b"1.2"),
            (PacketType::Features, b"a  b"),
        ],
    );
    assert!(matches!(
        request_in(&bytes, Dialect::V10),
        Err(RequestError::Features(_))
    ));
}

#[test]
fn v12_numbers_are_plain_decimals_in_range() {
    use PacketType::*;
    let send = |delay: &[u8]| {
        v12(
            MessageType::Send,
            &[(Queue, b"q"), (Content, b""), (Delay, delay)],
        )
    };
    let max_delay = MAX_DELAY_MS.to_string();
    assert!(matches!(
        send(max_delay.as_bytes()),
        Ok(Request::Send {
            delay: Some(MAX_DELAY_MS),
            ..
        })
    ));
    let over = (MAX_DELAY_MS + 1).to_string();
    assert!(matches!(
        send(over.as_bytes()),
        Err(RequestError::OutOfRange {
            packet: Delay,
            max: MAX_DELAY_MS,
            ..
        })
    ));
    for bad in [
        &b""[..],
        b"-1",
        b"+1",
        b" 1",
        b"1 ",
        b"1.5",
        b"1e3",
        b"0x10",
    ] {
        assert!(
            matches!(
                send(bad),
                Err(RequestError::NotANumber { packet: Delay, .. })
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        send(b"0005"),
        Ok(Request::Send { delay: Some(5), .. })
    ));

    let consume = |count: &[u8], lease: &[u8]| {
        v12(
            MessageType::Consume,
            &[(Queue, b"q"), (Count, count), (Lease, lease)],
        )
    };
    assert!(matches!(
        consume(b"18446744073709551615", b"4294967295"),
        Ok(Request::Consume {
            count: u64::MAX,
            lease: Some(MAX_LEASE_MS),
            ..
        })
    ));
    assert!(matches!(
        consume(b"18446744073709551616", b"1"),
        Err(RequestError::OutOfRange {
            packet: Count,
            max: u64::MAX,
            ..
        })
    ));
    assert!(matches!(
        consume(b"000000000000000000000018446744073709551615", b"1"),
        Ok(Request::Consume {
            count: u64::MAX,
            ..
        })
    ));
    assert!(matches!(
        consume(b"1", b"4294967296"),
        Err(RequestError::OutOfRange {
            packet: Lease,
            max: MAX_LEASE_MS,
            ..
        })
    ));
    let ttl = v12(
        MessageType::Send,
        &[(Queue, b"q"), (Content, b""), (Ttl, &[b'9'; 30])],
    );
    assert!(matches!(
        ttl,
        Err(RequestError::OutOfRange { packet: Ttl, .. })
    ));
    // The same numbers on v1.0 saturate, as they always did.
    let bytes = frame(
        MessageType::Send,
        &[(Queue, b"q"), (Content, b""), (Ttl, &[b'9'; 30])],
    );
    assert!(matches!(
        request_in(&bytes, Dialect::V10),
        Ok(Request::Send {
            ttl: Some(u64::MAX),
            ..
        })
    ));
    assert_eq!(MAX_DELAY_MS, 36_525 * 86_400_000 / 10, "3652.5 days");
}

#[test]
fn v12_frames_at_older_dialects_are_refused_even_if_decoded() {
    use PacketType::*;
    let bytes = frame(MessageType::Stats, &[(Queue, b"q")]);
    let decoded = match codec::decode_frame_in(&bytes, 1 << 20, Dialect::V12) {
        Ok(Decoded::Frame(frame, _)) => frame,
        other => panic!("{other:?}"),
    };
    for dialect in [Dialect::V10, Dialect::V11] {
        assert_eq!(
            Request::from_frame(&decoded, dialect),
            Err(RequestError::NotInDialect {
                message_type: MessageType::Stats,
                dialect
            })
        );
    }
    let bytes = frame(
        MessageType::Send,
        &[(Queue, b"q"), (Content, b""), (Delay, b"1")],
    );
    let decoded = match codec::decode_frame_in(&bytes, 1 << 20, Dialect::V12) {
        Ok(Decoded::Frame(frame, _)) => frame,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        Request::from_frame(&decoded, Dialect::V11),
        Err(RequestError::PacketNotInDialect {
            packet: Delay,
            dialect: Dialect::V11
        })
    );
}

#[test]
fn server_frames_from_a_client_are_refused() {
    use PacketType::*;
    let id = crate::id::MessageId::from_u128(1).to_hex();
    for (t, packets) in [
        (
            MessageType::Welcome,
            vec![(Version, &b"1.2"[..]), (Features, b"")],
        ),
        (
            MessageType::Receipt,
            vec![(Queue, &b"q"[..]), (MessageId, &id[..])],
        ),
        (
            MessageType::Error,
            vec![(ErrorCode, &b"400"[..]), (Content, b"x")],
        ),
        (
            MessageType::Counts,
            vec![(Queue, &b"q"[..]), (Counts, b"0 0 0 0")],
        ),
        (
            MessageType::Flushed,
            vec![(Queue, &b"q"[..]), (Count, b"0")],
        ),
    ] {
        assert_eq!(v12(t, &packets), Err(RequestError::ServerOnly(t)));
    }
}

/// The exact bytes a client sends.
#[test]
fn requests_encode_as_a_client_sends_them() {
    let mut out = Vec::new();
    Request::Hello {
        version: crate::hello::Version::V1_2,
        token: None,
        features: Default::default(),
    }
    .encode(&mut out);
    assert_eq!(out, b"H0100701P06000000000000000000000000000031.2");

    out.clear();
    Request::Send {
        queue: q("jobs"),
        content: Arc::from(&b"hello"[..]),
        ttl: None,
        delay: Some(5000),
    }
    .encode(&mut out);
    assert_eq!(
        out,
        &b"H0100103P0100000000000000000000000000004jobsP0200000000000000000000000000005helloP11000000000000000000000000000045000"[..]
    );

    out.clear();
    Request::Send {
        queue: q("Queue"),
        content: Arc::from(&b"Hello World"[..]),
        ttl: None,
        delay: None,
    }
    .encode(&mut out);
    assert_eq!(
        out,
        &b"H0100102P0100000000000000000000000000005QueueP0200000000000000000000000000011Hello World"[..]
    );

    let id = MessageId::from_u128(255);
    let cases: Vec<(Request, String)> = vec![
        (
            Request::Consume {
                queue: q("q"),
                count: 5,
                lease: Some(30000),
            },
            format!(
                "H0100203{}{}{}",
                p("01", "q"),
                p("04", "5"),
                p("12", "30000")
            ),
        ),
        (
            Request::Ack {
                queue: q("q"),
                id: Some(id),
            },
            format!("H0100402{}{}", p("01", "q"), p("03", &id.to_string())),
        ),
        (
            Request::Requeue {
                queue: q("q"),
                id: None,
                ttl: 60,
                delay: Some(1),
            },
            format!(
                "H0100504{}{}{}{}",
                p("01", "q"),
                p("03", ""),
                p("05", "60"),
                p("11", "1")
            ),
        ),
        (
            Request::DeadLetter {
                queue: q("q"),
                id: Some(id),
            },
            format!("H0100602{}{}", p("01", "q"), p("03", &id.to_string())),
        ),
        (
            Request::Touch {
                queue: q("q"),
                id: Some(id),
            },
            format!("H0101102{}{}", p("01", "q"), p("03", &id.to_string())),
        ),
        (
            Request::Stats { queue: q("q") },
            format!("H0101201{}", p("01", "q")),
        ),
        (
            Request::Flush { queue: q("q") },
            format!("H0101401{}", p("01", "q")),
        ),
        (
            Request::Hello {
                version: crate::hello::Version {
                    major: 1,
                    minor: 10,
                },
                token: Some(Arc::from(&b"t"[..])),
                features: crate::hello::Features::served(true, true),
            },
            format!(
                "H0100703{}{}{}",
                p("06", "1.10"),
                p("07", "t"),
                p(
                    "08",
                    "confirm stats delay attempts lease dead-letter durable"
                )
            ),
        ),
    ];
    for (request, expected) in cases {
        out.clear();
        request.encode(&mut out);
        assert_eq!(String::from_utf8_lossy(&out), expected);
        assert_eq!(request_in(&out, Dialect::V12), Ok(request));
    }
}

fn p(code: &str, content: &str) -> String {
    format!("P{code}{:029}{content}", content.len())
}
