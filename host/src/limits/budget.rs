//! How many bytes the PEP buffers on guests' behalf, host-wide and per session.
//!
//! Every byte a worker hands to its guest (response data, tunnel data) and every byte kept for a redirect's
//! replay holds a [`Charge`] until it is gone: written to the transport, or dropped. A charge is drawn from
//! three pools:
//!
//! - the session's **cap** (`session_buffer_bytes`): one guest never holds more, whatever it does;
//! - the session's **reserve** (`session_reserved_bytes`), used first: a guest that keeps up always has it,
//!   however many other guests are stalling, so their stall cannot delay it;
//! - the **host pool** (`buffer_budget_bytes`), shared, for what the reserve does not cover.
//!
//! A worker that cannot get a charge waits, and while it waits it reads nothing more from its upstream:
//! backpressure, never more buffering. The worst case is therefore `buffer_budget_bytes` plus
//! `max_sessions × session_reserved_bytes`, whatever the guests announce or do.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::config::LimitsConfig;

/// The host-wide pool, shared by every session of one PEP.
#[derive(Clone)]
pub struct Budget {
    pool: Arc<Semaphore>,
    total: usize,
    session_cap: usize,
    session_reserve: usize,
}

impl Budget {
    pub fn new(limits: &LimitsConfig) -> Budget {
        let total = limits.buffer_budget_bytes as usize;
        Budget {
            pool: Arc::new(Semaphore::new(total)),
            total,
            session_cap: limits.session_buffer_bytes as usize,
            session_reserve: limits.session_reserved_bytes as usize,
        }
    }

    /// Bytes of the host pool in use now (not counting sessions' reserves).
    pub fn pool_in_use(&self) -> usize {
        self.total - self.pool.available_permits()
    }

    pub fn session(&self) -> SessionBudget {
        SessionBudget {
            cap: Arc::new(Semaphore::new(self.session_cap)),
            cap_total: self.session_cap,
            reserve: Arc::new(Semaphore::new(self.session_reserve)),
            pool: self.pool.clone(),
        }
    }
}

/// One session's share of the [`Budget`].
#[derive(Clone)]
pub struct SessionBudget {
    cap: Arc<Semaphore>,
    cap_total: usize,
    reserve: Arc<Semaphore>,
    pool: Arc<Semaphore>,
}

impl SessionBudget {
    /// Bytes this session holds now.
    pub fn in_use(&self) -> usize {
        self.cap_total - self.cap.available_permits()
    }

    /// Waits for `n` bytes (at most `u32::MAX`; callers hand over chunks of at most 64 KiB).
    pub async fn acquire(&self, n: usize) -> Result<Charge, Closed> {
        let n = u32::try_from(n).map_err(|_| Closed)?;
        let cap = self
            .cap
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| Closed)?;
        let pool = match self.reserve.clone().try_acquire_many_owned(n) {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(Closed),
            Err(TryAcquireError::NoPermits) => tokio::select! {
                permit = self.reserve.clone().acquire_many_owned(n) => permit,
                permit = self.pool.clone().acquire_many_owned(n) => permit,
            }
            .map_err(|_| Closed)?,
        };
        Ok(Charge { cap, _pool: pool })
    }

    /// `n` bytes now, or `None`: for copies that are worth keeping only if memory is there (a replay copy).
    pub fn try_acquire(&self, n: usize) -> Option<Charge> {
        let n = u32::try_from(n).ok()?;
        let cap = self.cap.clone().try_acquire_many_owned(n).ok()?;
        let pool = self
            .reserve
            .clone()
            .try_acquire_many_owned(n)
            .or_else(|_| self.pool.clone().try_acquire_many_owned(n))
            .ok()?;
        Some(Charge { cap, _pool: pool })
    }
}

/// The budget is gone (the session ended).
#[derive(Debug)]
pub struct Closed;

/// Bytes held against the budget; dropping it gives them back.
pub struct Charge {
    cap: OwnedSemaphorePermit,
    /// Held for its drop: the bytes go back to the reserve or the host pool.
    _pool: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Charge({} bytes)", self.len())
    }
}

impl Charge {
    pub fn len(&self) -> usize {
        self.cap.num_permits()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
