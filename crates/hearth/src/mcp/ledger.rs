//! Which MCP session created which sandbox, and the end of those sandboxes: a sandbox created in a
//! session without `keep` is destroyed when the session ends — the stdio client closes the pipe,
//! a streamable HTTP session is closed or expires, or the server gets SIGTERM/SIGINT/SIGHUP.
//!
//! A [`Session`] is one MCP session's share of the [`Ledger`]; dropping it (rmcp drops the
//! session's handler when the session ends) destroys what it owns in the background, and
//! [`Ledger::destroy_all`] at exit destroys whatever is still owned, so a sandbox is listed here
//! until its DELETE answered. Streamable HTTP requests of the sessionless 2026 protocol have no
//! session: what they create belongs to [`Ledger::server`], which lives as long as the server.
//! Sandboxes not kept also carry the label [`LABEL`] = this server's instance id, so that at exit
//! one not yet owned (its create was cut short by the session's end) is found and destroyed too.
//! Touches only the daemon, through the client.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::Client;

/// How long a destroy at session end or exit may take before it is given up (and logged).
const DESTROY_TIMEOUT: Duration = Duration::from_secs(30);

/// The label a sandbox not kept carries: the instance id of the `hearth mcp` that ends it.
pub const LABEL: &str = "hearth.mcp/ends-with";

/// Every session's sandboxes.
pub struct Ledger {
    client: Arc<Client>,
    /// This server's [`LABEL`] value.
    instance: String,
    owned: Mutex<HashMap<u64, BTreeSet<String>>>,
    /// Sandboxes kept although labelled (forks of a sandbox not kept, asked to be kept).
    kept: Mutex<BTreeSet<String>>,
    next: AtomicU64,
    /// The owner of sandboxes created outside any session.
    server: Arc<Session>,
}

/// One MCP session's sandboxes; they are destroyed when it is dropped.
pub struct Session {
    id: u64,
    ledger: std::sync::Weak<Ledger>,
}

impl Ledger {
    /// `instance` tells this server's sandboxes from others' (a random id).
    pub fn new(client: Arc<Client>, instance: String) -> Arc<Ledger> {
        Arc::new_cyclic(|weak| Ledger {
            client,
            instance,
            owned: Mutex::new(HashMap::new()),
            kept: Mutex::new(BTreeSet::new()),
            next: AtomicU64::new(1),
            server: Arc::new(Session {
                id: 0,
                ledger: weak.clone(),
            }),
        })
    }

    /// A new session's share.
    pub fn open(self: &Arc<Self>) -> Arc<Session> {
        Arc::new(Session {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            ledger: Arc::downgrade(self),
        })
    }

    /// The owner of what sessionless requests create: ends with the server.
    pub fn server(&self) -> Arc<Session> {
        self.server.clone()
    }

    /// The label a sandbox this server is to end carries.
    pub fn label(&self) -> (String, String) {
        (LABEL.to_string(), self.instance.clone())
    }

    /// `id` carries the label but is to be kept.
    pub fn keep(&self, id: &str) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.insert(id.to_string());
    }

    /// `id` is gone (destroyed by a tool) or no longer ours to end: no session owns it any more.
    pub fn forget(&self, id: &str) {
        for ids in self.lock().values_mut() {
            ids.remove(id);
        }
    }

    /// Destroys every sandbox still owned by a session or labelled as this server's and not kept,
    /// at once; returns when all answered.
    pub async fn destroy_all(&self) {
        let mut ids: BTreeSet<String> = self.lock().values().flatten().cloned().collect();
        match tokio::time::timeout(DESTROY_TIMEOUT, self.client.list()).await {
            Ok(Ok(all)) => {
                let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).clone();
                ids.extend(
                    all.into_iter()
                        .filter(|s| s.labels.get(LABEL) == Some(&self.instance))
                        .map(|s| s.id)
                        .filter(|id| !kept.contains(id)),
                );
            }
            Ok(Err(e)) => tracing::warn!("listing this server's sandboxes at exit: {e:#}"),
            Err(_) => tracing::warn!("listing this server's sandboxes at exit: no answer"),
        }
        futures::future::join_all(ids.iter().map(|id| self.destroy(id))).await;
    }

    async fn destroy(&self, id: &str) {
        match tokio::time::timeout(DESTROY_TIMEOUT, self.client.delete(id)).await {
            Ok(Ok(())) => tracing::info!(sandbox = id, "destroyed at the end of its MCP session"),
            // Most often it is gone already (its TTL, or a destroy of its own in flight).
            Ok(Err(e)) => tracing::info!(sandbox = id, "destroying at session end: {e:#}"),
            Err(_) => tracing::warn!(
                sandbox = id,
                "destroying at session end: no answer in {DESTROY_TIMEOUT:?}; it lives on \
                 until its TTL"
            ),
        }
        self.forget(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, BTreeSet<String>>> {
        // A panic while holding the lock cannot leave the map half-updated: keep using it.
        self.owned.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Session {
    /// This session now owns sandbox `id`.
    pub fn adopt(&self, id: &str) {
        if let Some(ledger) = self.ledger.upgrade() {
            ledger
                .lock()
                .entry(self.id)
                .or_default()
                .insert(id.to_string());
        }
    }

    /// Whether the sandboxes this session owns live only as long as the server.
    pub fn is_server(&self) -> bool {
        self.id == 0
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let Some(ledger) = self.ledger.upgrade() else {
            return;
        };
        let ids: Vec<String> = {
            let mut owned = ledger.lock();
            match owned.get(&self.id) {
                Some(ids) if !ids.is_empty() => ids.iter().cloned().collect(),
                _ => {
                    owned.remove(&self.id);
                    return;
                }
            }
        };
        // Without a runtime (the process is exiting) `destroy_all` has them.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let session = self.id;
        runtime.spawn(async move {
            futures::future::join_all(ids.iter().map(|id| ledger.destroy(id))).await;
            ledger.lock().remove(&session);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sandboxes_belong_to_their_session_until_forgotten() {
        // Port 9 (discard): nothing answers, so ending a session only logs.
        let client = Arc::new(Client::new("127.0.0.1:9", "token-for-tests").unwrap());
        let ledger = Ledger::new(client, "test".to_string());
        // A session that created nothing ends without a trace.
        drop(ledger.open());
        let a = ledger.open();
        let b = ledger.open();
        a.adopt("sb-1");
        a.adopt("sb-2");
        b.adopt("sb-3");
        ledger.server().adopt("sb-4");
        ledger.forget("sb-2");
        let owned = |s: &Session| ledger.lock().get(&s.id).cloned().unwrap_or_default();
        assert_eq!(owned(&a), BTreeSet::from(["sb-1".to_string()]));
        assert_eq!(owned(&b), BTreeSet::from(["sb-3".to_string()]));
        assert!(ledger.server().is_server() && !a.is_server());
        drop(a);
        drop(b);
        // The destroys failed (nothing listens) but were answered: nothing is owned any more
        // except by the server, whose sandboxes `destroy_all` ends.
        for _ in 0..100 {
            if ledger.lock().keys().all(|&k| k == 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(ledger.lock().keys().copied().collect::<Vec<_>>(), vec![0]);
        ledger.destroy_all().await;
        assert!(ledger.lock().values().all(|ids| ids.is_empty()));
    }
}
