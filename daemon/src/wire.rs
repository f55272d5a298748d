//! The socket edge: IPAM's types and errors in the wire protocol's terms. IPAM knows nothing of
//! the protocol or of CNI error codes; this is the one place they meet.

use vpcnet_api::{self as api, ApiError, code};
use vpcnet_ipam::{self as ipam, IpamError};

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
        IpamError::InvalidTransition { .. } => code::TRY_AGAIN_LATER,
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
