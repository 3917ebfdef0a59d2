//! Tenants with odd names: a quote, a backslash and a systemd-escaped newline; unicode; and a name
//! of 255 bytes, the longest a cgroup directory can have. A real Prometheus scrapes the agent, a
//! receiver built on the official OTLP definitions takes its exports, and both must carry each
//! name exactly as the cgroup has it, with the exact count of its VMM's exits.

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::Duration,
};

use vmtrace_tests::{
    TenantCgroup, binary, free_port, http_get,
    otlp_receiver::{Receiver, metric, tenant_int},
    privileged_host,
    process::Proc,
    prometheus::Prometheus,
    run_vmm,
    temp::TempDir,
    wait::{poll, wait_for},
};

/// The names, each a cgroup below the test's base.
fn odd_names() -> Vec<String> {
    // 255 bytes: multibyte characters and plain ones, so that a cut at a byte count would split
    // a character.
    let mut long = "long-é".to_owned();
    while long.len() < 255 {
        long.push('x');
    }
    assert_eq!(long.len(), 255);
    vec![
        r#"say"hi\x0athere"#.to_owned(),
        "租户-ünïcödé-🚀".to_owned(),
        long,
    ]
}

/// The exits that Prometheus holds for `vmtrace_vmm_exits_total{exit_reason="io"}`, by tenant.
fn scraped_io_exits(prometheus: &Prometheus) -> Option<BTreeMap<String, u64>> {
    let data = prometheus
        .query(r#"vmtrace_vmm_exits_total{job="odd-names", exit_reason="io"}"#)
        .ok()?;
    data["result"]
        .as_array()?
        .iter()
        .map(|series| {
            let tenant = series["metric"]["tenant"].as_str()?.to_owned();
            let value: f64 = series["value"][1].as_str()?.parse().ok()?;
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Some((tenant, value as u64))
        })
        .collect()
}

#[test]
fn odd_tenant_names_reach_prometheus_and_otlp_exactly() {
    if !privileged_host("odd_tenant_names_reach_prometheus_and_otlp_exactly") {
        return;
    }
    let base = format!("vmtrace-test-odd-names-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let tenants: Vec<TenantCgroup> = odd_names()
        .iter()
        .map(|name| TenantCgroup::new(&format!("{base}/{name}")))
        .collect();

    let receiver = Receiver::start(0);
    let port = free_port();
    let mut agent = Proc::spawn(
        "vmtrace agent",
        Command::new(binary("vmtrace"))
            .args(["agent", "--interval", "200ms"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://{}", receiver.http),
            )
            .env("OTEL_METRIC_EXPORT_INTERVAL", "300")
            .stderr(Stdio::inherit()),
    );
    wait_for("the agent's /readyz", Duration::from_mins(1), || {
        agent.assert_running("before it was ready");
        matches!(http_get(port, "/readyz"), Ok((200, _))).then_some(())
    });
    let dir = TempDir::new("odd-names-prometheus");
    let prometheus = Prometheus::start(
        dir.path(),
        &format!(
            "  - job_name: odd-names\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    );

    // Each tenant makes a different number of exits, so that no name can borrow another's count.
    let expected: BTreeMap<String, u64> = tenants
        .iter()
        .zip(1u64..)
        .map(|(tenant, i)| {
            let count = (1000 * i).to_string();
            let report = run_vmm(&[
                "--scenario",
                "pio",
                "--count",
                &count,
                "--cgroup",
                &tenant.relative,
            ]);
            (tenant.agent_path(), report.total.exits["io"])
        })
        .collect();

    // Until the scrapes after the last VMM have landed; then the figures must be exact.
    let mut scraped = BTreeMap::new();
    poll(Duration::from_mins(1), || {
        agent.assert_running("while Prometheus scraped it");
        scraped = scraped_io_exits(&prometheus)?;
        // Any series of ours under a name that is not the cgroup's stays in and fails below.
        scraped.retain(|tenant, _| tenant.starts_with(&format!("/{base}/")));
        (scraped == expected).then_some(())
    });
    assert_eq!(scraped, expected, "Prometheus (left) vs VMM (right)");
    eprintln!("Prometheus holds {scraped:?}");

    // The last export, sent as the agent stops, carries every count.
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = agent.child.wait().expect("waiting for the agent");
    assert!(status.success(), "vmtrace agent exited with {status}");
    let requests = receiver.requests();
    let last = requests
        .iter()
        .rev()
        .find(|r| metric(r, "vmtrace.vmm.exits").is_some())
        .expect("an OTLP export with vmtrace.vmm.exits");
    for (tenant, count) in &expected {
        let exported = tenant_int(last, tenant, "vmtrace.vmm.exits", &[("exit.reason", "io")]);
        assert_eq!(
            exported,
            Some(i64::try_from(*count).unwrap()),
            "OTLP tenant {tenant:?}"
        );
    }
}
