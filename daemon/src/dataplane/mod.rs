//! The eBPF dataplane (being written).
