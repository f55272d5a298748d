//! The cluster state from the Kubernetes API server: the [`StateSource`] over the watches of
//! `vpcnet_k8s::watch`.
//!
//! Until every kind has been listed once nothing is published, so ADD answers "try again" and
//! STATUS says which lists are still missing or why a watch fails (forbidden by RBAC, a CRD not
//! installed, the API server away). Once synced, a failing watch leaves the last state in force:
//! the pinned maps keep enforcing it, and nothing opens because the API is unreachable.

use super::source::{StateError, StateSource};
use std::sync::Arc;
use tokio::sync::watch;
use vpcnet_k8s::watch::Published;
use vpcnet_policy::ClusterState;

pub struct KubeSource {
    origin: String,
    published: Published,
}

impl KubeSource {
    /// `origin` names the API server for messages (its URL).
    pub fn new(origin: impl Into<String>, published: Published) -> Self {
        KubeSource {
            origin: origin.into(),
            published,
        }
    }

    pub fn published(&self) -> &Published {
        &self.published
    }

    fn problems(&self) -> Option<StateError> {
        let h = self
            .published
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut reasons = h.problems();
        if h.synced() {
            // Waiting for a relist after an outage is not a problem while a state is in force.
            reasons.retain(|r| !r.starts_with("waiting for the first list"));
        }
        reasons.extend(h.rejected.iter().cloned());
        (!reasons.is_empty()).then(|| StateError::Watch {
            origin: self.origin.clone(),
            reason: reasons.join("; "),
        })
    }
}

impl StateSource for KubeSource {
    fn origin(&self) -> String {
        self.origin.clone()
    }

    fn snapshot(&self) -> Result<Arc<ClusterState>, StateError> {
        self.published
            .state
            .borrow()
            .clone()
            .ok_or_else(|| StateError::NotSynced {
                origin: self.origin.clone(),
                cause: self.problems().map(Box::new),
            })
    }

    fn subscribe(&self) -> watch::Receiver<Option<Arc<ClusterState>>> {
        self.published.state.clone()
    }

    fn last_error(&self) -> Option<StateError> {
        self.problems()
    }

    fn synced(&self) -> bool {
        self.published.state.borrow().is_some()
    }

    fn has_every_pod(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::watcher::{self, Event};
    use vpcnet_k8s::fold::WatchedKind;
    use vpcnet_k8s::watch::{Update, spawn};

    fn forbidden() -> watcher::Error {
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(
            serde_json::from_value(serde_json::json!({"code": 403, "message": "pods is forbidden", "reason": "Forbidden"}))
                .unwrap(),
        )))
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn not_synced_says_why_and_a_forbidden_watch_is_named() {
        let (tx, rx) = mpsc::unbounded();
        let source = KubeSource::new("https://10.0.0.1:6443", spawn(rx, 30));
        for kind in WatchedKind::ALL
            .into_iter()
            .filter(|k| *k != WatchedKind::Pod)
        {
            for u in Update::empty_list(kind) {
                tx.unbounded_send(u).unwrap();
            }
        }
        tx.unbounded_send(Update::Pod(Err(forbidden()))).unwrap();
        settle().await;
        assert!(!source.synced());
        let e = source.snapshot().unwrap_err().to_string();
        assert!(
            e.contains("not synced yet from https://10.0.0.1:6443"),
            "{e}"
        );
        assert!(e.contains("forbids watching pods"), "{e}");

        // RBAC fixed: the pods list completes and the state is published.
        tx.unbounded_send(Update::Pod(Ok(Event::<Pod>::Init)))
            .unwrap();
        tx.unbounded_send(Update::Pod(Ok(Event::<Pod>::InitDone)))
            .unwrap();
        super::super::source::wait_synced(&source).await.unwrap();
        assert!(source.synced());
        assert!(source.last_error().is_none());
    }
}
