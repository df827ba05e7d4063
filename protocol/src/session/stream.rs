//! Per-stream state kept by the session.

use std::collections::VecDeque;

use bytes::Bytes;

use super::flow::{RecvWindow, SendWindow};
use crate::payload::{ErrorPayload, HeaderField, MethodCall};

#[derive(Debug)]
pub(super) struct Stream {
    /// Kept on both sides: the client needs it to type the HEAD, the server to know what it is serving.
    pub call: MethodCall,
    pub send: SendWindow,
    pub recv: RecvWindow,
    /// This side sent END.
    pub local_ended: bool,
    /// The peer sent END.
    pub remote_ended: bool,
    /// HEAD sent (server) or received (client).
    pub head: bool,
    /// What the application wrote that has not become frames yet (see [`super::Session::write`]).
    pub outbox: Outbox,
}

/// A stream's send buffer: data written ahead of the peer's credit, then the END or ERROR that follows it.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    pub data: VecDeque<Bytes>,
    /// Bytes in `data`: written and not yet taken by [`super::Session::poll_transmit`] (a frame made from
    /// them is handed out at once, never queued).
    pub unsent: usize,
    pub then: Option<Then>,
    /// A write found the buffer full: [`super::Event::Writable`] is due when room appears.
    pub blocked: bool,
    /// In the session's round-robin queue of streams with something to send.
    pub ready: bool,
}

#[derive(Debug)]
pub(super) enum Then {
    End(Vec<HeaderField>),
    Error(ErrorPayload),
}

impl Stream {
    pub fn new(call: MethodCall, send_window: u32, recv_window: u32) -> Self {
        Stream {
            call,
            send: SendWindow::new(send_window, super::MAX_USED_STREAM_WINDOW),
            recv: RecvWindow::new(recv_window),
            local_ended: false,
            remote_ended: false,
            head: false,
            outbox: Outbox::default(),
        }
    }

    /// Both directions ended and the application released everything it received: nothing can still
    /// happen on this stream, so it no longer counts against the concurrency limit.
    pub fn is_done(&self) -> bool {
        self.local_ended && self.remote_ended && self.recv.held() == 0
    }
}
