//! Credit-based flow control, one pair of windows per stream and one for the whole session.
//!
//! Only DATA payload bytes count. A sender may have at most as many unacknowledged DATA bytes in flight as
//! the receiver granted ([`SendWindow`]); the receiver grants more with WINDOW_UPDATE once its application
//! has consumed data ([`RecvWindow::release`]). Data the receiver throws away (for a stream that is already
//! gone) is released at once, so the session window never leaks credit.

use crate::payload::MAX_WINDOW;

/// Why the peer's flow-control behaviour is unacceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("peer sent {sent} DATA bytes with only {available} bytes of credit")]
    Overrun { sent: u32, available: u32 },
    #[error("WINDOW_UPDATE would raise the window above 2^31-1")]
    Overflow,
}

/// Credit this side has for sending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendWindow {
    available: u32,
}

impl SendWindow {
    pub fn new(initial: u32) -> Self {
        SendWindow { available: initial }
    }

    pub fn available(&self) -> u32 {
        self.available
    }

    /// # Panics
    /// If more is consumed than available: callers check [`Self::available`] first, so this is a bug.
    pub fn consume(&mut self, n: u32) {
        self.available = self
            .available
            .checked_sub(n)
            .expect("sent more DATA than the send window allows");
    }

    /// Adds credit from a WINDOW_UPDATE, or gives back credit for queued data that will never be sent.
    pub fn grant(&mut self, n: u32) -> Result<(), FlowError> {
        match self.available.checked_add(n) {
            Some(sum) if sum <= MAX_WINDOW => {
                self.available = sum;
                Ok(())
            }
            _ => Err(FlowError::Overflow),
        }
    }
}

/// Credit this side has granted the peer, and what the application has consumed but not yet re-granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvWindow {
    initial: u32,
    /// Bytes the peer may still send.
    available: u32,
    /// Received and not yet released by the application.
    held: u32,
    /// Released by the application, not yet announced in a WINDOW_UPDATE.
    pending: u32,
}

impl RecvWindow {
    pub fn new(initial: u32) -> Self {
        RecvWindow {
            initial,
            available: initial,
            held: 0,
            pending: 0,
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

    /// The application consumed `n` bytes (clamped to what it holds). Returns the increment to announce in
    /// a WINDOW_UPDATE once at least half the initial window is waiting, so that updates are batched but the
    /// peer can never stall on a window the application has already freed.
    pub fn release(&mut self, n: u32) -> Option<u32> {
        let n = n.min(self.held);
        self.held -= n;
        self.pending += n;
        if self.pending > 0 && self.pending >= self.initial.div_ceil(2) {
            let increment = std::mem::take(&mut self.pending);
            self.available += increment;
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
        let mut w = SendWindow::new(MAX_WINDOW - 1);
        assert_eq!(w.grant(1), Ok(()));
        assert_eq!(w.grant(1), Err(FlowError::Overflow));
        assert_eq!(w.available(), MAX_WINDOW);
    }
}
