//! Where addresses come from beyond this node's store. Standalone, the topology file gives every
//! block up front and nothing is needed; on Kubernetes a node claims blocks and fixed addresses
//! through the API server, so ADD can ask for them.

use vpcnet_policy::model::Labels;

/// Defined once, by the Kubernetes supply that produces it; a standalone node never sees one.
pub use vpcnet_k8s::supply::SupplyError;

pub trait AddressSupply: Send + Sync {
    /// `(network, subnet)` a Subnet's namespace selector gives a namespace with `labels`.
    fn subnet_for_namespace(&self, labels: &Labels) -> Option<(String, String)>;
    /// The store has no room in `network`/`subnet`: get a block, returning once the store can
    /// allocate from it. Blocking, bounded.
    fn claim_block_now(&self, network: &str, subnet: &str) -> Result<(), SupplyError>;
    /// Holds `ip` cluster-wide for pod `namespace/name` before the store allocates it.
    /// Blocking, bounded.
    fn claim_address_now(
        &self,
        network: &str,
        subnet: &str,
        ip: std::net::IpAddr,
        namespace: &str,
        name: &str,
    ) -> Result<(), SupplyError>;
    /// The store's use changed (an allocation, a release, a topology applied).
    fn changed(&self);
    /// What keeps the node from serving pods (no network, no block).
    fn problems(&self) -> Vec<String>;
    /// What an operator should know while serving (claims failing).
    fn warnings(&self) -> Vec<String>;
}
