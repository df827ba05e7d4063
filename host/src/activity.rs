//! What the PEP is doing, as it happens, for the people watching (`pexi ui`, `pexi approve`): decisions,
//! outcomes, questions and answers as JSON events on a broadcast channel, the most recent of them for a page
//! that opens late, and counts per host. Bounded everywhere: a slow watcher misses events (and is told
//! how many), it never holds the PEP up; the audit log, not this, is the record.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;

/// Events kept for watchers that connect later.
const RECENT: usize = 500;
/// Events a watcher may fall behind by before it misses some.
const CHANNEL: usize = 1024;
/// Hosts counted one by one; past this many, the rest are counted together.
const HOSTS: usize = 10_000;
const OTHER_HOSTS: &str = "(other hosts)";

/// Milliseconds since the epoch, the events' clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Counts {
    pub allowed: u64,
    pub denied: u64,
    pub asked: u64,
}

pub struct Activity {
    sender: broadcast::Sender<Arc<Value>>,
    recent: Mutex<VecDeque<Arc<Value>>>,
    hosts: Mutex<BTreeMap<String, Counts>>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            sender: broadcast::channel(CHANNEL).0,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            hosts: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Activity {
    /// Sends `event` (an object with a `type`) to every watcher and keeps it among the recent ones.
    pub fn publish(&self, event: Value) {
        let event = Arc::new(event);
        {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(event.clone());
        }
        // No watcher is not an error.
        let _ = self.sender.send(event);
    }

    /// Counts a decision about `host`.
    pub fn count(&self, host: &str, allow: bool, asked: bool) {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        let key = if hosts.contains_key(host) || hosts.len() < HOSTS {
            host
        } else {
            OTHER_HOSTS
        };
        // A host seen before costs no allocation.
        if !hosts.contains_key(key) {
            hosts.insert(key.to_string(), Counts::default());
        }
        let Some(counts) = hosts.get_mut(key) else {
            return;
        };
        match (allow, asked) {
            (true, _) => counts.allowed += 1,
            (false, true) => counts.asked += 1,
            (false, false) => counts.denied += 1,
        }
    }

    pub fn recent(&self) -> Vec<Arc<Value>> {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    pub fn hosts(&self) -> BTreeMap<String, Counts> {
        self.hosts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Value>> {
        self.sender.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_events_and_host_counts_are_bounded() {
        let activity = Activity::default();
        for n in 0..(RECENT + 10) {
            activity.publish(serde_json::json!({"type": "decision", "n": n}));
        }
        let recent = activity.recent();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0]["n"], 10);
        for n in 0..(HOSTS + 5) {
            activity.count(&format!("h{n}.example"), n % 2 == 0, false);
        }
        activity.count("h0.example", false, true);
        let hosts = activity.hosts();
        assert_eq!(hosts.len(), HOSTS + 1);
        assert_eq!(hosts[OTHER_HOSTS].allowed + hosts[OTHER_HOSTS].denied, 5);
        assert_eq!(
            (hosts["h0.example"].allowed, hosts["h0.example"].asked),
            (1, 1)
        );
    }
}
