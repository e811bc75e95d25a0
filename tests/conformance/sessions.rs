//! SessionStore: exactly-once close, presence counted in the transaction.

use std::sync::Arc;

use plugboard::storage::{NewEvent, Presence, SessionEvents, SessionRecord};

use crate::conformance;

fn record(connection: &str, user: &str, device: &str) -> SessionRecord {
    SessionRecord {
        connection_id: connection.to_string(),
        user_id: user.to_string(),
        device_id: device.to_string(),
        node_id: "node-1".to_string(),
        opened_at: 1,
        remote_addr: "127.0.0.1:1".to_string(),
    }
}

/// One `test.session` event per change, carrying the presence it saw.
fn events(kind: &'static str) -> SessionEvents {
    Arc::new(move |r: &SessionRecord, p: Presence| {
        vec![NewEvent {
            id: format!("evt_{kind}_{}_{}", r.connection_id, p.connections),
            event_type: format!("test.{kind}"),
            order_key: r.user_id.clone(),
            created_at: 1,
            data: serde_json::json!({ "connections": p.connections, "devices": p.devices }),
        }]
    })
}

conformance! {
    async fn a_close_that_finds_no_session_writes_nothing(f) {
        let s = &f.backend.sessions;
        let before = f.backend.outbox.outbox_depth().await.unwrap();
        assert_eq!(s.close_session("nope", events("closed")).await.unwrap(), None);
        assert_eq!(f.backend.outbox.outbox_depth().await.unwrap(), before);

        let p = s.open_session(record("c1", "u1", "d1"), events("opened")).await.unwrap();
        assert_eq!(p, Presence { connections: 1, devices: 1 });
        let closed = s.close_session("c1", events("closed")).await.unwrap();
        assert_eq!(closed, Some(Presence { connections: 0, devices: 0 }));
        assert_eq!(s.close_session("c1", events("closed")).await.unwrap(), None);
        let (presence, open) = s.presence("u1").await.unwrap();
        assert_eq!(presence, Presence::default());
        assert!(open.is_empty());
    }
}
