//! Where cluster state comes from. Standalone mode reads a directory of manifests; the
//! Kubernetes mode (kube-rs watchers) will implement the same [`StateSource`], so everything
//! downstream sees one model whichever feeds it.

use super::PolicyError;
use super::model::{ClusterState, Namespace, Pod};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// A feed of whole, consistent cluster states.
///
/// Contract: a state is published only when it is complete and valid. When the source's input is
/// broken the previous state stays published (and [`StateSource::last_error`] says why), because
/// falling back to "no policies" would open everything.
pub trait StateSource: Send + Sync {
    /// The state in force, or why there has never been one.
    fn snapshot(&self) -> Result<Arc<ClusterState>, PolicyError>;
    /// Fires on every newly published state. `None` until the first good state.
    fn subscribe(&self) -> watch::Receiver<Option<Arc<ClusterState>>>;
    /// Why the newest input was rejected, if it was.
    fn last_error(&self) -> Option<PolicyError>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

#[derive(Default)]
struct Inner {
    stamps: Vec<FileStamp>,
    content_hash: Option<u64>,
    error: Option<PolicyError>,
    /// Parsed objects per file and content hash: a change re-parses only the changed files.
    parsed: BTreeMap<PathBuf, (u64, Arc<Vec<Object>>)>,
}

/// Standalone cluster state: every `*.yaml`, `*.yml` and `*.json` file directly in a directory,
/// each possibly holding several `---`-separated documents (and `kind: List`). Kinds other than
/// Namespace, Pod and NetworkPolicy are ignored.
///
/// Write files atomically (write elsewhere, then rename): a half-written file that happens to
/// parse would be published until the next poll corrects it.
pub struct ManifestDir {
    dir: PathBuf,
    tx: watch::Sender<Option<Arc<ClusterState>>>,
    inner: Mutex<Inner>,
}

impl ManifestDir {
    /// Reads the directory once. A failed first read leaves the source without a state
    /// ([`StateSource::snapshot`] returns the error) rather than with an empty one.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let (tx, _) = watch::channel(None);
        let me = ManifestDir {
            dir: dir.into(),
            tx,
            inner: Mutex::new(Inner::default()),
        };
        let _ = me.poll();
        me
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn files(&self) -> Result<Vec<FileStamp>, PolicyError> {
        let io = |e: std::io::Error| PolicyError::Io {
            path: self.dir.clone(),
            reason: e.to_string(),
        };
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(io)? {
            let e = e.map_err(io)?;
            let path = e.path();
            if !matches!(
                path.extension().and_then(|x| x.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                continue;
            }
            // A file removed between listing and stat is simply gone.
            let Ok(md) = std::fs::metadata(&path) else {
                continue;
            };
            if !md.is_file() {
                continue;
            }
            out.push(FileStamp {
                path,
                len: md.len(),
                modified: md.modified().ok(),
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Checks the directory and publishes a new state if the content changed. Returns whether a
    /// new state was published. Cheap when nothing changed: only metadata is read, except while
    /// a file's mtime is too recent to trust (a same-size rewrite within the filesystem's
    /// timestamp granularity would otherwise go unnoticed).
    pub fn poll(&self) -> Result<bool, PolicyError> {
        let stamps = match self.files() {
            Ok(s) => s,
            Err(e) => return Err(self.fail(e)),
        };
        let now = SystemTime::now();
        let racy = stamps.iter().any(|s| {
            s.modified
                .and_then(|m| now.duration_since(m).ok())
                .is_none_or(|age| age < Duration::from_secs(2))
        });
        {
            let inner = self.lock();
            if !racy && inner.stamps == stamps && inner.content_hash.is_some() {
                return Ok(false);
            }
        }
        let mut texts = Vec::new();
        let mut h = DefaultHasher::new();
        for s in &stamps {
            let text = match std::fs::read_to_string(&s.path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(self.fail(PolicyError::Io {
                        path: s.path.clone(),
                        reason: e.to_string(),
                    }));
                }
            };
            s.path.hash(&mut h);
            text.hash(&mut h);
            texts.push((s.path.clone(), text));
        }
        let hash = h.finish();
        {
            let mut inner = self.lock();
            if inner.content_hash == Some(hash) {
                inner.stamps = stamps;
                return Ok(false);
            }
        }
        match self.parse_cached(&texts) {
            Ok(mut state) => {
                let prev = self.tx.borrow().clone();
                let mut inner = self.lock();
                inner.stamps = stamps;
                inner.content_hash = Some(hash);
                inner.error = None;
                drop(inner);
                if let Some(prev) = &prev
                    && prev.same_content(&state)
                {
                    return Ok(false);
                }
                state.set_generation(prev.map_or(1, |p| p.generation() + 1));
                tracing::info!(
                    dir = %self.dir.display(),
                    generation = state.generation(),
                    "cluster state loaded"
                );
                self.tx.send_replace(Some(Arc::new(state)));
                Ok(true)
            }
            Err(e) => {
                // Remember the content so a broken file is reported once, not on every poll.
                let mut inner = self.lock();
                inner.stamps = stamps;
                inner.content_hash = Some(hash);
                drop(inner);
                Err(self.fail(e))
            }
        }
    }

    /// [`parse_files`], re-using what earlier polls parsed of unchanged files.
    fn parse_cached(&self, texts: &[(PathBuf, String)]) -> Result<ClusterState, PolicyError> {
        let cached = std::mem::take(&mut self.lock().parsed);
        let mut parsed = BTreeMap::new();
        for (path, text) in texts {
            let mut h = DefaultHasher::new();
            text.hash(&mut h);
            let hash = h.finish();
            let objects = match cached.get(path) {
                Some((old, objects)) if *old == hash => objects.clone(),
                _ => Arc::new(parse_file(path, text)?),
            };
            parsed.insert(path.clone(), (hash, objects));
        }
        let state = assemble(parsed.values().map(|(_, o)| o.as_slice()));
        self.lock().parsed = parsed;
        state
    }

    fn fail(&self, e: PolicyError) -> PolicyError {
        tracing::warn!(error = %e, "manifests rejected; the previous cluster state stays in force");
        self.lock().error = Some(e.clone());
        e
    }

    /// Watches the directory until the `ManifestDir` is dropped: inotify wakes it on every
    /// write, rename or delete in the directory (so a change is read within milliseconds), and a
    /// poll every `interval` covers filesystems without inotify and same-size rewrites inside
    /// the mtime granularity.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        use notify::Watcher as _;
        let weak: Weak<Self> = Arc::downgrade(self);
        let wake = Arc::new(tokio::sync::Notify::new());
        let events = {
            let wake = wake.clone();
            notify::recommended_watcher(move |r: notify::Result<notify::Event>| {
                if r.is_ok() {
                    wake.notify_one();
                }
            })
        };
        let events = events.and_then(|mut w| {
            w.watch(&self.dir, notify::RecursiveMode::NonRecursive)?;
            Ok(w)
        });
        let events = match events {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e,
                    "no inotify watch on the manifests; changes are seen by polling only");
                None
            }
        };
        tokio::spawn(async move {
            let _events = events;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = wake.notified() => {}
                }
                let Some(me) = weak.upgrade() else { return };
                // Small synchronous reads; a blocking thread keeps them off the async workers.
                if tokio::task::spawn_blocking(move || {
                    let _ = me.poll();
                })
                .await
                .is_err()
                {
                    return;
                }
            }
        })
    }
}

impl StateSource for ManifestDir {
    fn snapshot(&self) -> Result<Arc<ClusterState>, PolicyError> {
        if let Some(s) = self.tx.borrow().clone() {
            return Ok(s);
        }
        Err(self.last_error().unwrap_or_else(|| PolicyError::Io {
            path: self.dir.clone(),
            reason: "not read yet".into(),
        }))
    }

    fn subscribe(&self) -> watch::Receiver<Option<Arc<ClusterState>>> {
        self.tx.subscribe()
    }

    fn last_error(&self) -> Option<PolicyError> {
        self.lock().error.clone()
    }
}

/// Builds one state from file texts; any bad document fails the whole state.
pub fn parse_files(files: &[(PathBuf, String)]) -> Result<ClusterState, PolicyError> {
    let parsed = files
        .iter()
        .map(|(path, text)| parse_file(path, text))
        .collect::<Result<Vec<_>, _>>()?;
    assemble(parsed.iter().map(|v| v.as_slice()))
}

/// One object of a manifest, validated, with where it came from (`file#document`).
#[derive(Debug, Clone)]
pub struct Object {
    origin: String,
    kind: ObjectKind,
}

#[derive(Debug, Clone)]
enum ObjectKind {
    Namespace(Namespace),
    Pod(Pod),
    Policy(Arc<super::model::Policy>),
}

/// Parses and validates one file's documents. The expensive half of reading the state: a
/// [`ManifestDir`] keeps the result per file and content, so a change to one file does not
/// re-parse the others.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Object>, PolicyError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let err = |reason: String| PolicyError::Manifest {
            file: path.to_path_buf(),
            document: i + 1,
            reason,
        };
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| err(e.to_string()))?;
        let origin = format!("{}#{}", path.display(), i + 1);
        objects(value, &origin, &mut out).map_err(err)?;
    }
    Ok(out)
}

/// Builds one state from parsed files; the same object twice fails the whole state.
pub fn assemble<'a>(
    files: impl IntoIterator<Item = &'a [Object]>,
) -> Result<ClusterState, PolicyError> {
    let mut state = ClusterState::new();
    let mut seen: BTreeMap<(&'static str, String), &str> = BTreeMap::new();
    for o in files.into_iter().flatten() {
        let (kind, name) = match &o.kind {
            ObjectKind::Namespace(ns) => ("Namespace", ns.name.clone()),
            ObjectKind::Pod(p) => ("Pod", p.key().to_string()),
            ObjectKind::Policy(p) => ("NetworkPolicy", p.key().to_string()),
        };
        if let Some(first) = seen.get(&(kind, name.clone())) {
            return Err(PolicyError::Duplicate {
                kind,
                name,
                first: first.to_string(),
                second: o.origin.clone(),
            });
        }
        seen.insert((kind, name), &o.origin);
        match &o.kind {
            ObjectKind::Namespace(ns) => state.upsert_namespace(ns.clone()),
            ObjectKind::Pod(p) => state.upsert_pod(p.clone()),
            ObjectKind::Policy(p) => state.insert_policy(p.clone()),
        }
    }
    Ok(state)
}

fn objects(value: serde_yaml::Value, origin: &str, out: &mut Vec<Object>) -> Result<(), String> {
    if value.is_null() {
        return Ok(()); // an empty document, e.g. a trailing `---`
    }
    let field = |k: &str| {
        value
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let (api, kind) = (field("apiVersion"), field("kind"));
    let describe = |e: &dyn std::fmt::Display| {
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("(unnamed)");
        format!("{kind} {name}: {e}")
    };
    let mut push = |kind| {
        out.push(Object {
            origin: origin.to_string(),
            kind,
        })
    };
    match (api.as_str(), kind.as_str()) {
        ("v1", "Namespace") => {
            let ns: core::Namespace =
                serde_yaml::from_value(value.clone()).map_err(|e| describe(&e))?;
            push(ObjectKind::Namespace(
                Namespace::from_k8s(&ns).map_err(|e| e.to_string())?,
            ));
        }
        ("v1", "Pod") => {
            let pod: core::Pod = serde_yaml::from_value(value.clone()).map_err(|e| describe(&e))?;
            push(ObjectKind::Pod(
                Pod::from_k8s(&pod).map_err(|e| e.to_string())?,
            ));
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            let np: NetworkPolicy =
                serde_yaml::from_value(value.clone()).map_err(|e| describe(&e))?;
            push(ObjectKind::Policy(Arc::new(
                super::model::Policy::from_k8s(&np).map_err(|e| e.to_string())?,
            )));
        }
        // Ignoring a policy we cannot read would silently allow what it denies.
        (_, "NetworkPolicy") => {
            return Err(format!(
                "NetworkPolicy with apiVersion {api:?}: only networking.k8s.io/v1 is supported"
            ));
        }
        ("v1", "List") => {
            let items = value
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default();
            for (j, item) in items.into_iter().enumerate() {
                objects(item, &format!("{origin} item {j}"), out)
                    .map_err(|e| format!("items[{j}]: {e}"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::engine::{Peer, allowed};
    use crate::policy::model::{PodRef, Protocol};

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: x, labels: { ns: x } }
---
apiVersion: v1
kind: Pod
metadata: { name: a, namespace: x, labels: { pod: a } }
spec:
  nodeName: n1
  containers:
  - name: c
    image: busybox
    ports: [{ name: serve-80-tcp, containerPort: 80 }]
status: { podIP: 10.0.0.1 }
---
apiVersion: v1
kind: Pod
metadata: { name: b, namespace: x, labels: { pod: b }, annotations: { vpcnet.io/ip: 10.0.0.2 } }
spec: { containers: [{ name: c, image: busybox }] }
---
apiVersion: v1
kind: ConfigMap
metadata: { name: ignored }
---
"#;

    const POLICY: &str = r#"{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
 "metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": {}}}"#;

    fn ab(state: &ClusterState) -> bool {
        allowed(
            state,
            &Peer::Pod(PodRef::new("x", "b")),
            &Peer::Pod(PodRef::new("x", "a")),
            Protocol::Tcp,
            80,
        )
        .unwrap()
        .is_allowed()
    }

    #[test]
    fn parses_a_multi_document_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("p.json"), POLICY).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not: [yaml").unwrap();
        let src = ManifestDir::new(dir.path());
        let s = src.snapshot().unwrap();
        assert_eq!(s.namespaces().count(), 1);
        assert_eq!(s.pods().count(), 2);
        assert_eq!(s.policies().count(), 1);
        let a = s.pod(&PodRef::new("x", "a")).unwrap();
        assert_eq!(a.ip, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(a.node.as_deref(), Some("n1"));
        assert_eq!(a.ports[0].name.as_deref(), Some("serve-80-tcp"));
        assert_eq!(
            s.pod(&PodRef::new("x", "b")).unwrap().ip,
            Some("10.0.0.2".parse().unwrap())
        );
        assert!(!ab(&s));
        assert_eq!(s.generation(), 1);
        assert_eq!(src.poll(), Ok(false));
    }

    #[test]
    fn bad_document_is_named_and_last_good_state_stays() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("p.json"), POLICY).unwrap();
        let src = ManifestDir::new(dir.path());
        let before = src.snapshot().unwrap();
        assert!(!ab(&before));

        // Delete the deny policy and break another document in the same write: the deletion must
        // not take effect while the directory is broken.
        std::fs::remove_file(dir.path().join("p.json")).unwrap();
        let broken = GOOD.replace("containerPort: 80", "containerPort: 99999");
        std::fs::write(dir.path().join("a.yaml"), &broken).unwrap();
        let err = src.poll().unwrap_err();
        match &err {
            PolicyError::Manifest { file, document, .. } => {
                assert!(file.ends_with("a.yaml"), "{err}");
                assert_eq!(*document, 2, "{err}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("a.yaml: document 2"), "{err}");
        assert!(err.to_string().contains("x/a"), "{err}");
        assert_eq!(src.last_error(), Some(err));
        let after = src.snapshot().unwrap();
        assert_eq!(after.generation(), before.generation());
        assert!(!ab(&after), "the broken directory must not open access");

        // Invalid policy content and YAML syntax errors are reported the same way.
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(
            dir.path().join("p.yaml"),
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchExpressions: [{key: a, operator: Maybe}]}\n",
        )
        .unwrap();
        let e = src.poll().unwrap_err().to_string();
        assert!(
            e.contains("p.yaml: document 1") && e.contains("Maybe"),
            "{e}"
        );
        std::fs::write(dir.path().join("p.yaml"), "a: [b\n").unwrap();
        let e = src.poll().unwrap_err().to_string();
        assert!(e.contains("p.yaml: document 1"), "{e}");
        std::fs::write(
            dir.path().join("p.yaml"),
            POLICY.replace("networking.k8s.io/v1", "extensions/v1beta1"),
        )
        .unwrap();
        assert!(src.poll().is_err());
        // Fixed: the new state (without the deny policy) is published.
        std::fs::remove_file(dir.path().join("p.yaml")).unwrap();
        assert_eq!(src.poll(), Ok(true));
        assert!(ab(&src.snapshot().unwrap()));
        assert_eq!(src.last_error(), None);
    }

    #[test]
    fn duplicates_and_first_failure_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("b.yaml"), GOOD).unwrap();
        let src = ManifestDir::new(dir.path());
        let e = src.snapshot().unwrap_err();
        assert!(matches!(e, PolicyError::Duplicate { .. }), "{e}");
        assert!(e.to_string().contains("defined twice"), "{e}");
        assert!(src.subscribe().borrow().is_none());
        let missing = ManifestDir::new(dir.path().join("nope"));
        assert!(matches!(missing.snapshot(), Err(PolicyError::Io { .. })));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watcher_sees_a_change_within_a_second() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        let src = Arc::new(ManifestDir::new(dir.path()));
        let mut rx = src.subscribe();
        rx.borrow_and_update();
        let task = src.spawn_watcher(Duration::from_millis(50));
        assert!(ab(&src.snapshot().unwrap()));
        let start = std::time::Instant::now();
        let tmp = dir.path().join(".p.tmp");
        std::fs::write(&tmp, POLICY).unwrap();
        std::fs::rename(&tmp, dir.path().join("p.json")).unwrap();
        tokio::time::timeout(Duration::from_secs(1), rx.changed())
            .await
            .expect("no change seen within a second")
            .unwrap();
        let elapsed = start.elapsed();
        let s = rx.borrow().clone().unwrap();
        assert!(!ab(&s));
        assert_eq!(s.generation(), 2);
        assert!(elapsed < Duration::from_millis(500), "{elapsed:?}");
        task.abort();
    }
}
