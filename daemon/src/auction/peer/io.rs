//! Frames on a byte stream: a u32 big-endian length, then the frame. A length
//! over [`MAX_FRAME`] is refused before anything is read or allocated.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::frame::MAX_FRAME;
use super::PeerError;

/// Writes one length-prefixed frame.
pub async fn write_frame<W: AsyncWriteExt + Unpin>(w: &mut W, frame: &[u8]) -> Result<(), PeerError> {
    let len = u32::try_from(frame.len()).map_err(|_| PeerError::TooLong(frame.len()))?;
    if frame.len() > MAX_FRAME {
        return Err(PeerError::TooLong(frame.len()));
    }
    w.write_all(&len.to_be_bytes()).await.map_err(|e| PeerError::Io(e.to_string()))?;
    w.write_all(frame).await.map_err(|e| PeerError::Io(e.to_string()))?;
    w.flush().await.map_err(|e| PeerError::Io(e.to_string()))
}

/// Reads one length-prefixed frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, PeerError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(PeerError::Io(e.to_string())),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(PeerError::TooLong(n));
    }
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).await.map_err(|e| PeerError::Io(e.to_string()))?;
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auction::peer::frame::{open, ClusterKey, ReplayGuard, Sealer};
    use crate::auction::peer::message::Message;

    #[test]
    fn frames_cross_a_tcp_connection_and_oversized_lengths_are_refused() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let key = ClusterKey::new(&[7; 32]).unwrap();
            let k2 = key.clone();
            let client = tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                let mut sealer = Sealer::new(k2, 1, 0);
                write_frame(&mut s, &sealer.seal(&Message::Heartbeat { node: 1 })).await.unwrap();
                s.write_all(&(u32::MAX).to_be_bytes()).await.unwrap();
            });
            let (mut s, _) = l.accept().await.unwrap();
            let f = read_frame(&mut s).await.unwrap().unwrap();
            let o = open(&key, &mut ReplayGuard::default(), &f).unwrap();
            assert_eq!(o.message, Message::Heartbeat { node: 1 });
            assert!(matches!(read_frame(&mut s).await, Err(PeerError::TooLong(_))));
            client.await.unwrap();
        });
    }
}
