//! A WebSocket client built on tokio-tungstenite (a client library, not the
//! gateway's code). A background task keeps reading, so pings are answered
//! and the close handshake completes, and hands frames to the test.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

use crate::gateway::Gateway;

/// How the server closed the connection, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    /// The code of the server's close frame; `None` if none arrived.
    pub code: Option<u16>,
    pub reason: String,
}

enum Incoming {
    Text(String),
    Binary,
    Closed(Closed),
}

enum Command {
    Send(Message),
    /// Drop the socket with a TCP reset (SO_LINGER 0) and no close frame.
    Reset,
    /// Drop the socket (FIN) without a close frame.
    Drop,
}

/// A connected client.
pub struct WsClient {
    commands: mpsc::UnboundedSender<Command>,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    /// The `meta` `connect` frame.
    pub connect: Value,
    pub connection_id: String,
    closed: Option<Closed>,
    /// Frames read while waiting for a reply to a request, in arrival order;
    /// `next_json` returns them first.
    stash: std::collections::VecDeque<Value>,
    next_request: u64,
}

/// Why a connection attempt did not open.
#[derive(Debug)]
pub struct Refused {
    pub status: Option<u16>,
    pub body: String,
    /// The response headers of an HTTP refusal (empty otherwise).
    pub headers: http::HeaderMap,
}

impl Refused {
    /// `error.code` of a JSON error body, if it is one.
    pub fn code(&self) -> Option<String> {
        let v: Value = serde_json::from_str(&self.body).ok()?;
        v["error"]["code"].as_str().map(str::to_string)
    }

    /// `error.message` of a JSON error body, if it is one.
    pub fn message(&self) -> Option<String> {
        let v: Value = serde_json::from_str(&self.body).ok()?;
        v["error"]["message"].as_str().map(str::to_string)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl WsClient {
    /// Connects as `user` (token in `?token=`) and waits for the `connect` frame.
    pub async fn connect(gw: &Gateway, user: &str) -> WsClient {
        Self::connect_token(gw, &gw.token(user, None, None)).await
    }

    pub async fn connect_device(gw: &Gateway, user: &str, device: &str) -> WsClient {
        Self::connect_token(gw, &gw.token(user, Some(device), None)).await
    }

    pub async fn connect_token(gw: &Gateway, token: &str) -> WsClient {
        match Self::try_connect(gw, &format!("{}?token={token}", gw.ws_url()), None).await {
            Ok(c) => c,
            Err(r) => panic!("connection refused: {r:?}"),
        }
    }

    /// Connects to `url`, optionally with an `Authorization: Bearer` header.
    pub async fn try_connect(
        gw: &Gateway,
        url: &str,
        bearer: Option<&str>,
    ) -> Result<WsClient, Refused> {
        let _ = gw;
        let mut req = url.into_client_request().unwrap();
        if let Some(b) = bearer {
            req.headers_mut()
                .insert("authorization", format!("Bearer {b}").parse().unwrap());
        }
        let tcp = tokio::net::TcpStream::connect(req.uri().authority().unwrap().as_str())
            .await
            .map_err(|e| Refused {
                status: None,
                body: e.to_string(),
                headers: Default::default(),
            })?;
        let config = WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        let (ws, _) = match tokio_tungstenite::client_async_with_config(
            req,
            tokio_tungstenite::MaybeTlsStream::Plain(tcp),
            Some(config),
        )
        .await
        {
            Ok(ok) => ok,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                return Err(Refused {
                    status: Some(resp.status().as_u16()),
                    body: String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
                        .into_owned(),
                    headers: resp.headers().clone(),
                })
            }
            Err(e) => {
                return Err(Refused {
                    status: None,
                    body: e.to_string(),
                    headers: Default::default(),
                })
            }
        };
        let mut client = Self::from_stream(ws);
        let connect = client.next_json().await;
        assert_eq!(connect["type"], "meta", "first frame: {connect}");
        assert_eq!(connect["event"], "connect", "first frame: {connect}");
        client.connection_id = connect["connection_id"].as_str().unwrap().to_string();
        client.connect = connect;
        Ok(client)
    }

    /// Wraps an upgraded stream (no `connect` frame read yet).
    pub fn from_stream(
        mut ws: tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    ) -> WsClient {
        let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<Command>();
        let (in_tx, in_rx) = mpsc::unbounded_channel::<Incoming>();
        tokio::spawn(async move {
            let mut close: Option<Closed> = None;
            loop {
                tokio::select! {
                    cmd = cmd_rx.recv() => match cmd {
                        Some(Command::Send(m)) => { let _ = ws.send(m).await; }
                        Some(Command::Reset) => {
                            if let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = ws.get_ref() {
                                #[allow(deprecated)]
                                let _ = tcp.set_linger(Some(Duration::ZERO));
                            }
                            return;
                        }
                        Some(Command::Drop) | None => return,
                    },
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Text(t))) => { let _ = in_tx.send(Incoming::Text(t.to_string())); }
                        Some(Ok(Message::Binary(_))) => { let _ = in_tx.send(Incoming::Binary); }
                        Some(Ok(Message::Close(f))) => {
                            close = Some(Closed {
                                code: f.as_ref().map(|f| u16::from(f.code)),
                                reason: f.map(|f| f.reason.to_string()).unwrap_or_default(),
                            });
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => {
                            let c = close.take().unwrap_or(Closed { code: None, reason: String::new() });
                            let _ = in_tx.send(Incoming::Closed(c));
                            // Keep the command side alive until the test drops us.
                            while cmd_rx.recv().await.is_some() {}
                            return;
                        }
                    }
                }
            }
        });
        WsClient {
            commands: cmd_tx,
            incoming: in_rx,
            connect: Value::Null,
            connection_id: String::new(),
            closed: None,
            stash: std::collections::VecDeque::new(),
            next_request: 0,
        }
    }

    /// The next text frame as JSON (panics on close or timeout).
    pub async fn next_json(&mut self) -> Value {
        if let Some(v) = self.stash.pop_front() {
            return v;
        }
        self.read_json().await
    }

    /// The next text frame, or `None` once the connection has ended.
    pub async fn next_json_or_closed(&mut self) -> Option<Value> {
        if let Some(v) = self.stash.pop_front() {
            return Some(v);
        }
        if self.closed.is_some() {
            return None;
        }
        loop {
            match self.incoming.recv().await {
                Some(Incoming::Text(t)) => return serde_json::from_str(&t).ok(),
                Some(Incoming::Binary) => continue,
                Some(Incoming::Closed(c)) => {
                    self.closed = Some(c);
                    return None;
                }
                None => return None,
            }
        }
    }

    /// The next frame, which must be of type `kind`.
    pub async fn next_of(&mut self, kind: &str) -> Value {
        let v = self.next_json().await;
        assert_eq!(v["type"], kind, "expected a `{kind}` frame, got {v}");
        v
    }

    /// Sends `frame` with a fresh `id` and returns the frame answering it
    /// (same `id`); frames arriving meanwhile are kept for `next_json`.
    pub async fn request(&mut self, mut frame: Value) -> Value {
        self.next_request += 1;
        let id = format!("req-{}", self.next_request);
        frame["id"] = Value::String(id.clone());
        self.send_json(frame);
        loop {
            let v = self.read_json().await;
            if v["id"] == id.as_str() {
                return v;
            }
            self.stash.push_back(v);
        }
    }

    async fn read_json(&mut self) -> Value {
        match tokio::time::timeout(crate::WAIT, self.incoming.recv()).await {
            Ok(Some(Incoming::Text(t))) => {
                serde_json::from_str(&t).unwrap_or_else(|e| panic!("bad JSON {t}: {e}"))
            }
            Ok(Some(Incoming::Binary)) => panic!("unexpected binary frame"),
            Ok(Some(Incoming::Closed(c))) => {
                self.closed = Some(c.clone());
                panic!("connection closed while waiting for a frame: {c:?}")
            }
            Ok(None) => panic!("client task ended"),
            Err(_) => panic!("no frame within {:?}", crate::WAIT),
        }
    }

    /// Waits for the connection to end; returns the frames seen before it and how it closed.
    pub async fn closed_within(&mut self, limit: Duration) -> (Vec<Value>, Closed) {
        if let Some(c) = self.closed.clone() {
            return (vec![], c);
        }
        let mut frames = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.incoming.recv()).await {
                Ok(Some(Incoming::Text(t))) => {
                    frames.push(serde_json::from_str(&t).unwrap_or(Value::String(t)))
                }
                Ok(Some(Incoming::Binary)) => {}
                Ok(Some(Incoming::Closed(c))) => {
                    self.closed = Some(c.clone());
                    return (frames, c);
                }
                Ok(None) => panic!("client task ended"),
                Err(_) => panic!("connection not closed within {limit:?}; frames seen: {frames:?}"),
            }
        }
    }

    pub async fn closed(&mut self) -> (Vec<Value>, Closed) {
        self.closed_within(crate::WAIT).await
    }

    pub fn send(&self, msg: Message) {
        let _ = self.commands.send(Command::Send(msg));
    }

    pub fn send_json(&self, v: Value) {
        self.send(Message::text(v.to_string()));
    }

    /// Sends a close frame; the background task completes the handshake.
    pub fn close(&self, code: u16, reason: &str) {
        self.send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        })));
    }

    /// Ends the TCP connection with a reset, no close frame.
    pub fn reset(&self) {
        let _ = self.commands.send(Command::Reset);
    }

    /// Ends the TCP connection with a FIN, no close frame.
    pub fn drop_tcp(&self) {
        let _ = self.commands.send(Command::Drop);
    }
}
