//! Kubernetes NetworkPolicy: the cluster model, exact semantics, and compilation (being written).
