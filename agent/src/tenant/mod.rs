//! Who a cgroup belongs to: paths to workloads (`resolve`), pods to their Kubernetes metadata
//! (`kubernetes`), and per-cgroup counts summed per tenant (`aggregate`). Cgroup ids become paths
//! in `host::cgroup_index`.

pub mod aggregate;
pub(crate) mod kubernetes;
pub(crate) mod resolve;
