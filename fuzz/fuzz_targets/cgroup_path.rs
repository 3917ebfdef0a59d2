//! A cgroup path (as /proc/PID/cgroup and the cgroup_mkdir tracepoint give it) always resolves to a
//! tenant without panicking, and the tenant survives the JSON round trip recordings put it through.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmtrace::input::Tenant;

fuzz_target!(|path: &str| {
    let tenant = Tenant::from_cgroup_path(path);
    assert!(!tenant.label().is_empty(), "{path:?} gave an empty label");
    let json = serde_json::to_string(&tenant).expect("a tenant serializes");
    let back: Tenant = serde_json::from_str(&json).expect("a tenant deserializes");
    assert_eq!(back, tenant);
    // Resolving is a function of the path alone.
    assert_eq!(Tenant::from_cgroup_path(path), tenant);
});
