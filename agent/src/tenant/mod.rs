//! Who a cgroup belongs to: cgroup ids to paths (`cgroup_index`), paths to workloads (`resolve`),
//! pods to their Kubernetes metadata (`kubernetes`), and per-cgroup counts summed per tenant
//! (`aggregate`).

pub mod aggregate;
pub mod cgroup_index;
pub(crate) mod kubernetes;
pub(crate) mod resolve;
