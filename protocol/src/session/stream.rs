//! Per-stream state kept by the session.

use super::flow::{RecvWindow, SendWindow};
use crate::payload::MethodCall;

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
        }
    }

    /// Both directions ended and the application released everything it received: nothing can still
    /// happen on this stream, so it no longer counts against the concurrency limit.
    pub fn is_done(&self) -> bool {
        self.local_ended && self.remote_ended && self.recv.held() == 0
    }
}
