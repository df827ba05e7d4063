//! Credit-based flow control, one pair of windows per stream and one for the whole session.
//!
//! Only DATA payload bytes count. A sender may have at most as many unacknowledged DATA bytes in flight as
//! the receiver granted ([`SendWindow`]); the receiver grants more with WINDOW_UPDATE once its application
//! has consumed data ([`RecvWindow::release`]). Data the receiver throws away (for a stream that is already
//! gone) is released at once, so the session window never leaks credit.

use crate::payload::MAX_WINDOW;

/// The most stream credit a side uses at once, whatever the peer announces or grants: DATA in flight to a
/// peer sits in buffers somewhere (a virtio-serial ring, the guest's socket), and a peer announcing 2^31-1
/// must not make this side push gigabytes at it. The peer's own accounting is kept exact.
pub const MAX_USED_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// The same for the session: the most DATA in flight across all streams.
pub const MAX_USED_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Why the peer's flow-control behaviour is unacceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("peer sent {sent} DATA bytes with only {available} bytes of credit")]
    Overrun { sent: u32, available: u32 },
    #[error("WINDOW_UPDATE would raise the window above 2^31-1")]
    Overflow,
}

/// Credit this side has for sending: the peer's exact figure (so an overflowing grant is still caught)
/// and the part of it this side uses, at most `cap` (credit above the cap is ignored, not banked).
///
/// Because a receiver re-grants only what it consumed, usable credit plus bytes in flight stays equal to
/// `min(announced, cap)`; a receiver that waits for half of its *announced* window before it re-grants
/// would stall once `cap` bytes are in flight, so receivers re-grant at half of `min(window, cap)`
/// ([`RecvWindow`] does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendWindow {
    announced: u32,
    usable: u32,
    cap: u32,
}

impl SendWindow {
    pub fn new(initial: u32, cap: u32) -> Self {
        SendWindow {
            announced: initial,
            usable: initial.min(cap),
            cap,
        }
    }

    pub fn available(&self) -> u32 {
        self.usable
    }

    /// # Panics
    /// If more is consumed than available: callers check [`Self::available`] first, so this is a bug.
    pub fn consume(&mut self, n: u32) {
        self.usable = self
            .usable
            .checked_sub(n)
            .expect("sent more DATA than the send window allows");
        self.announced -= n;
    }

    /// Adds credit from a WINDOW_UPDATE, or gives back credit for queued data that will never be sent.
    pub fn grant(&mut self, n: u32) -> Result<(), FlowError> {
        match self.announced.checked_add(n) {
            Some(sum) if sum <= MAX_WINDOW => {
                self.announced = sum;
                self.usable = self.usable.saturating_add(n).min(self.cap).min(sum);
                Ok(())
            }
            _ => Err(FlowError::Overflow),
        }
    }
}

/// Credit this side has granted the peer, and what the application has consumed but not yet re-granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvWindow {
    /// The window granted: the initial one, or what [`Self::grow`] raised it to.
    window: u32,
    /// Bytes the peer may still send.
    available: u32,
    /// Received and not yet released by the application.
    held: u32,
    /// Released by the application, not yet announced in a WINDOW_UPDATE.
    pending: u32,
    /// A WINDOW_UPDATE was due at least once: the peer sent half a window and the reader consumed it.
    regranted: bool,
}

impl RecvWindow {
    pub fn new(initial: u32) -> Self {
        RecvWindow {
            window: initial,
            available: initial,
            held: 0,
            pending: 0,
            regranted: false,
        }
    }

    pub fn available(&self) -> u32 {
        self.available
    }

    pub fn held(&self) -> u32 {
        self.held
    }

    /// Accounts for a DATA frame from the peer.
    pub fn receive(&mut self, n: u32) -> Result<(), FlowError> {
        if n > self.available {
            return Err(FlowError::Overrun {
                sent: n,
                available: self.available,
            });
        }
        self.available -= n;
        self.held += n;
        Ok(())
    }

    /// Whether this window was ever re-granted: the stream carried half a window or more, and its reader
    /// kept up.
    pub fn regranted(&self) -> bool {
        self.regranted
    }

    pub fn window(&self) -> u32 {
        self.window
    }

    /// Raises the window to `window` (never lowers it) and returns the extra credit to announce in a
    /// WINDOW_UPDATE, if any. Later re-grants wait for half of the larger window.
    pub fn grow(&mut self, window: u32) -> Option<u32> {
        let window = window.min(MAX_WINDOW);
        let extra = window.checked_sub(self.window).filter(|&n| n > 0)?;
        // Credit granted never exceeds the window: available + held + pending == window.
        self.window = window;
        self.available += extra;
        Some(extra)
    }

    /// The application consumed `n` bytes (clamped to what it holds). Returns the increment to announce in
    /// a WINDOW_UPDATE once at least half the window is waiting, so that updates are batched but the
    /// peer can never stall on a window the application has already freed. The window is capped at
    /// [`MAX_USED_STREAM_WINDOW`]: a peer never has more than that in flight (see [`SendWindow`]).
    pub fn release(&mut self, n: u32) -> Option<u32> {
        let n = n.min(self.held);
        self.held -= n;
        self.pending += n;
        let threshold = self.window.min(MAX_USED_STREAM_WINDOW).div_ceil(2);
        if self.pending > 0 && self.pending >= threshold {
            let increment = std::mem::take(&mut self.pending);
            self.available += increment;
            self.regranted = true;
            Some(increment)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grown_window_grants_the_difference_once_and_regrants_at_half_of_it() {
        let mut w = RecvWindow::new(100);
        assert_eq!(w.grow(50), None, "never lowered");
        assert_eq!(w.grow(300), Some(200));
        assert_eq!(w.grow(300), None);
        assert_eq!(w.available(), 300);
        w.receive(300).unwrap();
        assert_eq!(w.release(149), None);
        assert_eq!(w.release(1), Some(150));
    }

    #[test]
    fn overrun_is_refused_and_changes_nothing() {
        let mut w = RecvWindow::new(10);
        w.receive(6).unwrap();
        assert_eq!(
            w.receive(5),
            Err(FlowError::Overrun {
                sent: 5,
                available: 4
            })
        );
        assert_eq!(w.available(), 4);
        assert_eq!(w.held(), 6);
    }

    #[test]
    fn release_batches_until_half_the_window() {
        let mut w = RecvWindow::new(100);
        w.receive(100).unwrap();
        assert_eq!(w.release(30), None);
        assert_eq!(w.release(19), None);
        assert_eq!(w.release(1), Some(50));
        assert_eq!(w.available(), 50);
        assert_eq!(w.release(50), Some(50));
        assert_eq!(w.available(), 100);
    }

    #[test]
    fn release_cannot_grant_more_than_was_received() {
        let mut w = RecvWindow::new(100);
        w.receive(10).unwrap();
        assert_eq!(w.release(1000), None);
        assert_eq!(w.held(), 0);
        w.receive(90).unwrap();
        assert_eq!(w.release(90), Some(100));
        assert_eq!(w.available(), 100);
    }

    #[test]
    fn a_window_of_one_still_reopens() {
        let mut w = RecvWindow::new(1);
        w.receive(1).unwrap();
        assert_eq!(w.release(1), Some(1));
    }

    #[test]
    fn send_window_overflow_is_an_error() {
        let mut w = SendWindow::new(MAX_WINDOW - 1, MAX_WINDOW);
        assert_eq!(w.grant(1), Ok(()));
        assert_eq!(w.grant(1), Err(FlowError::Overflow));
        assert_eq!(w.available(), MAX_WINDOW);
    }

    #[test]
    fn a_huge_window_is_used_only_up_to_the_cap_and_overflow_is_still_caught() {
        let mut w = SendWindow::new(MAX_WINDOW, MAX_USED_STREAM_WINDOW);
        assert_eq!(w.available(), MAX_USED_STREAM_WINDOW);
        w.consume(MAX_USED_STREAM_WINDOW);
        assert_eq!(w.available(), 0);
        // Credit above the cap is not banked: a grant of a gigabyte refills only to the cap.
        w.grant(MAX_USED_STREAM_WINDOW).unwrap();
        assert_eq!(w.available(), MAX_USED_STREAM_WINDOW);
        assert_eq!(w.grant(1), Err(FlowError::Overflow));
        // Below the cap nothing changes.
        let mut small = SendWindow::new(100, MAX_USED_STREAM_WINDOW);
        small.consume(60);
        small.grant(30).unwrap();
        assert_eq!(small.available(), 70);
    }

    #[test]
    fn a_huge_receive_window_is_regranted_at_half_the_cap() {
        let mut w = RecvWindow::new(MAX_WINDOW);
        w.receive(MAX_USED_STREAM_WINDOW).unwrap();
        assert_eq!(w.release(MAX_USED_STREAM_WINDOW / 2 - 1), None);
        assert_eq!(w.release(1), Some(MAX_USED_STREAM_WINDOW / 2));
    }
}
