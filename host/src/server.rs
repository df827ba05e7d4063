//! A PEP serving inside this process: what `pexi serve` runs, usable by other programs (a VM runner that
//! embeds the PEP) and by tests.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::pipeline::Pipeline;

pub struct Server {
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Server {
    /// Builds the pipeline from `config` and starts every configured listener and the policy reloader.
    /// Must run inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Server, String> {
        let pipeline = Arc::new(Pipeline::new(config).map_err(|err| err.to_string())?);
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        // Before any guest is served: the dashboard's address is in the address guard from the start.
        crate::control::start(pipeline.clone(), shutdown.clone(), &tasks).await?;
        if let Err(err) = crate::export::start(pipeline.clone(), shutdown.clone(), &tasks) {
            shutdown.cancel();
            return Err(format!("pep.export: {err}"));
        }
        // Before guests: a reachable bundle server's newest bundle serves from the first request.
        if let Err(err) =
            crate::bundle_sync::start(pipeline.clone(), shutdown.clone(), &tasks).await
        {
            shutdown.cancel();
            return Err(err);
        }
        for listen in pipeline.config.pep.listen.clone() {
            if let Err(err) =
                crate::transport::start(&listen, pipeline.clone(), shutdown.clone(), &tasks).await
            {
                shutdown.cancel();
                return Err(format!("{listen}: {err}"));
            }
        }
        tasks.spawn(crate::reload::watch(pipeline.clone(), shutdown.clone()));
        Ok(Server {
            pipeline,
            shutdown,
            tasks,
        })
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    /// Stops serving: each session gets GOAWAY, streams already open get `drain_timeout_ms` to finish
    /// (the rest are cut with `session_reset`), every worker writes its outcome record, and the audit log is
    /// flushed.
    pub async fn stop(&self) -> Result<(), String> {
        self.shutdown.cancel();
        self.tasks.close();
        let drain = Duration::from_millis(self.pipeline.config.pep.limits.drain_timeout_ms);
        // The drain deadline, then a moment for the last frames and the workers' outcome records.
        let limit = drain + Duration::from_secs(3);
        let workers = &self.pipeline.admission.workers;
        workers.close();
        let everything = async {
            self.tasks.wait().await;
            workers.wait().await;
        };
        if tokio::time::timeout(limit, everything).await.is_err() {
            tracing::warn!(?limit, "connections or streams still open; stopping anyway");
        }
        self.pipeline.record(&crate::audit::records::PepStop {
            reason: "stop".into(),
        });
        let pipeline = self.pipeline.clone();
        tokio::task::spawn_blocking(move || pipeline.audit().flush())
            .await
            .unwrap_or_else(|err| Err(err.to_string()))
    }
}
