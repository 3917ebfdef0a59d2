//! The guest workloads every tracer is measured on, and guest time per operation.

use anyhow::Result;

use super::{
    Env,
    cgroups::ROOT,
    vmm::{self, Run},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    /// MMIO writes to an ioeventfd doorbell, completed in the kernel: the hot path of virtio.
    Doorbell,
    /// Port writes that exit to the VMM.
    Pio,
    /// Four tenants at once: doorbell, port, MMIO-exit and CPUID guests in their own cgroups.
    Mixed,
}

impl Workload {
    pub const ALL: [Workload; 3] = [Workload::Doorbell, Workload::Pio, Workload::Mixed];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Doorbell => "doorbell",
            Workload::Pio => "pio",
            Workload::Mixed => "mixed",
        }
    }

    /// The VMM runs, with `scale` times the full benchmark's operation counts.
    pub fn runs(self, scale: f64) -> Vec<Run> {
        let run = |scenario, count: f64, tenant: &str| Run {
            scenario,
            vcpus: 1,
            count: (count * scale).max(1000.0) as u64,
            rate: None,
            cgroup: format!("{ROOT}/{tenant}"),
        };
        match self {
            Workload::Doorbell => vec![run("doorbell", 300_000.0, "doorbell")],
            Workload::Pio => vec![run("pio", 100_000.0, "pio")],
            Workload::Mixed => vec![
                run("doorbell", 150_000.0, "mixed/tenant-a"),
                run("pio", 50_000.0, "mixed/tenant-b"),
                run("mmio", 50_000.0, "mixed/tenant-c"),
                run("cpuid", 150_000.0, "mixed/tenant-d"),
            ],
        }
    }

    /// What the table says the workload is.
    pub fn describe(self, scale: f64) -> String {
        let parts: Vec<String> = self
            .runs(scale)
            .iter()
            .map(|r| format!("{} × {}", r.scenario, r.count))
            .collect();
        match self {
            Workload::Mixed => format!("4 VMMs in 4 cgroups at once: {}", parts.join(", ")),
            _ => format!("1 VMM, 1 vCPU: {}", parts.join(", ")),
        }
    }
}

/// Guest time and operations of one run of a workload, summed over its VMMs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub secs: f64,
    pub ops: u64,
}

impl Measured {
    pub fn us_per_op(self) -> f64 {
        self.secs * 1e6 / self.ops.max(1) as f64
    }
}

pub fn measure(env: &Env, workload: Workload) -> Result<Measured> {
    let reports = vmm::run_together(
        &env.tools.vmm,
        &workload.runs(env.plan.ops_scale),
        &env.tools.logs,
    )?;
    Ok(Measured {
        secs: reports.iter().map(|r| r.duration_secs).sum(),
        ops: reports.iter().map(|r| r.guest_ops).sum(),
    })
}
