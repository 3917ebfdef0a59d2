//! `cargo xtask kernel-matrix`: on every kernel Debian offers here (each booted as an emulated
//! AMD-V host) and on this host's own, what `vmtrace doctor` says, which probes attach, and which
//! of them fire while the reference VMM runs every scenario. Writes docs/kernel-matrix.md.

use std::{collections::BTreeMap, path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use vmtrace_emulated_host::{KernelPackage, offered_kernels, sections};

use crate::{
    bench::bpfstats::{self, LoadedProgram},
    emulated,
    workspace::{target_dir, workspace_root},
};

/// Where the matrix goes.
const OUT: &str = "docs/kernel-matrix.md";

/// The reference VMM's scenarios run under watch, one cgroup each: every event the probes know.
const SCENARIOS: &[(&str, &str)] = &[
    ("pio", "--scenario pio --count 1000"),
    ("pio-in", "--scenario pio-in --count 500"),
    ("mmio", "--scenario mmio --count 500"),
    ("cpuid", "--scenario cpuid --count 500"),
    ("hlt", "--scenario hlt --count 300"),
    ("signal", "--scenario signal --count 50"),
    ("doorbell", "--scenario doorbell --count 500"),
    ("virtio", "--scenario virtio --queues 2 --count 100"),
    ("touch", "--scenario touch --mib 8"),
    ("balloon", "--scenario balloon --mib 8"),
    (
        "write-protect",
        "--scenario pio --vcpus 2 --count 2000 --write-protect-cycles 20",
    ),
];

/// The job, in the guest's `/init` or this host's shell: `emit` sends a command's output as a
/// section. `$CGROUPS` is the cgroup v2 mount, `$PREFIX` the tenants' parent under it.
fn job() -> String {
    let mut job = String::from(
        r#"stats=$(cat /proc/sys/kernel/bpf_stats_enabled)
echo 1 > /proc/sys/kernel/bpf_stats_enabled
emit doctor vmtrace doctor
echo "+cpu +memory" > $CGROUPS/$PREFIX/cgroup.subtree_control 2>/dev/null
emit progs.before bpftool prog show --json
vmtrace watch --json --interval 1s > /tmp/matrix-watch.json 2> /tmp/matrix-watch.err &
watch=$!
tries=0
until grep -q "vmtrace: watching" /tmp/matrix-watch.err; do
    tries=$((tries + 1))
    [ $tries -gt 600 ] && break
    sleep 0.2
done
"#,
    );
    for (name, args) in SCENARIOS {
        job.push_str(&format!(
            "mkdir -p $CGROUPS/$PREFIX/{name}\nemit vmm.{name} vmtrace-vmm {args} --cgroup $PREFIX/{name} --quiet\n"
        ));
    }
    job.push_str(
        "sleep 2
emit progs.after bpftool prog show --json
kill -INT $watch
wait $watch
emit watch.stderr cat /tmp/matrix-watch.err
echo $stats > /proc/sys/kernel/bpf_stats_enabled
",
    );
    for (name, _) in SCENARIOS {
        job.push_str(&format!("rmdir $CGROUPS/$PREFIX/{name}\n"));
    }
    job
}

/// What one kernel showed.
struct Row {
    kernel: String,
    /// Where it ran: an emulated host or this one.
    host: &'static str,
    doctor: BTreeMap<String, String>,
    probes: Vec<Probe>,
    scenarios_failed: Vec<String>,
}

struct Probe {
    name: String,
    kind: String,
    status: String,
    /// Runs of its program while the scenarios ran (with `kernel.bpf_stats_enabled`).
    runs: Option<u64>,
}

pub fn run() -> Result<()> {
    let guest = emulated::guest()?;
    let job = job();
    let mut rows = Vec::new();
    for kernel in offered_kernels() {
        let emulated_job = format!("CGROUPS=/sys/fs/cgroup\nPREFIX=matrix\n{job}");
        let run = guest.boot(&kernel, &emulated_job);
        rows.push(row(
            kernel_name(&kernel),
            "emulated AMD-V host (QEMU/TCG)",
            &run.sections,
        )?);
    }
    rows.push(this_host(&job)?);
    let text = render(&rows);
    let out = workspace_root().join(OUT);
    std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    for row in &rows {
        let fired = row.probes.iter().filter(|p| p.runs > Some(0)).count();
        eprintln!(
            "kernel-matrix: {}: {} of {} probes attached, {fired} fired",
            row.kernel,
            attached(row),
            row.probes.len()
        );
    }
    eprintln!("kernel-matrix: wrote {OUT}");
    Ok(())
}

fn kernel_name(kernel: &KernelPackage) -> String {
    kernel.release().to_owned()
}

/// The same job on this machine, in a cgroup of its own, with the release binaries on PATH.
fn this_host(job: &str) -> Result<Row> {
    let cgroups = cgroup2_mount()?;
    let results = target_dir().join("kernel-matrix-host.txt");
    let release = target_dir().join("release");
    let path = format!(
        "{}:{}",
        release.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = format!(
        "exec 3>{}\nemit() {{\n    name=$1\n    shift\n    \"$@\" >/tmp/emit.out 2>&1\n    rc=$?\n    \
         sed \"s/^/@@$name /\" /tmp/emit.out >&3\n    echo \"@@$name.rc $rc\" >&3\n}}\n\
         CGROUPS={}\nPREFIX=vmtrace-kernel-matrix\nmkdir -p $CGROUPS/$PREFIX\n{job}rmdir $CGROUPS/$PREFIX\n",
        results.display(),
        cgroups.display()
    );
    eprintln!("kernel-matrix: this host");
    let status = Command::new("sh")
        .args(["-c", &script])
        .env("PATH", path)
        .status()
        .context("running the job on this host")?;
    if !status.success() {
        bail!("the job on this host failed ({status})");
    }
    let text = std::fs::read_to_string(&results)
        .with_context(|| format!("reading {}", results.display()))?;
    let kernel = String::from_utf8_lossy(
        &Command::new("uname")
            .arg("-r")
            .output()
            .context("uname")?
            .stdout,
    )
    .trim()
    .to_owned();
    row(kernel, "this machine", &sections(&text))
}

/// Where cgroup v2 is mounted here (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid host).
fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .map(|f| PathBuf::from(f[1]))
        .context("no cgroup v2 mount on this host")
}

fn row(
    kernel: String,
    host: &'static str,
    sections: &BTreeMap<String, Vec<String>>,
) -> Result<Row> {
    let section = |name: &str| -> Result<String> {
        sections
            .get(name)
            .map(|lines| lines.join("\n"))
            .with_context(|| format!("{kernel}: the job emitted no {name}"))
    };
    let doctor_text = section("doctor")?;
    let (doctor, mut probes) = parse_doctor(&doctor_text);
    let before = programs(&section("progs.before")?)?;
    let after = programs(&section("progs.after")?)?;
    let new = bpfstats::new_ids(&before, &after);
    let ran = bpfstats::delta(&before, &after, &new);
    for probe in &mut probes {
        probe.runs = program_of(&probe.name, &ran).map(|p| p.run_cnt);
    }
    let scenarios_failed = SCENARIOS
        .iter()
        .filter(|(name, _)| section(&format!("vmm.{name}.rc")).is_ok_and(|rc| rc.trim() != "0"))
        .map(|(name, _)| (*name).to_owned())
        .collect();
    Ok(Row {
        kernel,
        host,
        doctor,
        probes,
        scenarios_failed,
    })
}

fn programs(json: &str) -> Result<bpfstats::Snapshot> {
    Ok(bpfstats::parse(json)?
        .into_iter()
        .map(|p| (p.id, p))
        .collect())
}

/// The program of a probe (`group:event`): named after its event, or `group_event`, as the kernel
/// keeps it (at most 15 characters without BTF).
fn program_of<'a>(probe: &str, programs: &'a [LoadedProgram]) -> Option<&'a LoadedProgram> {
    let (group, event) = probe.split_once(':')?;
    let names = [event.to_owned(), format!("{group}_{event}")];
    programs.iter().find(|p| {
        names
            .iter()
            .any(|n| *n == p.name || (p.name.len() == 15 && n.starts_with(&p.name)))
    })
}

/// Doctor's `label  value` lines, and its probes table (probe, program type, status).
fn parse_doctor(text: &str) -> (BTreeMap<String, String>, Vec<Probe>) {
    let mut fields = BTreeMap::new();
    let mut probes = Vec::new();
    let mut in_probes = false;
    for line in text.lines() {
        if line.trim().is_empty() {
            in_probes = false;
            continue;
        }
        let rest = if let Some(rest) = line.strip_prefix("probes ") {
            in_probes = true;
            rest
        } else if in_probes && line.starts_with(' ') {
            line
        } else {
            in_probes = false;
            // Labels are padded to 16 columns: "kernel          6.1.0", "exit source     ...".
            let (label, value) = line.split_at(line.len().min(16));
            fields.insert(label.trim().to_owned(), value.trim().to_owned());
            continue;
        };
        let mut words = rest.split_whitespace();
        if let (Some(name), Some(kind)) = (words.next(), words.next()) {
            probes.push(Probe {
                name: name.to_owned(),
                kind: kind.to_owned(),
                status: words.collect::<Vec<_>>().join(" "),
                runs: None,
            });
        }
    }
    (fields, probes)
}

fn attached(row: &Row) -> usize {
    row.probes
        .iter()
        .filter(|p| p.status.starts_with("attached"))
        .count()
}

fn render(rows: &[Row]) -> String {
    let scenarios: Vec<&str> = SCENARIOS.iter().map(|(name, _)| *name).collect();
    let mut out = format!(
        "# Kernel matrix\n\n\
         Written by `cargo xtask kernel-matrix`; do not edit by hand. Each kernel Debian offers here \
         (the newest generic amd64 image of each series) is booted as an emulated AMD-V host \
         (docs/svm-host.md), and the host's own kernel is checked in place. On each, `vmtrace \
         doctor` runs, then `vmtrace watch` while the reference VMM runs these scenarios one after \
         the other, each in its own cgroup: {}. \"Fired\" is the kernel's own count of runs of the \
         probe's program meanwhile (`kernel.bpf_stats_enabled`, `bpftool prog show`).\n\n\
         | kernel | where | KVM | exit source | probes attached | arguments checked against BTF | probes that fired |\n\
         |---|---|---|---|---|---|---|\n",
        scenarios.join(", ")
    );
    for row in rows {
        let field = |name: &str| row.doctor.get(name).map_or("?", String::as_str);
        let kvm = field("KVM").split(" (").next().unwrap_or("?");
        let source = field("exit source").split(" (").next().unwrap_or("?");
        let btf = field("BTF");
        let checked = btf
            .split_once("arguments of ")
            .map_or(btf, |(_, rest)| rest.split(" (").next().unwrap_or(rest));
        let off = row
            .probes
            .iter()
            .filter(|p| p.status.starts_with("off"))
            .count();
        let fired = row.probes.iter().filter(|p| p.runs > Some(0)).count();
        out.push_str(&format!(
            "| {} | {} | {kvm} | {source} | {} of {} ({off} off by default) | {checked} | {fired} |\n",
            row.kernel,
            row.host,
            attached(row),
            row.probes.len()
        ));
    }
    for row in rows {
        out.push_str(&format!("\n## {} ({})\n\n", row.kernel, row.host));
        if !row.scenarios_failed.is_empty() {
            out.push_str(&format!(
                "Scenarios that failed there: {}.\n\n",
                row.scenarios_failed.join(", ")
            ));
        }
        out.push_str(
            "| probe | program type | status | runs while the scenarios ran |\n|---|---|---|---|\n",
        );
        for probe in &row.probes {
            let runs = probe
                .runs
                .map_or("not loaded".to_owned(), |n| n.to_string());
            out.push_str(&format!(
                "| `{}` | {} | {} | {runs} |\n",
                probe.name, probe.kind, probe.status
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCTOR: &str = "kernel          6.1.0-57-amd64
BTF             yes (/sys/kernel/btf/vmlinux); arguments of 19 of 20 raw tracepoints checked, 1 unchecked (see probes)
KVM             SVM (module kvm_amd present in /sys/module; /dev/kvm present)
exit source     kvm:kvm_exit (every exit, with its hardware reason)
probes          kvm:kvm_userspace_exit           raw_tracepoint  attached
                iommu:map                        raw_tracepoint  attached; silent here: no IOMMU groups on this host
                syscalls:sys_enter_read          tracepoint      off (enable with --kick-latency)

ready: vmtrace can run on this host";

    #[test]
    fn doctor_fields_and_probes_are_read() {
        let (fields, probes) = parse_doctor(DOCTOR);
        assert_eq!(fields["kernel"], "6.1.0-57-amd64");
        assert_eq!(
            fields["exit source"],
            "kvm:kvm_exit (every exit, with its hardware reason)"
        );
        assert_eq!(probes.len(), 3);
        assert_eq!(probes[1].name, "iommu:map");
        assert_eq!(probes[1].kind, "raw_tracepoint");
        assert!(probes[1].status.starts_with("attached; silent"));
        assert!(probes[2].status.starts_with("off"));
    }

    #[test]
    fn probes_find_their_programs() {
        let program = |name: &str| LoadedProgram {
            id: 1,
            name: name.to_owned(),
            prog_type: "raw_tracepoint".to_owned(),
            run_time_ns: 0,
            run_cnt: 7,
        };
        let programs = [
            program("iommu_map"),
            program("kvm_userspace_e"),
            program("kvm_exit"),
        ];
        assert_eq!(
            program_of("iommu:map", &programs).unwrap().name,
            "iommu_map"
        );
        assert_eq!(
            program_of("kvm:kvm_userspace_exit", &programs)
                .unwrap()
                .name,
            "kvm_userspace_e"
        );
        assert_eq!(
            program_of("kvm:kvm_exit", &programs).unwrap().name,
            "kvm_exit"
        );
        assert!(program_of("kvm:kvm_entry", &programs).is_none());
    }
}
