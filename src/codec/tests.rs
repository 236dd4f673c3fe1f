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
        decode_frame(b"H0100102P0100000000000000000000000000011", 10),
        Err(CodecError::PacketTooLarge {
            packet: PacketType::Queue,
            length: 11,
            max: 10
        })
    );
    assert!(matches!(
        err(b"H0100102P0199999999999999999999999999999"),
        CodecError::PacketTooLarge { .. }
    ));
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
            let _ = crate::request::Request::from_frame(&frame);
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
