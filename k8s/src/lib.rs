//! vpcnet on Kubernetes: the `vpcnet.io` custom resources, the cluster state and topology
//! folded from watched API objects, and the claims that make blocks and fixed addresses unique
//! cluster-wide.

pub mod claims;
pub mod crd;
pub mod fold;
pub mod node;
pub mod topology;
pub mod watch;
