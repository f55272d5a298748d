//! The socket edge: the agent's and IPAM's types and errors in the wire protocol's terms.
//! Neither knows the protocol's shapes or CNI error codes; this is the one place they meet.

use crate::agent::{Agent, AgentError, SupplyError};
use vpcnet_api::{self as api, ApiError, RequestBody, ResponseBody, code};
use vpcnet_ipam::{self as ipam, IpamError};

/// Serves one decoded request (blocking: see [`Agent`]).
pub fn handle(agent: &Agent, body: RequestBody) -> ResponseBody {
    let mtu = agent.mtu();
    let result = match body {
        RequestBody::Allocate(req) => agent
            .allocate(&req)
            .map(|ep| ResponseBody::Allocated(allocation(&ep, mtu))),
        RequestBody::EndpointReady(req) => agent.endpoint_ready(&req).map(|()| ResponseBody::Ok),
        RequestBody::Release { key: k } => {
            agent.release(&key(&k)).map(|ep| ResponseBody::Released {
                allocation: ep.map(|ep| allocation(&ep, mtu)),
            })
        }
        RequestBody::Check(req) => agent.check(&req).map(|()| ResponseBody::Ok),
        RequestBody::Gc(req) => agent.gc(&req).map(|released| ResponseBody::GcDone {
            released: released.iter().map(|ep| allocation(ep, mtu)).collect(),
        }),
        RequestBody::Status => agent.status().map(ResponseBody::Status),
        RequestBody::List => agent.list().map(|l| ResponseBody::List {
            allocations: l.iter().map(|ep| allocation(ep, mtu)).collect(),
        }),
        RequestBody::Policy { namespace, name } => agent
            .explain_policy(&namespace, &name)
            .map(|text| ResponseBody::Text { text }),
        RequestBody::Counters => agent.counters().map(ResponseBody::Counters),
    };
    result.unwrap_or_else(|e| ResponseBody::Error(agent_error(&e)))
}

/// The CNI error code and message the plugin reports for an agent error.
pub fn agent_error(e: &AgentError) -> ApiError {
    let code = match e {
        AgentError::Ipam(e) => return ipam_error(e),
        // Transient: the runtime retries the ADD once the state is there.
        AgentError::NotSynced(_) | AgentError::Adopting(_) => code::TRY_AGAIN_LATER,
        AgentError::Supply(SupplyError::Taken(_)) => code::ADDRESS_TAKEN,
        AgentError::Supply(SupplyError::Exhausted(_)) => code::EXHAUSTED,
        AgentError::Supply(SupplyError::Unavailable(_)) => code::TRY_AGAIN_LATER,
        AgentError::BadAnnotation { .. }
        | AgentError::NoClusterState
        | AgentError::ClusterState(_)
        | AgentError::NoStateToEnforce(_) => code::INVALID_CONFIG,
        AgentError::TooManyStaticIps(_) | AgentError::Ipv6Only { .. } => code::UNSUPPORTED_FIELD,
        AgentError::UnknownAttachment(_) | AgentError::Explain(_) => code::UNKNOWN_CONTAINER,
        AgentError::AddressMismatch { .. } => code::INTERNAL,
        AgentError::CheckMismatch { .. } | AgentError::CheckUnknown(_) => code::CHECK_FAILED,
        AgentError::Dataplane { .. } => code::DATAPLANE,
        AgentError::GcIncomplete { failed, .. } => {
            let each: Vec<String> = failed.iter().map(|f| agent_error(f).msg).collect();
            return ApiError::new(code::DATAPLANE, e.to_string()).with_details(each.join("; "));
        }
    };
    ApiError::new(code, e.to_string())
}

/// The CNI error code and message the plugin reports for an IPAM error.
pub fn ipam_error(e: &IpamError) -> ApiError {
    let code = match e {
        // Addresses still cooling free themselves: tell the runtime to retry rather than
        // report a hard exhaustion.
        IpamError::Exhausted { cooling, .. } if *cooling > 0 => code::TRY_AGAIN_LATER,
        IpamError::Exhausted { .. } | IpamError::NoBlocks { .. } => code::EXHAUSTED,
        IpamError::AddressTaken { .. }
        | IpamError::KeyHoldsOtherAddress { .. }
        | IpamError::Reserved { .. } => code::ADDRESS_TAKEN,
        IpamError::OutsideSubnet { .. } => code::ADDRESS_OUTSIDE_SUBNET,
        IpamError::UnknownNetwork { .. } | IpamError::UnknownSubnet { .. } => code::UNKNOWN_NETWORK,
        // An ADD racing its own DEL: the DEL finishes, and the runtime's retried ADD then
        // succeeds.
        IpamError::InvalidTransition { .. } | IpamError::NoNetworks => code::TRY_AGAIN_LATER,
        IpamError::InvalidConfig(_) => code::INVALID_CONFIG,
        IpamError::Store(_) => code::IO,
        IpamError::StoreUnavailable(_) => code::TRY_AGAIN_LATER,
    };
    ApiError::new(code, e.to_string())
}

pub fn key(k: &api::AttachmentKey) -> ipam::AttachmentKey {
    ipam::AttachmentKey {
        container_id: k.container_id.clone(),
        ifname: k.ifname.clone(),
    }
}

pub fn api_key(k: &ipam::AttachmentKey) -> api::AttachmentKey {
    api::AttachmentKey {
        container_id: k.container_id.clone(),
        ifname: k.ifname.clone(),
    }
}

pub fn pod(p: &api::PodRef) -> ipam::PodInfo {
    ipam::PodInfo {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        uid: p.uid.clone(),
        infra_container_id: p.infra_container_id.clone(),
    }
}

pub fn pod_ref(p: &ipam::PodInfo) -> api::PodRef {
    api::PodRef {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        uid: p.uid.clone(),
        infra_container_id: p.infra_container_id.clone(),
    }
}

/// An endpoint as the plugin and `vpcnetctl` see it: every address, of either family.
pub fn allocation(ep: &ipam::Endpoint, mtu: u32) -> api::Allocation {
    api::Allocation {
        key: api_key(&ep.key),
        ips: ep
            .addresses
            .iter()
            .map(|a| api::IpConfig {
                address: a.ip,
                prefix_len: a.prefix_len,
                gateway: None,
            })
            .collect(),
        network: ep.network().to_string(),
        subnet: ep.subnet().to_string(),
        mtu: Some(mtu),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipam_errors_keep_their_cni_codes() {
        let exhausted = |cooling| IpamError::Exhausted {
            network: "n".into(),
            subnet: "s".into(),
            node: "x".into(),
            blocks: "10.0.0.0/30".into(),
            allocated: 2,
            cooling,
            cooling_secs_left: 3,
            reserved: 2,
        };
        let cases = [
            (exhausted(1), code::TRY_AGAIN_LATER),
            (exhausted(0), code::EXHAUSTED),
            (
                IpamError::OutsideSubnet {
                    ip: "10.9.0.1".parse().unwrap(),
                    where_: "w".into(),
                    cidrs: "c".into(),
                },
                code::ADDRESS_OUTSIDE_SUBNET,
            ),
            (
                IpamError::UnknownNetwork {
                    name: "a".into(),
                    known: "b".into(),
                },
                code::UNKNOWN_NETWORK,
            ),
            (IpamError::InvalidConfig("x".into()), code::INVALID_CONFIG),
            (IpamError::Store("x".into()), code::IO),
            (
                IpamError::StoreUnavailable("x".into()),
                code::TRY_AGAIN_LATER,
            ),
        ];
        for (e, want) in cases {
            let got = ipam_error(&e);
            assert_eq!(got.code, want, "{e}");
            assert_eq!(got.msg, e.to_string());
        }
    }

    #[test]
    fn supply_errors_keep_their_cni_codes_and_words() {
        let exhausted = "subnet \"s1\" (10.20.0.0/24) of network \"vpc\" is exhausted: 0 of 4 blocks of /26 free cluster-wide; widen the Subnet's spec.cidr";
        for (e, want) in [
            (SupplyError::Taken("held".into()), code::ADDRESS_TAKEN),
            (SupplyError::Exhausted(exhausted.into()), code::EXHAUSTED),
            (
                SupplyError::Unavailable("later".into()),
                code::TRY_AGAIN_LATER,
            ),
        ] {
            let text = e.to_string();
            let got = agent_error(&AgentError::Supply(e));
            assert_eq!(got.code, want, "{text}");
            // The plugin shows the supply's sentence as is: `kubectl describe pod` tells the
            // operator what to do.
            assert_eq!(got.msg, text);
        }
    }

    #[test]
    fn keys_and_pods_convert_both_ways() {
        let k = api::AttachmentKey {
            container_id: "c".into(),
            ifname: "eth0".into(),
        };
        assert_eq!(api_key(&key(&k)), k);
        let p = api::PodRef {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
            infra_container_id: "i".into(),
        };
        assert_eq!(pod_ref(&pod(&p)), p);
    }
}

/// A plugin binary of the previous release (protocol 1) talks to this daemon over its socket
/// while a node is upgraded.
#[cfg(test)]
mod upgrade_tests {
    use crate::agent::{Agent, KernelRoutes};
    use crate::config::DaemonConfig;
    use serde_json::Value;
    use std::io::{BufRead, BufReader, Write};
    use std::sync::Arc;
    use std::time::Duration;
    use vpcnet_ipam::{Ipam, Lifecycle, Wiring};

    fn talk(socket: &std::path::Path, line: &str) -> Value {
        let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_1_plugin_is_served_in_version_1() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let yaml = format!(
            "node: n1\nuplink: eth0\nstate_dir: {d}/state\nsocket: {d}/run/s.sock\n\
             release_queue: {d}/queue\nipam:\n  cooldown_secs: 0\n  networks:\n  - name: vpc\n    \
             id: 3\n    subnets:\n    - name: main\n      cidr: 10.20.0.0/16\n      \
             blocks: {{n1: [10.20.1.0/24]}}\n"
        );
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, yaml).unwrap();
        let config = DaemonConfig::load(&path).unwrap();
        let ipam =
            Arc::new(Ipam::open(&dir.path().join("ipam.redb"), config.ipam.clone(), "n1").unwrap());
        let agent = Arc::new(Agent::new(
            config.clone(),
            ipam.clone(),
            Box::new(KernelRoutes),
            1400,
        ));
        let listener = crate::server::bind(&config.socket).unwrap();
        let server = crate::server::Server::start(listener, config.socket.clone(), agent);
        let socket = config.socket.clone();
        tokio::task::spawn_blocking(move || {
            let key = r#""key":{"container_id":"old","ifname":"eth0"}"#;
            let a = talk(
                &socket,
                &format!(
                    r#"{{"version":1,"op":"allocate",{key},"pod":{{"namespace":"default","name":"p"}},"static_ips":["10.20.1.9"],"host_veth":"vpcold"}}"#
                ),
            );
            assert_eq!(a["version"], 1, "{a}");
            assert_eq!(a["result"], "allocated", "{a}");
            assert_eq!(a["ip"], "10.20.1.9", "{a}");
            assert_eq!(a["prefix_len"], 16, "{a}");
            assert_eq!(a["mtu"], 1400, "{a}");
            assert!(a.get("ips").is_none(), "version-1 shape: {a}");
            let r = talk(
                &socket,
                &format!(
                    r#"{{"version":1,"op":"endpoint_ready",{key},"ip":"10.20.1.9","host_veth":"vpcold","host_ifindex":17,"pod_mac":[2,0,0,0,0,7]}}"#
                ),
            );
            assert_eq!(r["result"], "ok", "{r}");
            assert_eq!(r["version"], 1, "{r}");
            let c = talk(
                &socket,
                &format!(r#"{{"version":1,"op":"check",{key},"ip":"10.20.1.9"}}"#),
            );
            assert_eq!(c["result"], "ok", "{c}");
            let c = talk(
                &socket,
                &format!(r#"{{"version":1,"op":"check",{key},"ip":"10.20.1.8"}}"#),
            );
            assert_eq!(c["result"], "error", "{c}");
            assert_eq!(c["code"], vpcnet_api::code::CHECK_FAILED, "{c}");
            let l = talk(&socket, r#"{"version":1,"op":"list"}"#);
            assert_eq!(l["allocations"][0]["ip"], "10.20.1.9", "{l}");
            // A current client at the same time sees the address list.
            let l2 = talk(&socket, r#"{"version":2,"op":"list"}"#);
            assert_eq!(l2["version"], 2, "{l2}");
            assert_eq!(l2["allocations"][0]["ips"][0]["address"], "10.20.1.9", "{l2}");
            let bad = talk(&socket, r#"{"version":7,"op":"status"}"#);
            assert_eq!(bad["code"], vpcnet_api::code::INCOMPATIBLE_VERSION, "{bad}");
        })
        .await
        .unwrap();
        // The ready request went through the lifecycle, with the wiring it carried.
        let key = vpcnet_ipam::AttachmentKey {
            container_id: "old".into(),
            ifname: "eth0".into(),
        };
        let ep = ipam.get(&key).unwrap().unwrap();
        assert_eq!(ep.state, Lifecycle::Ready { policy_revision: 0 });
        assert_eq!(
            ep.wiring,
            Some(Wiring {
                host_ifindex: 17,
                pod_mac: [2, 0, 0, 0, 0, 7],
            })
        );
        assert_eq!(ep.network_id, 3);
        let socket = config.socket.clone();
        tokio::task::spawn_blocking(move || {
            let rel = talk(
                &socket,
                r#"{"version":1,"op":"release","key":{"container_id":"old","ifname":"eth0"}}"#,
            );
            assert_eq!(rel["result"], "released", "{rel}");
            assert_eq!(rel["allocation"]["ip"], "10.20.1.9", "{rel}");
        })
        .await
        .unwrap();
        assert!(ipam.list().unwrap().is_empty());
        server.shutdown(Duration::from_secs(2)).await;
    }
}
