//! An emulated AMD-V host: a Debian kernel booted under QEMU's TCG with SVM and nested paging, so
//! that `kvm:kvm_exit` fires, with executables of the host inside. Everything the guest needs comes
//! from Debian packages (the kernel, busybox), downloaded once per machine into a cache directory.
//! A caller writes a job (a shell script the guest's `/init` sources) and reads back the sections
//! it emitted. docs/svm-host.md has the recipe and what was learnt there.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// How long one boot, job and power-off may take before QEMU is killed, unless the guest says
/// otherwise: the tests' jobs take under a minute on a 2-core machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_mins(10);

/// How long a guest may emit nothing before it counts as hung: a boot takes under a minute, and
/// the jobs emit every few seconds.
pub const STALL: Duration = Duration::from_mins(3);

/// The kernel modules KVM needs, loaded with their dependencies first.
const MODULES: &[&str] = &["kvm-amd"];
/// The modules a VMM needs to take a device through VFIO (the type1 IOMMU backend is loaded on
/// demand only where modprobe exists).
const VFIO_MODULES: &[&str] = &["vfio-iommu-type1", "vfio-pci"];

/// What a job's shell functions and the guest's `/init` provide: `emit NAME CMD...` runs CMD and
/// sends its output as section NAME (and its exit status as NAME.rc).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tracefs tracefs /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ifconfig lo 127.0.0.1 up
hostname svm-host
exec 3>/dev/ttyS1
# One line per result: "@@<section> <text>".
emit() {
    name=$1
    shift
    "$@" >/tmp/emit.out 2>&1
    rc=$?
    sed "s/^/@@$name /" /tmp/emit.out >&3
    echo "@@$name.rc $rc" >&3
}
for module in $(cat /modules/order); do
    insmod /modules/$module.ko || echo "@@insmod.failed $module" >&3
done
echo "@@uname $(uname -r)" >&3
. /job.sh
echo "@@end" >&3
sync
poweroff -f
"#;

/// A Debian kernel package the guest boots, e.g. `linux-image-6.1.0-57-amd64`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelPackage(pub String);

impl KernelPackage {
    /// The kernel release it installs (`uname -r`).
    pub fn release(&self) -> &str {
        self.0.strip_prefix("linux-image-").unwrap_or(&self.0)
    }
}

/// The newest generic amd64 kernel of every series (6.1, 6.12, ...) that apt offers here.
pub fn offered_kernels() -> Vec<KernelPackage> {
    let offered = || {
        let output = Command::new("apt-cache")
            .args(["pkgnames", "linux-image-"])
            .output()
            .expect("running apt-cache");
        newest_per_series(String::from_utf8_lossy(&output.stdout).lines())
    };
    let kernels = offered();
    if !kernels.is_empty() {
        return kernels;
    }
    // A fresh machine may have no package lists yet.
    run(Command::new("apt-get").args(["update", "-q"]));
    offered()
}

/// Of package names, the signed generic amd64 kernel images (`linux-image-<release>-amd64`, not
/// `-cloud`, `-rt`, `-dbg`, `-unsigned` or meta-packages), the newest of each series.
pub fn newest_per_series<'a>(names: impl Iterator<Item = &'a str>) -> Vec<KernelPackage> {
    let mut newest: BTreeMap<(u32, u32), (Vec<u32>, String)> = BTreeMap::new();
    for name in names {
        let Some(release) = name
            .strip_prefix("linux-image-")
            .and_then(|r| r.strip_suffix("-amd64"))
        else {
            continue;
        };
        // Other flavours: linux-image-<release>-cloud-amd64, ...-rt-amd64.
        if release.contains("cloud") || release.contains("rt") {
            continue;
        }
        // 6.1.0-57 gives [6, 1, 0, 57]; 6.12.118+deb12 gives [6, 12, 118]; a meta-package's
        // 6.12 has too few numbers.
        let numbers: Vec<u32> = release
            .split(['.', '-', '+'])
            .map_while(|part| part.parse().ok())
            .collect();
        if numbers.len() < 3 {
            continue;
        }
        let series = (numbers[0], numbers[1]);
        let entry = newest
            .entry(series)
            .or_insert_with(|| (Vec::new(), String::new()));
        if numbers > entry.0 {
            *entry = (numbers, name.to_owned());
        }
    }
    newest
        .into_values()
        .map(|(_, name)| KernelPackage(name))
        .collect()
}

/// The files of a Debian package, downloaded and unpacked once into the cache.
fn unpacked(cache: &Path, package: &str) -> PathBuf {
    let dir = cache.join(package);
    if dir.join(".unpacked").exists() {
        return dir;
    }
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs).expect("mkdir debs");
    eprintln!("svm-host: downloading {package}");
    run(Command::new("apt-get")
        // The download runs as root into a directory the _apt user cannot write.
        .args(["-q", "-o", "APT::Sandbox::User=root", "download", package])
        .current_dir(&debs));
    let deb = std::fs::read_dir(&debs)
        .expect("reading the downloads")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "deb")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")))
        })
        .unwrap_or_else(|| panic!("apt-get download {package} left no .deb"));
    let _ = std::fs::remove_dir_all(&dir);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir));
    std::fs::write(dir.join(".unpacked"), "").expect("marking the package unpacked");
    dir
}

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A file of the initramfs: its contents and mode.
struct Entry {
    mode: u32,
    data: Vec<u8>,
    /// A character device's major and minor.
    device: Option<(u32, u32)>,
}

/// The initramfs being written, by path (sorted, so that directories come before their files).
#[derive(Default)]
struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

impl Initramfs {
    fn dir(&mut self, path: &str) {
        let mut at = String::new();
        for part in path.trim_matches('/').split('/') {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            self.entries.entry(at.clone()).or_insert(Entry {
                mode: 0o040_755,
                data: Vec::new(),
                device: None,
            });
        }
    }

    fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entries.insert(
            path.to_owned(),
            Entry {
                mode: 0o100_000 | mode,
                data,
                device: None,
            },
        );
    }

    fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.entries.insert(
            path.trim_start_matches('/').to_owned(),
            Entry {
                mode: 0o020_600,
                data: Vec::new(),
                device: Some((major, minor)),
            },
        );
    }

    /// A host executable and the shared libraries it loads, at the paths where it finds them.
    fn executable(&mut self, path: &str, host_file: &Path) {
        let data = std::fs::read(host_file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", host_file.display()));
        self.file(path, 0o755, data);
        let ldd = Command::new("ldd")
            .arg(host_file)
            .output()
            .expect("running ldd");
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let library = line
                .split("=>")
                .last()
                .and_then(|s| s.split_whitespace().next())
                .filter(|s| s.starts_with('/'));
            if let Some(library) = library {
                let data =
                    std::fs::read(library).unwrap_or_else(|e| panic!("reading {library}: {e}"));
                self.file(library, 0o755, data);
            }
        }
    }

    fn write(self, to: &Path) {
        let file =
            std::fs::File::create(to).unwrap_or_else(|e| panic!("creating {}: {e}", to.display()));
        let mut out = std::io::BufWriter::new(file);
        for (inode, (path, entry)) in self.entries.into_iter().enumerate() {
            let mut builder = cpio::NewcBuilder::new(&path)
                .ino(inode as u32 + 1)
                .mode(entry.mode)
                .nlink(1);
            if let Some((major, minor)) = entry.device {
                builder = builder.rdev_major(major).rdev_minor(minor);
            }
            let size = u32::try_from(entry.data.len()).expect("a file under 4 GiB");
            let mut writer = builder.write(&mut out, size);
            writer
                .write_all(&entry.data)
                .expect("writing the initramfs");
            writer.finish().expect("writing the initramfs");
        }
        cpio::newc::trailer(&mut out).expect("writing the initramfs");
        out.flush().expect("writing the initramfs");
    }
}

/// A kernel module's file in an unpacked kernel package, and its `depends=` modules.
fn module(modules_dir: &Path, name: &str) -> (Vec<u8>, Vec<String>) {
    // Module files are named with `-` or `_` (vfio-pci.ko, vfio_iommu_type1.ko); both mean the
    // same to the kernel.
    let wanted: Vec<String> = [name.to_owned(), name.replace('-', "_")]
        .iter()
        .flat_map(|n| [format!("{n}.ko"), format!("{n}.ko.xz")])
        .collect();
    let path = find_file(modules_dir, &wanted)
        .unwrap_or_else(|| panic!("no module {name} under {}", modules_dir.display()));
    let data = if path.extension().is_some_and(|e| e == "xz") {
        let output = Command::new("xz")
            .arg("-dc")
            .arg(&path)
            .output()
            .expect("running xz");
        assert!(output.status.success(), "xz -dc {}", path.display());
        output.stdout
    } else {
        std::fs::read(&path).expect("reading a module")
    };
    // The .modinfo section holds NUL-terminated `key=value` strings.
    let depends = data
        .split(|&b| b == 0)
        .find_map(|field| field.strip_prefix(b"depends="))
        .map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .filter(|m| !m.is_empty())
                .map(|m| m.replace('_', "-"))
                .collect()
        })
        .unwrap_or_default();
    (data, depends)
}

fn find_file(dir: &Path, names: &[String]) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, names) {
                return Some(found);
            }
        } else if entry
            .file_name()
            .to_str()
            .is_some_and(|n| names.iter().any(|w| w == n))
        {
            return Some(path);
        }
    }
    None
}

/// Adds `name` and its dependencies to the initramfs, dependencies first, once each.
fn add_module(initramfs: &mut Initramfs, modules_dir: &Path, name: &str, order: &mut Vec<String>) {
    if order.iter().any(|m| m == name) {
        return;
    }
    let (data, depends) = module(modules_dir, name);
    for dependency in depends {
        add_module(initramfs, modules_dir, &dependency, order);
    }
    initramfs.file(&format!("modules/{name}.ko"), 0o644, data);
    order.push(name.to_owned());
}

/// What one boot of the guest emitted.
#[derive(Debug)]
pub struct Run {
    pub kernel: KernelPackage,
    /// Every section's lines, in the order the guest emitted them.
    pub sections: BTreeMap<String, Vec<String>>,
    /// The guest's console, for failure messages.
    pub console: String,
    pub took: Duration,
    /// How long it had emitted nothing when it was stopped as hung.
    pub stalled: Option<Duration>,
    /// Boots it took, the failed ones included.
    pub boots: usize,
}

impl Run {
    /// The lines of `section`, or a panic that shows the console.
    pub fn section(&self, name: &str) -> &[String] {
        self.sections.get(name).unwrap_or_else(|| {
            panic!(
                "the guest on {} emitted no {name:?}; sections: {:?}\nconsole:\n{}",
                self.kernel.0,
                self.sections.keys().collect::<Vec<_>>(),
                self.console
            )
        })
    }

    /// The text of `section`, its lines joined.
    pub fn text(&self, name: &str) -> String {
        self.section(name).join("\n")
    }

    /// The guest kernel's panic message, if it panicked.
    pub fn panic(&self) -> Option<&str> {
        self.console.lines().find_map(|line| {
            line.split_once("Kernel panic - ")
                .map(|(_, what)| what.trim())
        })
    }

    /// Why the guest did not finish its job: its kernel panicked, or it stalled.
    pub fn failure(&self) -> Option<String> {
        if let Some(panic) = self.panic() {
            return Some(format!("the guest's kernel panicked ({panic})"));
        }
        self.stalled
            .map(|stall| format!("the guest emitted nothing for {} s", stall.as_secs()))
    }

    /// The exit status the guest's `emit` recorded for `section`.
    pub fn status(&self, name: &str) -> i32 {
        self.text(&format!("{name}.rc"))
            .trim()
            .parse()
            .unwrap_or(-1)
    }
}

/// What the guest holds besides busybox and KVM's modules, and where its files are kept.
pub struct Guest {
    /// The downloaded packages and each kernel's last run (initramfs, console, results), kept
    /// between runs on one machine.
    pub cache: PathBuf,
    /// Executables of this host at their paths in the guest (e.g. `bin/vmtrace`), each with the
    /// shared libraries it loads.
    pub executables: Vec<(String, PathBuf)>,
    /// How long one boot may take before QEMU is killed ([`BOOT_TIMEOUT`] for the tests).
    pub timeout: Duration,
    /// Boots of one job at most, when the emulation fails it (2 for the tests).
    pub attempts: usize,
    /// How long the guest may emit nothing before it counts as hung ([`STALL`] for the tests).
    pub stall: Duration,
    /// Whether the guest has an IOMMU and a device to pass through: a q35 machine with QEMU's
    /// AMD or Intel IOMMU (`iommu=nopt`: translated DMA domains) and its `edu` PCI device
    /// (1234:11e8, DMA to addresses its driver programs), and the VFIO modules loaded
    /// (docs/iommu.md).
    pub iommu: Option<Iommu>,
}

/// The IOMMU QEMU emulates for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Iommu {
    /// `amd-iommu` (AMD-Vi), with interrupt remapping.
    Amd,
    /// `intel-iommu` (VT-d) with interrupt remapping, which VFIO requires; Debian's kernel
    /// enables it only with `intel_iommu=on`.
    Intel,
}

impl Iommu {
    fn name(self) -> &'static str {
        match self {
            Self::Amd => "amd",
            Self::Intel => "intel",
        }
    }
}

impl Guest {
    /// Boots `kernel` with the executables and `job` (a busybox shell script that `/init` sources
    /// after mounting everything and loading KVM) and returns what it emitted. The job's
    /// `@@progress <text>` lines are shown as they come.
    ///
    /// A guest whose kernel panicked, or that emitted nothing for `stall`, is booted again, up
    /// to `attempts` boots in all: Debian's 6.12 under QEMU's TCG sometimes stops with "corrupted
    /// stack end detected inside scheduler" in a vCPU thread of a nested guest, and 6.1 has hung
    /// in a nested guest's run (docs/svm-host.md), the emulation's faults rather than the job's.
    pub fn boot(&self, kernel: &KernelPackage, job: &str) -> Run {
        let mut attempt = 1;
        loop {
            let mut run = self.boot_once(kernel, job);
            let Some(failure) = run.failure() else {
                run.boots = attempt;
                return run;
            };
            assert!(
                attempt < self.attempts,
                "the guest on {} failed {attempt} times, the last: {failure}; console:\n{}",
                kernel.release(),
                run.console
            );
            eprintln!(
                "svm-host: {}: {failure}; booting it again",
                kernel.release()
            );
            attempt += 1;
        }
    }

    fn boot_once(&self, kernel: &KernelPackage, job: &str) -> Run {
        std::fs::create_dir_all(&self.cache)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", self.cache.display()));
        let started = Instant::now();
        let kernel_dir = unpacked(&self.cache, &kernel.0);
        let busybox = unpacked(&self.cache, "busybox-static");
        let release = kernel.release();
        let machine = self
            .iommu
            .map_or(String::new(), |iommu| format!("-{}-iommu", iommu.name()));
        let work = self.cache.join(format!("run-{release}{machine}"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("mkdir run");

        let mut initramfs = Initramfs::default();
        for dir in ["proc", "sys", "dev", "tmp", "run", "etc", "bin", "var/run"] {
            initramfs.dir(dir);
        }
        initramfs.char_device("dev/console", 5, 1);
        initramfs.file(
            "bin/busybox",
            0o755,
            std::fs::read(busybox.join("bin/busybox")).expect("busybox-static's busybox"),
        );
        initramfs.file("init", 0o755, INIT.as_bytes().to_vec());
        initramfs.file("job.sh", 0o644, job.as_bytes().to_vec());
        for (path, host_file) in &self.executables {
            initramfs.executable(path, host_file);
        }
        let modules_dir = kernel_dir.join("lib/modules").join(release);
        let mut order = Vec::new();
        let vfio = if self.iommu.is_some() {
            VFIO_MODULES
        } else {
            &[]
        };
        for name in MODULES.iter().chain(vfio) {
            add_module(&mut initramfs, &modules_dir, name, &mut order);
        }
        initramfs.file("modules/order", 0o644, order.join("\n").into_bytes());
        let initrd = work.join("initramfs.cpio");
        initramfs.write(&initrd);

        let console = work.join("console.log");
        let results = work.join("results.txt");
        eprintln!(
            "svm-host: booting {release} under QEMU/TCG with AMD-V{}",
            self.iommu.map_or(String::new(), |iommu| format!(
                ", an {} IOMMU and an edu device",
                iommu.name()
            ))
        );
        // The IOMMU must exist before the devices it translates for.
        let (machine, append): (&[&str], _) = match self.iommu {
            None => (&[], "console=ttyS0 quiet panic=-1"),
            Some(Iommu::Amd) => (
                &["-machine", "q35", "-device", "amd-iommu", "-device", "edu"],
                "console=ttyS0 quiet panic=-1 iommu=nopt",
            ),
            Some(Iommu::Intel) => (
                &[
                    "-machine",
                    "q35,kernel-irqchip=split",
                    "-device",
                    "intel-iommu,intremap=on",
                    "-device",
                    "edu",
                ],
                "console=ttyS0 quiet panic=-1 iommu=nopt intel_iommu=on",
            ),
        };
        let mut qemu = KillOnDrop(
            Command::new("qemu-system-x86_64")
                .args([
                    "-accel",
                    "tcg,thread=single",
                    "-cpu",
                    "EPYC,+svm,+npt",
                    "-smp",
                    "2",
                ])
                .args(["-m", "3G", "-display", "none", "-monitor", "none"])
                .args(["-no-reboot", "-kernel"])
                .arg(kernel_dir.join("boot").join(format!("vmlinuz-{release}")))
                .arg("-initrd")
                .arg(&initrd)
                .args(machine)
                .arg("-append")
                .arg(append)
                .arg("-serial")
                .arg(format!("file:{}", console.display()))
                .arg("-serial")
                .arg(format!("file:{}", results.display()))
                .stdin(Stdio::null())
                .spawn()
                .expect("starting qemu-system-x86_64"),
        );
        let deadline = Instant::now() + self.timeout;
        let mut progress = Progress::default();
        let mut last_output = (0, Instant::now());
        let stalled = loop {
            progress.show(&results);
            if let Some(status) = qemu.0.try_wait().expect("waiting for QEMU") {
                assert!(
                    status.success(),
                    "QEMU exited with {status}; console:\n{}",
                    std::fs::read_to_string(&console).unwrap_or_default()
                );
                break false;
            }
            assert!(
                Instant::now() < deadline,
                "the guest on {release} did not power off within {:?}; console:\n{}",
                self.timeout,
                std::fs::read_to_string(&console).unwrap_or_default()
            );
            let size = std::fs::metadata(&results).map_or(0, |m| m.len());
            if size != last_output.0 {
                last_output = (size, Instant::now());
            } else if last_output.1.elapsed() > self.stall {
                break true;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        drop(qemu);
        let console = std::fs::read_to_string(&console).unwrap_or_default();
        let text = std::fs::read_to_string(&results).unwrap_or_default();
        let run = Run {
            kernel: kernel.clone(),
            sections: sections(&text),
            console,
            took: started.elapsed(),
            stalled: stalled.then_some(self.stall),
            boots: 1,
        };
        assert!(
            run.sections.contains_key("end") || run.failure().is_some(),
            "the guest on {release} stopped before the end of its job; sections: {:?}\nconsole:\n{}",
            run.sections.keys().collect::<Vec<_>>(),
            run.console
        );
        eprintln!(
            "svm-host: {release}: done in {:.1}s",
            run.took.as_secs_f64()
        );
        run
    }
}

/// Echoes the job's `@@progress <text>` lines as they arrive, for jobs that run for minutes.
#[derive(Default)]
struct Progress {
    shown: usize,
}

impl Progress {
    fn show(&mut self, results: &Path) {
        let Ok(text) = std::fs::read_to_string(results) else {
            return;
        };
        let complete = text.rfind('\n').map_or(0, |end| end + 1);
        if complete <= self.shown {
            return;
        }
        for line in text[self.shown..complete].lines() {
            if let Some(what) = line.trim_end_matches('\r').strip_prefix("@@progress ") {
                eprintln!("svm-host: {what}");
            }
        }
        self.shown = complete;
    }
}

/// The lines of a results file, `@@<section> <text>`, by section. The serial line may add `\r`.
pub fn sections(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut sections: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let Some(line) = line.trim_end_matches('\r').strip_prefix("@@") else {
            continue;
        };
        let (name, rest) = line.split_once(' ').unwrap_or((line, ""));
        sections
            .entry(name.to_owned())
            .or_default()
            .push(rest.to_owned());
    }
    sections
}

/// QEMU, killed and reaped if the caller stops waiting for it.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether QEMU and apt's tools are on PATH.
pub fn qemu_available() -> bool {
    ["qemu-system-x86_64", "apt-get", "dpkg-deb"]
        .iter()
        .all(|tool| {
            std::env::var_os("PATH").is_some_and(|path| {
                std::env::split_paths(&path).any(|dir| dir.join(tool).is_file())
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_generic_kernel_of_each_series_is_chosen() {
        let names = [
            "linux-image-6.1.0-50-amd64",
            "linux-image-6.1.0-57-amd64",
            "linux-image-6.1.0-57-cloud-amd64",
            "linux-image-6.1.0-57-rt-amd64",
            "linux-image-6.1.0-9-amd64",
            "linux-image-6.1.0-57-amd64-dbg",
            "linux-image-6.1.0-57-amd64-unsigned",
            "linux-image-6.12.118+deb12-amd64",
            "linux-image-6.12.99+deb12-amd64",
            "linux-image-6.12.118+deb12-cloud-amd64",
            "linux-image-6.12-amd64",
            "linux-image-amd64",
        ];
        let chosen: Vec<String> = newest_per_series(names.into_iter())
            .into_iter()
            .map(|k| k.0)
            .collect();
        assert_eq!(
            chosen,
            [
                "linux-image-6.1.0-57-amd64",
                "linux-image-6.12.118+deb12-amd64"
            ]
        );
    }

    #[test]
    fn sections_collect_lines_by_name() {
        let text = "noise\n@@a one\r\n@@b\n@@a two words\n";
        let s = sections(text);
        assert_eq!(s["a"], ["one", "two words"]);
        assert_eq!(s["b"], [""]);
        assert_eq!(s.len(), 2);
    }
}
