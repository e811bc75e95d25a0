//! Bad input from clients gets a clear error and loses nothing.

use plugboard_tests::WsClient;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::setup;

#[tokio::test]
async fn malformed_and_unknown_frames_get_error_frames_and_the_connection_stays() {
    let (gw, rx) = setup("").await;
    let mut c = WsClient::connect(&gw, "olga").await;
    let cases = [
        ("{not json", "malformed_frame"),
        ("[1,2]", "malformed_frame"),
        (r#"{"id":1}"#, "malformed_frame"),
        (r#"{"type":"teleport","id":"x1"}"#, "unknown_type"),
        (r#"{"type":"auth","token":"t"}"#, "already_authenticated"),
    ];
    for (input, code) in cases {
        c.send(Message::text(input));
        let err = c.next_json().await;
        assert_eq!(
            (err["type"].as_str(), err["code"].as_str()),
            (Some("error"), Some(code)),
            "for {input}: {err}"
        );
        assert!(!err["message"].as_str().unwrap().is_empty());
    }
    // The unknown frame's id is echoed so the client can match the error.
    c.send(Message::text(r#"{"type":"teleport","id":"x2"}"#));
    assert_eq!(c.next_json().await["id"], "x2");
    c.send(Message::binary(vec![1u8, 2, 3]));
    let err = c.next_json().await;
    assert_eq!(err["code"], "binary_not_supported");
    // Still open and answering.
    c.send_json(json!({ "type": "ping", "id": 9 }));
    let hb = c.next_json().await;
    assert_eq!(
        (hb["event"].as_str(), hb["id"].as_i64()),
        (Some("heartbeat"), Some(9))
    );
    c.close(1000, "");
    let ev = rx.assert_exactly_once(&c.connection_id).await;
    assert_eq!(ev.str("reason"), "client_close");
    assert!(
        gw.metric("plugboard_frame_errors_total", "reason=\"malformed_frame\"")
            .await
            >= 3.0
    );
}

/// After a protocol violation (the text frame `payload`, `masked` or not)
/// the server sends its close frame and then keeps reading, discarding,
/// until the client's close frame: the client reads the close code, can go
/// on writing (16 MiB here, which a closed socket would refuse with a
/// reset), answers the close, and only then does TCP end.
async fn violation_then_close_handshake(payload: &[u8], masked: bool, code: u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let limits = "[gateway]\nmax_frame_size = \"4KiB\"\nmax_message_size = \"4KiB\"\nclose_timeout = \"60s\"";
    let (gw, rx) = setup(limits).await;
    let token = gw.token("vera", None, None);
    let (mut raw, status) =
        plugboard_tests::RawClient::upgrade(&gw.addr, &format!("/v1/ws?token={token}")).await;
    assert!(status.contains("101"), "{status}");
    let connect = raw
        .read_frame(plugboard_tests::WAIT)
        .await
        .expect("connect frame");
    let connect: serde_json::Value = serde_json::from_slice(&connect.payload).unwrap();
    raw.write_frame(1, payload, masked).await;
    assert_eq!(raw.read_close_code(plugboard_tests::WAIT).await, Some(code));

    // Masked text frames of 64 KiB, over the frame limit: discarded unread.
    let key = [7u8, 7, 7, 7];
    let mut frame = vec![0x81, 0x80 | 126];
    frame.extend_from_slice(&u16::MAX.to_be_bytes());
    frame.extend_from_slice(&key);
    frame.extend(std::iter::repeat_n(b'x' ^ 7, usize::from(u16::MAX)));
    for i in 0..256 {
        let wrote = tokio::time::timeout(plugboard_tests::WAIT, raw.tcp.write_all(&frame)).await;
        assert!(
            matches!(wrote, Ok(Ok(()))),
            "write {i} after close {code}: {wrote:?} (the server stopped reading)"
        );
    }
    raw.write_frame(0x8, &code.to_be_bytes(), true).await;
    let mut rest = Vec::new();
    let end = tokio::time::timeout(plugboard_tests::WAIT, raw.tcp.read_to_end(&mut rest)).await;
    assert!(
        matches!(end, Ok(Ok(0))),
        "a clean end of TCP after the client's close: {end:?}"
    );
    let ev = rx
        .assert_exactly_once(connect["connection_id"].as_str().unwrap())
        .await;
    assert_eq!(ev.code(), u64::from(code));
}

#[tokio::test]
async fn after_a_protocol_error_the_server_reads_on_to_the_clients_close() {
    // Client frames must be masked.
    violation_then_close_handshake(br#"{"type":"ping"}"#, false, 1002).await;
}

#[tokio::test]
async fn after_invalid_utf8_the_server_reads_on_to_the_clients_close() {
    violation_then_close_handshake(&[0x7b, 0xff, 0xfe, 0x7d], true, 1007).await;
}

#[tokio::test]
async fn after_a_frame_too_big_the_server_reads_on_past_it_to_the_clients_close() {
    // The server stops at the header; the tap follows the 8 KiB that come after it.
    violation_then_close_handshake(&[b' '; 8 * 1024], true, 1009).await;
}
