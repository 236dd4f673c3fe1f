use super::*;

const MAX: usize = 16 << 20;

fn decode_whole(bytes: &[u8]) -> Frame<'_> {
    match decode_frame(bytes, MAX) {
        Ok(Decoded::Frame(frame, used)) => {
            assert_eq!(used, bytes.len(), "frame should use every byte");
            frame
        }
        other => panic!("expected a whole frame, got {other:?}"),
    }
}

fn err(bytes: &[u8]) -> CodecError {
    decode_frame(bytes, MAX).expect_err("expected a decode error")
}

// The byte examples of `man/phpmq-protocol.7` (its Message header and Packet sections, which
// quote the PHPMQ v1 specification), verbatim.
#[test]
fn protocol_doc_header_example() {
    // `H0100102` = version 1, type 001, 2 packets.
    let bytes =
        b"H0100102P0100000000000000000000000000005QueueP0200000000000000000000000000011Hello World";
    let frame = decode_whole(bytes);
    assert_eq!(frame.message_type, MessageType::Send);
    assert_eq!(frame.packet(PacketType::Queue), Some(&b"Queue"[..]));
    assert_eq!(frame.packet(PacketType::Content), Some(&b"Hello World"[..]));
    assert_eq!(frame.packet(PacketType::Ttl), None);
}

#[test]
fn protocol_doc_packet_example() {
    // `P0200000000000000000000000000011` + `Hello World`.
    let mut bytes = b"H0100102P0100000000000000000000000000001q".to_vec();
    bytes.extend_from_slice(b"P0200000000000000000000000000011Hello World");
    let frame = decode_whole(&bytes);
    assert_eq!(frame.required(PacketType::Content), b"Hello World");
}

#[test]
fn encoding_reproduces_the_doc_bytes() {
    let mut out = Vec::new();
    encode_frame(
        &mut out,
        MessageType::Send,
        &[
            (PacketType::Queue, b"Queue"),
            (PacketType::Content, b"Hello World"),
        ],
    );
    assert_eq!(
        out,
        b"H0100102P0100000000000000000000000000005QueueP0200000000000000000000000000011Hello World"
    );
    assert_eq!(
        out.len(),
        encoded_len(&[
            (PacketType::Queue, b"Queue"),
            (PacketType::Content, b"Hello World")
        ])
    );
}

#[test]
fn v11_send_with_ttl_in_any_order() {
    let bytes = b"H0100103P05000000000000000000000000000043600P0100000000000000000000000000001qP0200000000000000000000000000000";
    let frame = decode_whole(bytes);
    assert_eq!(frame.packet(PacketType::Ttl), Some(&b"3600"[..]));
    assert_eq!(frame.packet(PacketType::Content), Some(&b""[..]));
}

#[test]
fn every_message_type_round_trips() {
    fn decode_whole(bytes: &[u8]) -> Frame<'_> {
        match decode_frame_in(bytes, MAX, Dialect::V12) {
            Ok(Decoded::Frame(frame, used)) if used == bytes.len() => frame,
            other => panic!("expected a whole frame, got {other:?}"),
        }
    }
    for message_type in MessageType::ALL {
        let shape = message_type.shape();
        let packets: Vec<(PacketType, &[u8])> = shape
            .required
            .iter()
            .chain(shape.optional)
            .map(|&p| (p, &b"\x00\xffbin"[..]))
            .collect();
        let mut out = Vec::new();
        encode_frame(&mut out, message_type, &packets);
        let frame = decode_whole(&out);
        assert_eq!(frame.message_type, message_type);
        for (p, c) in packets {
            assert_eq!(frame.packet(p), Some(c));
        }
    }
}

#[test]
fn partial_input_asks_for_more() {
    let bytes =
        b"H0100102P0100000000000000000000000000005QueueP0200000000000000000000000000011Hello World";
    for cut in 0..bytes.len() {
        match decode_frame(&bytes[..cut], MAX) {
            Ok(Decoded::Incomplete { needed }) => {
                assert!(needed > cut && needed <= bytes.len())
            }
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
}

#[test]
fn rejects_bad_headers_early() {
    assert_eq!(err(b"X"), CodecError::BadMagic(b'X'));
    assert!(matches!(err(b"H01a0102"), CodecError::BadHeader(_)));
    assert_eq!(err(b"H0200102"), CodecError::UnsupportedVersion(2));
    assert_eq!(err(b"H0100902"), CodecError::UnknownMessageType(9));
    assert_eq!(err(b"H0100000"), CodecError::UnknownMessageType(0));
    assert_eq!(
        err(b"H0100205"),
        CodecError::PacketCount {
            message_type: MessageType::Consume,
            count: 5
        }
    );
    assert_eq!(
        err(b"H0100101"),
        CodecError::PacketCount {
            message_type: MessageType::Send,
            count: 1
        }
    );
}

#[test]
fn rejects_bad_packets() {
    assert!(matches!(
        err(b"H0100102X0100000000000000000000000000005"),
        CodecError::BadPacketHeader(_)
    ));
    assert!(matches!(
        err(b"H0100102P01000000000000000000000000000-5"),
        CodecError::BadPacketHeader(_)
    ));
    assert_eq!(
        err(b"H0100102P0900000000000000000000000000001q"),
        CodecError::UnknownPacketType(9)
    );
    assert_eq!(
        err(b"H0100102P0400000000000000000000000000001q"),
        CodecError::UnexpectedPacket {
            message_type: MessageType::Send,
            packet: PacketType::Count
        }
    );
    assert_eq!(
        err(b"H0100102P0100000000000000000000000000001qP0100000000000000000000000000001q"),
        CodecError::DuplicatePacket(PacketType::Queue)
    );
    assert_eq!(
        err(b"H0100102P0100000000000000000000000000001qP0500000000000000000000000000001q"),
        CodecError::MissingPacket {
            message_type: MessageType::Send,
            packet: PacketType::Content
        }
    );
}

#[test]
fn rejects_oversized_packets_before_reading_them() {
    assert_eq!(
        decode_frame(b"H0100102P0100000000000000000000000001025", 10),
        Err(CodecError::PacketTooLarge {
            packet: PacketType::Queue,
            length: 1025,
            max: 1024
        })
    );
    assert!(matches!(
        err(b"H0100102P0199999999999999999999999999999"),
        CodecError::PacketTooLarge { .. }
    ));
}

/// A frame's bytes up to and including the header of its last packet, whose declared length is
/// `length`: what a server has when it must decide, before any of that content.
fn headers_only(header: &str, before: &[(u8, &[u8])], last: u8, length: u128) -> Vec<u8> {
    let mut bytes = header.as_bytes().to_vec();
    for &(code, content) in before {
        bytes.extend(format!("P{code:02}{:029}", content.len()).into_bytes());
        bytes.extend_from_slice(content);
    }
    bytes.extend(format!("P{last:02}{length:029}").into_bytes());
    bytes
}

/// The audit's case: every packet but the content may be declared at `--max-message-size`
/// (16 MiB), and was read whole before the request layer refused it. Each type now has its own
/// bound, decided from the packet header with none of the content in the buffer.
#[test]
fn short_packets_over_their_own_bound_are_refused_from_the_header() {
    use PacketType::*;
    for (packet, bound) in [
        (Queue, MAX_QUEUE_PACKET_LEN),
        (MessageId, MAX_ID_PACKET_LEN),
        (Count, MAX_NUMBER_PACKET_LEN),
        (Ttl, MAX_NUMBER_PACKET_LEN),
        (Version, MAX_VERSION_PACKET_LEN),
        (Token, MAX_TOKEN_PACKET_LEN),
        (Features, MAX_FEATURES_PACKET_LEN),
        (Deliveries, MAX_NUMBER_PACKET_LEN),
        (ErrorCode, MAX_NUMBER_PACKET_LEN),
        (Delay, MAX_NUMBER_PACKET_LEN),
        (Lease, MAX_NUMBER_PACKET_LEN),
        (Counts, MAX_COUNTS_PACKET_LEN),
    ] {
        assert_eq!(packet.max_len(MAX), bound, "{packet}");
    }
    let (q, v12): (&[u8], _) = (b"q", Dialect::V12);
    // The frame header, the packets before the long one, the long one's type, the dialect.
    type Case<'a> = (&'a str, &'a [(u8, &'a [u8])], PacketType, Dialect);
    let cases: [Case; 11] = [
        ("H0100102", &[], Queue, Dialect::V10),
        ("H0100402", &[(1, q)], MessageId, Dialect::V11),
        ("H0100202", &[(1, q)], Count, Dialect::V10),
        ("H0100103", &[(1, q), (2, q)], Ttl, Dialect::V11),
        ("H0100103", &[(1, q), (2, q)], Delay, v12),
        ("H0100203", &[(1, q), (4, b"1")], Lease, v12),
        ("H0100701", &[], Version, Dialect::V10),
        ("H0100702", &[(6, b"1.2")], Token, v12),
        ("H0100702", &[(6, b"1.2")], Features, Dialect::V11),
        ("H0101102", &[(1, q)], MessageId, v12),
        ("H0101201", &[], Queue, v12),
    ];
    for (header, before, packet, dialect) in cases {
        let bound = packet.max_len(MAX);
        for length in [bound as u128 + 1, 1 << 20, MAX as u128] {
            let bytes = headers_only(header, before, packet.code(), length);
            assert_eq!(
                decode_frame_in(&bytes, MAX, dialect),
                Err(CodecError::PacketTooLarge {
                    packet,
                    length,
                    max: bound
                }),
                "{header} {packet} {length} in {dialect}"
            );
        }
        // At the bound, the header is fine: the decoder waits for the content.
        let bytes = headers_only(header, before, packet.code(), bound as u128);
        assert_eq!(
            decode_frame_in(&bytes, MAX, dialect),
            Ok(Decoded::Incomplete {
                needed: bytes.len() + bound
            }),
            "{header} {packet} in {dialect}"
        );
    }
    // Server frames, as a client decodes them (with no practical content limit).
    let id: &[u8] = b"0123456789abcdef0123456789abcdef";
    for (header, before, packet) in [
        ("H0100303", &[(1, q), (2, q)][..], PacketType::MessageId),
        (
            "H0100304",
            &[(1, q), (2, q), (3, id)][..],
            PacketType::Deliveries,
        ),
        ("H0101002", &[][..], PacketType::ErrorCode),
        ("H0100802", &[(6, &b"1.2"[..])][..], PacketType::Features),
    ] {
        let bytes = headers_only(header, before, packet.code(), 1 << 24);
        assert_eq!(
            decode_frame_in(&bytes, usize::MAX >> 1, v12),
            Err(CodecError::PacketTooLarge {
                packet,
                length: 1 << 24,
                max: packet.max_len(usize::MAX)
            }),
            "{header} {packet}"
        );
    }
}

#[test]
fn the_413_text_names_the_packet_its_length_and_its_limit() {
    let bytes = headers_only("H0100102", &[], 1, 16 << 20);
    let error = decode_frame(&bytes, MAX).expect_err("over the queue bound");
    assert_eq!(
        error.to_string(),
        "packet 01 (queue) declares 16777216 bytes, over the limit of 1024 bytes"
    );
}

#[test]
fn packets_at_their_limit_are_taken() {
    // Content at --max-message-size, whatever that is; the others at their own bound.
    let content = vec![b'c'; 100];
    let mut bytes = Vec::new();
    encode_frame(
        &mut bytes,
        MessageType::Send,
        &[(PacketType::Queue, b"q"), (PacketType::Content, &content)],
    );
    match decode_frame(&bytes, 100) {
        Ok(Decoded::Frame(frame, used)) => {
            assert_eq!(used, bytes.len());
            assert_eq!(frame.required(PacketType::Content), &content[..]);
        }
        other => panic!("content at the limit: {other:?}"),
    }
    assert_eq!(
        decode_frame(&bytes, 99),
        Err(CodecError::PacketTooLarge {
            packet: PacketType::Content,
            length: 100,
            max: 99
        })
    );
    // Content is not held to any of the short bounds.
    let big = vec![b'c'; MAX_TOKEN_PACKET_LEN + 1];
    let mut bytes = Vec::new();
    encode_frame(
        &mut bytes,
        MessageType::Send,
        &[(PacketType::Queue, b"q"), (PacketType::Content, &big)],
    );
    assert!(matches!(decode_frame(&bytes, MAX), Ok(Decoded::Frame(..))));

    // A queue name at the packet bound is read whole, so the request layer can answer 422
    // (over 255 bytes) instead of a 413.
    let name = vec![b'n'; MAX_QUEUE_PACKET_LEN];
    let number = vec![b'0'; MAX_NUMBER_PACKET_LEN];
    let mut bytes = Vec::new();
    encode_frame(
        &mut bytes,
        MessageType::Consume,
        &[(PacketType::Queue, &name), (PacketType::Count, &number)],
    );
    let frame = decode_whole(&bytes);
    assert!(matches!(
        crate::request::Request::from_frame(&frame, Dialect::V12),
        Err(crate::request::RequestError::QueueName(
            crate::request::QueueNameProblem::Length(MAX_QUEUE_PACKET_LEN)
        ))
    ));
    // The longest valid name, with a count padded to the bound, is a request.
    let name = vec![b'n'; crate::request::MAX_QUEUE_NAME_LEN];
    let mut bytes = Vec::new();
    encode_frame(
        &mut bytes,
        MessageType::Consume,
        &[(PacketType::Queue, &name), (PacketType::Count, &number)],
    );
    assert!(crate::request::Request::from_frame(&decode_whole(&bytes), Dialect::V12).is_ok());
}

#[test]
fn max_message_size_bounds_the_content_alone() {
    for packet in PacketType::ALL {
        if packet != PacketType::Content {
            // A tiny --max-message-size must not make a 32-byte id too long to ack with.
            assert_eq!(packet.max_len(10), packet.max_len(usize::MAX), "{packet}");
            assert!(
                packet.max_len(usize::MAX) <= MAX_TOKEN_PACKET_LEN,
                "{packet}"
            );
        }
    }
    assert_eq!(PacketType::Content.max_len(usize::MAX), usize::MAX);
    assert_eq!(PacketType::Content.max_len(10), 10);
}

/// With `--max-message-size` near usize::MAX, `header_end + length` used to wrap, and the
/// wrapped end then sliced backwards (a panic). Now it is an oversized packet.
#[test]
fn a_length_past_the_address_space_is_oversized_not_a_panic() {
    let before: &[(u8, &[u8])] = &[(1, b"q")];
    // The content's header ends at 8 + 33 + 32 = 73.
    for length in [usize::MAX - 72, usize::MAX - 10, usize::MAX] {
        let mut bytes = headers_only("H0100102", before, 2, length as u128);
        bytes.extend_from_slice(b"some of the content");
        assert_eq!(
            decode_frame(&bytes, usize::MAX),
            Err(CodecError::PacketTooLarge {
                packet: PacketType::Content,
                length: length as u128,
                max: usize::MAX - 73
            }),
            "{length}"
        );
    }
    // The largest length that can be addressed still only asks for more.
    let bytes = headers_only("H0100102", before, 2, (usize::MAX - 73) as u128);
    assert_eq!(
        decode_frame(&bytes, usize::MAX),
        Ok(Decoded::Incomplete { needed: usize::MAX })
    );
}

/// Random bytes and mutated valid frames: the decoder answers every one without panicking,
/// never claims more bytes than it was given, and whatever it accepts re-encodes the same.
#[test]
fn arbitrary_input_never_panics() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut valid = Vec::new();
    encode_frame(
        &mut valid,
        MessageType::Send,
        &[
            (PacketType::Queue, b"q"),
            (PacketType::Content, b"hello"),
            (PacketType::Ttl, b"60"),
        ],
    );
    for round in 0..100_000 {
        let mut input = if round % 2 == 0 {
            valid.clone()
        } else {
            (0..(random() % 120)).map(|_| random() as u8).collect()
        };
        for _ in 0..(random() % 4) {
            if input.is_empty() {
                break;
            }
            let at = (random() as usize) % input.len();
            input[at] = match random() % 3 {
                0 => b'0' + (random() % 10) as u8,
                1 => random() as u8,
                _ => b'9',
            };
        }
        let cut = (random() as usize) % (input.len() + 1);
        let input = &input[..cut];
        if let Ok(Decoded::Frame(frame, used)) = decode_frame(input, 1 << 20) {
            assert!(used <= input.len());
            let packets: Vec<(PacketType, &[u8])> = PacketType::ALL
                .into_iter()
                .filter_map(|p| frame.packet(p).map(|c| (p, c)))
                .collect();
            assert_eq!(encoded_len(&packets), used, "{input:?}");
            // Validation must not panic on what the decoder lets through either.
            let _ = crate::request::Request::from_frame(&frame, Dialect::V10);
        }
    }
}

#[test]
fn length_fields_parse_on_both_paths() {
    assert_eq!(parse_length(b"00000000000000000000000000011"), Some(11));
    assert_eq!(
        parse_length(b"00000000009999999999999999999"),
        Some(9_999_999_999_999_999_999)
    );
    assert_eq!(
        parse_length(b"99999999999999999999999999999"),
        Some(99_999_999_999_999_999_999_999_999_999)
    );
    assert_eq!(parse_length(b"0000000000000000000000000001x"), None);
    assert_eq!(parse_length(b"x0000000000000000000000000001"), None);
    let mut out = Vec::new();
    push_digits(&mut out, 0, 3);
    push_digits(&mut out, 1_234_567, 29);
    assert_eq!(out, format!("000{:029}", 1_234_567).into_bytes());
}

#[test]
fn parse_decimal_rejects_non_digits() {
    assert_eq!(parse_decimal(b"3600"), Some(3600));
    assert_eq!(parse_decimal(b""), None);
    assert_eq!(parse_decimal(b"-1"), None);
    assert_eq!(parse_decimal(b"1 "), None);
    assert_eq!(parse_decimal(&[b'9'; 40]), None);
}

// ---- v1.2 ----

fn decode_in(bytes: &[u8], dialect: Dialect) -> Result<Decoded<'_>, CodecError> {
    decode_frame_in(bytes, MAX, dialect)
}

fn whole_in(bytes: &[u8], dialect: Dialect) -> Frame<'_> {
    match decode_in(bytes, dialect) {
        Ok(Decoded::Frame(frame, used)) if used == bytes.len() => frame,
        other => panic!("expected a whole frame, got {other:?}"),
    }
}

fn err_in(bytes: &[u8], dialect: Dialect) -> CodecError {
    decode_in(bytes, dialect).expect_err("expected a decode error")
}

/// A packet header by hand, for frames the encoder would not write.
fn packet(code: u8, content: &[u8]) -> Vec<u8> {
    let mut out = format!("P{code:02}{:029}", content.len()).into_bytes();
    out.extend_from_slice(content);
    out
}

/// The example of PROTOCOL-v1.2.md, with the spaces and line breaks it shows for reading
/// taken out (packets follow each other directly on the wire).
#[test]
fn spec_v12_example_bytes() {
    let hello = b"H0100701P06000000000000000000000000000031.2";
    let frame = whole_in(hello, Dialect::V10);
    assert_eq!(frame.message_type, MessageType::Hello);
    assert_eq!(frame.packet(PacketType::Version), Some(&b"1.2"[..]));

    let welcome = b"H0100802P06000000000000000000000000000031.2P0800000000000000000000000000046confirm stats delay attempts lease dead-letter";
    let frame = whole_in(welcome, Dialect::V12);
    assert_eq!(frame.message_type, MessageType::Welcome);
    assert_eq!(
        frame.packet(PacketType::Features),
        Some(&b"confirm stats delay attempts lease dead-letter"[..])
    );

    let send = b"H0100103P0100000000000000000000000000004jobsP0200000000000000000000000000005helloP11000000000000000000000000000045000";
    let frame = whole_in(send, Dialect::V12);
    assert_eq!(frame.packet(PacketType::Delay), Some(&b"5000"[..]));

    let mut receipt =
        b"H0100902P0100000000000000000000000000004jobsP0300000000000000000000000000032".to_vec();
    receipt.extend_from_slice(b"8d5e0000000000000000000000000000");
    let frame = whole_in(&receipt, Dialect::V12);
    assert_eq!(frame.message_type, MessageType::Receipt);
}

#[test]
fn v12_types_and_packets_are_unknown_before_v12() {
    for dialect in [Dialect::V10, Dialect::V11] {
        for code in 8..=15u16 {
            let header = format!("H01{code:03}01");
            assert_eq!(
                err_in(header.as_bytes(), dialect),
                CodecError::UnknownMessageType(code),
                "{dialect}"
            );
        }
        for code in 6..=13u8 {
            let mut bytes = b"H0100103".to_vec();
            bytes.extend(packet(code, b"1"));
            assert_eq!(
                err_in(&bytes, dialect),
                CodecError::UnknownPacketType(code),
                "{dialect}"
            );
        }
        // A send with a delay cannot have four packets there: decided from the header.
        assert_eq!(
            err_in(b"H0100104", dialect),
            CodecError::PacketCount {
                message_type: MessageType::Send,
                count: 4
            }
        );
        // HELLO's own packets, and only those, exist in a HELLO.
        let mut hello = b"H0100703".to_vec();
        hello.extend(packet(6, b"1.2"));
        hello.extend(packet(7, b"secret"));
        hello.extend(packet(8, b"confirm"));
        assert_eq!(
            whole_in(&hello, dialect).packet(PacketType::Token),
            Some(&b"secret"[..])
        );
        let mut hello = b"H0100702".to_vec();
        hello.extend(packet(6, b"1.2"));
        hello.extend(packet(11, b"5"));
        assert_eq!(err_in(&hello, dialect), CodecError::UnknownPacketType(11));
    }
}

#[test]
fn v12_shapes_are_enforced() {
    let v12 = Dialect::V12;
    // A packet a type does not carry is malformed, whether v1 or v1.2 packet.
    let mut bytes = b"H0100102".to_vec();
    bytes.extend(packet(1, b"q"));
    bytes.extend(packet(12, b"5"));
    assert_eq!(
        err_in(&bytes, v12),
        CodecError::UnexpectedPacket {
            message_type: MessageType::Send,
            packet: PacketType::Lease
        }
    );
    let mut bytes = b"H0101201".to_vec();
    bytes.extend(packet(4, b"5"));
    assert_eq!(
        err_in(&bytes, v12),
        CodecError::UnexpectedPacket {
            message_type: MessageType::Stats,
            packet: PacketType::Count
        }
    );
    // Duplicates, as in v1.
    let mut bytes = b"H0100104".to_vec();
    bytes.extend(packet(1, b"q"));
    bytes.extend(packet(11, b"5"));
    bytes.extend(packet(11, b"5"));
    assert_eq!(
        err_in(&bytes, v12),
        CodecError::DuplicatePacket(PacketType::Delay)
    );
    // Missing a required packet.
    let mut bytes = b"H0100701".to_vec();
    bytes.extend(packet(8, b"confirm"));
    assert_eq!(
        err_in(&bytes, v12),
        CodecError::MissingPacket {
            message_type: MessageType::Hello,
            packet: PacketType::Version
        }
    );
    // Impossible counts, from the header alone.
    for (header, message_type, count) in [
        (&b"H0101202"[..], MessageType::Stats, 2),
        (b"H0101200", MessageType::Stats, 0),
        (b"H0100700", MessageType::Hello, 0),
        (b"H0100704", MessageType::Hello, 4),
        (b"H0100105", MessageType::Send, 5),
        (b"H0100306", MessageType::Dispatch, 6),
        (b"H0101001", MessageType::Error, 1),
    ] {
        assert_eq!(
            err_in(header, v12),
            CodecError::PacketCount {
                message_type,
                count
            }
        );
    }
    // The 413 case for a new type: decided from the packet header, content unread.
    assert_eq!(
        decode_frame_in(b"H0101401P0100000000000000000000000001025", 10, v12),
        Err(CodecError::PacketTooLarge {
            packet: PacketType::Queue,
            length: 1025,
            max: 1024
        })
    );
    assert!(matches!(
        err_in(b"H0100701P0699999999999999999999999999999", Dialect::V10),
        CodecError::PacketTooLarge {
            packet: PacketType::Version,
            ..
        }
    ));
    assert!(matches!(err_in(b"H01012x1", v12), CodecError::BadHeader(_)));
    assert_eq!(err_in(b"H0101601", v12), CodecError::UnknownMessageType(16));
    let mut bytes = b"H0101201".to_vec();
    bytes.extend(packet(14, b"x"));
    assert_eq!(err_in(&bytes, v12), CodecError::UnknownPacketType(14));
}

#[test]
fn every_shape_fits_in_a_frame_and_counts_grow_with_the_dialect() {
    for t in MessageType::ALL {
        assert!(
            t.required().len() + t.optional().len() <= MAX_PACKETS,
            "{t}"
        );
        for d in Dialect::ALL {
            assert!(t.packet_counts(d).end() <= &MAX_PACKETS);
        }
        assert!(t.packet_counts(Dialect::V10) == t.packet_counts(Dialect::V11));
        assert!(t.packet_counts(Dialect::V11).end() <= t.packet_counts(Dialect::V12).end());
        assert_eq!(MessageType::from_code(t.code()), Some(t));
    }
    for p in PacketType::ALL {
        assert_eq!(PacketType::from_code(p.code()), Some(p));
    }
    assert_eq!(
        MessageType::ALL.map(MessageType::code),
        std::array::from_fn(|i| i as u16 + 1)
    );
    assert_eq!(
        PacketType::ALL.map(PacketType::code),
        std::array::from_fn(|i| i as u8 + 1)
    );
}

#[test]
fn packets_keep_their_wire_order() {
    let mut bytes = b"H0100304".to_vec();
    bytes.extend(packet(9, b"2"));
    bytes.extend(packet(3, b"id"));
    bytes.extend(packet(2, b"c"));
    bytes.extend(packet(1, b"q"));
    let frame = whole_in(&bytes, Dialect::V12);
    let order: Vec<PacketType> = frame.packets().map(|(p, _)| p).collect();
    assert_eq!(
        order,
        [
            PacketType::Deliveries,
            PacketType::MessageId,
            PacketType::Content,
            PacketType::Queue
        ]
    );
    let packets: Vec<(PacketType, &[u8])> = frame.packets().collect();
    let mut out = Vec::new();
    encode_frame(&mut out, frame.message_type, &packets);
    assert_eq!(out, bytes);
}

#[test]
fn the_declared_type_can_be_read_after_an_error() {
    assert_eq!(peek_message_type(b"H0100701P09"), Some(MessageType::Hello));
    assert_eq!(peek_message_type(b"H0101599"), Some(MessageType::Flushed));
    assert_eq!(peek_message_type(b"H01007"), None);
    assert_eq!(peek_message_type(b"H0201701"), None);
    assert_eq!(peek_message_type(b"H0101699"), None);
    assert_eq!(peek_message_type(b"X0100701"), None);
    assert_eq!(peek_message_type(b"H01a0701"), None);
}

#[test]
fn dialects_are_ordered_and_stored_compactly() {
    assert!(Dialect::V10 < Dialect::V11 && Dialect::V11 < Dialect::V12);
    for d in Dialect::ALL {
        assert_eq!(Dialect::from_u8(d.to_u8()), Some(d));
    }
    assert_eq!(Dialect::from_u8(0), None);
    assert!(!Dialect::V10.shows_ttl() && Dialect::V11.shows_ttl() && Dialect::V12.shows_ttl());
}
