//! Protocol version 1, as the previous release's plugin speaks it: one IPv4 address per
//! attachment. The daemon decodes these requests into the current ones and answers in these
//! shapes, so a plugin binary left from the previous release keeps working during an upgrade.
//! To be removed one release after version 2.

use crate::{
    AllocateRequest, Allocation, ApiError, AttachmentKey, CheckRequest, CountersInfo,
    EndpointReadyRequest, GcRequest, PodRef, RequestBody, ResponseBody, StatusInfo, code,
};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr};

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocateRequestV1 {
    pub key: AttachmentKey,
    pub pod: PodRef,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub static_ips: Vec<Ipv4Addr>,
    pub host_veth: String,
    #[serde(default)]
    pub netns: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationV1 {
    pub key: AttachmentKey,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub network: String,
    pub subnet: String,
    #[serde(default)]
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointReadyRequestV1 {
    pub key: AttachmentKey,
    pub ip: Ipv4Addr,
    pub host_veth: String,
    pub host_ifindex: u32,
    pub pod_mac: [u8; 6],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRequestV1 {
    pub key: AttachmentKey,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RequestBodyV1 {
    Allocate(AllocateRequestV1),
    EndpointReady(EndpointReadyRequestV1),
    Release { key: AttachmentKey },
    Check(CheckRequestV1),
    Gc(GcRequest),
    Status,
    List,
    Counters,
    Policy { namespace: String, name: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    #[serde(flatten)]
    pub body: RequestBodyV1,
}

impl From<RequestBodyV1> for RequestBody {
    fn from(b: RequestBodyV1) -> RequestBody {
        match b {
            RequestBodyV1::Allocate(r) => RequestBody::Allocate(AllocateRequest {
                key: r.key,
                pod: r.pod,
                network: r.network,
                static_ips: r.static_ips.into_iter().map(IpAddr::V4).collect(),
                host_veth: r.host_veth,
                netns: r.netns,
            }),
            RequestBodyV1::EndpointReady(r) => RequestBody::EndpointReady(EndpointReadyRequest {
                key: r.key,
                ips: vec![r.ip.into()],
                host_veth: r.host_veth,
                host_ifindex: r.host_ifindex,
                pod_mac: r.pod_mac,
            }),
            RequestBodyV1::Release { key } => RequestBody::Release { key },
            RequestBodyV1::Check(r) => RequestBody::Check(CheckRequest {
                key: r.key,
                ips: vec![r.ip.into()],
            }),
            RequestBodyV1::Gc(r) => RequestBody::Gc(r),
            RequestBodyV1::Status => RequestBody::Status,
            RequestBodyV1::List => RequestBody::List,
            RequestBodyV1::Counters => RequestBody::Counters,
            RequestBodyV1::Policy { namespace, name } => RequestBody::Policy { namespace, name },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointCountersV1 {
    pub ip: Ipv4Addr,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersInfoV1 {
    pub endpoints: Vec<EndpointCountersV1>,
    pub drops: Vec<(String, u64)>,
    #[serde(default)]
    pub node: Vec<(String, u64)>,
    #[serde(default)]
    pub conntrack: Option<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ResponseBodyV1 {
    Allocated(AllocationV1),
    Released { allocation: Option<AllocationV1> },
    Ok,
    GcDone { released: Vec<AllocationV1> },
    Status(StatusInfo),
    List { allocations: Vec<AllocationV1> },
    Counters(CountersInfoV1),
    Text { text: String },
    Error(ApiError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub version: u32,
    #[serde(flatten)]
    pub body: ResponseBodyV1,
}

/// The allocation's first IPv4 address in version-1 terms; `None` when it has none.
fn allocation_v1(a: &Allocation) -> Option<AllocationV1> {
    a.ips.iter().find_map(|ip| match ip.address {
        IpAddr::V4(v4) => Some(AllocationV1 {
            key: a.key.clone(),
            ip: v4,
            prefix_len: ip.prefix_len,
            network: a.network.clone(),
            subnet: a.subnet.clone(),
            mtu: a.mtu,
        }),
        IpAddr::V6(_) => None,
    })
}

fn counters_v1(c: CountersInfo) -> CountersInfoV1 {
    CountersInfoV1 {
        endpoints: c
            .endpoints
            .into_iter()
            .filter_map(|e| match e.ip {
                IpAddr::V4(ip) => Some(EndpointCountersV1 {
                    ip,
                    rx_packets: e.rx_packets,
                    rx_bytes: e.rx_bytes,
                    tx_packets: e.tx_packets,
                    tx_bytes: e.tx_bytes,
                }),
                IpAddr::V6(_) => None,
            })
            .collect(),
        drops: c.drops,
        node: c.node,
        conntrack: c.conntrack,
    }
}

impl Response {
    /// A current answer in version-1 shapes. An allocation without an IPv4 address cannot be
    /// told to a version-1 client: the ADD fails with a message saying what to upgrade; in
    /// listings such attachments are left out.
    pub fn from_current(body: ResponseBody) -> Response {
        let body = match body {
            ResponseBody::Allocated(a) => match allocation_v1(&a) {
                Some(v1) => ResponseBodyV1::Allocated(v1),
                None => ResponseBodyV1::Error(ApiError::new(
                    code::INCOMPATIBLE_VERSION,
                    format!(
                        "the attachment got only IPv6 addresses ({}), which vpcnet protocol 1 \
                         cannot carry: install the vpcnet plugin binary of the daemon's release",
                        a.ips
                            .iter()
                            .map(|i| i.address.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
            },
            ResponseBody::Released { allocation } => ResponseBodyV1::Released {
                allocation: allocation.as_ref().and_then(allocation_v1),
            },
            ResponseBody::Ok => ResponseBodyV1::Ok,
            ResponseBody::GcDone { released } => ResponseBodyV1::GcDone {
                released: released.iter().filter_map(allocation_v1).collect(),
            },
            ResponseBody::Status(s) => ResponseBodyV1::Status(s),
            ResponseBody::List { allocations } => ResponseBodyV1::List {
                allocations: allocations.iter().filter_map(allocation_v1).collect(),
            },
            ResponseBody::Counters(c) => ResponseBodyV1::Counters(counters_v1(c)),
            ResponseBody::Text { text } => ResponseBodyV1::Text { text },
            ResponseBody::Error(e) => ResponseBodyV1::Error(e),
        };
        Response {
            version: VERSION,
            body,
        }
    }
}
