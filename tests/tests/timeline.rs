//! The agent's timeline: every tenant's rates and gauges as fixed-interval points over the configured
//! window, served at `/api/timeline`, filtered by tenant and series prefix.

use std::{
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use serde_json::Value;
use vmtrace_tests::{
    TenantCgroup, binary, free_port, http_get, privileged_host, process::Proc, run_vmm,
    wait::wait_for,
};

fn timeline(port: u16, query: &str) -> Value {
    let (status, body) = http_get(port, &format!("/api/timeline{query}")).expect("GET");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn the_timeline_holds_a_window_of_every_tenants_series() {
    if !privileged_host("the_timeline_holds_a_window_of_every_tenants_series") {
        return;
    }
    let base = format!("vmtrace-test-timeline-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let tenant = TenantCgroup::new(&format!("{base}/busy"));
    let port = free_port();
    let _agent = Proc::spawn(
        "vmtrace agent",
        Command::new(binary("vmtrace"))
            .args(["agent", "--interval", "250ms", "--window", "4s", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );
    wait_for("the agent to be ready", Duration::from_mins(1), || {
        matches!(http_get(port, "/readyz"), Ok((200, _))).then_some(())
    });
    let report = run_vmm(&[
        "--scenario",
        "pio",
        "--count",
        "3000",
        "--cgroup",
        &tenant.relative,
    ]);
    let exits = report.total.exits["io"];
    thread::sleep(Duration::from_secs(1));

    let all = timeline(port, "");
    assert_eq!(all["interval_secs"], 0.25);
    let points = all["timestamps"].as_array().unwrap().len();
    assert!(
        (1..=16).contains(&points),
        "4 s at 250 ms is at most 16 points: {points}"
    );
    let series = &all["tenants"][tenant.agent_path()];
    let rates: Vec<f64> = series["exit.io"]
        .as_array()
        .unwrap_or_else(|| panic!("no exit.io series for the tenant: {all}"))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(rates.len(), points, "one value per point");
    // The guest ran within the window: its rates add up to its exits (each rate is a count over the
    // actual interval, which is 250 ms within the timer's precision).
    let total: f64 = rates.iter().sum::<f64>() * 0.25;
    assert!(
        (total - exits as f64).abs() <= exits as f64 * 0.1,
        "rates sum to {total:.0} exits, the VMM saw {exits}"
    );
    assert!(series["memory.usage_bytes"].is_array(), "{series}");

    let only = timeline(
        port,
        &format!("?tenant={}&prefix=tax.", tenant.agent_path()),
    );
    let tenants = only["tenants"].as_object().unwrap();
    assert_eq!(tenants.len(), 1, "{only}");
    let kinds: Vec<&String> = tenants[&tenant.agent_path()]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert!(
        !kinds.is_empty() && kinds.iter().all(|k| k.starts_with("tax.")),
        "{kinds:?}"
    );
    let none = timeline(port, "?tenant=/no/such/tenant");
    assert!(none["tenants"].as_object().unwrap().is_empty());

    // After the window has passed, the window is full and the idle tenant's exit rates are zero.
    thread::sleep(Duration::from_secs(5));
    let later = timeline(port, "");
    assert_eq!(later["timestamps"].as_array().unwrap().len(), 16);
    let exit_rates = &later["tenants"][tenant.agent_path()]["exit.io"];
    assert!(
        exit_rates.is_null() || exit_rates.as_array().unwrap().iter().all(|v| v == 0.0),
        "{exit_rates}"
    );
}
