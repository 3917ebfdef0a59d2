//! A per-tenant counter on raw tracepoints: what bpftrace compiles
//! `rawtracepoint:kvm_mmio { @[cgroup] = count(); }` to (a per-CPU hash map keyed by cgroup id,
//! looked up and incremented, inserted on the first event). Debian 12's bpftrace 0.17 has no
//! `rawtracepoint` probes, so the benchmark loads these few instructions itself through bpf(2).
//! The same module loads programs that do nothing, the floor of any BPF tracer on these events.
//! An event named `group:event` is hooked as a classic tracepoint instead (a tracepoint program on
//! a perf event, as bpftrace's `tracepoint:` probes are), whose record the kernel builds before
//! the program runs: the difference between the two is that record's cost.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result, bail};

// bpf(2) commands, map and program types, helpers (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
// perf_event_open(2) for a tracepoint, and the ioctls that attach a program and enable the event
// (include/uapi/linux/perf_event.h).
const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_SAMPLE_RAW: u64 = 1 << 10;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_MAP_UPDATE_ELEM: i32 = 2;
const HELPER_GET_CURRENT_CGROUP_ID: i32 = 80;
const MAX_TENANTS: u32 = 10_240;

/// What the programs do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `@[cgroup] = count()`.
    Count,
    /// `return 0`.
    Empty,
}

/// The programs, attached until dropped.
pub struct RawCounter {
    counters: Vec<Counter>,
}

struct Counter {
    tracepoint: String,
    map: OwnedFd,
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl RawCounter {
    pub fn attach(tracepoints: &[&str], body: Body) -> Result<Self> {
        let counters = tracepoints
            .iter()
            .map(|tp| Counter::attach(tp, body).with_context(|| format!("raw tracepoint {tp}")))
            .collect::<Result<_>>()?;
        Ok(Self { counters })
    }

    /// Events counted per tracepoint, all tenants and CPUs together.
    pub fn totals(&self) -> Result<Vec<(String, u64)>> {
        let cpus = possible_cpus()?;
        self.counters
            .iter()
            .map(|c| Ok((c.tracepoint.clone(), map_total(&c.map, cpus)?)))
            .collect()
    }
}

impl Counter {
    /// `tracepoint` is a raw tracepoint's name, or `group:event` for a classic one.
    fn attach(tracepoint: &str, body: Body) -> Result<Self> {
        let map = map_create()?;
        let insns = match body {
            Body::Count => program(map.as_raw_fd()),
            Body::Empty => vec![insn(0xb7, 0, 0, 0, 0), insn(0x95, 0, 0, 0, 0)],
        };
        let (prog, link) = match tracepoint.split_once(':') {
            None => {
                let prog = prog_load(tracepoint, BPF_PROG_TYPE_RAW_TRACEPOINT, &insns)?;
                let name = CString::new(tracepoint)?;
                let mut attr = RawTracepointOpen {
                    name: name.as_ptr() as u64,
                    prog_fd: prog.as_raw_fd() as u32,
                    _pad: 0,
                };
                let link = bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr).context("attaching")?;
                (prog, link)
            }
            Some((group, event)) => {
                let prog = prog_load(event, BPF_PROG_TYPE_TRACEPOINT, &insns)?;
                let link = attach_classic(group, event, &prog)?;
                (prog, link)
            }
        };
        Ok(Self {
            tracepoint: tracepoint.to_owned(),
            map,
            _prog: prog,
            _link: link,
        })
    }
}

/// `@[cgroup] = count()`: r0 = cgroup id; value = lookup(map, &id); if value { *value += 1 }
/// else { update(map, &id, &1) }; return 0.
fn program(map_fd: i32) -> Vec<u64> {
    let mut p = vec![
        insn(0x85, 0, 0, 0, HELPER_GET_CURRENT_CGROUP_ID), // call get_current_cgroup_id
        insn(0x7b, 10, 0, -8, 0),                          // *(u64 *)(r10 - 8) = r0
    ];
    p.extend(load_map(map_fd)); //                            r1 = map
    p.extend([
        insn(0xbf, 2, 10, 0, 0),                     // r2 = r10
        insn(0x07, 2, 0, 0, -8),                     // r2 += -8
        insn(0x85, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM), // call map_lookup_elem
        insn(0x15, 0, 0, 4, 0),                      // if r0 == 0 goto insert
        insn(0x79, 1, 0, 0, 0),                      // r1 = *(u64 *)(r0 + 0)
        insn(0x07, 1, 0, 0, 1),                      // r1 += 1
        insn(0x7b, 0, 1, 0, 0),                      // *(u64 *)(r0 + 0) = r1
        insn(0x05, 0, 0, 9, 0),                      // goto out
        insn(0x7a, 10, 0, -16, 1),                   // insert: *(u64 *)(r10 - 16) = 1
    ]);
    p.extend(load_map(map_fd)); //                            r1 = map
    p.extend([
        insn(0xbf, 2, 10, 0, 0),                     // r2 = r10
        insn(0x07, 2, 0, 0, -8),                     // r2 += -8
        insn(0xbf, 3, 10, 0, 0),                     // r3 = r10
        insn(0x07, 3, 0, 0, -16),                    // r3 += -16
        insn(0xb7, 4, 0, 0, 0),                      // r4 = BPF_ANY
        insn(0x85, 0, 0, 0, HELPER_MAP_UPDATE_ELEM), // call map_update_elem
        insn(0xb7, 0, 0, 0, 0),                      // out: r0 = 0
        insn(0x95, 0, 0, 0, 0),                      // exit
    ]);
    p
}

/// One instruction: opcode, dst and src registers, offset, immediate (struct bpf_insn).
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | u64::from(dst & 0xf) << 8
        | u64::from(src & 0xf) << 12
        | u64::from(off as u16) << 16
        | u64::from(imm as u32) << 32
}

/// `r1 = map` (ld_imm64 with BPF_PSEUDO_MAP_FD), two instruction slots.
fn load_map(fd: i32) -> [u64; 2] {
    [insn(0x18, 1, 1, 0, fd), 0]
}

#[repr(C)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

#[repr(C)]
struct RawTracepointOpen {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

#[repr(C)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn map_create() -> Result<OwnedFd> {
    let mut attr = MapCreate {
        map_type: BPF_MAP_TYPE_PERCPU_HASH,
        key_size: 8,
        value_size: 8,
        max_entries: MAX_TENANTS,
        map_flags: 0,
    };
    bpf(BPF_MAP_CREATE, &mut attr).context("creating the map")
}

/// The tracepoint's perf event, with `prog` attached and enabled. One event (on CPU 0, any task)
/// is enough: the program is attached to the tracepoint itself and runs on every CPU, as libbpf
/// does it.
fn attach_classic(group: &str, event: &str, prog: &OwnedFd) -> Result<OwnedFd> {
    let id_file = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .map(|root| format!("{root}/events/{group}/{event}/id"))
        .find(|path| std::path::Path::new(path).exists())
        .with_context(|| format!("no tracefs id file for {group}:{event} (is tracefs mounted?)"))?;
    let id: u64 = std::fs::read_to_string(&id_file)
        .with_context(|| format!("reading {id_file}"))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {id_file}"))?;
    let mut attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config: id,
        sample_type: PERF_SAMPLE_RAW,
        sample_period: 1,
        wakeup_events: 1,
        ..PerfEventAttr::default()
    };
    // SAFETY: `attr` is a live perf_event_attr (its first, VER0 size); the call reads only that.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw mut attr,
            -1,
            0,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        bail!(
            "perf_event_open({group}:{event}): {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: perf_event_open returned a new file descriptor that nothing else owns.
    let event_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    for (request, arg) in [
        (PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd() as libc::c_ulong),
        (PERF_EVENT_IOC_ENABLE, 0),
    ] {
        // SAFETY: both ioctls take an integer argument, on the perf event just opened.
        if unsafe { libc::ioctl(event_fd.as_raw_fd(), request, arg) } < 0 {
            bail!(
                "attaching to {group}:{event}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(event_fd)
}

/// struct perf_event_attr up to `config1` (PERF_ATTR_SIZE_VER0, 64 bytes).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

fn prog_load(name: &str, prog_type: u32, insns: &[u64]) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut prog_name = [0u8; 16];
    for (slot, byte) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte;
    }
    let mut attr = ProgLoad {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
    };
    bpf(BPF_PROG_LOAD, &mut attr).with_context(|| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        format!(
            "loading the program: {}",
            String::from_utf8_lossy(&log[..end])
        )
    })
}

/// Sum of every key's per-CPU values.
fn map_total(map: &OwnedFd, cpus: usize) -> Result<u64> {
    let mut total = 0;
    let mut key = 0u64;
    let mut next = 0u64;
    let mut first = true;
    let mut values = vec![0u64; cpus];
    loop {
        let mut attr = MapElem {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: if first { 0 } else { &raw const key as u64 },
            value: &raw mut next as u64,
            flags: 0,
        };
        if bpf_raw(BPF_MAP_GET_NEXT_KEY, &mut attr).is_err() {
            return Ok(total); // ENOENT: no more keys
        }
        first = false;
        key = next;
        let mut attr = MapElem {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: &raw const key as u64,
            value: values.as_mut_ptr() as u64,
            flags: 0,
        };
        if bpf_raw(BPF_MAP_LOOKUP_ELEM, &mut attr).is_ok() {
            total += values.iter().sum::<u64>();
        }
    }
}

/// A bpf(2) command that returns a new file descriptor.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> Result<OwnedFd> {
    let fd = bpf_raw(cmd, attr)?;
    // SAFETY: on success these commands return a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn bpf_raw<T>(cmd: libc::c_long, attr: &mut T) -> Result<libc::c_long> {
    // SAFETY: `attr` is a live, #[repr(C)] bpf_attr prefix of the given size; every pointer in it
    // points to memory that outlives the call, with the sizes the kernel expects for `cmd`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut::<T>(attr),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        bail!("bpf({cmd}): {}", std::io::Error::last_os_error());
    }
    Ok(ret)
}

/// Number of possible CPUs: a per-CPU map's lookup writes one value for each.
fn possible_cpus() -> Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .context("reading /sys/devices/system/cpu/possible")?;
    parse_cpu_list(&text).context("parsing /sys/devices/system/cpu/possible")
}

/// `0-3,5` → 6 (the highest CPU number plus one).
fn parse_cpu_list(text: &str) -> Option<usize> {
    text.trim()
        .split(',')
        .map(|part| part.rsplit('-').next()?.parse::<usize>().ok())
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .max()
        .map(|max| max + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3,5"), Some(6));
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn perf_event_attr_is_the_first_abi_version() {
        assert_eq!(std::mem::size_of::<PerfEventAttr>(), 64);
    }

    #[test]
    fn jumps_land_on_their_labels() {
        let p = program(7);
        assert_eq!(p.len(), 23);
        // `if r0 == 0 goto insert` at 7 lands on the store of 1 at 12; `goto out` at 11 on 21.
        assert_eq!(p[7] & 0xff, 0x15);
        assert_eq!(p[12] & 0xff, 0x7a);
        assert_eq!(7 + 1 + (p[7] >> 16 & 0xffff), 12);
        assert_eq!(11 + 1 + (p[11] >> 16 & 0xffff), 21);
        assert_eq!(p[21] & 0xff, 0xb7);
        assert_eq!(p[22] & 0xff, 0x95);
    }
}
