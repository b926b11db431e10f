//! What the API and the running rollout share in memory: an abort request, manual
//! restart confirmations, the server a manual hook waits for, the leader term the
//! rollout is driven under, whether a driver runs, and a counter that wakes the
//! rollout's driver. The plane holds one; the rollout and the API use it.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;

/// Abort and confirmation signals for the running rollout.
pub struct Signals {
    abort: Mutex<Option<String>>,
    confirmed: Mutex<HashSet<String>>,
    /// The servers whose manual hooks wait for a confirmation.
    waiting_for: Mutex<BTreeSet<String>>,
    /// The leader term of the running rollout's driver.
    term: Mutex<Option<i64>>,
    /// A driver runs in this process (an unfinished rollout without one is an
    /// orphan: `abort` starts one).
    driving: Mutex<bool>,
    bump: watch::Sender<u64>,
}

impl Default for Signals {
    fn default() -> Self {
        Signals {
            abort: Mutex::new(None),
            confirmed: Mutex::new(HashSet::new()),
            waiting_for: Mutex::new(BTreeSet::new()),
            term: Mutex::new(None),
            driving: Mutex::new(false),
            bump: watch::channel(0).0,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Signals {
    /// Forgets everything: a new rollout starts.
    pub fn reset(&self) {
        *lock(&self.abort) = None;
        lock(&self.confirmed).clear();
        lock(&self.waiting_for).clear();
    }

    /// The running rollout is driven under leader term `term`.
    pub fn set_term(&self, term: Option<i64>) {
        *lock(&self.term) = term;
    }

    /// The leader term the running rollout is driven under.
    pub fn term(&self) -> Option<i64> {
        *lock(&self.term)
    }

    /// A driver starts (`true`) or ends.
    pub fn set_driving(&self, driving: bool) {
        *lock(&self.driving) = driving;
    }

    /// Whether a rollout's driver runs in this process.
    pub fn driving(&self) -> bool {
        *lock(&self.driving)
    }

    fn wake(&self) {
        self.bump.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Asks the running rollout to roll back.
    pub fn request_abort(&self, reason: &str) {
        *lock(&self.abort) = Some(reason.to_owned());
        self.wake();
    }

    /// Why an abort was asked for, if it was.
    pub fn abort_reason(&self) -> Option<String> {
        lock(&self.abort).clone()
    }

    /// Resolves when an abort is asked for, with its reason.
    pub async fn aborted(&self) -> String {
        let mut rx = self.bump.subscribe();
        loop {
            if let Some(r) = self.abort_reason() {
                return r;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The servers whose manual hooks wait for a confirmation, sorted.
    pub fn waiting_for(&self) -> Vec<String> {
        lock(&self.waiting_for).iter().cloned().collect()
    }

    /// `server`'s manual hook waits (`true`) or no longer waits for a confirmation.
    pub fn set_waiting(&self, server: &str, waiting: bool) {
        let mut w = lock(&self.waiting_for);
        if waiting {
            w.insert(server.to_owned());
        } else {
            w.remove(server);
        }
    }

    /// Confirms `server`'s manual restart; false when no hook waits for it.
    pub fn confirm(&self, server: &str) -> bool {
        if !lock(&self.waiting_for).contains(server) {
            return false;
        }
        lock(&self.confirmed).insert(server.to_owned());
        self.wake();
        true
    }

    /// Resolves when `server`'s manual restart is confirmed.
    pub async fn confirmed(&self, server: &str) {
        let mut rx = self.bump.subscribe();
        loop {
            if lock(&self.confirmed).remove(server) {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
