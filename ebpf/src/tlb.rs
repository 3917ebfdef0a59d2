//! TLB activity: the host's TLB flushes caused by VMM processes (`tlb:tlb_flush`, by reason) and the
//! guests' flush requests KVM handles (paravirtual and Hyper-V flush hypercalls). TLB-relevant exits
//! (CR3 writes, INVLPG) come with `kvm:kvm_exit` where the host emits it; see `kvm_exit.rs`.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use vmtrace_common::ExitKind;

use crate::{maps::count, vmm_process::in_vmm};

/// `TLB_FLUSH_ON_TASK_SWITCH` of `enum tlb_flush_reason`.
const ON_TASK_SWITCH: u64 = 0;

/// `tlb_flush(int reason, unsigned long pages)`; reason is `enum tlb_flush_reason`.
#[raw_tracepoint(tracepoint = "tlb_flush")]
pub fn tlb_flush(ctx: RawTracePointContext) -> i32 {
    let reason: u64 = ctx.arg(0);
    let pages: u64 = ctx.arg(1);
    // Nearly every context switch of the host lands here with 0 pages: switch_mm_irqs_off() found
    // the next mm's ASID (PCID) still holding its entries, and flushed nothing. Returning before
    // any helper or map keeps the host's context switches, VM or not, at an empty program's cost.
    if reason == ON_TASK_SWITCH && pages == 0 {
        return 0;
    }
    if in_vmm() {
        count(ExitKind::TlbFlush, reason as u32);
    }
    0
}

/// `kvm_pv_tlb_flush(unsigned int vcpu_id, bool need_flush_tlb)`.
#[raw_tracepoint(tracepoint = "kvm_pv_tlb_flush")]
pub fn kvm_pv_tlb_flush(ctx: RawTracePointContext) -> i32 {
    let need_flush: u64 = ctx.arg(1);
    count(ExitKind::TlbPvFlush, (need_flush & 1) as u32);
    0
}

/// `kvm_hv_flush_tlb(...)`: a Hyper-V enlightened guest's flush hypercall.
#[raw_tracepoint(tracepoint = "kvm_hv_flush_tlb")]
pub fn kvm_hv_flush_tlb(_ctx: RawTracePointContext) -> i32 {
    count(ExitKind::TlbHvFlush, 0);
    0
}

/// `kvm_hv_flush_tlb_ex(...)`: the extended (sparse vCPU set) variant.
#[raw_tracepoint(tracepoint = "kvm_hv_flush_tlb_ex")]
pub fn kvm_hv_flush_tlb_ex(_ctx: RawTracePointContext) -> i32 {
    count(ExitKind::TlbHvFlush, 1);
    0
}
