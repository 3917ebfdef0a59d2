//! Opening `/dev/kvm` and checking, before anything is created, that KVM offers what the VMM
//! needs.

use kvm_ioctls::{Cap, Kvm};

use crate::config::{Scenario, VmmConfig};
use crate::error::Error;

/// The stable KVM API version.
const KVM_API_VERSION: i32 = 12;

/// An open `/dev/kvm` whose capabilities were checked against a configuration.
#[derive(Debug)]
pub struct CheckedKvm {
    /// The open `/dev/kvm`.
    pub kvm: Kvm,
    /// The most vCPUs one VM may have here (KVM_CAP_MAX_VCPUS).
    pub max_vcpus: usize,
}

/// Opens `/dev/kvm`; the error says what to do when it cannot be opened.
pub fn open_kvm() -> Result<Kvm, Error> {
    Kvm::new().map_err(Error::KvmOpen)
}

/// Opens `/dev/kvm` and checks the API version and every capability `config` needs.
pub fn check(config: &VmmConfig) -> Result<CheckedKvm, Error> {
    let kvm = open_kvm()?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(Error::KvmApiVersion(version));
    }
    let mut needed = vec![
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ];
    if matches!(config.scenario, Scenario::Doorbell | Scenario::Virtio) {
        needed.push((Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"));
    }
    for (cap, name) in needed {
        if !kvm.check_extension(cap) {
            return Err(Error::MissingCapability(name));
        }
    }
    let max_vcpus = kvm.get_max_vcpus();
    if config.vcpus as usize > max_vcpus {
        return Err(Error::Config(format!(
            "--vcpus {} is more than KVM allows here ({max_vcpus})",
            config.vcpus
        )));
    }
    Ok(CheckedKvm { kvm, max_vcpus })
}

/// Why `/dev/kvm` cannot be used here, or `None` if it opens. Tests use it to skip (or, with
/// `VMTRACE_REQUIRE_CAPS=1`, fail) with the reason instead of passing silently.
pub fn kvm_unavailable() -> Option<String> {
    match Kvm::new() {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// For tests: `true` if KVM can be used. Otherwise prints `SKIP: <test>: /dev/kvm unavailable
/// (<reason>)` to stderr and returns `false`, or panics if `VMTRACE_REQUIRE_CAPS=1` is set.
pub fn kvm_or_skip(test: &str) -> bool {
    let Some(reason) = kvm_unavailable() else {
        return true;
    };
    assert!(
        std::env::var("VMTRACE_REQUIRE_CAPS").as_deref() != Ok("1"),
        "{test}: /dev/kvm unavailable ({reason}) and VMTRACE_REQUIRE_CAPS=1 requires it"
    );
    eprintln!("SKIP: {test}: /dev/kvm unavailable ({reason})");
    false
}
