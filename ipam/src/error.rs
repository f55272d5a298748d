//! Errors of the IPAM, worded for the operator who reads them in `kubectl describe pod`.

//!
//! IPAM knows nothing of the wire: the daemon maps these variants to CNI error codes at its
//! socket edge.

use std::net::IpAddr;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// The topology is empty: a Kubernetes cluster whose VirtualNetwork and Subnet objects do
    /// not exist yet (standalone configs without networks are refused at load).
    #[error(
        "no virtual network is defined yet: create a VirtualNetwork and a Subnet (see manifests/examples/network.yaml)"
    )]
    NoNetworks,
    /// Every address of this node's blocks is allocated, reserved or cooling down.
    #[error("{}", exhausted_msg(self))]
    Exhausted {
        network: String,
        subnet: String,
        node: String,
        /// This node's blocks, comma-separated.
        blocks: String,
        // u32 counts keep the error under clippy's `result_large_err` bound for every caller.
        allocated: u32,
        /// Addresses released less than the cooldown ago; they become free without intervention.
        cooling: u32,
        /// Seconds until the last cooling address is free again (0 when none is cooling).
        cooling_secs_left: u32,
        /// Network, broadcast, gateway and reserved addresses inside the blocks.
        reserved: u32,
    },
    /// The requested address is held by another attachment.
    #[error(
        "{ip} in subnet {subnet:?} of network {network:?} is already held by {holder}: choose \
         another address for {requester}, or delete the pod holding it"
    )]
    AddressTaken {
        ip: IpAddr,
        network: String,
        subnet: String,
        /// Who holds it: pod namespace/name and container id.
        holder: String,
        requester: String,
    },
    /// The attachment already holds an address and the request asks for something else.
    #[error(
        "{key} already holds {ip} in subnet {subnet:?} of network {network:?} but now asks for \
         {requested}: run CNI DEL for the attachment (or delete the pod) before adding it again \
         with another address"
    )]
    KeyHoldsOtherAddress {
        key: String,
        ip: IpAddr,
        network: String,
        subnet: String,
        requested: String,
    },
    /// The requested address is part of the subnet's infrastructure.
    #[error(
        "{ip} is {what} of subnet {subnet:?} of network {network:?} and is never assigned to a \
         pod: choose another address"
    )]
    Reserved {
        ip: IpAddr,
        network: String,
        subnet: String,
        /// e.g. "the gateway", "in reserved range 10.0.0.2-10.0.0.9".
        what: String,
    },
    #[error(
        "{ip} is outside {where_}: request an address inside {cidrs}, or name the subnet that \
         contains it"
    )]
    OutsideSubnet {
        ip: IpAddr,
        /// e.g. `subnet "a" of network "vpc"` or `every subnet of network "vpc"`.
        where_: String,
        cidrs: String,
    },
    #[error(
        "network {name:?} is not configured (configured: {known}): fix the network name in the \
         CNI configuration or add the network to vpcnet's configuration"
    )]
    UnknownNetwork { name: String, known: String },
    #[error(
        "network {network:?} has no subnet {name:?} (subnets: {known}): fix the subnet name or \
         add the subnet to the network"
    )]
    UnknownSubnet {
        network: String,
        name: String,
        known: String,
    },
    #[error(
        "subnet {subnet:?} of network {network:?} has no blocks for node {node:?} (nodes with \
         blocks: {nodes_with_blocks}): add `blocks: {{{node}: [<cidr>]}}` to the subnet"
    )]
    NoBlocks {
        network: String,
        subnet: String,
        node: String,
        nodes_with_blocks: String,
    },
    /// A lifecycle step the endpoint cannot take from where it is (e.g. "ready" after its
    /// release started: an ADD that raced its DEL).
    #[error("{key} is {from} and cannot become {to}{why}")]
    InvalidTransition {
        key: String,
        from: String,
        to: String,
        /// Empty, or "; " and what to do.
        why: String,
    },
    #[error("invalid IPAM configuration: {0}")]
    InvalidConfig(String),
    /// The database could not be read or written; the message names the file.
    #[error("{0}")]
    Store(String),
    /// The file could not be written (disk full, I/O error). Nothing was changed, and the store
    /// recovers by itself once the cause is gone, so callers should retry later.
    #[error("{0}")]
    StoreUnavailable(String),
}

fn exhausted_msg(e: &IpamError) -> String {
    let IpamError::Exhausted {
        network,
        subnet,
        node,
        blocks,
        allocated,
        cooling,
        cooling_secs_left,
        reserved,
    } = e
    else {
        return String::new();
    };
    let mut counts = format!("{allocated} allocated");
    if *cooling > 0 {
        counts += &format!(", {cooling} cooling down for up to {cooling_secs_left} s");
    }
    if *reserved > 0 {
        counts += &format!(", {reserved} reserved");
    }
    let mut msg = format!(
        "subnet {subnet:?} of network {network:?} has no free address in node {node:?}'s blocks \
         {blocks} ({counts}): add a block for node {node:?} to the subnet or remove unused pods"
    );
    if *cooling > 0 {
        msg += &format!(
            "; {cooling} released address(es) become free again within {cooling_secs_left} s"
        );
    }
    msg
}

/// An I/O failure under redb, worded for the operator; `None` for every other storage error.
fn io_failure(e: &redb::StorageError) -> Option<String> {
    match e {
        redb::StorageError::Io(io) => Some(describe_io(io)),
        redb::StorageError::PreviousIo => {
            Some("an earlier write failed and the file is reopened before the next one".to_string())
        }
        _ => None,
    }
}

fn describe_io(io: &std::io::Error) -> String {
    if io.raw_os_error() == Some(libc_enospc()) || io.kind() == std::io::ErrorKind::StorageFull {
        format!(
            "the disk is full ({io}): free space on it; allocations and releases resume by themselves"
        )
    } else {
        format!("I/O error ({io})")
    }
}

const fn libc_enospc() -> i32 {
    // ENOSPC on every Linux architecture.
    28
}

fn storage(e: &redb::StorageError) -> IpamError {
    match io_failure(e) {
        Some(msg) => IpamError::StoreUnavailable(msg),
        None => IpamError::Store(e.to_string()),
    }
}

impl From<redb::StorageError> for IpamError {
    fn from(e: redb::StorageError) -> Self {
        storage(&e)
    }
}

macro_rules! store_error_from {
    ($($t:ident),* $(,)?) => {
        $(impl From<redb::$t> for IpamError {
            fn from(e: redb::$t) -> Self {
                match &e {
                    redb::$t::Storage(s) => storage(s),
                    _ => IpamError::Store(e.to_string()),
                }
            }
        })*
    };
}

store_error_from!(DatabaseError, TransactionError, TableError, CommitError);

impl From<redb::SetDurabilityError> for IpamError {
    fn from(e: redb::SetDurabilityError) -> Self {
        IpamError::Store(e.to_string())
    }
}

impl From<redb::Error> for IpamError {
    fn from(e: redb::Error) -> Self {
        match e {
            redb::Error::Io(io) => IpamError::StoreUnavailable(describe_io(&io)),
            redb::Error::PreviousIo => storage(&redb::StorageError::PreviousIo),
            other => IpamError::Store(other.to_string()),
        }
    }
}

impl From<serde_json::Error> for IpamError {
    fn from(e: serde_json::Error) -> Self {
        IpamError::Store(format!("a stored record cannot be encoded or decoded: {e}"))
    }
}
