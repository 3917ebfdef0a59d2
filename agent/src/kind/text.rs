//! Kinds and gauges as text, the form recordings, `watch --json` and labels carry: `Display` and
//! `FromStr` are exact inverses on every name the agent writes, `Ord` is the order of those names
//! (so that maps keyed by kind serialise in the same key order as maps keyed by their names), and
//! serde reads and writes the names.

use std::{borrow::Cow, cmp::Ordering, fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use super::{
    CpuMode, Errno, ExitReason, FaultType, FlushReason, Gauge, IommuOp, Kind, KvmExitReason,
    MemEvent, MemcgEvent, MmioAccess, MmuEvent, PioDirection, Queue, Series, TlbEvent,
};

/// A name that is no kind (or gauge) this vmtrace knows.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown kind `{0}`")]
pub struct ParseKindError(String);

/// The name of a kind or gauge this vmtrace does not know, kept as read so that it is written back
/// unchanged. Only reading a recording makes one, so it never spells a known kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UnknownKind(String);

impl UnknownKind {
    pub(super) fn new(text: &str) -> Self {
        Self(text.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether a kind or gauge name matches a filter people typed (the `prefix=` of `/api/timeline`):
/// the one place a user's text is compared with names.
pub fn name_matches(name: &str, prefix: &str) -> bool {
    name.starts_with(prefix)
}

/// A number in its one canonical spelling (no sign, no leading zeros), so that every accepted
/// name is written back as read.
fn canonical<T: FromStr + ToString>(digits: &str) -> Option<T> {
    let value: T = digits.parse().ok()?;
    (value.to_string() == digits).then_some(value)
}

/// The variant of `all` whose name is `text`.
fn find<T: Copy>(all: &[T], name: impl Fn(T) -> &'static str, text: &str) -> Option<T> {
    all.iter().copied().find(|&v| name(v) == text)
}

impl ExitReason {
    fn parse(text: &str) -> Option<Self> {
        match text.strip_prefix("reason_") {
            Some(digits) => canonical(digits)
                .map(Self)
                .filter(|r| r.known_name().is_none()),
            None => Self::from_name(text),
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.known_name() {
            Some(name) => f.write_str(name),
            None => write!(f, "reason_{}", self.0),
        }
    }
}

impl Errno {
    fn known_name(self) -> Option<&'static str> {
        ERRNO_NAMES
            .iter()
            .find(|(errno, _)| *errno == self.0)
            .map(|(_, name)| *name)
    }

    fn parse(text: &str) -> Option<Self> {
        match text.strip_prefix("errno_") {
            Some(digits) => canonical(digits)
                .map(Self)
                .filter(|e| e.known_name().is_none()),
            None => ERRNO_NAMES
                .iter()
                .find(|(_, name)| *name == text)
                .map(|(errno, _)| Self(*errno)),
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.known_name() {
            Some(name) => f.write_str(name),
            None => write!(f, "errno_{}", self.0),
        }
    }
}

impl FlushReason {
    fn known_name(self) -> Option<&'static str> {
        TLB_FLUSH_REASONS.get(self.0 as usize).copied()
    }

    fn parse(text: &str) -> Option<Self> {
        match text.strip_prefix("reason_") {
            Some(digits) => canonical(digits)
                .map(Self)
                .filter(|r| r.known_name().is_none()),
            None => TLB_FLUSH_REASONS
                .iter()
                .position(|n| *n == text)
                .map(|i| Self(i as u32)),
        }
    }
}

impl fmt::Display for FlushReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.known_name() {
            Some(name) => f.write_str(name),
            None => write!(f, "reason_{}", self.0),
        }
    }
}

impl PioDirection {
    const ALL: [Self; 2] = [Self::In, Self::Out];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::In => "pio.in",
            Self::Out => "pio.out",
        }
    }
}

impl MmioAccess {
    const NAMED: [Self; 4] = [
        Self::Read,
        Self::Write,
        Self::ReadUnsatisfied,
        Self::WriteKernel,
    ];

    /// The name after `mmio.`; `None` for [`MmioAccess::Other`].
    pub(crate) fn name(self) -> Option<&'static str> {
        match self {
            Self::Read => Some("read"),
            Self::Write => Some("write"),
            Self::ReadUnsatisfied => Some("read_unsatisfied"),
            Self::WriteKernel => Some("write.kernel"),
            Self::Other(_) => None,
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text.strip_prefix("type_") {
            Some(digits) => canonical(digits).map(Self::Other),
            None => Self::NAMED.into_iter().find(|a| a.name() == Some(text)),
        }
    }
}

impl Queue {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "any" => Some(Self::Any),
            _ => canonical(text.strip_prefix('q')?)
                .map(Self::Index)
                .filter(|q| *q != Self::Index(vmtrace_common::ANY_QUEUE)),
        }
    }
}

impl fmt::Display for Queue {
    /// `any`, or `q<N>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Index(queue) => write!(f, "q{queue}"),
            Self::Any => f.write_str("any"),
        }
    }
}

impl TlbEvent {
    const NAMED: [Self; 7] = [
        Self::PvFlush,
        Self::PvFlushSkipped,
        Self::HvFlush,
        Self::HvFlushEx,
        Self::Exit,
        Self::DtlbLoadMiss,
        Self::DtlbStoreMiss,
    ];

    /// The name after `tlb.`; `None` for [`TlbEvent::Flush`], whose name has its reason.
    pub(crate) fn name(self) -> Option<&'static str> {
        match self {
            Self::Flush(_) => None,
            Self::PvFlush => Some("pv_flush"),
            Self::PvFlushSkipped => Some("pv_flush.skipped"),
            Self::HvFlush => Some("hv_flush"),
            Self::HvFlushEx => Some("hv_flush_ex"),
            Self::Exit => Some("exit"),
            Self::DtlbLoadMiss => Some("dtlb_load_miss"),
            Self::DtlbStoreMiss => Some("dtlb_store_miss"),
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text.strip_prefix("flush.") {
            Some(reason) => FlushReason::parse(reason).map(Self::Flush),
            None => Self::NAMED.into_iter().find(|e| e.name() == Some(text)),
        }
    }
}

impl FaultType {
    const ALL: [Self; 3] = [Self::User, Self::Kernel, Self::Guest];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::User => "fault.user",
            Self::Kernel => "fault.kernel",
            Self::Guest => "fault.guest",
        }
    }
}

impl MmuEvent {
    const ALL: [Self; 3] = [Self::Created, Self::Reused, Self::Zapped];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Created => "mmu.page.created",
            Self::Reused => "mmu.page.reused",
            Self::Zapped => "mmu.page.zapped",
        }
    }
}

impl MemEvent {
    const ALL: [Self; 7] = [
        Self::Unmap,
        Self::UnmapBytes,
        Self::Returned,
        Self::ReturnedBytes,
        Self::Age,
        Self::TestAge,
        Self::Refault,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Unmap => "mem.unmap",
            Self::UnmapBytes => "mem.unmap_bytes",
            Self::Returned => "mem.returned",
            Self::ReturnedBytes => "mem.returned_bytes",
            Self::Age => "mem.age",
            Self::TestAge => "mem.test_age",
            Self::Refault => "mem.refault",
        }
    }
}

impl MemcgEvent {
    const ALL: [Self; 4] = [
        Self::Pgfault,
        Self::Pgmajfault,
        Self::LimitHits,
        Self::OomKills,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Pgfault => "memcg.pgfault",
            Self::Pgmajfault => "memcg.pgmajfault",
            Self::LimitHits => "memcg.limit_hits",
            Self::OomKills => "memcg.oom_kills",
        }
    }
}

impl IommuOp {
    const ALL: [Self; 4] = [Self::Map, Self::MapBytes, Self::Unmap, Self::UnmapBytes];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Map => "iommu.map",
            Self::MapBytes => "iommu.map_bytes",
            Self::Unmap => "iommu.unmap",
            Self::UnmapBytes => "iommu.unmap_bytes",
        }
    }
}

impl CpuMode {
    const ALL: [Self; 3] = [Self::Guest, Self::TaxKernel, Self::TaxVmm];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Guest => "cpu.guest",
            Self::TaxKernel => "tax.kernel",
            Self::TaxVmm => "tax.vmm",
        }
    }
}

impl Kind {
    /// The kind's name, e.g. `exit.io`; borrowed wherever the name is fixed.
    pub fn text(&self) -> Cow<'_, str> {
        let mut digits = itoa::Buffer::new();
        match self.parts(&mut digits) {
            (whole, "") => Cow::Borrowed(whole),
            (family, rest) => Cow::Owned(format!("{family}{rest}")),
        }
    }

    /// The name in two parts, a fixed one and the rest, so that names compare without being
    /// built: only numbers of unnamed reasons, errnos and queues are formatted, into `digits`.
    fn parts<'a>(&'a self, digits: &'a mut itoa::Buffer) -> (&'static str, &'a str) {
        match self {
            Self::Exit(reason) => match reason.known_name() {
                Some(name) => ("exit.", name),
                None => ("exit.reason_", digits.format(reason.0)),
            },
            Self::KvmExit(KvmExitReason(name)) => ("kvm_exit.", name.as_str()),
            Self::RunError(errno) => match errno.known_name() {
                Some(name) => ("run_error.", name),
                None => ("run_error.errno_", digits.format(errno.0)),
            },
            Self::Pio(direction) => (direction.name(), ""),
            Self::Mmio(MmioAccess::Other(code)) => ("mmio.type_", digits.format(*code)),
            Self::Mmio(access) => ("mmio.", access.name().unwrap_or_default()),
            Self::Cpuid => ("cpuid", ""),
            Self::Kick(Queue::Any) => ("kick.any", ""),
            Self::Kick(Queue::Index(queue)) => ("kick.q", digits.format(*queue)),
            Self::Tlb(TlbEvent::Flush(reason)) => match reason.known_name() {
                Some(name) => ("tlb.flush.", name),
                None => ("tlb.flush.reason_", digits.format(reason.0)),
            },
            Self::Tlb(event) => ("tlb.", event.name().unwrap_or_default()),
            Self::Fault(fault) => (fault.name(), ""),
            Self::MmuPage(event) => (event.name(), ""),
            Self::Mem(event) => (event.name(), ""),
            Self::Memcg(event) => (event.name(), ""),
            Self::Iommu(op) => (op.name(), ""),
            Self::Cpu(mode) => (mode.name(), ""),
            Self::Unknown(UnknownKind(text)) => ("", text.as_str()),
        }
    }
}

impl Ord for Kind {
    /// The order of the names (byte by byte, as `str` orders), without building them.
    fn cmp(&self, other: &Self) -> Ordering {
        if self == other {
            return Ordering::Equal;
        }
        let (mut digits, mut other_digits) = (itoa::Buffer::new(), itoa::Buffer::new());
        let (family, rest) = self.parts(&mut digits);
        let (other_family, other_rest) = other.parts(&mut other_digits);
        compare_joined(
            [family.as_bytes(), rest.as_bytes()],
            [other_family.as_bytes(), other_rest.as_bytes()],
        )
    }
}

/// Orders `a[0] ++ a[1]` against `b[0] ++ b[1]` as byte strings, a slice at a time: the maps the
/// agent aggregates into are keyed by kind, and a byte-by-byte chain made this the tick's hottest
/// function.
fn compare_joined(a: [&[u8]; 2], b: [&[u8]; 2]) -> Ordering {
    let total = |parts: [&[u8]; 2]| parts[0].len() + parts[1].len();
    let (mut a_parts, mut b_parts) = (a.into_iter(), b.into_iter());
    let (mut x, mut y): (&[u8], &[u8]) = (&[], &[]);
    loop {
        while x.is_empty() {
            match a_parts.next() {
                Some(part) => x = part,
                None => return total(a).cmp(&total(b)),
            }
        }
        while y.is_empty() {
            match b_parts.next() {
                Some(part) => y = part,
                None => return total(a).cmp(&total(b)),
            }
        }
        let n = x.len().min(y.len());
        match x[..n].cmp(&y[..n]) {
            Ordering::Equal => (x, y) = (&x[n..], &y[n..]),
            unequal => return unequal,
        }
    }
}

impl PartialOrd for Kind {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.text())
    }
}

impl FromStr for Kind {
    type Err = ParseKindError;

    /// Every name the agent writes or ever wrote, fallbacks included (`exit.reason_99`,
    /// `run_error.errno_5`, `tlb.flush.reason_7`, `kvm_exit.<any name>`); nothing else.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let parsed = if text == "cpuid" {
            Some(Self::Cpuid)
        } else if let Some(reason) = text.strip_prefix("exit.") {
            ExitReason::parse(reason).map(Self::Exit)
        } else if let Some(reason) = text.strip_prefix("kvm_exit.") {
            Some(Self::KvmExit(KvmExitReason(reason.to_owned())))
        } else if let Some(errno) = text.strip_prefix("run_error.") {
            Errno::parse(errno).map(Self::RunError)
        } else if let Some(access) = text.strip_prefix("mmio.") {
            MmioAccess::parse(access).map(Self::Mmio)
        } else if let Some(queue) = text.strip_prefix("kick.") {
            Queue::parse(queue).map(Self::Kick)
        } else if let Some(event) = text.strip_prefix("tlb.") {
            TlbEvent::parse(event).map(Self::Tlb)
        } else {
            find(&PioDirection::ALL, PioDirection::name, text)
                .map(Self::Pio)
                .or_else(|| find(&FaultType::ALL, FaultType::name, text).map(Self::Fault))
                .or_else(|| find(&MmuEvent::ALL, MmuEvent::name, text).map(Self::MmuPage))
                .or_else(|| find(&MemEvent::ALL, MemEvent::name, text).map(Self::Mem))
                .or_else(|| find(&MemcgEvent::ALL, MemcgEvent::name, text).map(Self::Memcg))
                .or_else(|| find(&IommuOp::ALL, IommuOp::name, text).map(Self::Iommu))
                .or_else(|| find(&CpuMode::ALL, CpuMode::name, text).map(Self::Cpu))
        };
        parsed.ok_or_else(|| ParseKindError(text.to_owned()))
    }
}

impl Gauge {
    /// The gauge's name, e.g. `memory.usage_bytes`.
    pub fn text(&self) -> &str {
        match self {
            Self::MemoryUsage => "memory.usage_bytes",
            Self::TaxRatio => "tax.ratio",
            Self::Unknown(UnknownKind(text)) => text,
        }
    }
}

impl fmt::Display for Gauge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.text())
    }
}

impl FromStr for Gauge {
    type Err = ParseKindError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        [Self::MemoryUsage, Self::TaxRatio]
            .into_iter()
            .find(|g| g.text() == text)
            .ok_or_else(|| ParseKindError(text.to_owned()))
    }
}

impl Series {
    /// The series' name: its kind's or gauge's.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            Self::Rate(kind) => kind.text(),
            Self::Gauge(gauge) => Cow::Borrowed(gauge.text()),
        }
    }
}

impl fmt::Display for Series {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.text())
    }
}

impl Ord for Series {
    /// The order of the names, as a timeline of names kept them.
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Self::Rate(kind), Self::Rate(other)) => kind.cmp(other),
            _ => self.text().cmp(&other.text()),
        }
    }
}

impl PartialOrd for Series {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Gauge {
    fn cmp(&self, other: &Self) -> Ordering {
        self.text().cmp(other.text())
    }
}

impl PartialOrd for Gauge {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Written and read as their names. Kinds and gauges are ordered as their names are, so that a map
/// keyed by them lists its keys as a map keyed by the names would: recordings stay byte for byte
/// what they were.
macro_rules! serialised_by_name {
    ($type:ty) => {
        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.text())
            }
        }

        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = Cow::<str>::deserialize(deserializer)?;
                Ok(Self::from_recorded(&text))
            }
        }
    };
}

serialised_by_name!(Kind);
serialised_by_name!(Gauge);

/// Errnos with a name of their own.
const ERRNO_NAMES: [(i32, &str); 4] = [
    (libc::EINTR, "eintr"),
    (libc::EAGAIN, "eagain"),
    (libc::EFAULT, "efault"),
    (libc::EINVAL, "einval"),
];

/// `enum tlb_flush_reason` (include/linux/mm_types.h), indexed by value.
const TLB_FLUSH_REASONS: [&str; 5] = [
    "task_switch",
    "remote_shootdown",
    "local_shootdown",
    "local_mm_shootdown",
    "remote_send_ipi",
];

#[cfg(test)]
mod compare_joined_tests {
    use super::compare_joined;

    #[test]
    fn joined_parts_order_as_the_joined_string_wherever_they_are_split() {
        let words = [
            "", "a", "ab", "abc", "b", "exit.", "exit.io", "kick.q1", "kick.q10",
        ];
        for a in words {
            for b in words {
                for i in 0..=a.len() {
                    for j in 0..=b.len() {
                        let (a0, a1) = a.split_at(i);
                        let (b0, b1) = b.split_at(j);
                        assert_eq!(
                            compare_joined(
                                [a0.as_bytes(), a1.as_bytes()],
                                [b0.as_bytes(), b1.as_bytes()]
                            ),
                            a.cmp(b),
                            "{a0:?}+{a1:?} against {b0:?}+{b1:?}"
                        );
                    }
                }
            }
        }
    }
}
