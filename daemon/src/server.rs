//! The Unix socket server: one task per connection, one line per request, each request's blocking
//! work on the blocking pool so a slow request never holds up the others.
//!
//! What a connection may cost is bounded: at most [`MAX_CONNECTIONS`] at once (beyond that a
//! connection is refused at once with "try again", so idle clients cannot take the descriptors an
//! ADD needs), [`IDLE_TIMEOUT`] to send each complete request, and memory that follows the request
//! being read rather than the largest one ever seen: an idle connection holds an 8 KiB read buffer,
//! and requests beyond [`SMALL_LINE`] (only a GC of a busy node is that large) are read
//! [`LARGE_SLOTS`] at a time.

use crate::agent::Agent;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use vpcnet_api::{ApiError, PROTOCOL_VERSION, ResponseBody, code};

/// Longest request line accepted; a GC of tens of thousands of attachments fits comfortably.
pub const MAX_LINE: usize = 16 << 20;
/// Requests up to this size are read without a large-request slot; ADD, DEL, CHECK and STATUS
/// are a few KiB.
pub const SMALL_LINE: usize = 64 << 10;
/// Requests larger than [`SMALL_LINE`] read at the same time; the others wait (their bytes stay in
/// the kernel's socket buffer), so memory is bounded by this, not by the number of connections.
pub const LARGE_SLOTS: usize = 2;
/// Connections served at once. The plugin opens one per call and closes it after the answer.
pub const MAX_CONNECTIONS: usize = 256;
/// A connection that has not sent a complete request this long after connecting (or after its
/// previous answer) is closed. The plugin sends its request as soon as it is connected.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// After shutdown began: how long a connection without a started request gets to start one (a
/// client between connect and write), and how long connections queued before the socket was
/// removed are still accepted.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(200);

/// Binds the socket so that it is never reachable by anyone but the owner: it is created under a
/// temporary name inside an owner-only directory, made 0600, and only then renamed into place
/// (which also replaces a socket left by a killed daemon in one step).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    private_socket_dir(&dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vpcnetd.sock".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// The socket's directory: created 0700; an existing one that this process owns and that holds
/// nothing but sockets (so it is the daemon's own, e.g. the DaemonSet's hostPath `/run/vpcnet`,
/// created 0755 by the kubelet) is taken to 0700. A shared directory (`/run`) is left alone.
fn private_socket_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let md = std::fs::metadata(dir)?;
    if md.mode() & 0o077 == 0 {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    let ours = md.uid() == unsafe { libc::geteuid() };
    let only_sockets = std::fs::read_dir(dir)?
        .flatten()
        .all(|e| e.file_type().is_ok_and(|t| t.is_socket()));
    if ours && only_sockets {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    } else {
        tracing::warn!(dir = %dir.display(), mode = format!("{:o}", md.mode() & 0o777),
            "the socket's directory is shared and open to others; the socket itself is 0600");
    }
    Ok(())
}

/// The running socket server.
pub struct Server {
    stop: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
    slots: Arc<Semaphore>,
}

impl Server {
    /// Serves `listener` (bound at `path`) until [`Server::shutdown`].
    pub fn start(listener: UnixListener, path: PathBuf, agent: Arc<Agent>) -> Server {
        let (stop, stopping) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let shared = Shared {
            agent,
            slots: slots.clone(),
            large: Arc::new(Semaphore::new(LARGE_SLOTS)),
            stopping,
        };
        let accept = tokio::spawn(accept_loop(listener, path, shared));
        Server {
            stop,
            accept,
            slots,
        }
    }

    /// Stops taking connections (the socket file goes, so new plugin calls see the daemon as
    /// restarting rather than getting half an answer), lets every accepted request be answered,
    /// waiting at most `limit`, and returns how many connections were still busy then.
    pub async fn shutdown(self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout_at(deadline, self.accept).await;
        let all = MAX_CONNECTIONS as u32;
        match tokio::time::timeout_at(deadline, self.slots.acquire_many(all)).await {
            Ok(_) => 0,
            Err(_) => MAX_CONNECTIONS - self.slots.available_permits(),
        }
    }
}

#[derive(Clone)]
struct Shared {
    agent: Arc<Agent>,
    slots: Arc<Semaphore>,
    large: Arc<Semaphore>,
    stopping: watch::Receiver<bool>,
}

impl Shared {
    fn stopping(&self) -> bool {
        *self.stopping.borrow()
    }
}

async fn accept_loop(listener: UnixListener, path: PathBuf, shared: Shared) {
    let mut stop = shared.stopping.clone();
    let mut errors = crate::metrics::AcceptErrors::default();
    loop {
        tokio::select! {
            biased;
            // The guard wait_for returns must not live across the select's awaits.
            () = async { drop(stop.wait_for(|s| *s).await) } => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => admit(stream, &shared),
                Err(e) => {
                    // Out of descriptors, most likely: the connection stays queued; retry soon.
                    errors.failed("socket", &e);
                    tokio::time::sleep(crate::metrics::ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::debug!(error = %e, "removing the socket");
    }
    // Clients whose connect() completed before the unlink are queued on the listener: they were
    // let in, so they are served.
    let until = Instant::now() + SHUTDOWN_GRACE;
    while let Ok(Ok((stream, _))) = tokio::time::timeout_at(until, listener.accept()).await {
        admit(stream, &shared);
    }
}

fn admit(stream: UnixStream, shared: &Shared) {
    let Ok(slot) = shared.slots.clone().try_acquire_owned() else {
        // Refused at once, with an answer the plugin passes on as "try again": waiting here
        // would hold a descriptor per waiting client.
        let line = answer(ResponseBody::Error(ApiError::new(
            code::TRY_AGAIN_LATER,
            format!("vpcnetd is serving {MAX_CONNECTIONS} connections already; try again"),
        )));
        let _ = stream.try_write(&line);
        return;
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(e) = connection(stream, &shared).await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
}

fn answer(body: ResponseBody) -> Vec<u8> {
    answer_in(PROTOCOL_VERSION, body)
}

/// The answer in the client's protocol version (a version-1 plugin gets version-1 shapes).
fn answer_in(version: u32, body: ResponseBody) -> Vec<u8> {
    vpcnet_api::encode_response(version, body)
}

enum Incoming {
    /// One request line (without regard to its newline), and the large-request slot it holds.
    Line(Vec<u8>, Option<OwnedSemaphorePermit>),
    TooLong,
    /// End of stream, idle timeout, or shutdown with no request started.
    Done,
}

async fn connection(stream: UnixStream, shared: &Shared) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let (line, slot) = match read_request(&mut reader, shared).await? {
            Incoming::Line(line, slot) => (line, slot),
            Incoming::TooLong => {
                let out = answer(ResponseBody::Error(ApiError::new(
                    code::DECODE,
                    format!("request line longer than {MAX_LINE} bytes"),
                )));
                let _ = tokio::time::timeout(IDLE_TIMEOUT, write.write_all(&out)).await;
                return Ok(());
            }
            Incoming::Done => return Ok(()),
        };
        let large = slot.is_some();
        shared.agent.metrics().requests.inc();
        // Version 1 is still decoded (and answered in its shapes): a plugin binary of the
        // previous release keeps working while a node is upgraded.
        let (version, body) = match vpcnet_api::decode_request(&line) {
            Ok(req) => {
                drop(line);
                let version = req.version;
                let agent = shared.agent.clone();
                let body =
                    tokio::task::spawn_blocking(move || crate::wire::handle(&agent, req.body))
                        .await
                        .unwrap_or_else(|e| {
                            ResponseBody::Error(ApiError::new(
                                code::INTERNAL,
                                format!("request handler failed: {e}"),
                            ))
                        });
                (version, body)
            }
            Err(e) => (
                e.answer_version,
                ResponseBody::Error(ApiError::new(e.error.code(), e.error.to_string())),
            ),
        };
        drop(slot);
        let out = answer_in(version, body);
        // A client that does not read its answer does not keep the connection forever.
        tokio::time::timeout(IDLE_TIMEOUT, write.write_all(&out))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if large || out.len() > SMALL_LINE {
            drop(out);
            // The request's buffers and parse are freed; hand the pages back, or an 11 MB GC
            // leaves tens of MB resident for good.
            tokio::task::spawn_blocking(crate::run::trim_heap);
        }
        if shared.stopping() {
            return Ok(());
        }
    }
}

/// Reads one request line, bounded in size ([`MAX_LINE`]) and time ([`IDLE_TIMEOUT`] from now).
async fn read_request(
    reader: &mut BufReader<OwnedReadHalf>,
    shared: &Shared,
) -> std::io::Result<Incoming> {
    let deadline = Instant::now() + IDLE_TIMEOUT;
    let mut stop = shared.stopping.clone();
    let mut line = Vec::new();
    let mut slot: Option<OwnedSemaphorePermit> = None;
    loop {
        let stopping = *stop.borrow_and_update();
        // At shutdown only a request already started is waited for; one not started gets a
        // moment (the client may be between its connect and its write).
        let until = if stopping && line.is_empty() {
            deadline.min(Instant::now() + SHUTDOWN_GRACE)
        } else {
            deadline
        };
        let available = tokio::select! {
            r = tokio::time::timeout_at(until, reader.fill_buf()) => match r {
                Err(_) => return Ok(Incoming::Done),
                Ok(r) => r?,
            },
            r = stop.changed(), if !stopping => {
                if r.is_err() {
                    // The server is gone without a shutdown: serve what is started, no more.
                    return Ok(Incoming::Done);
                }
                continue;
            }
        };
        if available.is_empty() {
            return Ok(if line.is_empty() {
                Incoming::Done
            } else {
                Incoming::Line(line, slot)
            });
        }
        let (n, complete) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if line.len() + n > MAX_LINE {
            return Ok(Incoming::TooLong);
        }
        if slot.is_none() && line.len() + n > SMALL_LINE {
            match tokio::time::timeout_at(deadline, shared.large.clone().acquire_owned()).await {
                Ok(Ok(permit)) => slot = Some(permit),
                _ => return Ok(Incoming::Done),
            }
            continue;
        }
        line.extend_from_slice(&available[..n]);
        reader.consume(n);
        if complete {
            return Ok(Incoming::Line(line, slot));
        }
    }
}
