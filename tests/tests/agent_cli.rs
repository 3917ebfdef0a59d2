//! The agent's command line: doctor on this host, and clear errors for bad input.

use std::process::Command;

use vmtrace_tests::{binary, privileged_host};

#[test]
fn doctor_reports_this_hosts_kvm_flavour_and_exit_source() {
    if !privileged_host("doctor_reports_this_hosts_kvm_flavour_and_exit_source") {
        return;
    }
    let output = Command::new(binary("vmtrace"))
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "doctor failed here: {stderr}");
    let diagnosis: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // What the host says, read independently of the agent.
    let module = |name: &str| std::path::Path::new("/sys/module").join(name).exists();
    let expected = if module("kvm_intel") {
        "vmx"
    } else if module("kvm_amd") {
        "svm"
    } else {
        assert!(
            module("kvm_pvm"),
            "a KVM host without kvm_intel, kvm_amd or kvm_pvm"
        );
        "pvm"
    };
    assert_eq!(diagnosis["kvm"]["flavour"], expected);
    let (source, kvm_exit_word) = if expected == "pvm" {
        ("derived", "silent")
    } else {
        ("kvm_exit", "fires")
    };
    assert_eq!(diagnosis["exit_source"], source);
    assert!(
        diagnosis["kvm_exit"]
            .as_str()
            .unwrap()
            .contains(kvm_exit_word),
        "{diagnosis}"
    );
    let probes = diagnosis["probes"].as_array().unwrap();
    for raw in [
        "kvm:kvm_userspace_exit",
        "kvm:kvm_pio",
        "kvm:kvm_mmio",
        "kvm:kvm_cpuid",
    ] {
        let probe = probes
            .iter()
            .find(|p| p["tracepoint"] == raw)
            .unwrap_or_else(|| panic!("{raw} missing"));
        assert!(probe["error"].is_null(), "{raw} did not attach: {probe}");
    }
    assert_eq!(diagnosis["blockers"].as_array().unwrap().len(), 0);

    let text = Command::new(binary("vmtrace"))
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&expected.to_uppercase()), "{text}");
    assert!(
        text.contains("ready: vmtrace can run on this host"),
        "{text}"
    );
}

#[test]
fn bad_flags_and_values_get_one_clear_error() {
    for (args, needle) in [
        (&["watch", "--bogus"][..], "unexpected argument '--bogus'"),
        (&["watch", "--interval", "1ms"][..], "at least 10ms"),
        (&["watch", "--duration", "soon"][..], "invalid value 'soon'"),
        (&["frobnicate"][..], "unrecognized subcommand"),
        (
            &["agent", "--prometheus-bucket-factor", "3"][..],
            "give a power of two from 2",
        ),
    ] {
        let output = Command::new(binary("vmtrace")).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn help_lists_every_command_and_flag() {
    let output = Command::new(binary("vmtrace"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for word in ["doctor", "watch"] {
        assert!(help.contains(word), "{help}");
    }
    let output = Command::new(binary("vmtrace"))
        .args(["watch", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in ["--interval", "--duration", "--json", "mmio.write.kernel"] {
        assert!(help.contains(flag), "{help}");
    }
}

#[test]
fn without_privileges_the_agent_says_what_to_do() {
    if !privileged_host("without_privileges_the_agent_says_what_to_do") {
        return;
    }
    // Drop to an unprivileged user: the agent must refuse with advice, not panic.
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(binary("vmtrace"))
        .args(["watch", "--duration", "1s"])
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("vmtrace: error:") && stderr.contains("CAP_BPF"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Arguments, environment, and what the error must say.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn zero_and_absurd_agent_durations_are_refused_with_one_line() {
    let dir = vmtrace_tests::temp::TempDir::new("agent-durations");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "interval = \"0\"\n").unwrap();
    let config = config.to_str().unwrap();
    let cases: [Case; 8] = [
        (&["--interval", "0"], &[], "'--interval <INTERVAL>'"),
        (&["--interval", "2h"], &[], "at most 1h"),
        (&[], &[("VMTRACE_INTERVAL", "0")], "at least 10ms"),
        (&["--window", "0"], &[], "'--window <WINDOW>'"),
        (&["--window", "7days"], &[], "at most 1day"),
        (
            &["--interval", "10s", "--window", "5s"],
            &[],
            "shorter than the interval",
        ),
        (&["--config", config], &[], "agent.toml"),
        (
            &["--otlp-endpoint", "http://127.0.0.1:1"],
            &[("OTEL_METRIC_EXPORT_INTERVAL", "0")],
            "OTEL_METRIC_EXPORT_INTERVAL = 0: the OTLP export interval must be from 100 to",
        ),
    ];
    for (args, env, needle) in cases {
        let output = Command::new(binary("vmtrace"))
            .arg("agent")
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let what = format!("{args:?} {env:?}");
        assert!(!output.status.success(), "{what}: {stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        assert!(stderr.contains(needle), "{what}: {stderr}");
        // One line says what is wrong; clap adds only its pointer to --help.
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("For more information"))
            .collect();
        assert_eq!(lines.len(), 1, "{what}: {stderr}");
        assert!(
            lines[0].starts_with("error:") || lines[0].starts_with("vmtrace: error:"),
            "{what}: {stderr}"
        );
    }
}

/// Exit codes of `vmtrace` (docs/configuration.md, "Exit codes"): bad settings are 2, as clap's bad
/// flags are; a file that does not read as a recording is 3; other failures are 1. Each says so in
/// exactly one `vmtrace: error:` line, without a panic.
#[test]
fn malformed_configuration_and_recordings_get_one_error_line_and_their_exit_code() {
    let dir = vmtrace_tests::temp::TempDir::new("malformed-input");
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let unterminated = file("unterminated.toml", "interval = \"1s\n");
    let unknown_key = file(
        "unknown-key.toml",
        "[otlp]\nendpoint = \"http://c:4317\"\nretries = 3\n",
    );
    let wrong_type = file("wrong-type.toml", "listen = 9464\n");
    let not_a_certificate = file("not-a-certificate.pem", "hello\n");
    let bad_ca = file(
        "bad-ca.toml",
        &format!("[otlp]\nendpoint = \"https://c:4317\"\ncertificate = \"{not_a_certificate}\"\n"),
    );
    let missing_config = dir.path().join("missing.toml").to_str().unwrap().to_owned();
    let header = "{\"format\":\"vmtrace-recording\",\"version\":1,\"vmtrace_version\":\"0.1.0\",\
                  \"host\":\"h\",\"kernel\":\"6.18\",\"kvm\":\"pvm\",\"exit_source\":\"derived\",\
                  \"started\":\"2026-12-03T06:18:14Z\",\"started_unix\":1796278694.2,\
                  \"interval_secs\":1.0,\"kick_latency\":false}\n";
    let not_json = file("not-json.jsonl", "hello\nworld\n");
    let newer = file(
        "newer.jsonl",
        &header.replace("\"version\":1", "\"version\":99"),
    );
    let bad_sample = file(
        "bad-sample.jsonl",
        &format!("{header}{{\"timestamp\": \"soon\"}}\n"),
    );
    let binary_garbage = dir.path().join("garbage.jsonl");
    std::fs::write(&binary_garbage, [0xff, 0xfe, 0x00, b'\n', 0x80]).unwrap();
    let binary_garbage = binary_garbage.to_str().unwrap().to_owned();
    let missing_recording = dir
        .path()
        .join("missing.jsonl")
        .to_str()
        .unwrap()
        .to_owned();
    let cases: [(Vec<&str>, i32, &str); 13] = [
        (
            vec!["agent", "--config", &bad_ca],
            2,
            "OTEL_EXPORTER_OTLP_CERTIFICATE: ",
        ),
        (
            vec!["agent", "--config", &unterminated],
            2,
            "unterminated.toml, line 1",
        ),
        (
            vec!["agent", "--config", &unknown_key],
            2,
            "unknown-key.toml, line 3",
        ),
        (
            vec!["agent", "--config", &wrong_type],
            2,
            "wrong-type.toml, line 1",
        ),
        (
            vec!["agent", "--config", &missing_config],
            2,
            "cannot read the configuration file",
        ),
        (
            vec!["replay", "--no-delay", &not_json],
            3,
            "is not a vmtrace recording",
        ),
        (
            vec!["replay", "--no-delay", &newer],
            3,
            "is a version 99 recording",
        ),
        (
            vec!["replay", "--no-delay", &bad_sample],
            3,
            "bad-sample.jsonl, line 2: not a sample",
        ),
        (
            vec!["replay", "--no-delay", &binary_garbage],
            3,
            "garbage.jsonl",
        ),
        (
            vec!["replay", "--no-delay", &missing_recording],
            1,
            "cannot read",
        ),
        (
            vec!["report", "--output", "out", &not_json],
            3,
            "is not a vmtrace recording",
        ),
        (
            vec!["report", "--output", "out", &bad_sample],
            3,
            "line 2: not a sample",
        ),
        (
            vec!["report", "--output", "out", &missing_recording],
            1,
            "cannot read",
        ),
    ];
    for (args, code, needle) in cases {
        let output = Command::new(binary("vmtrace"))
            .args(&args)
            .current_dir(dir.path())
            .env_remove("VMTRACE_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("vmtrace: error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
        assert!(errors[0].contains(needle), "{args:?}: {stderr}");
        // Nothing follows the error line: no backtrace, no source quoted over several lines.
        assert!(stderr.trim_end().ends_with(errors[0]), "{args:?}: {stderr}");
    }
}

#[test]
fn completions_man_pages_and_the_version_are_generated() {
    let vmtrace = binary("vmtrace");
    let run = |args: &[&str]| {
        let output = Command::new(&vmtrace).args(args).output().unwrap();
        assert!(
            output.status.success(),
            "vmtrace {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let commands = [
        "doctor", "watch", "agent", "top", "record", "replay", "report",
    ];
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]);
        for command in commands {
            assert!(
                script.contains(command),
                "{shell} completions lack {command}"
            );
        }
        assert!(script.contains("web-config"), "{shell}: the agent's flags");
    }
    let page = run(&["man"]);
    assert!(
        page.starts_with(".ie") || page.contains(".TH vmtrace 1"),
        "{page}"
    );
    for command in commands {
        assert!(page.contains(command), "vmtrace(1) lists {command}");
        let sub = run(&["man", command]);
        assert!(
            sub.contains(&format!(".TH vmtrace\\-{command} 1"))
                || sub.contains(&format!(".TH vmtrace-{command} 1")),
            "{sub}"
        );
    }
    let refused = Command::new(&vmtrace)
        .args(["man", "nope"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("one of doctor, watch, agent"));
    let version = run(&["--version"]);
    assert!(
        version.starts_with(&format!("vmtrace {}", env!("CARGO_PKG_VERSION")))
            && version.contains("BPF programs built with: rustc ")
            && version.contains("bpf-linker "),
        "{version}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    if !privileged_host("json_logs_are_one_object_per_line") {
        return;
    }
    let port = vmtrace_tests::free_port();
    let agent = Command::new(binary("vmtrace"))
        .args([
            "--log-format",
            "json",
            "agent",
            "--state-dir",
            "off",
            "--listen",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    vmtrace_tests::wait::wait_for(
        "the agent to be ready",
        std::time::Duration::from_mins(1),
        || matches!(vmtrace_tests::http_get(port, "/readyz"), Ok((200, _))).then_some(()),
    );
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let output = agent.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() >= 3, "{stderr}");
    for line in &lines {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            event["level"].is_string() && event["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("vmtrace agent: watching")),
        "the status lines are JSON too: {stderr}"
    );
}
