//! The Prometheus endpoint over TLS with client certificates and basic auth (`--web-config`),
//! with certificates made here by openssl: a real Prometheus scrapes it with its `tls_config` and
//! `basic_auth` and reads the reference VMM's exits exactly; a client without a certificate, without
//! credentials or with wrong ones, or speaking plain HTTP, gets nothing; `/healthz` and `/readyz`
//! answer without credentials.

use std::{fs, path::Path, process::Command, process::Stdio, time::Duration};

use vmtrace_tests::otlp_receiver::make_certificates;

use vmtrace_tests::{
    TenantCgroup, binary, expected_agent_counts, free_port, have, on_path, privileged_host,
    process::Proc,
    prometheus::{Prometheus, describe_result},
    run_vmm,
    temp::TempDir,
    wait::poll,
};

const PASSWORD: &str = "scrape-s3cret";

/// curl's HTTP status for `url` with `args` (0 when it got no HTTP answer at all).
fn curl(dir: &Path, url: &str, args: &[&str]) -> u32 {
    let output = Command::new("curl")
        .args([
            "--silent",
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_code}",
        ])
        .args(["--max-time", "10"])
        .args(args)
        .arg(url)
        .current_dir(dir)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn prometheus_scrapes_over_tls_with_a_client_certificate_and_basic_auth() {
    let test = "prometheus_scrapes_over_tls_with_a_client_certificate_and_basic_auth";
    if !privileged_host(test) {
        return;
    }
    for tool in ["openssl", "curl", "prometheus"] {
        if !have(
            test,
            on_path(tool),
            &format!("{tool} missing (`cargo xtask setup`)"),
        ) {
            return;
        }
    }
    let dir = TempDir::new("web-tls");
    make_certificates(dir.path());
    let hash = bcrypt::hash(PASSWORD, 6).unwrap();
    let web_config = dir.join("web.toml");
    fs::write(
        &web_config,
        format!(
            "[tls_server_config]\ncert_file = \"{0}/server.crt\"\nkey_file = \"{0}/server.key\"\n\
             client_ca_file = \"{0}/ca.crt\"\n\n[basic_auth_users]\nprometheus = \"{hash}\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let port = free_port();
    let _agent = Proc::spawn(
        "vmtrace agent",
        Command::new(binary("vmtrace"))
            .args(["agent", "--interval", "200ms", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--web-config")
            .arg(&web_config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );
    let base = format!("https://127.0.0.1:{port}");
    let with_cert = [
        "--cacert",
        "ca.crt",
        "--cert",
        "client.crt",
        "--key",
        "client.key",
    ];
    let ready = poll(Duration::from_mins(1), || {
        (curl(dir.path(), &format!("{base}/readyz"), &with_cert) == 200).then_some(())
    });
    assert!(
        ready.is_some(),
        "/readyz over TLS, without credentials, not 200"
    );
    let credentials = format!("prometheus:{PASSWORD}");
    let authorised = [&with_cert[..], &["--user", &credentials]].concat();
    let wrong = [&with_cert[..], &["--user", "prometheus:guess"]].concat();
    let url = format!("{base}/metrics");
    assert_eq!(
        curl(dir.path(), &url, &authorised),
        200,
        "cert and password"
    );
    assert_eq!(curl(dir.path(), &url, &with_cert), 401, "no credentials");
    assert_eq!(curl(dir.path(), &url, &wrong), 401, "a wrong password");
    assert_eq!(
        curl(dir.path(), &format!("{base}/api/timeline"), &wrong),
        401,
        "the timeline is guarded too"
    );
    assert_eq!(
        curl(dir.path(), &format!("{base}/healthz"), &with_cert),
        200,
        "/healthz needs no credentials"
    );
    let no_cert = [
        "--cacert",
        "ca.crt",
        "--user",
        &format!("prometheus:{PASSWORD}"),
    ];
    assert_eq!(
        curl(dir.path(), &url, &no_cert),
        0,
        "no client certificate: no answer"
    );
    assert_eq!(
        curl(dir.path(), &format!("http://127.0.0.1:{port}/metrics"), &[]),
        0,
        "plain HTTP: no answer"
    );

    // A real Prometheus, configured as a scrape job with TLS and basic auth would be.
    let tenant = TenantCgroup::new(&format!("vmtrace-web-tls-{}", std::process::id()));
    let report = run_vmm(&[
        "--scenario",
        "pio",
        "--count",
        "1500",
        "--cgroup",
        &tenant.relative,
    ]);
    let job = format!(
        "  - job_name: vmtrace\n    scheme: https\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n    \
         tls_config:\n      ca_file: {0}/ca.crt\n      cert_file: {0}/client.crt\n      key_file: {0}/client.key\n    \
         basic_auth:\n      username: prometheus\n      password: {PASSWORD}\n",
        dir.path().display()
    );
    let prometheus = Prometheus::start(dir.path(), &job);
    let expr = format!(
        "sum(vmtrace_vm_exits_total{{tenant=\"{}\",exit_reason=\"io\"}})",
        tenant.agent_path()
    );
    let expected = expected_agent_counts(&[report])["exit.io"] as f64;
    let mut last = String::new();
    let counted = poll(Duration::from_secs(30), || {
        let up = prometheus.query("up{job=\"vmtrace\"}").ok()?;
        last = format!("up: {}", describe_result(&up).unwrap_or_default());
        let value = prometheus.query(&expr).ok()?;
        let value = value["result"][0]["value"][1]
            .as_str()?
            .parse::<f64>()
            .ok()?;
        last = format!("{last}; {expr} = {value}");
        (value == expected).then_some(())
    });
    assert!(
        counted.is_some(),
        "Prometheus did not read {expected} io exits over TLS: {last}\n{}",
        prometheus.log_tail()
    );
    eprintln!("over TLS with a client certificate and basic auth: {expr} = {expected}");
}
