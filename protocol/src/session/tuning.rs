//! Stream receive windows that grow with the bandwidth-delay product, the way h2 implementations do it
//! (hyper's "adaptive window"): while DATA arrives, one PING is out as a probe; the DATA bytes that arrive
//! before its PONG are one round trip's worth. When a round trip brings at least two thirds of the stream
//! window, the window (not the reader) is what limits the flow, so it doubles, up to a bound. Only
//! transfers are probed and raised: streams whose reader has consumed half a window (the session checks
//! `RecvWindow::regranted`), so a small response costs no PING and a reader that does not read keeps its
//! initial window.
//!
//! No clock is needed, so the session stays sans-IO. The bound is the session's receive window: every
//! DATA byte also counts against that, so a larger stream window lets one stream use more of the session's
//! credit without raising what a peer can make this side buffer. A peer that fakes PONGs can at most make
//! the windows reach that bound, which this side already accepts.

/// The first bytes of a probe's payload; the last four count probes, so the PONG of a probe from before a
/// resync is not taken for the current one.
const PROBE_TAG: [u8; 4] = *b"bdp:";

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct WindowTuner {
    /// The stream window in use now: streams are raised to it as their DATA arrives.
    window: u32,
    max: u32,
    probe: Option<[u8; 8]>,
    probes_sent: u32,
    /// DATA bytes received since the probe went out.
    sampled: u64,
}

/// What a PONG meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pong {
    /// Not this tuner's probe: the application's (keepalive) PONG.
    Other,
    /// The probe came back; the window stays.
    Kept,
    /// The probe came back after a round trip that filled the window: streams may receive this much.
    Grown(u32),
}

impl WindowTuner {
    pub fn new(initial: u32, max: u32) -> Self {
        WindowTuner {
            window: initial,
            max: max.max(initial),
            probe: None,
            probes_sent: 0,
            sampled: 0,
        }
    }

    pub fn window(&self) -> u32 {
        self.window
    }

    /// Counts DATA that arrived; returns the payload of a PING to send when no probe is out, the window
    /// can still grow, and the DATA belongs to a `bulk` stream (one that has been re-granted credit).
    pub fn on_data(&mut self, bytes: u32, bulk: bool) -> Option<[u8; 8]> {
        self.sampled = self.sampled.saturating_add(u64::from(bytes));
        if !bulk || self.probe.is_some() || self.window >= self.max {
            return None;
        }
        self.probes_sent = self.probes_sent.wrapping_add(1);
        let mut payload = [0u8; 8];
        payload[..4].copy_from_slice(&PROBE_TAG);
        payload[4..].copy_from_slice(&self.probes_sent.to_be_bytes());
        self.probe = Some(payload);
        // The round trip starts now: what arrived before the probe left does not count.
        self.sampled = 0;
        Some(payload)
    }

    pub fn on_pong(&mut self, payload: [u8; 8]) -> Pong {
        if self.probe != Some(payload) {
            return Pong::Other;
        }
        self.probe = None;
        let window = u64::from(self.window);
        if self.sampled * 3 >= window * 2 {
            // Fits: bounded by `max`, a u32.
            self.window = (window * 2).min(u64::from(self.max)) as u32;
            return Pong::Grown(self.window);
        }
        Pong::Kept
    }

    /// The transport was reset: a probe's PONG may never come, so a new probe may go out.
    pub fn forget_probe(&mut self) {
        self.probe = None;
        self.sampled = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_that_fills_two_thirds_of_the_window_doubles_it_up_to_the_bound() {
        let mut tuner = WindowTuner::new(256, 1024);
        let probe = tuner
            .on_data(100, true)
            .expect("a probe goes out with the first DATA");
        assert_eq!(tuner.on_data(100, true), None, "one probe at a time");
        tuner.on_data(71, true);
        assert_eq!(
            tuner.on_pong(probe),
            Pong::Grown(512),
            "171 of 256 is two thirds"
        );
        let probe = tuner.on_data(400, true).expect("next probe");
        tuner.on_data(400, true);
        assert_eq!(tuner.on_pong(probe), Pong::Grown(1024));
        assert_eq!(
            tuner.on_data(4096, true),
            None,
            "at the bound no probe is needed"
        );
        assert_eq!(tuner.window(), 1024);
    }

    #[test]
    fn a_round_trip_that_brings_little_keeps_the_window() {
        let mut tuner = WindowTuner::new(256, 1024);
        let probe = tuner.on_data(256, true).expect("probe");
        // What arrived with the frame that sent the probe does not count: only the round trip's DATA.
        tuner.on_data(169, true);
        assert_eq!(tuner.on_pong(probe), Pong::Kept);
        assert_eq!(tuner.window(), 256);
    }

    #[test]
    fn other_pongs_and_stale_probes_change_nothing() {
        let mut tuner = WindowTuner::new(256, 1024);
        let first = tuner.on_data(1, true).expect("probe");
        assert_eq!(tuner.on_pong(*b"pexi-ka!"), Pong::Other);
        tuner.forget_probe();
        let second = tuner.on_data(1, true).expect("a new probe after a reset");
        assert_ne!(first, second);
        tuner.on_data(1000, true);
        assert_eq!(tuner.on_pong(first), Pong::Other, "the old probe's PONG");
        assert_eq!(tuner.on_pong(second), Pong::Grown(512));
    }

    #[test]
    fn data_of_a_stream_that_is_not_bulk_sends_no_probe_but_is_counted() {
        let mut tuner = WindowTuner::new(256, 1024);
        assert_eq!(tuner.on_data(100, false), None);
        let probe = tuner.on_data(1, true).expect("probe once a stream is bulk");
        tuner.on_data(171, false);
        assert_eq!(tuner.on_pong(probe), Pong::Grown(512));
    }

    #[test]
    fn the_bound_is_never_below_the_initial_window() {
        let tuner = WindowTuner::new(4096, 1024);
        assert_eq!(tuner.window(), 4096);
        let mut tuner = tuner;
        assert_eq!(tuner.on_data(10_000, true), None);
    }
}
