//! The protocol spoken over vpcnetd's Unix socket.
//!
//! Framing is one JSON object per line in each direction: small, debuggable with `socat`, and cheap to
//! implement synchronously in the CNI plugin (which must not pull in an async runtime). Every request
//! carries the protocol version; the daemon refuses versions it does not speak with a clear error
//! instead of guessing, so a plugin binary and a daemon from different releases fail loudly.
//!
//! Types are defined once here and used by the plugin, the daemon and `vpcnetctl`.

pub mod release_queue;
pub mod v1;

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Bumped on any incompatible change of [`Request`] or [`Response`].
///
/// 2: an attachment carries a list of addresses of either family. The daemon still answers
/// version-1 requests in version 1 (see [`v1`]) for one release, so a plugin binary of the
/// previous release keeps working while a node is upgraded.
pub const PROTOCOL_VERSION: u32 = 2;

/// Default location of the daemon socket (root-only, mode 0600).
pub const DEFAULT_SOCKET: &str = "/run/vpcnet/vpcnetd.sock";

/// Where the plugin queues releases it could not hand to the daemon; the daemon replays them.
pub const DEFAULT_RELEASE_QUEUE: &str = "/var/lib/vpcnet/release-queue";

/// The link-local gateway every pod routes through; the host veth answers for it via a permanent
/// neighbour entry in the pod, so no ARP is needed and the address never collides with a VPC subnet.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// MAC address of every host-side veth. A fixed address lets the plugin install the pod's neighbour
/// entry without reading the link back, and lets the dataplane rewrite MACs without a lookup.
pub const HOST_VETH_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee];

/// Identity of one attachment: what CNI calls (container ID, ifname).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

/// The Kubernetes pod an attachment belongs to, as far as the runtime told us (CNI_ARGS).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// `K8S_POD_INFRA_CONTAINER_ID`, when the runtime sent it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub infra_container_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocateRequest {
    pub key: AttachmentKey,
    pub pod: PodRef,
    /// Virtual network named in the CNI config; `None` means the daemon's default network.
    #[serde(default)]
    pub network: Option<String>,
    /// Addresses the runtime asked for (`ips` capability or `IP=` in CNI_ARGS).
    #[serde(default)]
    pub static_ips: Vec<IpAddr>,
    /// Host-side veth the plugin will create; recorded so reconcile can tell a live attachment.
    pub host_veth: String,
    /// The pod's network namespace path (informational, used in logs and `vpcnetctl`).
    #[serde(default)]
    pub netns: String,
}

/// One address of an attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: IpAddr,
    /// Prefix length of the subnet the address came from (the pod itself gets a host route).
    pub prefix_len: u8,
    /// The pod's next hop for this family, when the daemon names one (the plugin otherwise
    /// uses [`POD_GATEWAY`] for IPv4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub key: AttachmentKey,
    /// Every address of the attachment, of either family; never empty.
    pub ips: Vec<IpConfig>,
    pub network: String,
    pub subnet: String,
    /// MTU the pod interface should get (the daemon knows the uplink).
    #[serde(default)]
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointReadyRequest {
    pub key: AttachmentKey,
    /// The addresses the plugin configured, as the allocation listed them.
    pub ips: Vec<IpAddr>,
    pub host_veth: String,
    pub host_ifindex: u32,
    pub pod_mac: [u8; 6],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRequest {
    pub key: AttachmentKey,
    /// The addresses of the attachment's prevResult.
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRequest {
    /// The attachments the runtime still considers valid; every other one is released.
    pub valid: Vec<AttachmentKey>,
    /// Restrict the collection to one virtual network (the CNI network's `network`), if set.
    #[serde(default)]
    pub network: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RequestBody {
    Allocate(AllocateRequest),
    EndpointReady(EndpointReadyRequest),
    Release {
        key: AttachmentKey,
    },
    Check(CheckRequest),
    Gc(GcRequest),
    Status,
    /// All allocations (for `vpcnetctl`).
    List,
    /// Dataplane counters (for `vpcnetctl`).
    Counters,
    /// Which NetworkPolicies select a pod and what they allow, in words (for `vpcnetctl`).
    Policy {
        namespace: String,
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    #[serde(flatten)]
    pub body: RequestBody,
}

impl Request {
    pub fn new(body: RequestBody) -> Self {
        Request {
            version: PROTOCOL_VERSION,
            body,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub ready: bool,
    pub node: String,
    pub allocations: u64,
    /// Free addresses per `network/subnet` on this node (excluding cooldown).
    pub free: Vec<(String, u64)>,
    pub dataplane: String,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointCounters {
    pub ip: IpAddr,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersInfo {
    pub endpoints: Vec<EndpointCounters>,
    /// Drops by reason name.
    pub drops: Vec<(String, u64)>,
    /// Node-wide events by name (where traffic went, conntrack activity).
    #[serde(default)]
    pub node: Vec<(String, u64)>,
    /// Connection-tracking entries of policy-selected pods: live, and expired but not yet
    /// evicted. `None` without the eBPF dataplane.
    #[serde(default)]
    pub conntrack: Option<(u64, u64)>,
}

/// A failure the plugin can turn into CNI error JSON as-is: the daemon picks the CNI code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg}")]
pub struct ApiError {
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl ApiError {
    /// Messages can quote what a client sent; they are bounded here, at the one place every
    /// daemon error is made, so no input can make an answer (or a log line) large.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        ApiError {
            code,
            msg: bounded(msg.into(), MAX_MESSAGE),
            details: String::new(),
        }
    }
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = bounded(details.into(), MAX_MESSAGE);
        self
    }
}

/// Longest error message or details text sent over the socket or printed by the plugin.
pub const MAX_MESSAGE: usize = 2048;

/// Cuts `text` to at most `max` bytes (on a character boundary), saying how much was left out.
pub fn bounded(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let total = text.len();
    let mut cut = max.saturating_sub(48);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push_str(&format!("… ({} more bytes)", total - cut));
    text
}

/// Quotes a client-supplied value for a message, cut to a length a person can read.
pub fn quote(value: &str) -> String {
    bounded(format!("{value:?}"), 160)
}

/// CNI error codes used across the project (spec 1.1 §Error).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const UNAVAILABLE: u32 = 50;
    pub const UNAVAILABLE_DEGRADED: u32 = 51;
    /// Plugin-specific (100+).
    pub const EXHAUSTED: u32 = 100;
    pub const ADDRESS_TAKEN: u32 = 101;
    pub const ADDRESS_OUTSIDE_SUBNET: u32 = 102;
    pub const UNKNOWN_NETWORK: u32 = 103;
    pub const CHECK_FAILED: u32 = 104;
    pub const DATAPLANE: u32 = 105;
    /// ADD for an attachment that is already wired and live: the spec's "interface already
    /// exists"; the live attachment is left untouched.
    pub const ATTACHMENT_EXISTS: u32 = 106;
    pub const INTERNAL: u32 = 199;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ResponseBody {
    Allocated(Allocation),
    Released { allocation: Option<Allocation> },
    Ok,
    GcDone { released: Vec<Allocation> },
    Status(StatusInfo),
    List { allocations: Vec<Allocation> },
    Counters(CountersInfo),
    Text { text: String },
    Error(ApiError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub version: u32,
    #[serde(flatten)]
    pub body: ResponseBody,
}

impl Response {
    pub fn new(body: ResponseBody) -> Self {
        Response {
            version: PROTOCOL_VERSION,
            body,
        }
    }
}

/// A request as the daemon received it: the version the client speaks and the body in this
/// version's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub version: u32,
    pub body: RequestBody,
}

/// Why a request line could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("cannot decode request: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "client speaks vpcnet protocol {0}, vpcnetd speaks {PROTOCOL_VERSION} (and 1): run a \
         plugin binary from the same release as the daemon"
    )]
    Version(u32),
}

/// A request line that could not be taken, with the version its answer is owed in: the one the
/// client declared when the daemon serves it (a version-1 plugin gets a version-1 error),
/// otherwise this release's.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Undecodable {
    pub answer_version: u32,
    pub error: DecodeError,
}

impl DecodeError {
    pub fn code(&self) -> u32 {
        match self {
            DecodeError::Json(_) => code::DECODE,
            DecodeError::Version(_) => code::INCOMPATIBLE_VERSION,
        }
    }
}

/// Decodes one request line of this version or of version 1 (translated).
pub fn decode_request(line: &[u8]) -> Result<Incoming, Undecodable> {
    #[derive(Deserialize)]
    struct Probe {
        version: u32,
    }
    let failed = |answer_version: u32| {
        move |e: serde_json::Error| Undecodable {
            answer_version,
            error: DecodeError::Json(e),
        }
    };
    let probe: Probe = serde_json::from_slice(line).map_err(failed(PROTOCOL_VERSION))?;
    match probe.version {
        PROTOCOL_VERSION => {
            let req: Request = serde_json::from_slice(line).map_err(failed(PROTOCOL_VERSION))?;
            Ok(Incoming {
                version: req.version,
                body: req.body,
            })
        }
        v1::VERSION => {
            let req: v1::Request = serde_json::from_slice(line).map_err(failed(v1::VERSION))?;
            Ok(Incoming {
                version: v1::VERSION,
                body: req.body.into(),
            })
        }
        other => Err(Undecodable {
            answer_version: PROTOCOL_VERSION,
            error: DecodeError::Version(other),
        }),
    }
}

/// The answer line (with its newline) for a client of `version`: version 1 gets its own
/// shapes, with what it cannot carry (IPv6 addresses) left out or refused.
pub fn encode_response(version: u32, body: ResponseBody) -> Vec<u8> {
    let encoded = if version == v1::VERSION {
        serde_json::to_vec(&v1::Response::from_current(body))
    } else {
        serde_json::to_vec(&Response::new(body))
    };
    let mut out = encoded.unwrap_or_else(|e| {
        format!(
            r#"{{"version":{version},"result":"error","code":199,"msg":"encoding answer: {e}"}}"#
        )
        .into_bytes()
    });
    out.push(b'\n');
    out
}

/// Why a synchronous call to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon is not there (no socket, connection refused, timed out connecting).
    #[error("cannot reach vpcnetd at {path}: {source}")]
    Unreachable {
        path: String,
        source: std::io::Error,
    },
    /// The connection broke mid-call or the answer could not be read.
    #[error("vpcnetd at {path} did not answer: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("vpcnetd sent an answer that cannot be decoded: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("vpcnetd speaks protocol version {got}, this client speaks {PROTOCOL_VERSION}")]
    Version { got: u32 },
}

impl ClientError {
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }
}

/// One synchronous request/response over a fresh connection. A connection per call keeps the plugin
/// trivially correct (no shared state between concurrent plugin processes) and costs ~30 µs locally.
pub fn call(
    socket: &Path,
    body: RequestBody,
    timeout: Duration,
) -> Result<ResponseBody, ClientError> {
    send(socket, body, timeout)?.receive()
}

/// A request that has been sent and whose answer has not been read yet.
pub struct Pending {
    stream: UnixStream,
    path: String,
}

/// Sends a request without waiting for the answer, so the caller can do independent work (the plugin
/// creates the veth pair while the daemon commits the allocation to disk).
pub fn send(socket: &Path, body: RequestBody, timeout: Duration) -> Result<Pending, ClientError> {
    let path = socket.display().to_string();
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Unreachable {
        path: path.clone(),
        source,
    })?;
    let io = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(&Request::new(body))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    Ok(Pending { stream, path })
}

impl Pending {
    pub fn receive(self) -> Result<ResponseBody, ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut reader = BufReader::new(&self.stream);
        let mut answer = String::new();
        let n = reader.read_line(&mut answer).map_err(io)?;
        if n == 0 {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before an answer",
            )));
        }
        let resp: Response = serde_json::from_str(&answer)?;
        if resp.version != PROTOCOL_VERSION {
            return Err(ClientError::Version { got: resp.version });
        }
        Ok(resp.body)
    }
}

/// The host-side veth of an attachment: "vpc" + 11 hex digits of FNV-1a over (container ID,
/// ifname). Deterministic, so DEL, GC and a retried ADD find the link without any stored state,
/// 14 bytes fit IFNAMSIZ, and the daemon can tell which attachment a live veth belongs to when
/// its store has lost the record (the plugin names the veth, the daemon matches it).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([0u8]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("vpc{:011x}", h >> 20)
}

/// Whether `name` has the shape of [`host_veth_name`]'s names.
pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == 14
        && name.starts_with("vpc")
        && name[3..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_is_tagged_and_versioned() {
        let req = Request::new(RequestBody::Release {
            key: AttachmentKey {
                container_id: "abc".into(),
                ifname: "eth0".into(),
            },
        });
        let text = serde_json::to_string(&req).unwrap();
        assert!(text.contains("\"op\":\"release\""), "{text}");
        assert!(text.contains("\"version\":2"), "{text}");
        let back: Request = serde_json::from_str(&text).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn messages_are_bounded() {
        let e = ApiError::new(code::INVALID_CONFIG, "x".repeat(10 << 20))
            .with_details("é".repeat(5000));
        assert!(e.msg.len() <= MAX_MESSAGE, "{}", e.msg.len());
        assert!(e.details.len() <= MAX_MESSAGE);
        assert!(
            e.msg.ends_with("more bytes)"),
            "{}",
            &e.msg[e.msg.len() - 40..]
        );
        assert_eq!(ApiError::new(1, "short").msg, "short");
        assert!(quote(&"n".repeat(10_000)).len() < 200);
    }

    #[test]
    fn error_response_roundtrip() {
        let resp = Response::new(ResponseBody::Error(ApiError::new(code::EXHAUSTED, "full")));
        let text = serde_json::to_string(&resp).unwrap();
        let back: Response = serde_json::from_str(&text).unwrap();
        assert_eq!(back, resp);
    }

    fn key() -> AttachmentKey {
        AttachmentKey {
            container_id: "abc".into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn version_1_requests_are_translated() {
        let line = br#"{"version":1,"op":"allocate","key":{"container_id":"abc","ifname":"eth0"},"pod":{"name":"p"},"static_ips":["10.0.0.7"],"host_veth":"vpc1"}"#;
        let got = decode_request(line).unwrap();
        assert_eq!(got.version, 1);
        let RequestBody::Allocate(a) = got.body else {
            panic!("{got:?}")
        };
        assert_eq!(a.static_ips, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
        let line = br#"{"version":1,"op":"endpoint_ready","key":{"container_id":"abc","ifname":"eth0"},"ip":"10.0.0.7","host_veth":"vpc1","host_ifindex":4,"pod_mac":[2,0,0,0,0,1]}"#;
        let RequestBody::EndpointReady(r) = decode_request(line).unwrap().body else {
            panic!()
        };
        assert_eq!(r.ips, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(r.host_ifindex, 4);
        let line = br#"{"version":1,"op":"check","key":{"container_id":"abc","ifname":"eth0"},"ip":"10.0.0.7"}"#;
        let RequestBody::Check(c) = decode_request(line).unwrap().body else {
            panic!()
        };
        assert_eq!(c.ips.len(), 1);
        let e = decode_request(br#"{"version":3,"op":"status"}"#).unwrap_err();
        assert_eq!(e.error.code(), code::INCOMPATIBLE_VERSION);
        assert_eq!(e.answer_version, PROTOCOL_VERSION);
        assert!(e.to_string().contains("protocol 3"), "{e}");
        let e = decode_request(b"{").unwrap_err();
        assert_eq!(e.error.code(), code::DECODE);
        assert_eq!(e.answer_version, PROTOCOL_VERSION);
        // A version-1 client's bad request is answered in version 1: it can read that.
        let e = decode_request(br#"{"op":"","version":1}"#).unwrap_err();
        assert_eq!((e.error.code(), e.answer_version), (code::DECODE, 1));
    }

    #[test]
    fn version_1_clients_get_version_1_answers() {
        let alloc = |ips: &[&str]| Allocation {
            key: key(),
            ips: ips
                .iter()
                .map(|a| IpConfig {
                    address: a.parse().unwrap(),
                    prefix_len: if a.contains(':') { 64 } else { 24 },
                    gateway: None,
                })
                .collect(),
            network: "vpc".into(),
            subnet: "pods".into(),
            mtu: Some(1500),
        };
        let out = encode_response(1, ResponseBody::Allocated(alloc(&["fd00::5", "10.0.0.7"])));
        let back: v1::Response = serde_json::from_slice(&out).unwrap();
        assert_eq!(back.version, 1);
        let v1::ResponseBodyV1::Allocated(a) = back.body else {
            panic!("{back:?}")
        };
        assert_eq!(a.ip, Ipv4Addr::new(10, 0, 0, 7));
        assert_eq!(a.prefix_len, 24);
        let out = encode_response(1, ResponseBody::Allocated(alloc(&["fd00::5"])));
        let back: v1::Response = serde_json::from_slice(&out).unwrap();
        let v1::ResponseBodyV1::Error(e) = back.body else {
            panic!("{back:?}")
        };
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e.msg.contains("fd00::5"), "{}", e.msg);
        let out = encode_response(
            1,
            ResponseBody::List {
                allocations: vec![alloc(&["fd00::5"]), alloc(&["10.0.0.8"])],
            },
        );
        let back: v1::Response = serde_json::from_slice(&out).unwrap();
        let v1::ResponseBodyV1::List { allocations } = back.body else {
            panic!()
        };
        assert_eq!(allocations.len(), 1);
        // The current version round-trips as itself.
        let body = ResponseBody::Allocated(alloc(&["10.0.0.7", "fd00::5"]));
        let out = encode_response(PROTOCOL_VERSION, body.clone());
        let back: Response = serde_json::from_slice(&out).unwrap();
        assert_eq!(back.version, 2);
        assert_eq!(back.body, body);
    }
}
