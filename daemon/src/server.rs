//! The Unix socket server: one task per connection, one line per request, each request's blocking
//! work on the blocking pool so a slow request never holds up the others.

use crate::service::Service;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use vpcnet_api::{ApiError, PROTOCOL_VERSION, Request, Response, ResponseBody, code};

/// Longest request line accepted; a GC of tens of thousands of attachments fits comfortably.
const MAX_LINE: usize = 16 << 20;

pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a killed daemon would make bind fail; nothing else may live at this path.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    // Root-only: the socket hands out addresses and programs the dataplane.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, service: Arc<Service>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let service = service.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, service).await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(stream: tokio::net::UnixStream, service: Arc<Service>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        service.metrics.requests.inc();
        let body = match serde_json::from_str::<Request>(&line) {
            Ok(req) if req.version != PROTOCOL_VERSION => ResponseBody::Error(ApiError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "client speaks vpcnet protocol {}, vpcnetd speaks {PROTOCOL_VERSION}: run a plugin binary from the same release as the daemon",
                    req.version
                ),
            )),
            Ok(req) => {
                let service = service.clone();
                tokio::task::spawn_blocking(move || service.handle(req.body))
                    .await
                    .unwrap_or_else(|e| {
                        ResponseBody::Error(ApiError::new(
                            code::INTERNAL,
                            format!("request handler failed: {e}"),
                        ))
                    })
            }
            Err(e) => ResponseBody::Error(ApiError::new(
                code::DECODE,
                format!("cannot decode request: {e}"),
            )),
        };
        let mut out = serde_json::to_vec(&Response::new(body)).unwrap_or_else(|e| {
            format!(r#"{{"version":{PROTOCOL_VERSION},"result":"error","code":199,"msg":"encoding answer: {e}"}}"#)
                .into_bytes()
        });
        out.push(b'\n');
        write.write_all(&out).await?;
    }
}
