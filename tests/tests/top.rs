//! `vmtrace top` driven as a person would: in an 80x24 tmux terminal (made taller to read every
//! kind of a tenant), with send-keys and capture-pane, while reference VMMs run in three tenant
//! cgroups; its rates and counts are compared with the VMMs' reports.

use std::{
    collections::BTreeMap,
    io::Read,
    process::{Command, Output, Stdio},
    time::Duration,
};

use vmtrace_tests::{
    TenantCgroup, binary,
    expect::{Expectation, HostKvm, is_exit_without_kvm_exit, is_guest_side, is_kick},
    expected_agent_counts, have, privileged_host,
    process::Proc,
    temp::TempDir,
    wait::{poll, wait_for},
};
use vmtrace_vmm::Report;

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

/// The table rows, in screen order: the tenant cell and the cells after it (EXITS/s, TOP REASON,
/// P99, KICKS/s, ...).
fn table(screen: &str) -> Vec<(String, Vec<String>)> {
    screen
        .lines()
        .skip(2)
        .map(|l| l.trim_start_matches(['▶', ' ']))
        .take_while(|l| l.starts_with('…') || l.starts_with('/'))
        .filter_map(|l| {
            let mut fields = l.split_whitespace().map(str::to_owned);
            let tenant = fields.next()?;
            Some((tenant, fields.collect()))
        })
        .collect()
}

/// The table rows, in screen order, as (tenant cell, exits/s value).
fn rows(screen: &str) -> Vec<(String, f64)> {
    table(screen)
        .into_iter()
        .filter_map(|(tenant, cells)| Some((tenant, parse_rate(cells.first()?)?)))
        .collect()
}

fn parse_rate(text: &str) -> Option<f64> {
    let (number, scale) = rate_parts(text)?;
    number.parse::<f64>().ok().map(|v| v * scale)
}

fn rate_parts(text: &str) -> Option<(&str, f64)> {
    Some(match text.chars().last()? {
        'k' => (&text[..text.len() - 1], 1e3),
        'M' => (&text[..text.len() - 1], 1e6),
        _ => (text, 1.0),
    })
}

/// Half a unit of the last digit a rate cell shows: how far `top`'s three significant digits
/// (`1.00k`, `987`, `12.3`) may be from the rate it rounded.
fn display_rounding(text: &str) -> f64 {
    let (number, scale) = rate_parts(text).unwrap_or((text, 1.0));
    let decimals = number.split_once('.').map_or(0, |(_, d)| d.len());
    0.5 * scale / 10f64.powi(decimals as i32)
}

fn order(screen: &str) -> Vec<char> {
    // Tenant cells end in tenant-a/-b/-c; their last letter names them.
    rows(screen)
        .iter()
        .filter_map(|(t, _)| t.chars().last())
        .collect()
}

/// The kinds table of a detail screen, as (kind cell, COUNT cell). It is the left part of the rows
/// beside the latency histogram (whose left border is `│`); a kind name too long for its column
/// ends in `…`.
fn detail_kinds(screen: &str) -> Vec<(String, String)> {
    let mut lines = screen
        .lines()
        .skip_while(|l| !(l.starts_with("KIND") && l.contains("COUNT")));
    lines.next();
    lines
        .take_while(|l| l.contains('│'))
        .filter_map(|l| {
            let mut fields = l.split('│').next()?.split_whitespace();
            Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
        })
        .collect()
}

/// The guest-side kinds of a detail screen, by kind, with the text of their COUNT cells. A name
/// cut short (`mmio.read_unsatisf…`) is taken as the one kind of `expected` it begins.
fn detail_counts(screen: &str, expected: &BTreeMap<String, u64>) -> BTreeMap<String, String> {
    detail_kinds(screen)
        .into_iter()
        .map(|(cell, count)| {
            let kind = cell.strip_suffix('…').map_or(cell.clone(), |prefix| {
                let mut matches = expected.keys().filter(|k| k.starts_with(prefix));
                match (matches.next(), matches.next()) {
                    (Some(only), None) => only.clone(),
                    _ => cell.clone(),
                }
            });
            (kind, count)
        })
        .filter(|(kind, _)| is_guest_side(kind))
        .collect()
}

/// The rows of the detail screen's virtio kicks table: (pid, doorbell, queue, kicks) cells.
fn detail_doorbells(screen: &str) -> Vec<(String, String, String, String)> {
    let mut lines = screen
        .lines()
        .skip_while(|l| !l.contains("virtio kicks per queue"));
    lines.next(); // the title
    lines.next(); // the header
    lines
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                [pid, _vm_fd, _space, doorbell, queue, kicks] => Some((
                    pid.to_owned(),
                    doorbell.to_owned(),
                    queue.to_owned(),
                    kicks.to_owned(),
                )),
                _ => None,
            }
        })
        .collect()
}

/// Seconds between `top`'s samples in the interactive test.
const INTERVAL_SECS: f64 = 1.0;
/// How long the paced guests run: enough for the frames the test reads while they run.
const RUN_SECS: f64 = 10.0;
/// How far a paced vCPU may lag its schedule at one instant, and the sampler its tick, beyond the
/// schedule's own granularity: both wake from a sleep (a few hundred µs here; 2 ms allowed for
/// a loaded host).
const JITTER_SECS: f64 = 0.002;

/// Tenant rows show each tenant's exits/s and kicks/s at its paced guests' rate; sort keys reorder
/// them; Enter drills into a tenant and shows its kinds, counted exactly as the VMMs report once
/// their guests are done; `/` filters; `p` pauses; `?` shows help; `q` leaves the alternate screen
/// and gives the shell back; Ctrl-C does too.
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
        "{} top --interval {INTERVAL_SECS}s --service-time --filter {base}",
        vmtrace.display()
    ));
    tmux.keys(&["Enter"]);
    // The screen appears once the probes are attached: start the guests then, so that their
    // doorbells are seen being registered.
    tmux.wait_for("top's screen", Duration::from_mins(1), |s| {
        s.starts_with("vmtrace top · live")
    });
    assert!(tmux.alternate_screen(), "top runs on the alternate screen");
    // Paced guests that run for RUN_SECS: tenant-a cpuid (in the kernel), tenant-b virtio (kicks
    // in the kernel), tenant-c pio; each operation also writes the PACE port, one more exit to the
    // VMM. The busiest has the most exits, and every kind stays below the 10,000 up to which the
    // detail screen shows counts digit for digit.
    let plan = [
        ("cpuid", 150.0, &tenants[0]),
        ("virtio", 300.0, &tenants[1]),
        ("pio", 450.0, &tenants[2]),
    ];
    let mut vmms: Vec<Proc> = plan
        .iter()
        .map(|(scenario, rate, cgroup)| {
            let count = (rate * RUN_SECS) as u64;
            Proc::spawn(
                &format!("vmtrace-vmm {scenario}"),
                Command::new(&vmm)
                    .args(["--scenario", scenario, "--rate", &rate.to_string()])
                    .args(["--count", &count.to_string()])
                    .args(["--cgroup", &cgroup.relative, "--quiet"])
                    .stdout(Stdio::piped()),
            )
        })
        .collect();

    tmux.wait_for("three tenants with rates", Duration::from_secs(30), |s| {
        let r = rows(s);
        r.len() == 3 && r.iter().all(|(_, rate)| *rate > 0.0)
    });
    // The frames of the next few samples, while every guest runs at its rate; they are compared
    // with the guests' ground truth once the VMMs have reported it.
    let mut frames: Vec<String> = Vec::new();
    wait_for(
        "five frames of three tenants",
        Duration::from_secs(20),
        || {
            let screen = tmux.screen();
            let status = screen.lines().next().unwrap_or_default();
            let new = frames
                .last()
                .is_none_or(|f| f.lines().next() != Some(status));
            if new && rows(&screen).len() == 3 {
                frames.push(screen);
            }
            (frames.len() == 5).then_some(())
        },
    );
    let screen = frames.last().unwrap().clone();
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
    // Its kicks per queue: the doorbell table under the kinds (which, busiest first, may show
    // the host-side kinds ahead of kick.q0 in 24 lines).
    let mut queues: Vec<String> = detail_doorbells(&detail)
        .into_iter()
        .map(|(_, _, queue, _)| queue)
        .collect();
    queues.sort();
    assert_eq!(queues, ["0", "1"], "{detail}");
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

    // The VMMs' ground truth, once their guests are done.
    let reports: Vec<Report> = vmms
        .iter_mut()
        .map(|vmm| {
            let mut json = String::new();
            let mut stdout = vmm.child.stdout.take().expect("the VMM's stdout");
            stdout.read_to_string(&mut json).expect("the VMM's report");
            let status = vmm.child.wait().expect("waiting for the VMM");
            assert!(status.success(), "the VMM exited with {status}");
            Report::from_json(&json).expect("the VMM's report")
        })
        .collect();
    assert_rates_match(&frames, &plan.map(|(_, rate, _)| rate), &reports);
    assert_final_counts_match(&tmux, &base, &reports);

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

/// What a tenant's guests make per operation, from its VMM's report: (exits as `top` counts them,
/// virtio kicks). Every operation makes the same number, the guest's own and its PACE write; the
/// few made once per run (the DONE write, the virtio driver's probe reads) are fewer than the
/// operations, so the quotient is the per-operation figure.
fn per_operation(report: &Report) -> (f64, f64) {
    let expected = expected_agent_counts(std::slice::from_ref(report));
    let sum = |keep: fn(&str) -> bool| -> u64 {
        expected
            .iter()
            .filter(|(kind, _)| keep(kind))
            .map(|(_, n)| n)
            .sum()
    };
    // expected_agent_counts describes a host without kvm_exit (this one).
    let exits = sum(is_exit_without_kvm_exit);
    let kicks = sum(is_kick);
    let ops = report.total.guest_ops;
    ((exits / ops) as f64, (kicks / ops) as f64)
}

/// Some frame shows every tenant's exits/s and kicks/s at its guests' rate.
///
/// A rate is a count over the sample's interval I: a guest paced at R operations per second
/// completes R·I ± 1 of them in a window (the pacer holds operation n to start + n/R, so its
/// schedule does not drift), and a kind made once per operation is off by at most 1/I per second.
/// The vCPU's and the sampler's wake-up lateness (JITTER_SECS) moves a window's ends by up to R·J
/// more operations. With k exits per operation the tolerance is k·(1 + R·J)/I, plus the half digit
/// of `top`'s three significant digits. Some frame, not every one: a loaded host may delay a
/// vCPU for longer now and then.
fn assert_rates_match(frames: &[String], rates: &[f64], reports: &[Report]) {
    let names = ["tenant-a", "tenant-b", "tenant-c"];
    let expected: Vec<(f64, f64, f64)> = reports
        .iter()
        .zip(rates)
        .map(|(report, &rate)| {
            let (exits, kicks) = per_operation(report);
            (rate, exits, kicks)
        })
        .collect();
    let within = |cell: &str, per_op: f64, rate: f64| {
        let tolerance =
            per_op * (1.0 + rate * JITTER_SECS) / INTERVAL_SECS + display_rounding(cell);
        parse_rate(cell).is_some_and(|v| (v - per_op * rate).abs() <= tolerance)
    };
    let matches = |frame: &str| {
        let table = table(frame);
        names
            .iter()
            .zip(&expected)
            .all(|(name, &(rate, exits, kicks))| {
                table
                    .iter()
                    .find(|(tenant, _)| tenant.ends_with(&format!("/{name}")))
                    .is_some_and(|(_, cells)| {
                        cells.len() > 3
                            && within(&cells[0], exits, rate)
                            && within(&cells[3], kicks, rate)
                    })
            })
    };
    assert!(
        frames.iter().any(|f| matches(f)),
        "no frame shows exits/s and kicks/s at (rate, exits per operation, kicks per operation) \
         {expected:?} for {names:?}:\n{}",
        frames.join("\n")
    );
}

/// Once the guests are done, each tenant's detail screen counts every guest-side kind exactly as
/// its VMM's report says, and the virtio tenant's kicks table has each queue's kicks. The window
/// is made taller first: with its host-side kinds a tenant has more kinds than 24 lines show.
fn assert_final_counts_match(tmux: &Tmux, base: &str, reports: &[Report]) {
    assert!(
        tmux.run(&["resize-window", "-t", "t", "-x", "80", "-y", "60"])
            .status
            .success()
    );
    for (name, report) in ["tenant-a", "tenant-b", "tenant-c"].iter().zip(reports) {
        let expected = expected_agent_counts(std::slice::from_ref(report));
        assert!(
            expected.values().all(|&n| n < 10_000),
            "the detail screen shows counts below 10,000 digit for digit: {expected:?}"
        );
        let wanted: BTreeMap<String, String> = expected
            .iter()
            .map(|(kind, n)| (kind.clone(), n.to_string()))
            .collect();
        tmux.keys(&["/"]);
        tmux.type_text(&format!("{base}/{name}"));
        tmux.keys(&["Enter"]);
        let letter = name.chars().last().unwrap();
        tmux.wait_for(&format!("only {name}"), Duration::from_secs(5), |s| {
            order(s) == [letter]
        });
        tmux.keys(&["Enter"]);
        let mut screen = String::new();
        let titled = |s: &str| s.lines().nth(1).is_some_and(|l| l.contains(name));
        poll(Duration::from_secs(10), || {
            screen = tmux.screen();
            (titled(&screen) && detail_counts(&screen, &expected) == wanted).then_some(())
        });
        assert!(titled(&screen), "{name}'s detail screen:\n{screen}");
        assert_eq!(
            detail_counts(&screen, &expected),
            wanted,
            "{name}'s guest-side counts on its detail screen, and its VMM's:\n{screen}"
        );
        // The host-side kinds are shown rounded (`73.5M`); their values are checked through
        // `watch --json` by the other tests. Here: each is one the tenant may have.
        let expectation =
            Expectation::of_vmms(std::slice::from_ref(report), HostKvm::of_this_host());
        let unexpected: Vec<String> = detail_kinds(&screen)
            .into_iter()
            .map(|(kind, _)| kind)
            .filter(|kind| !expectation.names(kind))
            .collect();
        assert!(
            unexpected.is_empty(),
            "{name}'s detail screen shows {unexpected:?}, which its VMM cannot have made:\n{screen}"
        );
        eprintln!("{name}'s detail at 80x60:\n{screen}");
        if let Some(virtio) = &report.virtio {
            let mut kicks: Vec<_> = detail_doorbells(&screen);
            kicks.sort();
            let mut want: Vec<_> = virtio
                .queues
                .iter()
                .map(|q| {
                    (
                        report.pid.to_string(),
                        format!("{:#x}", q.notify_addr),
                        q.index.to_string(),
                        q.kicks.to_string(),
                    )
                })
                .collect();
            want.sort();
            assert_eq!(kicks, want, "{name}'s kicks per queue:\n{screen}");
        }
        tmux.keys(&["Escape"]);
        tmux.wait_for("the table", Duration::from_secs(5), |s| {
            order(s) == [letter]
        });
    }
    tmux.keys(&["/"]);
    tmux.type_text(base);
    tmux.keys(&["Enter"]);
    tmux.wait_for("all tenants again", Duration::from_secs(5), |s| {
        order(s).len() == 3
    });
    assert!(
        tmux.run(&["resize-window", "-t", "t", "-x", "80", "-y", "24"])
            .status
            .success()
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

/// The per-vCPU view's exits by thread id, as the screen shows them.
fn vcpu_exits(screen: &str) -> BTreeMap<u32, String> {
    screen
        .lines()
        .skip_while(|l| !l.contains("REASONS"))
        .skip(1)
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|w| w.parse::<u32>().is_ok())?;
            Some((words[at].parse().ok()?, (*words.get(at + 1)?).to_owned()))
        })
        .collect()
}

#[test]
fn the_per_vcpu_view_gives_each_vcpu_threads_exits_as_the_vmm_counted_them() {
    let test = "the_per_vcpu_view_gives_each_vcpu_threads_exits_as_the_vmm_counted_them";
    if !privileged_host(test) || !tmux_available(test) {
        return;
    }
    let tenant = TenantCgroup::new(&format!("vmtrace-test-top-vcpus-{}", std::process::id()));
    let tmux = Tmux::start("top-vcpus");
    tmux.type_text(&format!(
        "{} top --interval 1s --filter {}",
        binary("vmtrace").display(),
        tenant.agent_path()
    ));
    tmux.keys(&["Enter"]);
    tmux.wait_for("top's screen", Duration::from_mins(1), |s| {
        s.starts_with("vmtrace top · live")
    });
    let report = vmtrace_tests::run_vmm(&[
        "--scenario",
        "pio",
        "--count",
        "1500",
        "--vcpus",
        "3",
        "--cgroup",
        &tenant.relative,
    ]);
    // Each vCPU's exits are its returns to the VMM (a port-I/O guest has no exit KVM completes
    // itself): the view must show each thread's, though the threads have ended.
    let expected: BTreeMap<u32, String> = report
        .vcpus
        .iter()
        .map(|v| (v.tid, v.exits.values().sum::<u64>().to_string()))
        .collect();
    assert_eq!(expected.len(), 3);
    tmux.wait_for("the tenant's row", Duration::from_secs(20), |s| {
        lists_tenant(s, &tenant.agent_path())
    });
    tmux.keys(&["Enter"]);
    tmux.wait_for("the drill-down", Duration::from_secs(5), |s| {
        s.contains("KIND")
    });
    tmux.keys(&["v"]);
    let screen = tmux.wait_for("every vCPU's exits", Duration::from_secs(20), |s| {
        vcpu_exits(s) == expected
    });
    eprintln!("per-vCPU view at 80x24:\n{screen}");
    for vcpu in &report.vcpus {
        let line = screen
            .lines()
            .find(|l| l.contains(&vcpu.tid.to_string()))
            .unwrap();
        assert!(line.contains(&format!("vcpu{}", vcpu.index)), "{line}");
        assert!(line.contains("(ended)") && line.contains("io "), "{line}");
    }
    // Back to the kinds.
    tmux.keys(&["v"]);
    tmux.wait_for("the kinds again", Duration::from_secs(5), |s| {
        s.contains("KIND")
    });
    tmux.keys(&["q"]);
}

/// Whether the table lists the tenant at `path`; a cell too narrow for it shows its end after `…`.
fn lists_tenant(screen: &str, path: &str) -> bool {
    table(screen)
        .iter()
        .any(|(cell, _)| path.ends_with(cell.trim_start_matches('…')))
}
