//! The bytes of an upgraded connection (WebSocket after a 101) or a tunnel, both ways, bounded by the idle
//! timeout and `max_upgraded_bytes`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::failure::RequestError;
use super::Pipeline;
use crate::stream::{RequestBody, Responder};
use bytes::Bytes;

impl Pipeline {
    /// Carries an upgraded connection's (or a tunnel's) bytes both ways until the upstream closes (after the guest's END
    /// was passed on as a write shutdown, or while the guest still sends), the guest goes away, nothing
    /// moves for `idle_timeout_ms`, or a direction passes `max_upgraded_bytes`. Returns the bytes sent
    /// each way (to the upstream, to the guest).
    pub(super) async fn relay_upgraded<IO>(
        &self,
        upgraded: IO,
        body: Option<RequestBody>,
        responder: &Responder,
    ) -> Result<(u64, u64), RequestError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = &self.config.pep.limits;
        let cap = limits.max_upgraded_bytes;
        let idle = Duration::from_millis(limits.idle_timeout_ms.max(1));
        let (mut from_upstream, mut to_upstream) = tokio::io::split(upgraded);
        let activity = AtomicU64::new(0);
        let epoch = std::time::Instant::now();
        let touch = || activity.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let sent_up = AtomicU64::new(0);
        let sent_down = AtomicU64::new(0);
        let upward = async {
            if let Some(mut body) = body {
                while let Some(chunk) = body.next().await {
                    let total = sent_up.fetch_add(chunk.len() as u64, Ordering::Relaxed)
                        + chunk.len() as u64;
                    if total > cap {
                        return Err(RequestError::UpgradedSentTooMuch { cap });
                    }
                    to_upstream.write_all(&chunk).await.map_err(|source| {
                        RequestError::UpgradedIo {
                            op: "write",
                            source,
                        }
                    })?;
                    touch();
                }
            }
            // The guest ended its side: half-close, and keep reading what the upstream still sends.
            let _ = to_upstream.shutdown().await;
            Ok(())
        };
        let downward = async {
            let mut buffer = vec![0u8; crate::stream::MAX_CHUNK];
            loop {
                let n = from_upstream
                    .read(&mut buffer)
                    .await
                    .map_err(|source| RequestError::UpgradedIo { op: "read", source })?;
                if n == 0 {
                    return Ok(());
                }
                let total = sent_down.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                if total > cap {
                    return Err(RequestError::UpgradedReceivedTooMuch { cap });
                }
                touch();
                responder
                    .data(Bytes::copy_from_slice(&buffer[..n]))
                    .await
                    .map_err(RequestError::Send)?;
            }
        };
        let watchdog = async {
            loop {
                tokio::time::sleep(idle.min(Duration::from_secs(1))).await;
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                if epoch.elapsed().saturating_sub(last) >= idle {
                    return RequestError::UpgradedIdle(idle);
                }
            }
        };
        tokio::pin!(upward, downward, watchdog);
        let mut upward_done = false;
        let outcome = loop {
            tokio::select! {
                result = &mut upward, if !upward_done => match result {
                    Ok(()) => upward_done = true,
                    Err(error) => break Err(error),
                },
                result = &mut downward => break result,
                error = &mut watchdog => break Err(error),
            }
        };
        outcome.map(|()| {
            (
                sent_up.load(Ordering::Relaxed),
                sent_down.load(Ordering::Relaxed),
            )
        })
    }
}
