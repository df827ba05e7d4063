//! A single-task loop over a [`Session`] and a transport, for tools and tests that script a peer step by
//! step: commands on [`Connection::session_mut`] between calls to [`Connection::next_event`]. Components
//! that serve streams concurrently use the [driver](super::driver) instead.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::HEADER_LEN;
use crate::session::{Event, Session};

pub use super::driver::RETRY_AFTER;

pub struct Connection<T> {
    io: T,
    session: Session,
    read_buf: Box<[u8]>,
    write_buf: Vec<u8>,
    eof: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Connection<T> {
    pub fn new(io: T, session: Session) -> Self {
        Connection {
            io,
            session,
            read_buf: vec![0u8; 64 * 1024].into_boxed_slice(),
            write_buf: Vec::with_capacity(HEADER_LEN + 64 * 1024),
            eof: false,
        }
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    pub fn into_inner(self) -> (T, Session) {
        (self.io, self.session)
    }

    /// Writes every frame the session has queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        while let Some(frame) = self.session.poll_transmit() {
            self.write_buf.clear();
            frame.encode_into(&mut self.write_buf);
            self.io.write_all(&self.write_buf).await?;
        }
        self.io.flush().await
    }

    /// Flushes, then returns the next event, reading from the transport as needed. `Ok(None)` once the
    /// transport reached EOF and every resulting event was handed out.
    pub async fn next_event(&mut self) -> std::io::Result<Option<Event>> {
        loop {
            self.flush().await?;
            if let Some(event) = self.session.poll_event() {
                return Ok(Some(event));
            }
            if self.eof {
                return Ok(None);
            }
            let read = if self.session.awaiting_answer() {
                match tokio::time::timeout(RETRY_AFTER, self.io.read(&mut self.read_buf)).await {
                    Ok(read) => read,
                    Err(_elapsed) => {
                        self.session.retry();
                        continue;
                    }
                }
            } else {
                self.io.read(&mut self.read_buf).await
            };
            match read? {
                0 => {
                    self.eof = true;
                    self.session.transport_closed();
                }
                n => self.session.receive(&self.read_buf[..n]),
            }
        }
    }
}
