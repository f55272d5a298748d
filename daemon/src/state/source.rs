//! Where cluster state comes from. Standalone mode reads a directory of manifests; the
//! Kubernetes mode (kube-rs watchers) will implement the same [`StateSource`], so everything
//! downstream sees one model whichever feeds it.

use std::collections::BTreeMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use vpcnet_policy::PolicyError;
use vpcnet_policy::manifest::{Object, assemble, parse_file, reassemble_changes};
use vpcnet_policy::model::{ClusterState, Namespace, ObjRef, Pod};

/// Why a source has no state to give, or rejected its newest input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// No complete state has been read yet (the watch has not listed everything, or every read
    /// so far was rejected: `cause` says why). Transient by nature: callers ask again later.
    #[error("cluster state not synced yet from {origin}{}", cause.as_ref().map(|c| format!(" (last attempt: {c})")).unwrap_or_default())]
    NotSynced {
        origin: String,
        cause: Option<Box<StateError>>,
    },
    /// The input could not be read.
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    /// The input was read but is not a valid state (manifest syntax, policy validation,
    /// duplicates).
    #[error(transparent)]
    Invalid(#[from] PolicyError),
    /// The API server's watches are failing (forbidden, a CRD missing, the server away). The
    /// last state published stays in force meanwhile.
    #[error("{origin}: {reason}")]
    Watch { origin: String, reason: String },
    /// The source stopped; no state will come.
    #[error("cluster state source {origin} stopped")]
    Closed { origin: String },
}

/// A feed of whole, consistent cluster states: the manifest directory now, Kubernetes watches
/// (kube-rs reflectors) next. Everything downstream — addressing at ADD, policy — reads states
/// through this trait only.
///
/// Contract: a state is published only when it is complete and valid ("synced": for a watch,
/// every kind listed once). When the source's input is broken the previous state stays
/// published (and [`StateSource::last_error`] says why), because falling back to "no policies"
/// would open everything.
///
/// Kinds: Namespace, Pod and NetworkPolicy are typed in [`ClusterState`]; any other kind a
/// source learns (Node, Service, EndpointSlice, CRDs) travels in the same state through
/// [`vpcnet_policy::model::Kind`] and [`ClusterState::objects`], so adding one changes neither
/// this trait nor its consumers.
pub trait StateSource: Send + Sync {
    /// Where the state comes from, for messages (a directory, a cluster).
    fn origin(&self) -> String;
    /// The state in force, shared (an `Arc` clone, never a copy), or [`StateError::NotSynced`].
    fn snapshot(&self) -> Result<Arc<ClusterState>, StateError>;
    /// Fires on every newly published state. `None` until the first good state; awaiting
    /// `Some` is awaiting "synced" (see [`wait_synced`]).
    fn subscribe(&self) -> watch::Receiver<Option<Arc<ClusterState>>>;
    /// Why the newest input was rejected, if it was.
    fn last_error(&self) -> Option<StateError>;

    /// Whether a complete state has been published. Cheap: called on every ADD.
    fn synced(&self) -> bool {
        self.snapshot().is_ok()
    }

    /// One pod, shared with the state in force: what ADD needs, without cloning the state.
    fn pod(&self, namespace: &str, name: &str) -> Result<Option<Arc<Pod>>, StateError> {
        Ok(self
            .snapshot()?
            .pod_shared(&ObjRef::new(namespace, name))
            .cloned())
    }

    fn namespace(&self, name: &str) -> Result<Option<Arc<Namespace>>, StateError> {
        Ok(self.snapshot()?.namespace_shared(name).cloned())
    }

    /// Whether every pod an ADD is for must be in the state first. The API server's state holds
    /// every pod before kubelet creates its sandbox, so a missing one is a watch that has not
    /// caught up: placing it now would ignore its annotations. A manifest directory names only
    /// the pods it places or isolates.
    fn has_every_pod(&self) -> bool {
        false
    }
}

/// Waits until `source` has published its first complete state, and returns it.
pub async fn wait_synced(source: &dyn StateSource) -> Result<Arc<ClusterState>, StateError> {
    let mut rx = source.subscribe();
    let state = rx
        .wait_for(|s| s.is_some())
        .await
        .map_err(|_| StateError::Closed {
            origin: source.origin(),
        })?;
    Ok(state.clone().expect("waited for Some"))
}

/// Largest manifest file read. The bench's 10,000-rule policy is about 1.1 MB; this leaves room
/// for policies ten times that, and for a few thousand pods per file. Checked from metadata
/// before reading, and again while reading (a file may grow in between).
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// Largest total of all manifest files: 50,000 pods at ~2 KB each, spread over files. Only
/// changed files are read and one file is in memory at a time, so this bounds the work of a
/// change of everything (e.g. a restart), not the memory.
pub const MAX_TOTAL_BYTES: u64 = 256 << 20;
/// How long a file's stamp must have been seen unchanged before a read of it is trusted. A
/// same-size rewrite inside the filesystem's timestamp granularity leaves the stamp as it was;
/// a read at least this long after the stamp first appeared has seen any such rewrite.
const STAMP_SETTLE: Duration = Duration::from_secs(2);
/// With inotify working, the directory is still checked this often: symlinked manifests whose
/// targets live elsewhere change without an event here, and a stamp still settling is re-read.
pub use crate::watch::EVENT_FALLBACK_POLL;

/// What identifies a file's content without reading it. `ctime` is set by the kernel on every
/// write, rename and chmod (unlike `mtime`, it cannot be set back or forward by a tool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(md: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt as _;
        FileStamp {
            dev: md.dev(),
            ino: md.ino(),
            len: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }
}

/// What the last read of one file found.
struct Cached {
    stamp: FileStamp,
    /// When this stamp was first seen (monotonic: wall-clock steps cannot make it settle never).
    first_seen: Instant,
    /// A read started at least [`STAMP_SETTLE`] after `first_seen`: the content cannot differ
    /// from what was read while the stamp stays the same.
    settled: bool,
    /// Of the bytes, so a file that is not UTF-8 is remembered like any other content.
    hash: u64,
    /// Parsed objects, or why the content is rejected (kept so it is not parsed again).
    parsed: Result<Arc<Vec<Object>>, StateError>,
}

#[derive(Default)]
struct Inner {
    error: Option<StateError>,
    /// Per file (path order) what its last read found.
    files: BTreeMap<PathBuf, Cached>,
    /// Combined content hash of the state in force, and of the last content rejected.
    good: Option<u64>,
    rejected: Option<u64>,
    /// Each file's objects in the state in force: what the next change is applied against.
    in_force: BTreeMap<PathBuf, Arc<Vec<Object>>>,
}

/// What a [`ManifestDir`] has done so far: lets tests and benches see idling, and operators
/// see churn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    pub polls: u64,
    /// Files opened and read.
    pub reads: u64,
    /// Files parsed (content not seen before).
    pub parses: u64,
    /// Rejections reported (a changed reason each).
    pub reports: u64,
}

#[derive(Default)]
struct Counters {
    polls: AtomicU64,
    reads: AtomicU64,
    parses: AtomicU64,
    reports: AtomicU64,
}

/// Standalone cluster state: every `*.yaml`, `*.yml` and `*.json` entry directly in a directory,
/// each possibly holding several `---`-separated documents (and `kind: List`). Kinds other than
/// Namespace, Pod and NetworkPolicy are ignored (and never built in memory).
///
/// Entries are followed through symlinks (ConfigMap volumes are symlinks). One that is named like
/// a manifest but cannot be read as one — a dangling symlink, a symlink loop, a directory, a
/// FIFO, a file over [`MAX_FILE_BYTES`], no permission — rejects the directory like a YAML error
/// does: the last good state stays, since treating it as deleted would drop the policies it holds.
/// Only an entry gone from the listing is a deletion.
///
/// Write files atomically (write elsewhere, then rename): a half-written file that happens to
/// parse would be published until the next poll corrects it.
pub struct ManifestDir {
    dir: PathBuf,
    tx: watch::Sender<Option<Arc<ClusterState>>>,
    inner: Mutex<Inner>,
    /// One poll at a time: a poll works on the file cache outside `inner`'s lock.
    polling: Mutex<()>,
    counters: Counters,
}

/// One manifest entry of the directory listing.
struct Entry {
    path: PathBuf,
    stamp: FileStamp,
}

enum ReadError {
    /// Removed between the listing and the read: simply gone.
    Gone,
    Rejected(StateError),
}

fn io_error(path: &Path, reason: impl std::fmt::Display) -> StateError {
    StateError::Io {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn too_large(path: &Path, len: u64) -> StateError {
    io_error(
        path,
        format_args!(
            "{len} bytes ({:.1} MiB) is over the limit of {MAX_FILE_BYTES} bytes ({} MiB) per manifest file",
            len as f64 / (1 << 20) as f64,
            MAX_FILE_BYTES >> 20
        ),
    )
}

fn kind_of(md: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    let t = md.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// Why an entry the listing shows cannot be stat'ed or opened; `None` when it is simply gone.
fn unreadable(path: &Path, e: &std::io::Error) -> Option<StateError> {
    if e.kind() == std::io::ErrorKind::NotFound {
        // Following the name failed; the name itself may still be there (a dangling symlink).
        return match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Ok(md) if md.file_type().is_symlink() => {
                let target = std::fs::read_link(path)
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|_| "?".into());
                Some(io_error(
                    path,
                    format_args!("a symlink to {target}, which does not exist"),
                ))
            }
            Ok(_) => Some(io_error(path, e)),
            Err(e) => Some(io_error(path, e)),
        };
    }
    Some(io_error(path, e))
}

/// Reads a regular file of at most [`MAX_FILE_BYTES`], never blocking: a FIFO put in place of
/// the file between the listing and the open must not hang the watcher.
fn read_bounded(path: &Path) -> Result<(Vec<u8>, FileStamp), ReadError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let reject = |e: &std::io::Error| match unreadable(path, e) {
        Some(e) => ReadError::Rejected(e),
        None => ReadError::Gone,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| reject(&e))?;
    let md = file.metadata().map_err(|e| reject(&e))?;
    if !md.is_file() {
        return Err(ReadError::Rejected(io_error(path, kind_of(&md))));
    }
    if md.len() > MAX_FILE_BYTES {
        return Err(ReadError::Rejected(too_large(path, md.len())));
    }
    let mut bytes = Vec::with_capacity(md.len() as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ReadError::Rejected(io_error(path, e)))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ReadError::Rejected(too_large(path, bytes.len() as u64)));
    }
    Ok((bytes, FileStamp::of(&md)))
}

fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// UTF-8 check, then [`parse_file`].
fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<Vec<Object>, StateError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        io_error(
            path,
            format_args!("not UTF-8 (invalid byte at offset {})", e.valid_up_to()),
        )
    })?;
    Ok(parse_file(path, text)?)
}

/// What a poll built from the files' parsed objects.
enum Built {
    /// From every file (the first state, or a collision to name): compare with the previous one.
    Whole(Result<ClusterState, StateError>),
    /// The state in force, brought to the changed files and published as this generation.
    Published(u64),
    /// The changed files hold the objects they held.
    Same,
}

/// Every file's objects, in path order, when every file parsed.
fn parsed_files(files: &BTreeMap<PathBuf, Cached>) -> BTreeMap<PathBuf, Arc<Vec<Object>>> {
    files
        .iter()
        .filter_map(|(p, c)| Some((p.clone(), c.parsed.as_ref().ok()?.clone())))
        .collect()
}

fn assemble_all(files: &BTreeMap<PathBuf, Cached>) -> Result<ClusterState, StateError> {
    let parsed: Vec<&Arc<Vec<Object>>> = files
        .values()
        .filter_map(|c| c.parsed.as_ref().ok())
        .collect();
    assemble(parsed.iter().map(|o| o.as_slice())).map_err(StateError::from)
}

/// Takes `state` from the `removed` files' objects to the `added` ones, recording the object
/// changes in its log under the next generation. `None` on a collision (`state` untouched),
/// `Some(false)` when the objects are the ones it held.
fn apply_files(
    state: &mut ClusterState,
    removed: &[&[Object]],
    added: &mut [&mut [Object]],
) -> Option<bool> {
    let from = state.generation();
    let changes = reassemble_changes(state, removed, added)?;
    if changes.is_empty() {
        // Objects taken out and put back count generations; the content is the one published.
        state.set_generation(from);
        return Some(false);
    }
    state.set_generation(from + 1);
    state.record_changes(from, changes);
    Some(true)
}

impl ManifestDir {
    /// The published state brought to `files` (every one parsed), from the files `in_force` it
    /// was built from: only the files whose parse is not the one in force are worked on (a
    /// content seen before keeps its parse, so the pointer says whether the file changed). The
    /// state is updated where it is when no reader holds it (the policy sync lets go of it
    /// once synced), so a change costs its objects, not a copy of the state; else a copy is
    /// changed and published. The all-or-nothing rule holds: a collision gives the whole
    /// directory's error, as a read from scratch would, and leaves the published state as it was.
    fn rebuild(
        &self,
        in_force: &BTreeMap<PathBuf, Arc<Vec<Object>>>,
        files: &mut BTreeMap<PathBuf, Cached>,
    ) -> Built {
        let same = |path: &PathBuf, c: &Cached| matches!((in_force.get(path), &c.parsed), (Some(a), Ok(b)) if Arc::ptr_eq(a, b));
        let removed: Vec<&[Object]> = in_force
            .iter()
            .filter(|(path, _)| !files.get(*path).is_some_and(|c| same(path, c)))
            .map(|(_, o)| o.as_slice())
            .collect();
        let mut added: Vec<&mut [Object]> = Vec::new();
        for (path, c) in files.iter_mut() {
            if same(path, c) {
                continue;
            }
            if let Ok(objects) = &mut c.parsed {
                // Unshared unless a poll before this one failed midway: then a copy of the
                // file's list (its objects stay shared).
                added.push(Arc::make_mut(objects).as_mut_slice());
            }
        }
        if removed.is_empty() && added.is_empty() {
            return Built::Same;
        }
        // Under the channel's lock, readers wait for the objects of the change only.
        let mut outcome = None;
        self.tx.send_if_modified(|slot| {
            let Some(state) = slot.as_mut().and_then(Arc::get_mut) else {
                return false;
            };
            outcome = Some(apply_files(state, &removed, &mut added));
            outcome == Some(Some(true))
        });
        let outcome = match outcome {
            Some(o) => o,
            None => {
                let Some(prev) = self.tx.borrow().clone() else {
                    drop((removed, added));
                    return Built::Whole(assemble_all(files));
                };
                let mut next = ClusterState::clone(&prev);
                // The copy is published; the previous state goes with its last reader.
                drop(prev);
                let o = apply_files(&mut next, &removed, &mut added);
                if o == Some(true) {
                    self.tx.send_replace(Some(Arc::new(next)));
                }
                o
            }
        };
        match outcome {
            Some(true) => Built::Published(self.generation()),
            Some(false) => Built::Same,
            None => {
                drop((removed, added));
                Built::Whole(assemble_all(files))
            }
        }
    }

    fn generation(&self) -> u64 {
        self.tx.borrow().as_ref().map_or(0, |s| s.generation())
    }

    /// Reads the directory once. A failed first read leaves the source without a state
    /// ([`StateSource::snapshot`] returns the error) rather than with an empty one.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let (tx, _) = watch::channel(None);
        let me = ManifestDir {
            dir: dir.into(),
            tx,
            inner: Mutex::new(Inner::default()),
            polling: Mutex::new(()),
            counters: Counters::default(),
        };
        let _ = me.poll();
        me
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn activity(&self) -> Activity {
        let c = &self.counters;
        Activity {
            polls: c.polls.load(Ordering::Relaxed),
            reads: c.reads.load(Ordering::Relaxed),
            parses: c.parses.load(Ordering::Relaxed),
            reports: c.reports.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The manifest entries of the directory, in path order, or the first one that cannot be
    /// read as a manifest.
    fn list(&self) -> Result<Vec<Entry>, StateError> {
        let io = |e: std::io::Error| io_error(&self.dir, e);
        let mut out = Vec::new();
        let mut broken: Option<StateError> = None;
        let mut total = 0u64;
        for e in std::fs::read_dir(&self.dir).map_err(io)? {
            let e = e.map_err(io)?;
            let path = e.path();
            if !is_manifest(&path) {
                continue;
            }
            let problem = match std::fs::metadata(&path) {
                Ok(md) if md.is_file() && md.len() > MAX_FILE_BYTES => {
                    Some(too_large(&path, md.len()))
                }
                Ok(md) if md.is_file() => {
                    total += md.len();
                    out.push(Entry {
                        path: path.clone(),
                        stamp: FileStamp::of(&md),
                    });
                    None
                }
                Ok(md) => Some(io_error(&path, kind_of(&md))),
                Err(e) => unreadable(&path, &e),
            };
            // The first in path order, so the same directory always gives the same reason.
            if let Some(p) = problem
                && broken
                    .as_ref()
                    .is_none_or(|b| error_path(&p) < error_path(b))
            {
                broken = Some(p);
            }
        }
        if let Some(b) = broken {
            return Err(b);
        }
        if total > MAX_TOTAL_BYTES {
            return Err(io_error(
                &self.dir,
                format_args!(
                    "the manifests total {total} bytes ({:.1} MiB), over the limit of {MAX_TOTAL_BYTES} bytes ({} MiB) per directory",
                    total as f64 / (1 << 20) as f64,
                    MAX_TOTAL_BYTES >> 20
                ),
            ));
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Checks the directory and publishes a new state if the content changed. Returns whether a
    /// new state was published. Cheap when nothing changed: one listing and a `stat` per file;
    /// a file is read only when its stamp changed or has not settled yet (see [`STAMP_SETTLE`]),
    /// and parsed only when its content is new. A rejected content is remembered too, so it is
    /// reported once, not on every poll.
    pub fn poll(&self) -> Result<bool, StateError> {
        let _one = self.polling.lock().unwrap_or_else(|p| p.into_inner());
        self.counters.polls.fetch_add(1, Ordering::Relaxed);
        let entries = self.list();
        self.poll_entries(entries)
    }

    /// [`ManifestDir::poll`] when only the entries `paths` (of this directory) are known to
    /// have changed: only they are looked at, the others keep the stamps their last look found,
    /// so a change of one file costs that file and not a `stat` of every other. Looks at
    /// everything instead when the state in force is not the newest input's (a rejection to
    /// re-check), or one of `paths` is anything but a readable manifest or a deletion.
    pub fn poll_paths(&self, paths: &[PathBuf]) -> Result<bool, StateError> {
        let _one = self.polling.lock().unwrap_or_else(|p| p.into_inner());
        let entries = {
            let inner = self.lock();
            if inner.error.is_some() || inner.good.is_none() {
                None
            } else {
                self.entries_with(&inner.files, paths)
            }
        };
        self.counters.polls.fetch_add(1, Ordering::Relaxed);
        match entries {
            Some(entries) => self.poll_entries(Ok(entries)),
            None => {
                let entries = self.list();
                self.poll_entries(entries)
            }
        }
    }

    /// The listing [`ManifestDir::list`] would give if only `paths` changed since `files` were
    /// read, or `None` when that cannot be told without a full listing.
    fn entries_with(
        &self,
        files: &BTreeMap<PathBuf, Cached>,
        paths: &[PathBuf],
    ) -> Option<Vec<Entry>> {
        let mut stamps: BTreeMap<PathBuf, FileStamp> =
            files.iter().map(|(p, c)| (p.clone(), c.stamp)).collect();
        for path in paths {
            // Spelled as the listing spells it: the cache is keyed by that.
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                return None;
            };
            if parent != self.dir.as_path() {
                return None;
            }
            let path = &self.dir.join(name);
            if !is_manifest(path) {
                continue;
            }
            match std::fs::metadata(path) {
                Ok(md) if md.is_file() && md.len() <= MAX_FILE_BYTES => {
                    stamps.insert(path.clone(), FileStamp::of(&md));
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && unreadable(path, &e).is_none() =>
                {
                    stamps.remove(path);
                }
                // Broken or odd: the listing names it (and the first such in path order).
                _ => return None,
            }
        }
        if stamps.values().map(|s| s.len).sum::<u64>() > MAX_TOTAL_BYTES {
            return None;
        }
        Some(
            stamps
                .into_iter()
                .map(|(path, stamp)| Entry { path, stamp })
                .collect(),
        )
    }

    fn poll_entries(&self, entries: Result<Vec<Entry>, StateError>) -> Result<bool, StateError> {
        let entries = match entries {
            Ok(e) => e,
            Err(e) => return Err(self.fail(e)),
        };
        let mut cache = std::mem::take(&mut self.lock().files);
        let result = self.refresh(entries, &mut cache);
        let mut inner = self.lock();
        inner.files = cache;
        drop(inner);
        let (combined, first_error) = match result {
            Ok(r) => r,
            Err(e) => return Err(self.fail(e)),
        };
        let (good, rejected) = {
            let inner = self.lock();
            (inner.good, inner.rejected)
        };
        if good == Some(combined) {
            // Back to the content in force (e.g. the bad file was removed): nothing is wrong.
            self.lock().error = None;
            return Ok(false);
        }
        if rejected == Some(combined)
            && let Some(e) = self.last_error()
        {
            return Err(e);
        }
        if let Some(e) = first_error {
            self.lock().rejected = Some(combined);
            return Err(self.fail(e));
        }
        // No reference to the state in force is held here: one would make the change copy it.
        let has_state = self.tx.borrow().is_some();
        let built = {
            let mut inner = self.lock();
            let inner = &mut *inner;
            if has_state {
                self.rebuild(&inner.in_force, &mut inner.files)
            } else {
                Built::Whole(assemble_all(&inner.files))
            }
        };
        let (whole, published) = match built {
            Built::Whole(Ok(state))
                if self
                    .tx
                    .borrow()
                    .as_ref()
                    .is_some_and(|p| p.same_content(&state)) =>
            {
                (None, None)
            }
            Built::Whole(Ok(state)) => (Some(state), None),
            Built::Published(g) => (None, Some(g)),
            Built::Same => (None, None),
            Built::Whole(Err(e)) => {
                self.lock().rejected = Some(combined);
                return Err(self.fail(e));
            }
        };
        let mut inner = self.lock();
        inner.good = Some(combined);
        inner.rejected = None;
        inner.error = None;
        inner.in_force = parsed_files(&inner.files);
        drop(inner);
        let generation = match (published, whole) {
            (_, Some(mut state)) => {
                state.set_generation(self.generation() + 1);
                state.track_changes();
                let g = state.generation();
                // The previous state goes as soon as its last reader lets it go.
                self.tx.send_replace(Some(Arc::new(state)));
                g
            }
            (Some(g), None) => g,
            (None, None) => return Ok(false),
        };
        tracing::info!(
            dir = %self.dir.display(),
            generation,
            "cluster state loaded"
        );
        Ok(true)
    }

    /// Brings `cache` to the listed entries (reading and parsing only what changed); returns the
    /// combined content hash and the first file's rejection, if any.
    fn refresh(
        &self,
        entries: Vec<Entry>,
        cache: &mut BTreeMap<PathBuf, Cached>,
    ) -> Result<(u64, Option<StateError>), StateError> {
        let mut old = std::mem::take(cache);
        let mut failure = None;
        for entry in entries {
            let prev = old.remove(&entry.path);
            let cached = match prev {
                Some(c) if c.stamp == entry.stamp && c.settled => c,
                prev => {
                    let read_at = Instant::now();
                    self.counters.reads.fetch_add(1, Ordering::Relaxed);
                    let (bytes, stamp) = match read_bounded(&entry.path) {
                        Ok(r) => r,
                        Err(ReadError::Gone) => continue,
                        Err(ReadError::Rejected(e)) => {
                            // Keep what is known of it: once readable again with the same
                            // content it need not be parsed again.
                            if let Some(c) = prev {
                                cache.insert(entry.path, c);
                            }
                            failure.get_or_insert(e);
                            continue;
                        }
                    };
                    // After the stat: the last write before it is older than this.
                    let first_seen = match &prev {
                        Some(c) if c.stamp == stamp => c.first_seen,
                        _ => Instant::now(),
                    };
                    let hash = hash_bytes(&bytes);
                    let parsed = match prev {
                        Some(c) if c.hash == hash => c.parsed,
                        _ => {
                            self.counters.parses.fetch_add(1, Ordering::Relaxed);
                            parse_bytes(&entry.path, &bytes).map(Arc::new)
                        }
                    };
                    Cached {
                        stamp,
                        first_seen,
                        settled: read_at.duration_since(first_seen) >= STAMP_SETTLE,
                        hash,
                        parsed,
                    }
                }
            };
            cache.insert(entry.path, cached);
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let mut h = DefaultHasher::new();
        let mut first_error = None;
        for (path, c) in cache.iter() {
            path.hash(&mut h);
            c.hash.hash(&mut h);
            if let (Err(e), None) = (&c.parsed, &first_error) {
                first_error = Some(e.clone());
            }
        }
        Ok((h.finish(), first_error))
    }

    /// Records why the newest input is rejected; logs it only when the reason changed.
    fn fail(&self, e: StateError) -> StateError {
        let mut inner = self.lock();
        if inner.error.as_ref() != Some(&e) {
            self.counters.reports.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "manifests rejected; the previous cluster state stays in force");
            inner.error = Some(e.clone());
        }
        e
    }

    /// Watches the directory until the `ManifestDir` is dropped; a change is read within
    /// milliseconds, and an idle directory costs nothing (see [`crate::watch`]).
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        // A writer's temporary file (`.x.yaml.tmp`, renamed over `x.yaml`) wakes nothing: only
        // the rename does.
        crate::watch::spawn_dir_watcher(
            self,
            &self.dir,
            interval,
            "manifests",
            |p: &Path| is_manifest(p) || crate::watch::is_projection_entry(p),
            |me: &Self, changed: crate::watch::Changed| {
                // A projection swap changes what every symlinked entry points at.
                let _ = match changed {
                    Some(paths) if !paths.iter().any(|p| crate::watch::is_projection_entry(p)) => {
                        me.poll_paths(&paths)
                    }
                    _ => me.poll(),
                };
            },
        )
    }
}

/// The entries read as manifests.
fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|x| x.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn error_path(e: &StateError) -> &Path {
    match e {
        StateError::Io { path, .. } => path,
        StateError::Invalid(PolicyError::Manifest { file, .. }) => file,
        _ => Path::new(""),
    }
}

impl StateSource for ManifestDir {
    fn origin(&self) -> String {
        format!("manifests directory {}", self.dir.display())
    }

    fn snapshot(&self) -> Result<Arc<ClusterState>, StateError> {
        if let Some(s) = self.tx.borrow().clone() {
            return Ok(s);
        }
        Err(StateError::NotSynced {
            origin: self.origin(),
            cause: self.last_error().map(Box::new),
        })
    }

    /// Synced once the first good read of the directory is published.
    fn synced(&self) -> bool {
        self.tx.borrow().is_some()
    }

    fn subscribe(&self) -> watch::Receiver<Option<Arc<ClusterState>>> {
        self.tx.subscribe()
    }

    fn last_error(&self) -> Option<StateError> {
        self.lock().error.clone()
    }
}

/// Builds one state from file texts; any bad document fails the whole state.
#[cfg(test)]
mod tests {
    use super::*;
    use vpcnet_policy::engine::{Peer, allowed};
    use vpcnet_policy::incremental::Change;
    use vpcnet_policy::model::{PodRef, Protocol};

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
            StateError::Invalid(PolicyError::Manifest { file, document, .. }) => {
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

    #[tokio::test]
    async fn wait_synced_returns_the_first_good_state() {
        let dir = tempfile::tempdir().unwrap();
        let later = dir.path().join("later");
        let src = Arc::new(ManifestDir::new(&later));
        assert!(!src.synced());
        let s = src.clone();
        let waiter =
            tokio::spawn(async move { wait_synced(s.as_ref()).await.map(|st| st.generation()) });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "synced without a state");
        std::fs::create_dir(&later).unwrap();
        std::fs::write(later.join("a.yaml"), GOOD).unwrap();
        assert_eq!(src.poll(), Ok(true));
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("wait_synced did not see the state")
            .unwrap();
        assert_eq!(got, Ok(1));
        assert!(src.synced());
    }

    #[test]
    fn duplicates_and_first_failure_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("b.yaml"), GOOD).unwrap();
        let src = ManifestDir::new(dir.path());
        assert!(!src.synced());
        let e = src.last_error().unwrap();
        assert!(
            matches!(e, StateError::Invalid(PolicyError::Duplicate { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("defined twice"), "{e}");
        // Not synced is its own error, naming the reason of the last attempt.
        let e = src.snapshot().unwrap_err();
        assert!(
            matches!(&e, StateError::NotSynced { cause: Some(c), .. }
                if matches!(**c, StateError::Invalid(PolicyError::Duplicate { .. }))),
            "{e}"
        );
        assert!(e.to_string().contains("not synced yet"), "{e}");
        assert!(e.to_string().contains("defined twice"), "{e}");
        assert!(matches!(
            src.pod("x", "a"),
            Err(StateError::NotSynced { .. })
        ));
        assert!(src.subscribe().borrow().is_none());
        let missing = ManifestDir::new(dir.path().join("nope"));
        assert!(matches!(missing.last_error(), Some(StateError::Io { .. })));
        assert!(matches!(
            missing.snapshot(),
            Err(StateError::NotSynced { .. })
        ));

        // Fixed: synced, and the lookups answer from the state.
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        assert_eq!(src.poll(), Ok(true));
        assert!(src.synced());
        let a = src.pod("x", "a").unwrap().unwrap();
        assert!(Arc::ptr_eq(
            &a,
            src.snapshot()
                .unwrap()
                .pod_shared(&PodRef::new("x", "a"))
                .unwrap()
        ));
        assert_eq!(src.pod("x", "nope"), Ok(None));
        assert_eq!(src.namespace("x").unwrap().unwrap().name, "x");
    }

    fn pod_doc(name: &str, label: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{ name: {name}, namespace: x, labels: {{ pod: {label} }} }}\nspec: {{ containers: [{{ name: c, image: i }}] }}\n"
        )
    }

    #[test]
    fn a_change_replaces_only_the_changed_files_objects() {
        let dir = tempfile::tempdir().unwrap();
        let write = |f: &str, text: &str| std::fs::write(dir.path().join(f), text).unwrap();
        write("a.yaml", GOOD);
        write("b.yaml", &(pod_doc("c", "c") + &pod_doc("d", "d")));
        let src = ManifestDir::new(dir.path());
        let before = src.snapshot().unwrap();
        let shared = |s: &ClusterState, name: &str| s.pod_shared(&PodRef::new("x", name)).cloned();

        // One pod's labels change and one pod is added: the other file's objects, and the
        // unchanged pod of the same file, stay the very same allocations.
        write(
            "b.yaml",
            &(pod_doc("c", "c") + &pod_doc("d", "d2") + &pod_doc("e", "e")),
        );
        assert_eq!(src.poll(), Ok(true));
        let after = src.snapshot().unwrap();
        assert_eq!(after.generation(), before.generation() + 1);
        for unchanged in ["a", "b", "c"] {
            assert!(
                Arc::ptr_eq(
                    &shared(&before, unchanged).unwrap(),
                    &shared(&after, unchanged).unwrap()
                ),
                "{unchanged}"
            );
        }
        assert!(Arc::ptr_eq(
            before.namespace_shared("x").unwrap(),
            after.namespace_shared("x").unwrap()
        ));
        assert_eq!(
            after.pod(&PodRef::new("x", "d")).unwrap().labels["pod"],
            "d2"
        );
        assert!(after.pod(&PodRef::new("x", "e")).is_some());
        assert_eq!(after.pods().count(), 5);

        // A pod moving between files in one change is no change.
        write("b.yaml", &(pod_doc("c", "c") + &pod_doc("d", "d2")));
        write("e.yaml", &pod_doc("e", "e"));
        assert_eq!(src.poll(), Ok(false));
        let moved = src.snapshot().unwrap();
        assert!(Arc::ptr_eq(&moved, &after));

        // A change that collides with another file is rejected whole, naming both files; the
        // state in force stays, and a later good change applies against it.
        write("e.yaml", &(pod_doc("e", "e") + &pod_doc("a", "other")));
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        let e = src.poll().unwrap_err();
        match &e {
            StateError::Invalid(PolicyError::Duplicate { first, second, .. }) => {
                assert!(first.contains("a.yaml") && second.contains("e.yaml"), "{e}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(Arc::ptr_eq(&src.snapshot().unwrap(), &after));
        write("e.yaml", &pod_doc("e", "e3"));
        assert_eq!(src.poll(), Ok(true));
        let fixed = src.snapshot().unwrap();
        assert_eq!(src.last_error(), None);
        let names: Vec<_> = fixed.pods().map(|p| p.name.clone()).collect();
        assert_eq!(names, ["a", "b", "e"]);
        assert_eq!(
            fixed.pod(&PodRef::new("x", "e")).unwrap().labels["pod"],
            "e3"
        );
        assert!(Arc::ptr_eq(
            &shared(&before, "a").unwrap(),
            &shared(&fixed, "a").unwrap()
        ));
        assert_eq!(fixed.generation(), after.generation() + 1);
    }

    #[test]
    fn an_unshared_state_changes_in_place_with_its_changes_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let write = |f: &str, text: &str| std::fs::write(dir.path().join(f), text).unwrap();
        write("a.yaml", GOOD);
        write("b.yaml", &pod_doc("c", "c"));
        let src = ManifestDir::new(dir.path());
        let mut rx = src.subscribe();
        rx.mark_unchanged();
        let g0 = src.snapshot().unwrap().generation();
        let at = Arc::as_ptr(&src.snapshot().unwrap());
        let label = |s: &ClusterState| s.pod(&PodRef::new("x", "c")).unwrap().labels["pod"].clone();

        // Nobody holds the state: it is changed where it is, and says what changed.
        write("b.yaml", &pod_doc("c", "c2"));
        assert_eq!(src.poll(), Ok(true));
        assert!(rx.has_changed().unwrap(), "subscribers are told");
        let now = src.snapshot().unwrap();
        assert_eq!(Arc::as_ptr(&now), at, "not copied");
        assert_eq!(now.generation(), g0 + 1);
        assert_eq!(label(&now), "c2");
        let changes = now.changes_since(g0).unwrap();
        assert!(
            matches!(changes.as_slice(), [Change::UpsertPod(p)] if p.name == "c"),
            "{changes:?}"
        );

        // A reader holds it: a copy is changed and published, the reader's stays as it was.
        write("b.yaml", &pod_doc("c", "c3"));
        assert_eq!(src.poll(), Ok(true));
        let next = src.snapshot().unwrap();
        assert!(!Arc::ptr_eq(&now, &next));
        assert_eq!((label(&now), label(&next)), ("c2".into(), "c3".into()));
        assert_eq!(next.changes_since(g0).map(|c| c.len()), Some(2));
        assert_eq!(next.changes_since(g0 + 1).map(|c| c.len()), Some(1));
    }

    #[test]
    fn a_poll_of_named_entries_sees_what_a_full_poll_sees() {
        let dir = tempfile::tempdir().unwrap();
        let path = |f: &str| dir.path().join(f);
        let write = |f: &str, text: &[u8]| std::fs::write(path(f), text).unwrap();
        write("a.yaml", GOOD.as_bytes());
        write(
            "b.yaml",
            (pod_doc("c", "c") + &pod_doc("d", "d")).as_bytes(),
        );
        write("e.yaml", pod_doc("e", "e").as_bytes());
        let src = ManifestDir::new(dir.path());
        let names = |src: &ManifestDir| -> Vec<String> {
            src.snapshot()
                .unwrap()
                .pods()
                .map(|p| p.name.clone())
                .collect()
        };

        // Changed, removed, added, and a writer's temporary file the poll does not read.
        write(
            "b.yaml",
            (pod_doc("c", "c") + &pod_doc("d", "d2")).as_bytes(),
        );
        std::fs::remove_file(path("e.yaml")).unwrap();
        write("f.yaml", pod_doc("f", "f").as_bytes());
        write(".g.yaml.tmp", b"not: [yaml");
        let named = [
            path("b.yaml"),
            path("e.yaml"),
            path("f.yaml"),
            path(".g.yaml.tmp"),
        ];
        assert_eq!(src.poll_paths(&named), Ok(true));
        assert_eq!(names(&src), ["a", "b", "c", "d", "f"]);
        let d = src.snapshot().unwrap();
        assert_eq!(d.pod(&PodRef::new("x", "d")).unwrap().labels["pod"], "d2");
        assert_eq!(src.poll(), Ok(false), "a full poll finds nothing more");

        // A named entry that cannot be read is judged as a full poll judges it.
        write("g.yaml", b"kind: \xff\n");
        assert!(src.poll_paths(&[path("g.yaml")]).is_err());
        assert!(src.last_error().is_some());
        std::fs::remove_file(path("g.yaml")).unwrap();
        assert_eq!(src.poll_paths(&[path("g.yaml")]), Ok(false));
        assert_eq!(src.last_error(), None);
        // A path outside the directory makes it look at everything.
        write("e.yaml", pod_doc("e", "e").as_bytes());
        assert_eq!(
            src.poll_paths(&[PathBuf::from("/elsewhere/e.yaml")]),
            Ok(true)
        );
        assert_eq!(names(&src), ["a", "b", "c", "d", "e", "f"]);
    }

    /// Counts the "manifests rejected" warnings `f` logs on this thread.
    fn rejections_logged(f: impl FnOnce()) -> usize {
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Lines::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
        text.lines()
            .filter(|l| l.contains("manifests rejected"))
            .count()
    }

    /// A directory whose `p.yaml` (a symlink) holds the deny policy, loaded.
    fn isolated_by_a_symlinked_policy() -> (tempfile::TempDir, ManifestDir) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/p.json"), POLICY).unwrap();
        std::os::unix::fs::symlink("data/p.json", dir.path().join("p.yaml")).unwrap();
        let src = ManifestDir::new(dir.path());
        assert!(!ab(&src.snapshot().unwrap()));
        (dir, src)
    }

    fn assert_still_isolated(src: &ManifestDir, generation: u64, what: &str) {
        let s = src.snapshot().unwrap();
        assert_eq!(
            s.generation(),
            generation,
            "{what}: a new state was published"
        );
        assert!(!ab(&s), "{what} opened the isolated pod");
        let e = src
            .last_error()
            .unwrap_or_else(|| panic!("{what}: no error reported"));
        assert!(e.to_string().contains("p.yaml"), "{what}: {e}");
    }

    #[test]
    fn dangling_symlink_or_symlink_loop_keeps_the_last_good_state() {
        let (dir, src) = isolated_by_a_symlinked_policy();
        let generation = src.snapshot().unwrap().generation();
        std::fs::remove_file(dir.path().join("data/p.json")).unwrap();
        assert!(src.poll().is_err());
        assert_still_isolated(&src, generation, "a dangling symlink");

        std::fs::remove_file(dir.path().join("p.yaml")).unwrap();
        std::os::unix::fs::symlink("p.yaml", dir.path().join("p.yaml")).unwrap();
        assert!(src.poll().is_err());
        assert_still_isolated(&src, generation, "a symlink loop");

        // Only an entry gone from the directory is a deletion.
        std::fs::remove_file(dir.path().join("p.yaml")).unwrap();
        assert_eq!(src.poll(), Ok(true));
        assert!(ab(&src.snapshot().unwrap()));
        assert_eq!(src.last_error(), None);
    }

    #[test]
    fn fifo_or_directory_in_place_of_a_manifest_keeps_the_last_good_state() {
        let (dir, src) = isolated_by_a_symlinked_policy();
        let generation = src.snapshot().unwrap().generation();
        let p = dir.path().join("p.yaml");
        std::fs::remove_file(&p).unwrap();
        let fifo = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        // Opening a FIFO for reading blocks until a writer comes: the poll must not.
        let (tx, rx) = std::sync::mpsc::channel();
        let src = Arc::new(src);
        let s = src.clone();
        std::thread::spawn(move || tx.send(s.poll().is_err()).unwrap());
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Ok(true),
            "poll blocked on a FIFO"
        );
        assert_still_isolated(&src, generation, "a FIFO");

        // A symlink to a FIFO is opened through the link: the same.
        std::fs::rename(&p, dir.path().join("data/fifo")).unwrap();
        std::os::unix::fs::symlink("data/fifo", &p).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let s = src.clone();
        std::thread::spawn(move || tx.send(s.poll().is_err()).unwrap());
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Ok(true),
            "poll blocked on a FIFO"
        );
        assert_still_isolated(&src, generation, "a symlink to a FIFO");

        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
        assert!(src.poll().is_err());
        assert_still_isolated(&src, generation, "a directory");
    }

    #[test]
    fn invalid_utf8_is_reported_once_and_the_warning_clears_when_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("p.json"), POLICY).unwrap();
        let src = ManifestDir::new(dir.path());
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, b"kind: \xff\xfe\n").unwrap();
        let warnings = rejections_logged(|| {
            for _ in 0..20 {
                assert!(src.poll().is_err());
            }
        });
        assert_eq!(warnings, 1, "one bad file, one warning");
        let e = src.last_error().unwrap().to_string();
        assert!(e.contains("bad.yaml") && e.contains("UTF-8"), "{e}");
        assert!(!ab(&src.snapshot().unwrap()));

        // The directory is back to the content in force: nothing to publish, nothing wrong.
        std::fs::remove_file(&bad).unwrap();
        assert_eq!(src.poll(), Ok(false));
        assert_eq!(src.last_error(), None, "the warning outlived the bad file");
    }

    #[test]
    fn oversized_file_is_rejected_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("p.json"), POLICY).unwrap();
        let src = ManifestDir::new(dir.path());
        // 200 MB of nothing: sparse, so the test costs no disk.
        let huge = std::fs::File::create(dir.path().join("huge.yaml")).unwrap();
        huge.set_len(200_000_000).unwrap();
        drop(huge);
        let start = std::time::Instant::now();
        let e = src.poll().unwrap_err().to_string();
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        assert!(
            e.contains("huge.yaml") && e.contains("200000000 bytes") && e.contains("limit"),
            "{e}"
        );
        assert!(!ab(&src.snapshot().unwrap()));
        assert_eq!(src.snapshot().unwrap().generation(), 1);
        std::fs::remove_file(dir.path().join("huge.yaml")).unwrap();
        assert_eq!(src.poll(), Ok(false));
        assert_eq!(src.last_error(), None);
    }

    #[test]
    fn directory_total_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("p.json"), POLICY).unwrap();
        let src = ManifestDir::new(dir.path());
        let n = MAX_TOTAL_BYTES / MAX_FILE_BYTES + 1;
        for i in 0..n {
            let f = std::fs::File::create(dir.path().join(format!("big{i}.yaml"))).unwrap();
            f.set_len(MAX_FILE_BYTES).unwrap();
        }
        let reads = src.activity().reads;
        let e = src.poll().unwrap_err();
        assert!(
            matches!(&e, StateError::Io { path, .. } if path == dir.path()),
            "{e}"
        );
        assert!(e.to_string().contains("per directory"), "{e}");
        assert_eq!(
            src.activity().reads,
            reads,
            "read before the sizes were checked"
        );
        assert!(!ab(&src.snapshot().unwrap()));
    }

    #[test]
    fn ignored_kinds_are_skipped_and_lists_are_read_item_by_item() {
        let mut text = String::new();
        for i in 0..20_000 {
            text += &format!(
                "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{ name: c{i} }}\ndata: {{ k: \"{}\" }}\n",
                "x".repeat(400)
            );
        }
        text += "---\nplain scalar\n---\n- a sequence\n---\n";
        text += r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "in-list"}},
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "l"}},
            {"apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "l"}}]}]}"#;
        assert!(text.len() > 8 << 20);
        let objects = parse_file(Path::new("m.yaml"), &text).unwrap();
        let origins: Vec<&str> = objects.iter().map(|o| o.origin()).collect();
        assert_eq!(
            origins,
            ["m.yaml#20003 item 1", "m.yaml#20003 item 2 item 0"],
            "{origins:?}"
        );
        let e = parse_file(
            Path::new("m.yaml"),
            "kind: List\napiVersion: v1\nitems: [{apiVersion: v1, kind: Pod, metadata: {name: p}, spec: 3}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("m.yaml: document 1") && e.contains("items[0]"),
            "{e}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_watcher_reads_nothing() {
        use notify::Watcher as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("p.json"), POLICY).unwrap();
        // Also a broken input: its error must not make the watcher retry it.
        std::fs::write(dir.path().join("bad.yaml"), b"kind: \xff\n").unwrap();
        let src = Arc::new(ManifestDir::new(dir.path()));
        let task = src.spawn_watcher(Duration::from_millis(50));
        // Settle (the first tick, the first re-read), then count what the watcher opens.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let opens = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let o = opens.clone();
        let mut spy = notify::recommended_watcher(move |r: notify::Result<notify::Event>| {
            if let Ok(e) = r
                && matches!(
                    e.kind,
                    notify::EventKind::Access(notify::event::AccessKind::Open(_))
                )
            {
                o.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
        .unwrap();
        spy.watch(dir.path(), notify::RecursiveMode::NonRecursive)
            .unwrap();
        let before = src.activity();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        drop(spy);
        let after = src.activity();
        assert_eq!(after.reads, before.reads, "{before:?} -> {after:?}");
        assert_eq!(after.parses, before.parses, "{before:?} -> {after:?}");
        assert_eq!(after.reports, 1, "{after:?}");
        let opens = opens.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            opens <= 4,
            "the idle watcher opened the directory or a file {opens} times in 1.5 s"
        );
        task.abort();
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
