//! Checks the `TP_PROTO` arguments a raw tracepoint program reads against the running kernel's BTF.
//!
//! A raw tracepoint program gets the tracepoint's arguments as an array of u64 and reads them by
//! position: a kernel that reorders or changes a tracepoint's arguments would make it count the
//! wrong thing without any error. The kernel describes each tracepoint in its BTF
//! (include/trace/bpf_probe.h):
//! - `typedef void (*btf_trace_<event>)(void *__data, <TP_PROTO args>)`, the tracepoint's prototype,
//!   whose parameters BTF leaves unnamed;
//! - `static void __bpf_trace_<class>(void *__data, <TP_PROTO args>)`, the function that calls the
//!   BPF program, one per event class (`DECLARE_EVENT_CLASS`, or `TRACE_EVENT`, which is a class of
//!   its own), whose parameters carry the names of the `TP_PROTO`.
//!
//! So the names come from `__bpf_trace_<class>`, after checking that its parameter types are the
//! typedef's (which ties the class to the event on this kernel), and the name at each position the
//! program reads (position + 1, after `__data`) must be the one the probe table expects.

use std::{
    cell::OnceCell,
    fs::{self, File},
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use btf_rs::{Backend, Btf, BtfType, FuncProto, Type};
use thiserror::Error;

/// The kernel's own BTF; modules' BTF (split, on top of it) sits beside it.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ArgError {
    #[error(
        "{event}: argument {position} is `{found}` in this kernel's BTF, the program reads `{expected}` there (its counts would be wrong)"
    )]
    Mismatch {
        event: String,
        position: usize,
        expected: &'static str,
        found: String,
    },
    #[error(
        "{event}: the program reads argument {position} (`{expected}`), this kernel's tracepoint has {count} arguments"
    )]
    Missing {
        event: String,
        position: usize,
        expected: &'static str,
        count: usize,
    },
    #[error(
        "{event}: `__bpf_trace_{class}` does not take the arguments of `btf_trace_{event}`: the event is not of class `{class}` in this kernel"
    )]
    WrongClass { event: String, class: String },
}

/// How a raw tracepoint's arguments fared against the BTF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgCheck {
    /// Every position the program reads has the expected name.
    Checked,
    /// The check could not be made; the probe attaches without it.
    Unchecked(String),
}

/// The kernel's BTF, and its modules' once a tracepoint is not found in vmlinux.
pub struct KernelBtf {
    vmlinux: Btf,
    dir: PathBuf,
    modules: OnceCell<Vec<Btf>>,
}

impl KernelBtf {
    /// Reads /sys/kernel/btf/vmlinux.
    pub fn open() -> Result<Self, String> {
        Self::open_at(Path::new(VMLINUX))
    }

    /// Reads a vmlinux BTF file; module BTF files are looked for in its directory.
    pub fn open_at(vmlinux: &Path) -> Result<Self, String> {
        let btf = open_mapped(vmlinux)
            .map_err(|e| format!("cannot read BTF from {}: {e}", vmlinux.display()))?;
        Ok(Self {
            vmlinux: btf,
            dir: vmlinux.parent().map(Path::to_path_buf).unwrap_or_default(),
            modules: OnceCell::new(),
        })
    }

    /// Checks that the raw tracepoint `event` has, at each `(position, name)` of `args`, an argument of
    /// that name. `classes` are the event classes it may be defined with, tried after its own name.
    pub fn check(
        &self,
        event: &str,
        classes: &[&str],
        args: &[(usize, &'static str)],
    ) -> Result<ArgCheck, ArgError> {
        let typedef = format!("btf_trace_{event}");
        let Some((btf, prototype)) = self.find(|btf| typedef_proto(btf, &typedef)) else {
            return Ok(ArgCheck::Unchecked(format!(
                "the kernel's BTF has no `{typedef}`"
            )));
        };
        let mut functions = std::iter::once(event).chain(classes.iter().copied());
        let Some((class, named)) = functions
            .find_map(|class| Some((class, function_proto(btf, &format!("__bpf_trace_{class}"))?)))
        else {
            return Ok(ArgCheck::Unchecked(format!(
                "the kernel's BTF has no `__bpf_trace_{event}` (nor of the classes {classes:?}) to name its arguments"
            )));
        };
        let types = |p: &FuncProto| -> Vec<Option<u32>> {
            p.parameters.iter().map(BtfType::get_type_id).collect()
        };
        if types(&prototype) != types(&named) {
            return Err(ArgError::WrongClass {
                event: event.to_owned(),
                class: class.to_owned(),
            });
        }
        // Parameter 0 is `__data`, the tracepoint's private data; TP_PROTO starts after it.
        let names: Vec<String> = named
            .parameters
            .iter()
            .skip(1)
            .map(|p| btf.resolve_name(p).unwrap_or_default())
            .collect();
        for &(position, expected) in args {
            match names.get(position) {
                Some(found) if found == expected => {}
                Some(found) => {
                    return Err(ArgError::Mismatch {
                        event: event.to_owned(),
                        position,
                        expected,
                        found: found.clone(),
                    });
                }
                None => {
                    return Err(ArgError::Missing {
                        event: event.to_owned(),
                        position,
                        expected,
                        count: names.len(),
                    });
                }
            }
        }
        Ok(ArgCheck::Checked)
    }

    /// The first of vmlinux, then the modules, in which `lookup` finds something.
    fn find<T>(&self, lookup: impl Fn(&Btf) -> Option<T>) -> Option<(&Btf, T)> {
        if let Some(found) = lookup(&self.vmlinux) {
            return Some((&self.vmlinux, found));
        }
        self.modules()
            .iter()
            .find_map(|btf| Some((btf, lookup(btf)?)))
    }

    /// The modules' BTF (KVM is a module on most hosts), read the first time a tracepoint is not in
    /// vmlinux. Unreadable ones are skipped: their tracepoints then go unchecked.
    fn modules(&self) -> &[Btf] {
        self.modules.get_or_init(|| {
            let Ok(entries) = fs::read_dir(&self.dir) else {
                return Vec::new();
            };
            entries
                .flatten()
                .filter(|e| e.file_name() != "vmlinux")
                .filter_map(|e| Btf::from_split_file(e.path(), &self.vmlinux).ok())
                .collect()
        })
    }
}

/// A vmlinux BTF read through btf-rs's mmap backend, which keeps only each type's offset and scans
/// the file for a name: the few dozen lookups of the checks afford that. Its default backend keeps
/// every type and a map of every name, some 35 MiB for this project's 5.5 MB vmlinux BTF, more than
/// the rest of the agent. /sys/kernel/btf/vmlinux can be mapped from Linux 6.16; on older kernels
/// its bytes are copied into a memfd, which can.
fn open_mapped(vmlinux: &Path) -> Result<Btf, String> {
    Btf::from_file_with_backend(vmlinux, Backend::Mmap).or_else(|_| open_copy(vmlinux))
}

/// `vmlinux`'s BTF mapped from a copy in a memfd.
fn open_copy(vmlinux: &Path) -> Result<Btf, String> {
    let copy = copy_to_memfd(vmlinux).map_err(|e| e.to_string())?;
    // The mapping outlives the descriptor, which is closed when `copy` goes.
    Btf::from_file_with_backend(format!("/proc/self/fd/{}", copy.as_raw_fd()), Backend::Mmap)
        .map_err(|e| e.to_string())
}

/// A memfd holding `path`'s bytes.
fn copy_to_memfd(path: &Path) -> io::Result<File> {
    // SAFETY: a NUL-terminated name and no flags that need anything else.
    let fd = unsafe { libc::memfd_create(c"vmtrace-btf".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just created and owned by nothing else.
    let mut copy = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    io::copy(&mut File::open(path)?, &mut copy)?;
    Ok(copy)
}

/// The prototype `typedef void (*name)(...)` points to.
fn typedef_proto(btf: &Btf, name: &str) -> Option<FuncProto> {
    btf.resolve_types_by_name(name)
        .ok()?
        .into_iter()
        .find_map(|t| match t {
            Type::Typedef(typedef) => match btf.resolve_chained_type(&typedef).ok()? {
                Type::Ptr(ptr) => match btf.resolve_chained_type(&ptr).ok()? {
                    Type::FuncProto(proto) => Some(proto),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        })
}

/// The prototype of the function `name`.
fn function_proto(btf: &Btf, name: &str) -> Option<FuncProto> {
    btf.resolve_types_by_name(name)
        .ok()?
        .into_iter()
        .find_map(|t| match t {
            Type::Func(function) => match btf.resolve_chained_type(&function).ok()? {
                Type::FuncProto(proto) => Some(proto),
                _ => None,
            },
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::spec::{PROBES, Reads};

    /// The real BTF of the kernel running the tests (world-readable, no privileges needed).
    fn kernel() -> Option<KernelBtf> {
        match KernelBtf::open() {
            Ok(btf) => Some(btf),
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }

    /// The path kernels before 6.16 take, where /sys/kernel/btf/vmlinux cannot be mapped.
    #[test]
    fn a_copy_in_a_memfd_answers_as_the_kernels_own_file() {
        let Some(direct) = kernel() else { return };
        let copy = KernelBtf {
            vmlinux: open_copy(Path::new(VMLINUX)).unwrap(),
            dir: PathBuf::from("/sys/kernel/btf"),
            modules: OnceCell::new(),
        };
        let probe = PROBES
            .iter()
            .find(|p| p.program == "kvm_pio")
            .expect("kvm_pio is in the probe table");
        let Reads::Raw { args, classes } = probe.reads else {
            panic!("kvm_pio is a raw tracepoint");
        };
        assert_eq!(
            copy.check(probe.event, classes, args),
            direct.check(probe.event, classes, args)
        );
        assert_eq!(
            copy.check(probe.event, classes, args),
            Ok(ArgCheck::Checked)
        );
    }

    #[test]
    fn every_raw_probe_reads_the_arguments_this_kernel_names() {
        let Some(btf) = kernel() else { return };
        for probe in PROBES {
            let Reads::Raw { args, classes } = probe.reads else {
                continue;
            };
            let check = btf.check(probe.event, classes, args);
            assert_eq!(check, Ok(ArgCheck::Checked), "{}", probe.tracepoint());
        }
    }

    #[test]
    fn a_wrong_position_or_name_is_rejected() {
        let Some(btf) = kernel() else { return };
        // kvm_mmio(int type, int len, u64 gpa, void *val): `gpa` is at 2, not 1.
        let err = btf
            .check("kvm_mmio", &[], &[(0, "type"), (1, "gpa")])
            .unwrap_err();
        assert_eq!(
            err,
            ArgError::Mismatch {
                event: "kvm_mmio".to_owned(),
                position: 1,
                expected: "gpa",
                found: "len".to_owned(),
            }
        );
        let text = err.to_string();
        assert!(
            text.contains("kvm_mmio") && text.contains("argument 1") && text.contains("`len`"),
            "{text}"
        );
        assert!(matches!(
            btf.check("kvm_mmio", &[], &[(4, "extra")]),
            Err(ArgError::Missing { count: 4, .. })
        ));
    }

    #[test]
    fn an_event_of_another_class_or_absent_is_told_apart() {
        let Some(btf) = kernel() else { return };
        // page_fault_user has no function of its own: without its class, it cannot be checked.
        assert!(matches!(
            btf.check("page_fault_user", &[], &[(0, "address")]),
            Ok(ArgCheck::Unchecked(_))
        ));
        // A class whose function takes other arguments is refused.
        assert_eq!(
            btf.check("page_fault_user", &["kvm_mmu_page_class"], &[]),
            Err(ArgError::WrongClass {
                event: "page_fault_user".to_owned(),
                class: "kvm_mmu_page_class".to_owned(),
            })
        );
        assert!(matches!(
            btf.check("no_such_event", &[], &[(0, "x")]),
            Ok(ArgCheck::Unchecked(_))
        ));
    }

    #[test]
    fn unreadable_btf_is_an_error_to_report() {
        let err = KernelBtf::open_at(Path::new("/nonexistent/vmlinux")).err();
        assert!(err.is_some_and(|e| e.contains("/nonexistent/vmlinux")));
    }
}
