//! Reading a whole hash map, per-CPU or not, in a few syscalls with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6),
//! which aya has no API for. Iterating with aya costs two syscalls per entry (the next key, then
//! its values), so the agent's tick grew with its tenants' entries.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
    sync::OnceLock,
};

use aya::{
    Pod,
    maps::{HashMap, IterableMap, MapData, MapError, PerCpuHashMap},
    sys::SyscallError,
};

/// `BPF_MAP_LOOKUP_BATCH` of `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for by the first call; a hash bucket larger than this makes the kernel answer
/// ENOSPC, and the call is repeated with room for twice as many.
const FIRST_CHUNK: usize = 256;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every key of `map` with its value on each possible CPU.
pub fn per_cpu_entries<K: Pod, V: Pod>(
    map: &PerCpuHashMap<MapData, K, V>,
) -> Result<Vec<(K, Vec<V>)>, MapError> {
    read_map(map, |values| values.collect())
}

/// Every key of a per-CPU counter map with its total over the CPUs: no vector per entry, for
/// maps of a few entries per tenant.
pub fn per_cpu_sums<K: Pod>(
    map: &PerCpuHashMap<MapData, K, u64>,
) -> Result<Vec<(K, u64)>, MapError> {
    read_map(map, |values| values.fold(0, u64::wrapping_add))
}

/// Every key of a hash map that is not per CPU, with its value.
pub fn entries<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> Result<Vec<(K, V)>, MapError> {
    read_fd(map.map(), Layout::Shared, |values| {
        values.next().expect("one value per entry")
    })
}

fn read_map<K: Pod, V: Pod, T>(
    map: &PerCpuHashMap<MapData, K, V>,
    per_entry: impl Fn(&mut dyn Iterator<Item = V>) -> T,
) -> Result<Vec<(K, T)>, MapError> {
    read_fd(map.map(), Layout::PerCpu(possible_cpus()?), per_entry)
}

/// How the kernel lays out a batch's values.
#[derive(Clone, Copy)]
enum Layout {
    /// One value per entry, of the map's value size (`htab_map_lookup_batch()`'s `value_size`).
    Shared,
    /// A value per possible CPU, each 8-byte aligned (bpf_long_memcpy of round_up(size, 8)).
    PerCpu(usize),
}

fn read_fd<K: Pod, V: Pod, T>(
    map: &MapData,
    layout: Layout,
    per_entry: impl Fn(&mut dyn Iterator<Item = V>) -> T,
) -> Result<Vec<(K, T)>, MapError> {
    read(map.fd().as_fd().as_raw_fd(), layout, FIRST_CHUNK, per_entry).map_err(|io_error| {
        SyscallError {
            call: "bpf_map_lookup_batch",
            io_error,
        }
        .into()
    })
}

/// The number of possible CPUs, read once: the kernel fixes it at boot.
fn possible_cpus() -> Result<usize, MapError> {
    static CPUS: OnceLock<usize> = OnceLock::new();
    if let Some(cpus) = CPUS.get() {
        return Ok(*cpus);
    }
    let cpus = aya::util::nr_cpus().map_err(|(call, io_error)| SyscallError { call, io_error })?;
    Ok(*CPUS.get_or_init(|| cpus))
}

fn read<K: Pod, V: Pod, T>(
    fd: i32,
    layout: Layout,
    first_chunk: usize,
    per_entry: impl Fn(&mut dyn Iterator<Item = V>) -> T,
) -> io::Result<Vec<(K, T)>> {
    let (cpus, stride) = match layout {
        Layout::Shared => (1, size_of::<V>()),
        Layout::PerCpu(cpus) => (cpus, size_of::<V>().next_multiple_of(8)),
    };
    // The position token: a bucket index (u32) for hash maps.
    let mut token = [0u64; 1];
    let mut chunk = first_chunk.max(1);
    let mut entries = Vec::new();
    let mut first = true;
    loop {
        let mut keys = vec![0u8; chunk * size_of::<K>()];
        let mut values = vec![0u8; chunk * stride * cpus];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: token.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: attr points at buffers of `count` keys and values that outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let error = (ret < 0).then(io::Error::last_os_error);
        if let Some(e) = &error
            && e.raw_os_error() == Some(libc::ENOSPC)
        {
            chunk *= 2;
            continue;
        }
        if let Some(e) = error
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            return Err(e);
        }
        for i in 0..attr.count as usize {
            // SAFETY: K and V are Pod, and the kernel filled `count` of each.
            let key = unsafe {
                keys.as_ptr()
                    .add(i * size_of::<K>())
                    .cast::<K>()
                    .read_unaligned()
            };
            let mut per_cpu = (0..cpus).map(|cpu| {
                let at = (i * cpus + cpu) * stride;
                // SAFETY: as above.
                unsafe { values.as_ptr().add(at).cast::<V>().read_unaligned() }
            });
            entries.push((key, per_entry(&mut per_cpu)));
        }
        // ENOENT: the last bucket was read.
        if ret < 0 {
            return Ok(entries);
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `map_create` member of `union bpf_attr`, as far as this test needs.
    #[repr(C)]
    #[derive(Default)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }

    #[repr(C)]
    #[derive(Default)]
    struct ElemAttr {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
        // SAFETY: attr is a bpf_attr prefix of the command's member.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                std::ptr::from_mut::<T>(attr),
                size_of::<T>(),
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    /// A hash map of u64 values made in the kernel, or `None` (said) where BPF is refused.
    fn create(map_type: u32, key_size: u32, max_entries: u32) -> Option<i32> {
        let mut create = CreateAttr {
            map_type,
            key_size,
            value_size: 8,
            max_entries,
            map_flags: 0,
        };
        match bpf(BPF_MAP_CREATE, &mut create) {
            Ok(fd) => Some(fd as i32),
            Err(e) => {
                assert!(
                    std::env::var("VMTRACE_REQUIRE_CAPS").as_deref() != Ok("1"),
                    "BPF_MAP_CREATE failed ({e}) and VMTRACE_REQUIRE_CAPS=1 requires BPF"
                );
                eprintln!("skipped: BPF_MAP_CREATE failed ({e}); needs CAP_BPF");
                None
            }
        }
    }

    /// A real per-CPU hash map of 12-byte keys (not a multiple of 8, as ExitKey's is not) and
    /// u64 values, read back in batches too small for its buckets at first.
    #[test]
    fn batches_read_every_entry_of_a_real_per_cpu_map_on_every_cpu() {
        let cpus = aya::util::nr_cpus().unwrap();
        let Some(fd) = create(BPF_MAP_TYPE_PERCPU_HASH, 12, 4096) else {
            return;
        };
        let entries = 3000u32;
        for n in 0..entries {
            let key = [n, n.wrapping_mul(7), 0xabcd];
            let values: Vec<u64> = (0..cpus as u64)
                .map(|cpu| u64::from(n) * 100 + cpu)
                .collect();
            let mut elem = ElemAttr {
                map_fd: fd as u32,
                key: key.as_ptr() as u64,
                value: values.as_ptr() as u64,
                ..ElemAttr::default()
            };
            bpf(BPF_MAP_UPDATE_ELEM, &mut elem).unwrap();
        }
        let mut read_back: Vec<([u32; 3], Vec<u64>)> =
            read(fd, Layout::PerCpu(cpus), 1, |values| values.collect()).unwrap();
        let mut sums: Vec<([u32; 3], u64)> = read(fd, Layout::PerCpu(cpus), 1, |values| {
            values.fold(0, u64::wrapping_add)
        })
        .unwrap();
        // SAFETY: the test owns the descriptor.
        unsafe { libc::close(fd) };
        read_back.sort();
        sums.sort_unstable();
        assert_eq!(read_back.len(), entries as usize);
        let summed: Vec<([u32; 3], u64)> = read_back
            .iter()
            .map(|(key, per_cpu)| (*key, per_cpu.iter().sum()))
            .collect();
        assert_eq!(sums, summed);
        for (n, (key, per_cpu)) in read_back.iter().enumerate() {
            let n = n as u32;
            assert_eq!(*key, [n, n.wrapping_mul(7), 0xabcd]);
            let want: Vec<u64> = (0..cpus as u64)
                .map(|cpu| u64::from(n) * 100 + cpu)
                .collect();
            assert_eq!(*per_cpu, want);
        }
    }

    /// A real hash map that is not per CPU, as the VMM processes' (u32 keys, u64 values).
    #[test]
    fn batches_read_every_entry_of_a_real_shared_map() {
        let Some(fd) = create(BPF_MAP_TYPE_HASH, 4, 1024) else {
            return;
        };
        let entries = 700u32;
        for n in 0..entries {
            let value = u64::from(n) << 33 | 5;
            let mut elem = ElemAttr {
                map_fd: fd as u32,
                key: (&raw const n) as u64,
                value: (&raw const value) as u64,
                ..ElemAttr::default()
            };
            bpf(BPF_MAP_UPDATE_ELEM, &mut elem).unwrap();
        }
        let mut read_back: Vec<(u32, u64)> =
            read(fd, Layout::Shared, 1, |values| values.next().unwrap()).unwrap();
        // SAFETY: the test owns the descriptor.
        unsafe { libc::close(fd) };
        read_back.sort_unstable();
        let want: Vec<(u32, u64)> = (0..entries).map(|n| (n, u64::from(n) << 33 | 5)).collect();
        assert_eq!(read_back, want);
    }

    #[test]
    fn an_empty_map_reads_as_nothing() {
        let cpus = aya::util::nr_cpus().unwrap();
        let Some(fd) = create(BPF_MAP_TYPE_PERCPU_HASH, 4, 16) else {
            return;
        };
        let read_back: Vec<(u32, Vec<u64>)> =
            read(fd, Layout::PerCpu(cpus), FIRST_CHUNK, |values| {
                values.collect()
            })
            .unwrap();
        // SAFETY: the test owns the descriptor.
        unsafe { libc::close(fd) };
        assert!(read_back.is_empty());
    }
}
