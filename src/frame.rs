//! Length-prefixed frames: a 4-byte big-endian payload length, then that many
//! bytes of `postcard`.
//!
//! Both ends enforce [`MAX_FRAME`] before they allocate: a length above it is
//! an error, never a buffer. A clean end of stream at a frame boundary is
//! `Ok(None)`; an end of stream inside a frame is [`FrameError::Truncated`].
//! The worker uses the blocking functions, the broker the `async` ones.

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Hard cap on one frame's payload: room for two capped output streams
/// (4 MiB each at most, see the policy limits) plus stdin and headers.
pub const MAX_FRAME: usize = 16 << 20;

const HEADER: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("failed to decode frame")]
    Decode(#[source] postcard::Error),
    #[error("frame has {0} trailing bytes after its message")]
    TrailingBytes(usize),
    #[error("failed to encode frame")]
    Encode(#[source] postcard::Error),
    #[error("frame i/o failed")]
    Io(#[from] io::Error),
}

/// Encodes `msg` as a complete frame (header and payload).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = postcard::to_extend(msg, vec![0u8; HEADER]).map_err(FrameError::Encode)?;
    let len = buf.len() - HEADER;
    let len32 = u32::try_from(len).ok().filter(|_| len <= MAX_FRAME).ok_or(FrameError::TooLarge(len))?;
    buf[..HEADER].copy_from_slice(&len32.to_be_bytes());
    Ok(buf)
}

/// Decodes one payload (without header); the whole payload must be used.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(FrameError::Decode)?;
    if rest.is_empty() {
        Ok(msg)
    } else {
        Err(FrameError::TrailingBytes(rest.len()))
    }
}

fn checked_len(header: [u8; HEADER]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a header.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<Option<T>, FrameError> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut payload = vec![0u8; checked_len(header)?];
    r.read_exact(&mut payload).map_err(eof_is_truncation)?;
    decode(&payload).map(Some)
}

/// Writes one frame and flushes it.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg)?)?;
    w.flush()?;
    Ok(())
}

/// Async [`read_frame`].
pub async fn read_frame_async<R, T>(r: &mut R) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match r.read(&mut header[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(FrameError::Truncated),
            n => got += n,
        }
    }
    let mut payload = vec![0u8; checked_len(header)?];
    r.read_exact(&mut payload).await.map_err(eof_is_truncation)?;
    decode(&payload).map(Some)
}

/// Async [`write_frame`].
pub async fn write_frame_async<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    w.write_all(&encode(msg)?).await?;
    w.flush().await?;
    Ok(())
}

fn eof_is_truncation(e: io::Error) -> FrameError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        FrameError::Truncated
    } else {
        FrameError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ExecRequest, ToWorker};

    fn exec(stdin: Vec<u8>) -> ToWorker {
        ToWorker::Exec(ExecRequest {
            id: 7,
            request_id: "r-7".into(),
            argv: vec!["echo".into(), "héllo ✓".into()],
            stdin,
            timeout_ms: 1000,
            stream: false,
            receipt: true,
            session_dir: None,
        })
    }

    #[test]
    fn round_trip_blocking_and_back_to_back() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &exec(vec![0, 255, 10])).unwrap();
        write_frame(&mut buf, &exec(Vec::new())).unwrap();
        let mut r = io::Cursor::new(buf);
        assert_eq!(read_frame::<_, ToWorker>(&mut r).unwrap(), Some(exec(vec![0, 255, 10])));
        assert_eq!(read_frame::<_, ToWorker>(&mut r).unwrap(), Some(exec(Vec::new())));
        assert!(read_frame::<_, ToWorker>(&mut r).unwrap().is_none(), "clean EOF is None");
    }

    #[tokio::test]
    async fn round_trip_async() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let msg = exec(vec![1; 100_000]);
        let sent = msg.clone();
        let writer = tokio::spawn(async move { write_frame_async(&mut a, &sent).await });
        let got: Option<ToWorker> = read_frame_async(&mut b).await.unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(got, Some(msg));
    }

    #[test]
    fn truncated_header_and_payload() {
        let frame = encode(&exec(vec![9; 10])).unwrap();
        for cut in [1, 3, HEADER + 1, frame.len() - 1] {
            let err = read_frame::<_, ToWorker>(&mut &frame[..cut]).unwrap_err();
            assert!(matches!(err, FrameError::Truncated), "cut at {cut}: {err:?}");
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        // A header claiming 4 GiB followed by nothing: must fail on the length,
        // not try to allocate or wait for the bytes.
        let bogus = u32::MAX.to_be_bytes();
        let err = read_frame::<_, ToWorker>(&mut &bogus[..]).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(n) if n == u32::MAX as usize));
        let just_over = u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes();
        assert!(matches!(read_frame::<_, ToWorker>(&mut &just_over[..]), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn oversized_message_is_refused_when_encoding() {
        let err = encode(&exec(vec![0; MAX_FRAME])).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(n) if n > MAX_FRAME));
    }

    #[test]
    fn garbage_payload_is_a_decode_error() {
        let mut frame = 3u32.to_be_bytes().to_vec();
        frame.extend([0xff, 0xff, 0xff]);
        let err = read_frame::<_, ToWorker>(&mut &frame[..]).unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)), "{err:?}");
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut frame = encode(&exec(Vec::new())).unwrap();
        frame.push(0);
        let len = u32::try_from(frame.len() - HEADER).unwrap();
        frame[..HEADER].copy_from_slice(&len.to_be_bytes());
        let err = read_frame::<_, ToWorker>(&mut &frame[..]).unwrap_err();
        assert!(matches!(err, FrameError::TrailingBytes(1)), "{err:?}");
    }
}
