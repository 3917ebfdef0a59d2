//! `cargo xtask demo`: the reference VMM runs in three tenant cgroups while the agent shows its live
//! per-tenant view: `vmtrace top` in a terminal (until `q`), `vmtrace watch` for the given time
//! otherwise.

use std::process::{Child, Command};

use anyhow::{Context, Result};

use vmtrace_common::mounts::MountTable;

use crate::setup;

/// (tenant cgroup, scenario, vCPUs, operations per second per vCPU).
const TENANTS: [(&str, &str, u32, u32); 3] = [
    ("vmtrace-demo/tenant-a", "pio", 2, 3000),
    ("vmtrace-demo/tenant-b", "virtio", 1, 2000),
    ("vmtrace-demo/tenant-c", "hlt", 1, 2000),
];

pub fn run(seconds: u64) -> Result<()> {
    setup::run()?;
    eprintln!("demo: building vmtrace and vmtrace-vmm (release)");
    setup::exec(
        crate::workspace::cargo(&crate::workspace::workspace_root()).args([
            "build",
            "--release",
            "-p",
            "vmtrace",
            "-p",
            "vmtrace-vmm",
        ]),
    )?;
    let bin = crate::workspace::target_dir().join("release");
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut agent = Command::new(bin.join("vmtrace"));
    if interactive {
        eprintln!("demo: vmtrace top; q quits, ? shows its keys");
        agent.args(["top", "--interval", "1s"]);
    } else {
        agent
            .args(["watch", "--interval", "2s", "--duration"])
            .arg(format!("{seconds}s"));
    }
    // One host and three small guests: the VMMs' service time is worth its cost per exit here.
    agent.arg("--service-time");
    let mut agent = agent.spawn().context("starting the agent")?;
    // In a terminal the guests run until `top` is quit (an hour at most).
    let seconds = if interactive { 3600 } else { seconds };
    // The agent attaches its probes within a fraction of a second; the guests start after that.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut guests = Guests(Vec::new());
    for (cgroup, scenario, vcpus, rate) in TENANTS {
        let count = u64::from(rate) * (seconds + 5);
        let child = Command::new(bin.join("vmtrace-vmm"))
            .args(["--scenario", scenario, "--cgroup", cgroup, "--quiet"])
            .args(["--vcpus", &vcpus.to_string(), "--rate", &rate.to_string()])
            .args(["--count", &count.to_string(), "--report", "/dev/null"])
            .spawn()
            .with_context(|| format!("starting the reference VMM in {cgroup}"))?;
        guests.0.push(child);
        eprintln!("demo: {cgroup}: {scenario} guest, {vcpus} vCPU(s) at {rate} operations/s each");
    }
    let status = agent.wait().context("waiting for the agent")?;
    drop(guests);
    remove_demo_cgroups();
    anyhow::ensure!(status.success(), "the agent failed ({status})");
    Ok(())
}

/// The guests' VMM processes, stopped when the demo ends however it ends.
struct Guests(Vec<Child>);

impl Drop for Guests {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn remove_demo_cgroups() {
    // On hybrid hosts `vmtrace-vmm --cgroup` also created the tenants in the cgroup v1 memory
    // hierarchy.
    let table = MountTable::read().unwrap_or_default();
    let roots = [table.cgroup2(), table.cgroup_v1("memory")];
    for root in roots.into_iter().flatten().map(|m| &m.mount_point) {
        for (cgroup, ..) in TENANTS {
            let _ = std::fs::remove_dir(root.join(cgroup));
        }
        let _ = std::fs::remove_dir(root.join("vmtrace-demo"));
    }
}
