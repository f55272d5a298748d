//! vpcnet on Kubernetes: the `vpcnet.io` custom resources, the cluster state and topology
//! folded from watched API objects, and the claims that make blocks and fixed addresses unique
//! cluster-wide.

pub mod claims;
pub mod crd;
pub mod fold;
pub mod node;
pub mod status;
pub mod supply;
pub mod topology;
pub mod watch;

/// A client for the API server: from `kubeconfig` when given, else the pod's service account
/// (in-cluster), else `$KUBECONFIG` / `~/.kube/config`.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| ClientError {
                reason: format!("reading kubeconfig {}: {e}", path.display()),
            })?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| ClientError {
                    reason: format!("kubeconfig {}: {e}", path.display()),
                })?
        }
        None => kube::Config::infer().await.map_err(|e| ClientError {
            reason: format!(
                "no in-cluster service account and no kubeconfig (set kubernetes.kubeconfig): {e}"
            ),
        })?,
    };
    kube::Client::try_from(config).map_err(|e| ClientError {
        reason: format!("building the API client: {e}"),
    })
}

#[derive(Debug, thiserror::Error)]
#[error("cannot reach the Kubernetes API: {reason}")]
pub struct ClientError {
    reason: String,
}
