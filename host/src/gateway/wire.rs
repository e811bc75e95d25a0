//! A tap on the client socket that follows the frame boundaries of what the
//! client sends, so the close handshake can be finished after a protocol error.
//!
//! tokio-tungstenite ends its stream at the first error: after a frame too
//! big (1009), invalid UTF-8 (1007) or another protocol violation (1002) it
//! yields nothing more, and it may already hold, unparsed, bytes that came
//! after the bad frame. RFC 6455 wants the server to send its close frame
//! and then read until the client's close (or a timeout), so the client
//! gets to read the close frame and its reason instead of a reset. The tap
//! sees every byte on its way from the socket to tungstenite and tracks
//! only frame headers and payload lengths, so it knows where each frame
//! ends even when tungstenite stopped in the middle of one, and whether the
//! client's close frame already came. [`Tap::read_until_close`] goes on
//! reading from there, discarding everything.
//!
//! The tracker checks nothing: tungstenite does the checking. Following a
//! hostile length costs nothing but waiting, and every wait is bounded by
//! the caller's `close_timeout`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The WebSocket opcode of a close frame.
const OPCODE_CLOSE: u8 = 0x8;
/// The longest frame header: 2 bytes, a 64-bit length, a 4-byte mask.
const MAX_HEADER: usize = 14;

/// Where the tracker is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// Inside a frame header, with `have` of its bytes read.
    Header {
        bytes: [u8; MAX_HEADER],
        have: usize,
    },
    /// Inside a payload, with `left` bytes to go.
    Payload { left: u64, close: bool },
}

/// Follows frame boundaries in the bytes a client sends.
#[derive(Debug, Clone)]
pub struct FrameTracker {
    at: Position,
    close_seen: bool,
}

impl Default for FrameTracker {
    fn default() -> Self {
        FrameTracker {
            at: Position::Header {
                bytes: [0; MAX_HEADER],
                have: 0,
            },
            close_seen: false,
        }
    }
}

impl FrameTracker {
    /// Whether a whole close frame from the client has gone by.
    pub fn close_seen(&self) -> bool {
        self.close_seen
    }

    /// Follows `data`, the next bytes of the stream.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.at {
                Position::Payload { left, close } => {
                    let n = (*left).min(data.len() as u64) as usize;
                    *left -= n as u64;
                    data = &data[n..];
                    if *left == 0 {
                        let close = *close;
                        self.frame_ended(close);
                    }
                }
                Position::Header { bytes, have } => {
                    bytes[*have] = data[0];
                    *have += 1;
                    data = &data[1..];
                    if let Some((opcode, len)) = parse_header(&bytes[..*have]) {
                        let close = opcode == OPCODE_CLOSE;
                        if len == 0 {
                            self.frame_ended(close);
                        } else {
                            self.at = Position::Payload { left: len, close };
                        }
                    }
                }
            }
        }
    }

    fn frame_ended(&mut self, close: bool) {
        self.close_seen |= close;
        self.at = Position::Header {
            bytes: [0; MAX_HEADER],
            have: 0,
        };
    }
}

/// The opcode and payload length once `h` is a whole header, else `None`.
fn parse_header(h: &[u8]) -> Option<(u8, u64)> {
    if h.len() < 2 {
        return None;
    }
    let masked = h[1] & 0x80 != 0;
    let (ext, len7) = match h[1] & 0x7f {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(u64::from(n))),
    };
    let need = 2 + ext + if masked { 4 } else { 0 };
    if h.len() < need {
        return None;
    }
    let len = len7.unwrap_or_else(|| {
        h[2..2 + ext]
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    });
    Some((h[0] & 0x0f, len))
}

/// A socket whose incoming bytes pass a [`FrameTracker`].
#[derive(Debug)]
pub struct Tap<S> {
    inner: S,
    tracker: FrameTracker,
}

impl<S> Tap<S> {
    pub fn new(inner: S) -> Self {
        Tap {
            inner,
            tracker: FrameTracker::default(),
        }
    }
}

impl<S: AsyncRead + Unpin> Tap<S> {
    /// Reads and discards until the client's close frame has gone by or the
    /// stream ends. The caller bounds the wait.
    pub async fn read_until_close(&mut self) {
        let mut scratch = [0u8; 4096];
        while !self.tracker.close_seen() {
            match self.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tap<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.tracker.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tap<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(payload.iter().map(|b| b ^ 0x5a));
        f
    }

    #[test]
    fn follows_frames_of_every_length_fed_in_any_pieces() {
        let mut stream = Vec::new();
        for len in [0usize, 1, 125, 126, 65535, 65536, 70_000] {
            stream.extend(frame(0x1, &vec![0x88; len]));
        }
        stream.extend(frame(OPCODE_CLOSE, &[0x03, 0xe8]));
        for piece in [1usize, 3, 7, 4096, stream.len()] {
            let mut t = FrameTracker::default();
            let (body, last) = stream.split_at(stream.len() - 1);
            for chunk in body.chunks(piece) {
                t.feed(chunk);
            }
            // Payload bytes that look like close opcodes (0x88) fool nothing.
            assert!(!t.close_seen(), "piece {piece}");
            t.feed(last);
            assert!(t.close_seen(), "piece {piece}");
        }
    }

    #[test]
    fn an_empty_close_and_an_unmasked_close_count() {
        let mut t = FrameTracker::default();
        t.feed(&[0x88, 0x80, 9, 9, 9, 9]);
        assert!(t.close_seen());
        let mut t = FrameTracker::default();
        t.feed(&[0x81, 0x02, b'h', b'i', 0x88, 0x00]);
        assert!(t.close_seen());
    }

    #[tokio::test]
    async fn reads_past_a_frame_tungstenite_gave_up_on_until_the_close() {
        // A "too big" frame whose header was consumed, half its payload read
        // elsewhere, then the rest of it, data, and the client's close.
        let big = frame(0x1, &[b'x'; 10_000]);
        let mut rest = big[5_000..].to_vec();
        rest.extend(frame(0x1, br#"{"type":"ping"}"#));
        rest.extend(frame(OPCODE_CLOSE, &[0x03, 0xf1]));
        rest.extend(b"never read");
        let (mut client, server) = tokio::io::duplex(64);
        let mut tap = Tap::new(server);
        tap.tracker.feed(&big[..5_000]);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // The tap stops reading at the close: what follows stays unwritten.
            let _ = client.write_all(&rest).await;
            client
        });
        tap.read_until_close().await;
        assert!(tap.tracker.close_seen());
        drop(tap);
        drop(writer.await.unwrap());
    }
}
