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
