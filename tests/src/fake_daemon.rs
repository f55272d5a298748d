//! A vpcnetd stand-in speaking the vpcnet-api protocol on a Unix socket, served from a thread
//! of the test: it allocates addresses, records every request and answers as its [`Behavior`]
//! says, so the plugin's tests can run the real binary without an agent.

use anyhow::{Context as _, Result};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vpcnet_api::{
    Allocation, ApiError, AttachmentKey, IpConfig, Request, RequestBody, Response, ResponseBody,
    StatusInfo,
};

/// How the fake daemon answers.
#[derive(Clone)]
pub struct Behavior {
    pub next_ip: Ipv4Addr,
    pub mtu: Option<u32>,
    pub ready: bool,
    pub endpoint_ready_error: Option<ApiError>,
    pub release_error: Option<ApiError>,
    pub check_error: Option<ApiError>,
    /// An IPv6 address allocated with every IPv4 one (a dual-stack subnet set-up).
    pub also_v6: Option<std::net::Ipv6Addr>,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            next_ip: Ipv4Addr::new(10, 77, 0, 10),
            mtu: Some(1450),
            ready: true,
            endpoint_ready_error: None,
            release_error: None,
            check_error: None,
            also_v6: None,
        }
    }
}

#[derive(Default)]
struct State {
    behavior: Behavior,
    requests: Vec<RequestBody>,
    allocations: HashMap<AttachmentKey, Allocation>,
}

/// A vpcnetd stand-in on a Unix socket, served from a thread of the test.
pub struct FakeDaemon {
    pub socket: PathBuf,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDaemon {
    /// Serves `<dir>/vpcnetd.sock` with the default behaviour.
    pub fn start(dir: &Path) -> Result<FakeDaemon> {
        Self::with(dir, Behavior::default())
    }

    pub fn with(dir: &Path, behavior: Behavior) -> Result<FakeDaemon> {
        let socket = dir.join("vpcnetd.sock");
        let listener =
            UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
        let state = Arc::new(Mutex::new(State {
            behavior,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    serve(conn, &st);
                }
            }
        });
        Ok(FakeDaemon {
            socket,
            state,
            stop,
            thread: Some(thread),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Every request served so far, in order.
    pub fn requests(&self) -> Vec<RequestBody> {
        self.state().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.state().requests.clear();
    }

    /// How many attachments hold an allocation.
    pub fn allocations(&self) -> usize {
        self.state().allocations.len()
    }

    /// Changes how the daemon answers from the next request on.
    pub fn set(&self, f: impl FnOnce(&mut Behavior)) {
        f(&mut self.state().behavior);
    }

    /// Stops serving and removes the socket: from now on the daemon is "not running".
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = UnixStream::connect(&self.socket);
            let _ = t.join();
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(conn: UnixStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(&conn);
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        let body = match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(req.body, state),
            Err(e) => ResponseBody::Error(ApiError::new(6, format!("fake: bad request: {e}"))),
        };
        let Ok(mut out) = serde_json::to_vec(&Response::new(body)) else {
            return;
        };
        out.push(b'\n');
        if (&conn).write_all(&out).is_err() {
            return;
        }
        line.clear();
    }
}

fn answer(body: RequestBody, state: &Mutex<State>) -> ResponseBody {
    let mut st = lock(state);
    st.requests.push(body.clone());
    let b = st.behavior.clone();
    match body {
        RequestBody::Allocate(req) => {
            if let Some(a) = st.allocations.get(&req.key) {
                return ResponseBody::Allocated(a.clone());
            }
            let ip = match req.static_ips.first() {
                Some(std::net::IpAddr::V4(ip)) => *ip,
                // The plugin asks for IPv4 only: a test that sees this error found a bug.
                Some(std::net::IpAddr::V6(ip)) => {
                    return ResponseBody::Error(ApiError::new(
                        199,
                        format!("fake: the plugin asked for IPv6 {ip}"),
                    ));
                }
                None => {
                    let ip = b.next_ip;
                    st.behavior.next_ip = Ipv4Addr::from(u32::from(ip) + 1);
                    ip
                }
            };
            let mut ips = vec![IpConfig {
                address: ip.into(),
                prefix_len: 24,
                gateway: None,
            }];
            if let Some(v6) = b.also_v6 {
                ips.push(IpConfig {
                    address: v6.into(),
                    prefix_len: 64,
                    gateway: None,
                });
            }
            let a = Allocation {
                key: req.key.clone(),
                ips,
                network: req.network.unwrap_or_else(|| "default".into()),
                subnet: "subnet-test".into(),
                mtu: b.mtu,
            };
            st.allocations.insert(req.key, a.clone());
            ResponseBody::Allocated(a)
        }
        RequestBody::EndpointReady(_) => match b.endpoint_ready_error {
            Some(e) => ResponseBody::Error(e),
            None => ResponseBody::Ok,
        },
        RequestBody::Release { key } => match b.release_error {
            Some(e) => ResponseBody::Error(e),
            None => ResponseBody::Released {
                allocation: st.allocations.remove(&key),
            },
        },
        RequestBody::Check(_) => match b.check_error {
            Some(e) => ResponseBody::Error(e),
            None => ResponseBody::Ok,
        },
        RequestBody::Gc(req) => {
            let stale: Vec<AttachmentKey> = st
                .allocations
                .keys()
                .filter(|k| !req.valid.contains(k))
                .cloned()
                .collect();
            let released = stale
                .iter()
                .filter_map(|k| st.allocations.remove(k))
                .collect();
            ResponseBody::GcDone { released }
        }
        RequestBody::Status => ResponseBody::Status(StatusInfo {
            ready: b.ready,
            node: "test-node".into(),
            allocations: st.allocations.len() as u64,
            free: vec![],
            dataplane: "none".into(),
            message: if b.ready {
                String::new()
            } else {
                "ENI not attached yet".into()
            },
        }),
        RequestBody::List => ResponseBody::List {
            allocations: st.allocations.values().cloned().collect(),
        },
        RequestBody::Counters => ResponseBody::Error(ApiError::new(199, "fake: no counters")),
        RequestBody::Policy { .. } => ResponseBody::Error(ApiError::new(199, "fake: no policy")),
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vpcnet_api::{AllocateRequest, PodRef};

    fn allocate(socket: &Path, container_id: &str) -> ResponseBody {
        let req = AllocateRequest {
            key: AttachmentKey {
                container_id: container_id.into(),
                ifname: "eth0".into(),
            },
            pod: PodRef::default(),
            network: None,
            static_ips: vec![],
            host_veth: "vpc0".into(),
            netns: String::new(),
        };
        vpcnet_api::call(socket, RequestBody::Allocate(req), Duration::from_secs(2)).unwrap()
    }

    #[test]
    fn allocates_in_order_answers_again_the_same_and_releases() {
        let dir = std::env::temp_dir().join(crate::netns::run_prefix());
        std::fs::create_dir_all(&dir).unwrap();
        let mut d = FakeDaemon::start(&dir).unwrap();
        let ip = |r: ResponseBody| match r {
            ResponseBody::Allocated(a) => a.ips[0].address,
            other => panic!("{other:?}"),
        };
        let v4 = |d: u8| std::net::IpAddr::from(Ipv4Addr::new(10, 77, 0, d));
        assert_eq!(ip(allocate(&d.socket, "a")), v4(10));
        assert_eq!(ip(allocate(&d.socket, "b")), v4(11));
        assert_eq!(ip(allocate(&d.socket, "a")), v4(10));
        assert_eq!(d.allocations(), 2);
        d.set(|b| b.release_error = Some(ApiError::new(5, "no")));
        let key = AttachmentKey {
            container_id: "a".into(),
            ifname: "eth0".into(),
        };
        let release = |d: &FakeDaemon| {
            vpcnet_api::call(
                &d.socket,
                RequestBody::Release { key: key.clone() },
                Duration::from_secs(2),
            )
            .unwrap()
        };
        assert!(matches!(release(&d), ResponseBody::Error(_)));
        d.set(|b| b.release_error = None);
        assert!(matches!(
            release(&d),
            ResponseBody::Released {
                allocation: Some(_)
            }
        ));
        assert_eq!(d.allocations(), 1);
        assert_eq!(d.requests().len(), 5);
        d.stop();
        assert!(!d.socket.exists(), "a stopped daemon's socket is gone");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
