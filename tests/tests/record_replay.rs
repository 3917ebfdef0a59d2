//! `vmtrace record` → `vmtrace replay`: a recording of real guests replays the recorded per-tenant
//! counts exactly, a recording from another host replays here, and bad files get one clear error.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use serde_json::{Value, json};
use vmtrace_tests::{
    TenantCgroup, agent_counts, agent_report, binary, expect, expected_agent_counts,
    privileged_host, process::Proc, run_vmm, temp::TempDir,
};

/// A running `vmtrace record`, stopped with SIGINT by [`Recorder::stop`], killed on drop.
struct Recorder {
    process: Proc,
}

impl Recorder {
    fn start(path: &Path) -> Self {
        let mut process = Proc::spawn(
            "vmtrace record",
            Command::new(binary("vmtrace"))
                .args(["record", "--interval", "200ms", "-o"])
                .arg(path)
                .stderr(Stdio::piped()),
        );
        let (tx, rx) = mpsc::channel();
        let stderr = process.child.stderr.take().expect("stderr");
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[vmtrace record] {line}");
                let _ = tx.send(line);
            }
        });
        loop {
            match rx.recv_timeout(Duration::from_mins(1)) {
                Ok(line) if line.starts_with("vmtrace: recording to") => return Self { process },
                Ok(_) => {}
                // The process is killed as it is dropped.
                Err(e) => panic!("vmtrace record did not start ({e}); its stderr is above"),
            }
        }
    }

    fn stop(mut self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(self.process.id() as i32, libc::SIGINT) };
        let status = self
            .process
            .child
            .wait()
            .expect("waiting for vmtrace record");
        assert!(status.success(), "vmtrace record exited with {status}");
    }
}

fn vmtrace(args: &[&str]) -> std::process::Output {
    Command::new(binary("vmtrace"))
        .args(args)
        .output()
        .expect("running vmtrace")
}

fn json_lines(text: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(text)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// Two tenants' guests run while `vmtrace record` records; the file has a versioned header, its
/// last sample holds the VMMs' ground truth, and `vmtrace replay --json` gives back every recorded
/// sample exactly, so the replayed per-tenant counts equal the recorded ones and the ground truth.
#[test]
fn replay_reproduces_the_recorded_per_tenant_counts_exactly() {
    if !privileged_host("replay_reproduces_the_recorded_per_tenant_counts_exactly") {
        return;
    }
    let base = format!("vmtrace-test-record-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let a = TenantCgroup::new(&format!("{base}/tenant-a"));
    let b = TenantCgroup::new(&format!("{base}/tenant-b"));
    let dir = TempDir::new("record");
    let file = dir.join("recording.jsonl");

    let recorder = Recorder::start(&file);
    let (ra, rb) = thread::scope(|s| {
        let ra = s.spawn(|| {
            run_vmm(&[
                "--scenario",
                "pio",
                "--vcpus",
                "2",
                "--count",
                "6000",
                "--cgroup",
                &a.relative,
            ])
        });
        let rb = s.spawn(|| {
            run_vmm(&[
                "--scenario",
                "doorbell",
                "--count",
                "8000",
                "--cgroup",
                &b.relative,
            ])
        });
        (ra.join().expect("VMM a"), rb.join().expect("VMM b"))
    });
    // One more interval so that the last sample holds every event.
    thread::sleep(Duration::from_millis(500));
    recorder.stop();

    let text = std::fs::read_to_string(&file).expect("reading the recording");
    let mut lines = text.lines();
    let header: Value = serde_json::from_str(lines.next().expect("header")).expect("header JSON");
    assert_eq!(header["format"], "vmtrace-recording");
    assert_eq!(header["version"], 1);
    assert_eq!(header["kvm"], "pvm");
    assert!(header["host"].as_str().is_some_and(|h| !h.is_empty()));
    assert_eq!(header["interval_secs"], 0.2);
    // The default probes: kicks inferred, not learnt from the VMMs' ioctls, and no VMM service time.
    assert_eq!(header["vm_ioctls"], false);
    assert_eq!(header["service_time"], false);
    let recorded: Vec<Value> = lines
        .map(|l| serde_json::from_str(l).expect("sample JSON"))
        .collect();
    assert!(recorded.len() >= 3, "{} samples", recorded.len());
    let last = recorded.last().unwrap();
    assert_eq!(
        last["last"], true,
        "the sample taken on SIGINT is marked last"
    );
    for (cgroup, report) in [(&a, &ra), (&b, &rb)] {
        let tenant = agent_report(last, &cgroup.agent_path()).expect("tenant in the recording");
        let service_times: Vec<&String> = tenant["latency"]
            .as_object()
            .into_iter()
            .flat_map(|latency| latency.keys())
            .filter(|kind| kind.starts_with("exit."))
            .collect();
        assert!(
            service_times.is_empty(),
            "service times without --service-time: {service_times:?}"
        );
        let expected = expected_agent_counts(std::slice::from_ref(report));
        assert_eq!(
            agent_counts(last, &cgroup.agent_path()).expect("tenant in the recording"),
            expected,
            "recorded counts of {} equal the VMM's ground truth",
            cgroup.agent_path()
        );
    }
    let (ra, rb) = ([ra], [rb]);
    expect::assert_tenants(
        last,
        &format!("/{base}"),
        &[(a.agent_path(), &ra[..]), (b.agent_path(), &rb[..])],
    );

    let path = file.to_str().unwrap();
    let out = vmtrace(&["replay", path, "--json", "--no-delay"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replayed = json_lines(&out.stdout);
    assert_eq!(
        replayed, recorded,
        "replay --json gives back every recorded sample"
    );
    // Byte for byte, too: floats survive the round trip.
    let recorded_text: Vec<&str> = text.lines().skip(1).collect();
    let replayed_text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(replayed_text.lines().collect::<Vec<_>>(), recorded_text);
    for (sample_r, sample_p) in recorded.iter().zip(&replayed) {
        for cgroup in [&a, &b] {
            assert_eq!(
                agent_counts(sample_p, &cgroup.agent_path()),
                agent_counts(sample_r, &cgroup.agent_path())
            );
        }
    }

    let table = vmtrace(&["replay", path, "--table", "--no-delay"]);
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&a.agent_path()) && table.contains(&b.agent_path()),
        "{table}"
    );
    assert!(
        table.contains("· final"),
        "the last sample is marked final:\n{table}"
    );
}

/// A hand-made recording from a VMX host (other kernel, exit source kvm_exit, reasons named as
/// that host names them) replays here unchanged, in every view.
#[test]
fn a_recording_from_another_host_replays_here() {
    let dir = TempDir::new("foreign-recording");
    let file = dir.join("foreign.jsonl");
    let header = json!({
        "format": "vmtrace-recording", "version": 1, "vmtrace_version": "0.1.0",
        "host": "other-host.example", "kernel": "5.15.0-generic", "kvm": "vmx",
        "exit_source": "kvm_exit", "started": "2025-01-02T03:04:05Z",
        "started_unix": 1735787045.0, "interval_secs": 1.0, "kick_latency": false,
        "some_future_field": {"ignored": true}
    });
    let samples: Vec<Value> = (1..=3)
        .map(|i| {
            json!({
                "timestamp": 1735787045.0 + f64::from(i), "elapsed_secs": f64::from(i),
                "interval_secs": 1.0, "kvm": "vmx", "exit_source": "kvm_exit",
                "drops": {}, "last": i == 3,
                "tenants": [{
                    "tenant": "vm/web", "identity": {"kind": "libvirt_vm", "name": "web"},
                    "cgroups": [{"id": 4242, "path": "/machine.slice/machine-qemu\\x2d1\\x2dweb.scope"}],
                    "counts": {"kvm_exit.EPT_VIOLATION": 1000 * i, "kvm_exit.HLT": 10 * i},
                    "rates": {"kvm_exit.EPT_VIOLATION": 1000.0, "kvm_exit.HLT": 10.0},
                    "latency": {"kvm_exit.EPT_VIOLATION": {"count": 1000 * i, "sum_ns": 900_000 * i, "mean_ns": 900,
                        "p50_ns": 1023, "p90_ns": 1023, "p99_ns": 2047, "max_ns": 1500,
                        "buckets": [[512, 990 * i], [1024, 10 * i]]}}
                }]
            })
        })
        .collect();
    let mut text = serde_json::to_string(&header).unwrap() + "\n";
    for s in &samples {
        text += &(serde_json::to_string(s).unwrap() + "\n");
    }
    std::fs::write(&file, &text).unwrap();
    let path = file.to_str().unwrap();

    let out = vmtrace(&["replay", path, "--json", "--no-delay"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("recorded on other-host.example"),
        "{stderr}"
    );
    let replayed = json_lines(&out.stdout);
    assert_eq!(replayed.len(), 3);
    for (r, s) in replayed.iter().zip(&samples) {
        assert_eq!(r["tenants"][0]["counts"], s["tenants"][0]["counts"]);
        assert_eq!(r["tenants"][0]["latency"], s["tenants"][0]["latency"]);
    }

    let out = vmtrace(&["top", "-b", "--replay", path, "--no-delay"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frames = String::from_utf8_lossy(&out.stdout);
    let last = frames.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("vmtrace top · replay "), "{last}");
    assert!(last.contains("VMX kvm_exit"), "{last}");
    let row = last
        .lines()
        .find(|l| l.starts_with("vm/web"))
        .expect("tenant row");
    assert!(
        row.contains("1.01k") && row.contains("EPT_VIOLATION") && row.contains("2.05µs"),
        "{row}"
    );

    // Paced replay waits the recorded second between samples, divided by the speed.
    let started = std::time::Instant::now();
    let out = vmtrace(&["replay", path, "--json", "--speed", "4"]);
    assert!(out.status.success());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450),
        "2 gaps of 1 s at 4x: {took:?}"
    );
}

/// Files that are not recordings, or of a newer version, are refused with one clear line.
#[test]
fn bad_recordings_get_one_clear_error() {
    let dir = TempDir::new("bad-recording");
    let file = dir.join("bad.jsonl");
    let path = file.to_str().unwrap();
    let cases = [
        (
            r#"{"format":"vmtrace-recording","version":99}"#.to_owned(),
            "is a version 99 recording; this vmtrace reads versions 1 to 1",
        ),
        (
            "PK\u{3}\u{4} not json".to_owned(),
            "is not a vmtrace recording",
        ),
        (String::new(), "is empty"),
        (
            format!(
                "{}\n{{\"timestamp\": \"yesterday\"}}\n",
                r#"{"format":"vmtrace-recording","version":1,"kvm":"pvm","exit_source":"derived","started":"x","started_unix":0,"interval_secs":1}"#
            ),
            "line 2: not a sample",
        ),
    ];
    for (content, message) in cases {
        std::fs::write(&file, content).unwrap();
        for command in [
            vec!["replay", path],
            vec!["top", "-b", "--replay", path],
            vec!["report", path, "-o", "/nonexistent-vmtrace-report"],
        ] {
            let out = vmtrace(&command);
            assert!(!out.status.success(), "{command:?} accepted a bad file");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
            assert_eq!(errors.len(), 1, "{command:?}: {stderr}");
            assert!(errors[0].contains(message), "{command:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
    let missing = vmtrace(&["replay", "/nonexistent/recording.jsonl"]);
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("cannot read /nonexistent/recording.jsonl")
    );
}
