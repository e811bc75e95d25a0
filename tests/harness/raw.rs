//! A raw TCP WebSocket client for what a well-behaved library will not do:
//! unmasked frames, invalid UTF-8, staying silent while the server pings.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upgraded connection driven byte by byte.
pub struct RawClient {
    pub tcp: TcpStream,
    buf: Vec<u8>,
}

/// A frame read from the server.
#[derive(Debug, Clone)]
pub struct RawFrame {
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code, for a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl RawClient {
    /// Performs the HTTP upgrade with `path_and_query` (e.g. `/v1/ws?token=…`).
    /// Returns the client and the HTTP status line.
    pub async fn upgrade(addr: &str, path_and_query: &str) -> (RawClient, String) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        Self::upgrade_tcp(tcp, addr, path_and_query).await
    }

    /// Upgrades an already connected socket; panics unless the answer is 101.
    pub async fn upgrade_over(tcp: TcpStream, addr: &str, path_and_query: &str) -> RawClient {
        let (raw, status) = Self::upgrade_tcp(tcp, addr, path_and_query).await;
        assert!(status.contains("101"), "{status}");
        raw
    }

    async fn upgrade_tcp(
        mut tcp: TcpStream,
        addr: &str,
        path_and_query: &str,
    ) -> (RawClient, String) {
        let req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let head_end = loop {
            let n = tokio::time::timeout(crate::WAIT, tcp.read(&mut chunk))
                .await
                .expect("upgrade answer")
                .unwrap();
            assert!(
                n > 0,
                "connection closed during upgrade: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let status = head.lines().next().unwrap_or_default().to_string();
        let rest = buf[head_end..].to_vec();
        (RawClient { tcp, buf: rest }, status)
    }

    /// Writes one frame. `masked` as a client must; `fin` set.
    pub async fn write_frame(&mut self, opcode: u8, payload: &[u8], masked: bool) {
        let mut f = vec![0x80 | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(mask_bit | n as u8),
            n if n < 65536 => {
                f.push(mask_bit | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(mask_bit | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [0x12u8, 0x34, 0x56, 0x78];
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        let _ = self.tcp.write_all(&f).await;
    }

    /// Reads the next frame from the server, or `None` at EOF / timeout.
    pub async fn read_frame(&mut self, limit: Duration) -> Option<RawFrame> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some((frame, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until a close frame; returns its code.
    pub async fn read_close_code(&mut self, limit: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self.read_frame(left).await?;
            if frame.opcode == 8 {
                return frame.close_code();
            }
        }
    }
}

fn parse(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let mut len = (buf[1] & 0x7f) as usize;
    let mut pos = 2;
    if len == 126 {
        if buf.len() < 4 {
            return None;
        }
        len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        pos = 4;
    } else if len == 127 {
        if buf.len() < 10 {
            return None;
        }
        len = u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize;
        pos = 10;
    }
    if masked {
        pos += 4;
    }
    if buf.len() < pos + len {
        return None;
    }
    Some((
        RawFrame {
            opcode,
            payload: buf[pos..pos + len].to_vec(),
        },
        pos + len,
    ))
}

/// An HTTP response read off a raw socket.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Sends `head` (request line and headers, each line ending in `\r\n`,
/// without the blank line that ends them) to `addr` exactly as written, and
/// reads the answer: its head, then `Content-Length` bytes of body.
pub async fn http_request(addr: &str, head: &str) -> RawResponse {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("{head}\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let n = tcp.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "connection closed before the answer's head: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let text = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = text.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("no status line in {text}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let n = tcp.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let end = (head_end + length).min(buf.len());
        RawResponse {
            status,
            headers,
            body: String::from_utf8_lossy(&buf[head_end..end]).into_owned(),
        }
    };
    tokio::time::timeout(crate::WAIT, read)
        .await
        .expect("an HTTP answer in time")
}
