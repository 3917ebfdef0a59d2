//! `vmtrace top` driven as a person would: in an 80x24 tmux terminal, with send-keys and
//! capture-pane, while reference VMMs run in three tenant cgroups.

use std::{
    process::{Command, Output, Stdio},
    time::Duration,
};

use vmtrace_tests::{
    TenantCgroup, binary, have, privileged_host, process::Proc, temp::TempDir, wait::poll,
};

/// A tmux server of our own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// A detached 80x24 session running a plain shell with a known prompt.
    fn start(name: &str) -> Self {
        let tmux = Self {
            socket: format!("vmtrace-test-{name}-{}", std::process::id()),
        };
        let out = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "80",
            "-y",
            "24",
            "env",
            "PS1=shell$ ",
            "TERM=xterm-256color",
            "bash",
            "--norc",
            "--noprofile",
        ]);
        assert!(
            out.status.success(),
            "tmux: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-u", "-L", &self.socket])
            .args(args)
            .output()
            .expect("running tmux")
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        assert!(self.run(&args).status.success());
    }

    /// Types text literally.
    fn type_text(&self, text: &str) {
        assert!(
            self.run(&["send-keys", "-t", "t", "-l", text])
                .status
                .success()
        );
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "t"]).stdout).into_owned()
    }

    fn alternate_screen(&self) -> bool {
        let out = self.run(&["display-message", "-p", "-t", "t", "#{alternate_on}"]);
        String::from_utf8_lossy(&out.stdout).trim() == "1"
    }

    /// Waits until `check` accepts the screen; panics with the last screen after `timeout`.
    fn wait_for(&self, what: &str, timeout: Duration, check: impl Fn(&str) -> bool) -> String {
        let mut screen = String::new();
        let seen = poll(timeout, || {
            screen = self.screen();
            check(&screen).then_some(())
        });
        assert!(
            seen.is_some(),
            "timed out waiting for {what}; the screen:\n{screen}"
        );
        screen
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn tmux_available(test: &str) -> bool {
    let found = Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    have(
        test,
        found,
        "tmux is missing (`cargo xtask setup` installs it)",
    )
}

/// The table rows, in screen order, as (tenant cell, exits/s value).
fn rows(screen: &str) -> Vec<(String, f64)> {
    screen
        .lines()
        .skip(2)
        .map(|l| l.trim_start_matches(['▶', ' ']))
        .take_while(|l| l.starts_with('…') || l.starts_with('/'))
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let tenant = fields.next()?.to_owned();
            Some((tenant, parse_rate(fields.next()?)?))
        })
        .collect()
}

fn parse_rate(text: &str) -> Option<f64> {
    let (number, scale) = match text.chars().last()? {
        'k' => (&text[..text.len() - 1], 1e3),
        'M' => (&text[..text.len() - 1], 1e6),
        _ => (text, 1.0),
    };
    number.parse::<f64>().ok().map(|v| v * scale)
}

fn order(screen: &str) -> Vec<char> {
    // Tenant cells end in tenant-a/-b/-c; their last letter names them.
    rows(screen)
        .iter()
        .filter_map(|(t, _)| t.chars().last())
        .collect()
}

/// Tenant rows appear with non-zero rates; sort keys reorder them; Enter drills into a tenant and
/// shows its kinds; `/` filters; `p` pauses; `?` shows help; `q` leaves the alternate screen and
/// gives the shell back; Ctrl-C does too.
#[test]
fn top_in_a_terminal_shows_sorts_drills_down_and_restores_the_terminal() {
    let test = "top_in_a_terminal_shows_sorts_drills_down_and_restores_the_terminal";
    if !privileged_host(test) || !tmux_available(test) {
        return;
    }
    let base = format!("vmtrace-test-top-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let tenants: Vec<TenantCgroup> = ["tenant-a", "tenant-b", "tenant-c"]
        .iter()
        .map(|t| TenantCgroup::new(&format!("{base}/{t}")))
        .collect();
    let vmtrace = binary("vmtrace");
    let vmm = binary("vmtrace-vmm");
    let tmux = Tmux::start("top");
    tmux.type_text("echo BEFORE-TOP");
    tmux.keys(&["Enter"]);
    // The filter keeps other tests' tenants (on a shared host) off the screen.
    tmux.type_text(&format!(
        "{} top --interval 500ms --filter {base}",
        vmtrace.display()
    ));
    tmux.keys(&["Enter"]);
    // The screen appears once the probes are attached: start the guests then, so that their
    // doorbells are seen being registered.
    tmux.wait_for("top's screen", Duration::from_mins(1), |s| {
        s.starts_with("vmtrace top · live")
    });
    assert!(tmux.alternate_screen(), "top runs on the alternate screen");
    // Exits/s: tenant-a ~1,000 (cpuid, paced), tenant-b ~2,000 (virtio: kicks in the kernel,
    // paced), tenant-c ~6,000 (pio, paced); each pacing step is one more exit to the VMM.
    let plan = [
        ("cpuid", "500", &tenants[0]),
        ("virtio", "1000", &tenants[1]),
        ("pio", "3000", &tenants[2]),
    ];
    // Killed on drop: they are paced to outlive the test.
    let _vmms: Vec<Proc> = plan
        .iter()
        .map(|(scenario, rate, cgroup)| {
            Proc::spawn(
                "vmtrace-vmm",
                Command::new(&vmm)
                    .args(["--scenario", scenario, "--rate", rate, "--count", "1000000"])
                    .args(["--cgroup", &cgroup.relative, "--quiet"])
                    .stdout(Stdio::null()),
            )
        })
        .collect();

    let screen = tmux.wait_for("three tenants with rates", Duration::from_secs(30), |s| {
        let r = rows(s);
        r.len() == 3 && r.iter().all(|(_, rate)| *rate > 100.0)
    });
    eprintln!("top at 80x24:\n{screen}");
    assert!(screen.lines().count() <= 24 && screen.lines().all(|l| l.chars().count() <= 80));
    let header = screen.lines().nth(1).unwrap();
    for title in [
        "TENANT",
        "EXITS/s",
        "TOP REASON",
        "P99",
        "KICKS/s",
        "TLB/s",
        "FLT/s",
        "TAX",
    ] {
        assert!(header.contains(title), "{title} in {header:?}");
    }
    assert_eq!(order(&screen), ['c', 'b', 'a'], "busiest first:\n{screen}");
    let b_row = screen.lines().find(|l| l.contains("tenant-b ")).unwrap();
    let kicks = b_row
        .split_whitespace()
        .nth(if b_row.starts_with('▶') { 5 } else { 4 });
    assert!(
        kicks.and_then(parse_rate).is_some_and(|k| k > 100.0),
        "tenant-b's virtio kicks/s: {b_row:?}"
    );

    // Sort by tenant name (key 1), then reverse (r).
    tmux.keys(&["1"]);
    tmux.wait_for("sorted by tenant", Duration::from_secs(5), |s| {
        order(s) == ['a', 'b', 'c']
    });
    tmux.keys(&["r"]);
    let screen = tmux.wait_for("reversed", Duration::from_secs(5), |s| {
        order(s) == ['c', 'b', 'a']
    });
    assert!(
        screen.lines().next().unwrap().contains("sort TENANT ▼"),
        "{screen}"
    );
    tmux.keys(&["r"]);
    tmux.wait_for("sorted by tenant", Duration::from_secs(5), |s| {
        order(s) == ['a', 'b', 'c']
    });

    // Drill down into the highlighted (first) tenant: tenant-a, a cpuid guest.
    tmux.keys(&["Enter"]);
    let detail = tmux.wait_for("tenant-a's detail", Duration::from_secs(5), |s| {
        s.contains("KIND") && s.contains("cpuid")
    });
    eprintln!("drill-down at 80x24:\n{detail}");
    let title = detail.lines().nth(1).unwrap();
    assert!(title.starts_with(&tenants[0].agent_path()), "{detail}");
    assert!(
        detail.contains("exit.io") && detail.contains("VMM service"),
        "{detail}"
    );
    // Back to the table. Each key waits for its screen: an Escape followed at once by another
    // key reads as Alt+key, as in any terminal.
    tmux.keys(&["Escape"]);
    tmux.wait_for("the table", Duration::from_secs(5), |s| order(s).len() == 3);
    tmux.keys(&["j", "Enter"]);
    let detail = tmux.wait_for("tenant-b's detail", Duration::from_secs(5), |s| {
        s.lines().nth(1).is_some_and(|l| l.contains("tenant-b"))
    });
    assert!(
        detail.contains("kick.q0") && detail.contains("virtio kicks per queue"),
        "{detail}"
    );
    tmux.keys(&["BSpace"]);
    tmux.wait_for("the table", Duration::from_secs(5), |s| order(s).len() == 3);

    // Filter by name (a new filter replaces --filter; ours stays specific to this test's tenants).
    tmux.keys(&["/"]);
    tmux.type_text(&format!("{base}/TENANT-B"));
    tmux.keys(&["Enter"]);
    tmux.wait_for("only tenant-b", Duration::from_secs(5), |s| {
        order(s) == ['b']
    });
    tmux.keys(&["/"]);
    tmux.type_text(&base);
    tmux.keys(&["Enter"]);
    tmux.wait_for("all tenants again", Duration::from_secs(5), |s| {
        order(s).len() == 3
    });

    // Pause and resume; help.
    tmux.keys(&["p"]);
    tmux.wait_for("paused", Duration::from_secs(5), |s| {
        s.lines().next().unwrap_or("").contains("PAUSED")
    });
    tmux.keys(&["Space"]);
    tmux.wait_for("resumed", Duration::from_secs(5), |s| {
        !s.lines().next().unwrap_or("").contains("PAUSED")
    });
    tmux.keys(&["?"]);
    tmux.wait_for("help", Duration::from_secs(5), |s| {
        s.contains("vmtrace top: keys")
    });
    tmux.keys(&["x"]);
    tmux.wait_for("help closed", Duration::from_secs(5), |s| {
        !s.contains("vmtrace top: keys")
    });

    // q restores the terminal: the alternate screen is left and the shell is back.
    tmux.keys(&["q"]);
    let shell = tmux.wait_for("the shell", Duration::from_secs(10), |s| {
        s.lines().any(|l| l == "BEFORE-TOP") && s.trim_end().ends_with("shell$")
    });
    assert!(!tmux.alternate_screen(), "alternate screen left:\n{shell}");
    assert!(!shell.contains("TENANT"), "top's screen is gone:\n{shell}");

    // Ctrl-C restores it too, and so does SIGTERM from outside.
    for (how, keys) in [("Ctrl-C", "C-c"), ("SIGTERM", "")] {
        tmux.type_text(&format!("{} top --filter {base}", vmtrace.display()));
        tmux.keys(&["Enter"]);
        tmux.wait_for("top again", Duration::from_mins(1), |s| {
            s.starts_with("vmtrace top")
        });
        if keys.is_empty() {
            // top is the only child of the pane's shell.
            let out = tmux.run(&["display-message", "-p", "-t", "t", "#{pane_pid}"]);
            let shell = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
                .expect("the shell's children");
            let top: i32 = children
                .split_whitespace()
                .next()
                .expect("top's pid")
                .parse()
                .unwrap();
            // SAFETY: kill has no memory-safety preconditions; the pid is the top we started.
            let signalled = unsafe { libc::kill(top, libc::SIGTERM) };
            assert_eq!(signalled, 0, "signalled top");
        } else {
            tmux.keys(&[keys]);
        }
        tmux.wait_for(
            &format!("the shell after {how}"),
            Duration::from_secs(10),
            |s| !s.contains("TENANT") && s.trim_end().ends_with("shell$"),
        );
        assert!(
            !tmux.alternate_screen(),
            "alternate screen left after {how}"
        );
    }

    // An error while running (a bad line in a recording) restores it too, and says what failed.
    let dir = TempDir::new("top-bad");
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        concat!(
            r#"{"format":"vmtrace-recording","version":1,"kvm":"pvm","exit_source":"derived","started":"x","started_unix":0,"interval_secs":1}"#,
            "\n",
            r#"{"timestamp":1.0,"elapsed_secs":1.0,"interval_secs":1.0,"kvm":"pvm","exit_source":"derived","tenants":[],"drops":{}}"#,
            "\nnot a sample\n"
        ),
    )
    .unwrap();
    tmux.type_text(&format!(
        "clear; {} top --no-delay --replay {}",
        vmtrace.display(),
        bad.display()
    ));
    tmux.keys(&["Enter"]);
    let shell = tmux.wait_for("the error on the shell", Duration::from_secs(10), |s| {
        s.contains("line 3: not a sample") && s.trim_end().ends_with("shell$")
    });
    assert!(
        !tmux.alternate_screen(),
        "alternate screen left after an error:\n{shell}"
    );
}

/// Batch mode prints plain frames without a terminal: `-n` of them, no escape sequences.
#[test]
fn top_batch_mode_prints_n_plain_frames() {
    if !privileged_host("top_batch_mode_prints_n_plain_frames") {
        return;
    }
    let out = Command::new(binary("vmtrace"))
        .args(["top", "-b", "-n", "2", "--interval", "200ms"])
        .output()
        .expect("vmtrace top -b");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    assert_eq!(text.matches("vmtrace top · live").count(), 2, "{text}");
    assert_eq!(text.matches("TENANT").count(), 2, "{text}");
    assert!(!text.contains('\x1b'), "no escape sequences:\n{text}");
}
