//! A host that makes 10,000 tenant cgroups, each with counts of its own, and removes them, while
//! the agent samples every 200 ms with a cap of 50 tenants by name.
//!
//! A helper process (a VMM to the probes: it registers a doorbell, which `--vm-ioctls` sees) moves itself into each cgroup,
//! takes exactly [`PAGES`] page faults there and moves back. Afterwards:
//! - the tenants beyond the cap are summed into `overflow`, whose fault count is exactly
//!   [`PAGES`] times the cgroups it took, and never went down meanwhile;
//! - the agent's own state (cgroup index, tenants, accounted cgroups) holds what live tenants
//!   reference, not every cgroup it ever saw, and falls back once they end;
//! - its memory stayed under the bound docs/memory-bound.md gives.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    io::{BufRead, BufReader, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use vmtrace_tests::{
    TenantCgroup, binary,
    doorbell::DoorbellVm,
    free_port, http_get, privileged_host,
    process::Proc,
    prometheus::sample,
    wait::{poll, wait_for},
};

/// Tenants reported by name.
const MAX_TENANTS: usize = 50;
/// Cgroups that stay for the whole run, each with its counts.
const LIVE: usize = 200;
/// Tenants of the host's own that may have counts meanwhile (the root cgroup, where the kernel
/// ages guest memory): they take no user page faults, but count against the cap.
const HOST_TENANTS: usize = 4;
/// Cgroups made and removed one after another.
const GONE: usize = 10_000;
/// Page faults the helper takes in each cgroup.
const PAGES: usize = 2;
const PAGE: usize = 4096;

const HELPER_BASE: &str = "VMTRACE_CHURN_BASE";

/// How long a span of the churn the helper reports the most cgroups made in: a sample holds the
/// cgroups counted since the one before, an interval (200 ms) and how late the ticks run.
const BURST_SPAN: Duration = Duration::from_millis(500);

/// The memory bound of docs/memory-bound.md for the agent of this test, above its figure at rest:
/// per tenant reported (named or summed) and per ended tenant its timeline keeps (`tenants`),
/// 16 KiB and its series' points; per tenant of one sample beyond those (`burst`: the churned
/// cgroups counted in one sample, each its own tenant until the cap sums it) 16 KiB and its
/// cgroup's 1 KiB; per cgroup referenced (`cgroups`) 1 KiB; the recent-path buffer at its
/// fullest; and the allocator's slack. The HTTP buffers are left out: this test's scrapes come
/// one at a time.
fn memory_bound_kib(at_rest_kib: u64, tenants: u64, cgroups: u64, burst: u64) -> u64 {
    // Series per tenant here: user and kernel faults, TLB flushes, and a margin.
    let series = 8;
    // A 10 s window at 200 ms, and as much again of grace for readers.
    let points = 2 * 50;
    let per_tenant = 16 * 1024 + series * points * 8;
    let recent = 4096 * 512;
    // glibc keeps part of what the churn frees resident (fragments between live chunks; the
    // agent trims the heap after a mass deletion, which hands back most of it): a debug agent
    // here ends 3 to 5 MiB above its rest. A leak of 2 KiB per tenant passes any slack within
    // the 10,000 cgroups.
    let slack = 12 * 1024 * 1024;
    let sampled = burst * (16 * 1024 + 1024);
    at_rest_kib + (tenants * per_tenant + sampled + cgroups * 1024 + recent + slack) / 1024
}

fn metrics(port: u16) -> Option<String> {
    match http_get(port, "/metrics") {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

/// User page faults the metrics give `tenant`.
fn user_faults(metrics: &str, tenant: &str) -> Option<u64> {
    sample(
        metrics,
        "vmtrace_memory_faults_total",
        &[("tenant", tenant), ("fault_type", "user")],
    )
    .map(|v| v as u64)
}

/// Every tenant with user page faults, and its count.
fn all_user_faults(metrics: &str) -> BTreeMap<String, u64> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("vmtrace_memory_faults_total{"))
        .filter(|l| l.contains("fault_type=\"user\""))
        .filter_map(|l| {
            let tenant = l.split("tenant=\"").nth(1)?.split('"').next()?;
            let value = l.rsplit(' ').next()?.parse::<f64>().ok()?;
            Some((tenant.to_owned(), value as u64))
        })
        .collect()
}

fn state(metrics: &str, state: &str) -> u64 {
    sample(metrics, "vmtrace_agent_state_entries", &[("state", state)])
        .unwrap_or_else(|| panic!("no state entries for {state}:\n{metrics}")) as u64
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .expect("the agent's VmRSS")
}

#[test]
fn ten_thousand_tenant_cgroups_leave_the_agent_bounded_and_its_totals_exact() {
    let test = "ten_thousand_tenant_cgroups_leave_the_agent_bounded_and_its_totals_exact";
    if !privileged_host(test) {
        return;
    }
    let base = TenantCgroup::new(&format!("vmtrace-test-churn-{}", std::process::id()));
    let home = TenantCgroup::new(&format!("{}/home", base.relative));
    let port = free_port();
    let mut agent = Proc::spawn(
        "vmtrace agent",
        Command::new(binary("vmtrace"))
            .args([
                "agent",
                "--vm-ioctls",
                "--interval",
                "200ms",
                "--window",
                "10s",
            ])
            .args(["--max-tenants", &MAX_TENANTS.to_string()])
            .args(["--state-dir", "off", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );
    wait_for("the agent's /readyz", Duration::from_mins(1), || {
        agent.assert_running("before it was ready");
        matches!(http_get(port, "/readyz"), Ok((200, _))).then_some(())
    });
    let at_rest = rss_kib(agent.id());

    let mut helper = Proc::spawn(
        "churn helper",
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "churn_helper", "--ignored", "--nocapture"])
            .env(HELPER_BASE, &base.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let mut to_helper = helper.child.stdin.take().unwrap();
    let mut from_helper = BufReader::new(helper.child.stdout.take().unwrap());
    // The helper's home is named first, so that the tenants beyond the cap are the helper's
    // cgroups and the host's own (the root cgroup's memory ageing, ...), which take no user faults.
    expect_line(&mut from_helper, "ready");
    let home_path = home.agent_path();
    wait_for("the helper's home tenant", Duration::from_secs(30), || {
        user_faults(&metrics(port)?, &home_path)
    });
    writeln!(to_helper, "go").unwrap();
    // The lasting cgroups take the names left, the rest of them overflow; then the churn starts.
    expect_line(&mut from_helper, "live");
    let live_prefix = format!("{}/live-", base.agent_path());
    let named_live = |m: &str| {
        all_user_faults(m)
            .into_iter()
            .filter(|(t, _)| t.starts_with(&live_prefix))
            .collect::<BTreeMap<_, _>>()
    };
    let lasting = wait_metrics(port, "the lasting tenants", |m| {
        let named = named_live(m);
        let in_overflow = user_faults(m, "overflow").unwrap_or(0);
        state(m, "named_tenants") == MAX_TENANTS as u64
            && named.values().all(|n| *n == PAGES as u64)
            && (named.len() * PAGES) as u64 + in_overflow == (LIVE * PAGES) as u64
    });
    let named_at_start = named_live(&lasting);
    let overflowed_live = LIVE - named_at_start.len();
    assert!(named_at_start.len() < MAX_TENANTS, "{named_at_start:?}");
    let overflowed = state(&lasting, "overflowed_tenants");
    assert!(
        (overflowed_live as u64..=(overflowed_live + HOST_TENANTS) as u64).contains(&overflowed),
        "{overflowed} tenants in the overflow, for {overflowed_live} lasting cgroups"
    );
    writeln!(to_helper, "go").unwrap();

    // While the cgroups come and go, the overflow tenant's count only goes up, and the agent's
    // memory stays under the bound (checked once the helper says how fast it churned).
    let started = Instant::now();
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let done = expect_line(&mut from_helper, "done");
        let burst: u64 = done
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("done <most cgroups in one span>");
        let _ = done_tx.send(burst);
        // The rest of its output (libtest's summary) must find the pipe open.
        let _ = std::io::copy(&mut from_helper, &mut std::io::sink());
    });
    let gone_prefix = format!("{}/gone-", base.agent_path());
    let mut named_gone = NamedGone::default();
    let mut overflow_seen = 0u64;
    let mut scrapes = 0u32;
    let mut peak_rss = at_rest;
    let burst = loop {
        agent.assert_running("during the churn");
        if let Some(m) = metrics(port) {
            scrapes += 1;
            if let Some(n) = user_faults(&m, "overflow") {
                assert!(
                    n >= overflow_seen,
                    "the overflow tenant went down from {overflow_seen} to {n}"
                );
                overflow_seen = n;
            }
        }
        named_gone.look(port, &gone_prefix);
        peak_rss = peak_rss.max(rss_kib(agent.id()));
        if let Ok(burst) = done.recv_timeout(Duration::from_millis(250)) {
            break burst;
        }
        assert!(
            started.elapsed() < Duration::from_mins(10),
            "the churn did not end in 10 minutes"
        );
    };
    let churned_in = started.elapsed();
    // Tenants reported and ended on the timeline; the lasting cgroups and the helper's home.
    let bound = memory_bound_kib(
        at_rest,
        2 * (MAX_TENANTS as u64 + 1),
        LIVE as u64 + 1,
        burst,
    );
    assert!(
        peak_rss <= bound,
        "the agent's RSS {peak_rss} KiB is above the bound {bound} KiB (at rest {at_rest} KiB; \
         at most {burst} cgroups made in {BURST_SPAN:?})"
    );

    // Every gone cgroup was counted into the overflow tenant, PAGES each, exactly; but for those
    // that took a name: a host tenant by name that ended meanwhile left its slot to the next new
    // tenant, a gone cgroup, which then ended with its counts (a named tenant's series end with it).
    let expected_overflow = |named_gone: &NamedGone| {
        (PAGES * (overflowed_live + GONE - named_gone.tenants.len())) as u64
    };
    let mut last = String::new();
    let settled = poll(Duration::from_secs(30), || {
        named_gone.look(port, &gone_prefix);
        let m = metrics(port)?;
        last.clone_from(&m);
        (user_faults(&m, "overflow")? >= expected_overflow(&named_gone)
            && state(&m, "overflowed_tenants") <= (overflowed_live + HOST_TENANTS) as u64)
            .then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "state and drops:\n{}\nthe overflow tenant should hold {} faults of \
             {overflowed_live} lasting and {GONE} gone tenants, {} gone ones by name \
             ({:?}); it holds {:?}; the other tenants with faults: {:?}",
            last.lines()
                .filter(|l| l.starts_with("vmtrace_agent_state")
                    || l.starts_with("vmtrace_agent_events_dropped"))
                .collect::<Vec<_>>()
                .join("\n"),
            expected_overflow(&named_gone),
            named_gone.tenants.len(),
            named_gone.faults,
            user_faults(&last, "overflow"),
            all_user_faults(&last)
                .into_iter()
                .filter(|(t, _)| !t.starts_with(&live_prefix) && t != "overflow")
                .collect::<BTreeMap<_, _>>(),
        )
    });
    let expected_overflow = expected_overflow(&named_gone);
    assert_eq!(
        named_gone.faults,
        (PAGES * named_gone.tenants.len()) as f64,
        "the gone cgroups that took a name: {:?}",
        named_gone.tenants
    );
    let faults = all_user_faults(&settled);
    assert_eq!(
        faults.get("overflow").copied(),
        Some(expected_overflow),
        "{faults:?}"
    );
    assert_eq!(
        named_live(&settled),
        named_at_start,
        "the named tenants kept their names"
    );
    assert!(
        faults.len() <= MAX_TENANTS + 1,
        "more tenants by name than the cap: {faults:?}"
    );
    let index_paths = state(&settled, "cgroup_paths");
    assert!(
        index_paths <= (LIVE + 1 + HOST_TENANTS) as u64,
        "the cgroup index holds {index_paths} paths for {} live cgroups",
        LIVE + 1
    );
    assert_eq!(state(&settled, "cgroups_awaiting_walk"), 0, "{settled}");
    assert!(state(&settled, "recent_cgroup_paths") <= 4096);
    assert!(state(&settled, "named_tenants") <= MAX_TENANTS as u64);
    let rss_churned = rss_kib(agent.id());

    // The live cgroups end too: what the agent holds for them goes.
    writeln!(to_helper, "exit").unwrap();
    let status = helper.child.wait().expect("the helper");
    assert!(status.success(), "the churn helper failed: {status}");
    for i in 0..LIVE {
        remove_cgroup(&base.path.join(format!("live-{i}")));
    }
    drop(home);
    let after = wait_for(
        "the agent to let go of the ended tenants",
        Duration::from_secs(30),
        || {
            let m = metrics(port)?;
            (state(&m, "cgroup_paths") <= HOST_TENANTS as u64
                && state(&m, "overflowed_tenants") <= HOST_TENANTS as u64)
                .then_some(m)
        },
    );
    for state_name in ["accounted_cgroups", "named_tenants", "previous_tenants"] {
        let held = state(&after, state_name);
        assert!(
            held <= 8,
            "{state_name}: {held} entries after every tenant ended"
        );
    }
    let overflow_after = user_faults(&after, "overflow");
    assert_eq!(
        overflow_after,
        Some(expected_overflow),
        "the overflow tenant keeps what its ended tenants counted"
    );
    // Nothing of the 10,201 tenants stays: the agent is back within the bound with none.
    let rss_end = rss_kib(agent.id());
    let bound_at_end = memory_bound_kib(at_rest, 0, 0, 0);
    assert!(
        rss_end <= bound_at_end,
        "the agent's RSS {rss_end} KiB after every tenant ended is above {bound_at_end} KiB \
         (at rest {at_rest} KiB)"
    );
    eprintln!(
        "{} cgroups ({LIVE} live, {GONE} gone) churned in {churned_in:.1?}, {scrapes} scrapes; \
         overflow {expected_overflow} faults exact ({} gone cgroups by name); agent RSS {at_rest} KiB at rest, peak \
         {peak_rss} KiB, {rss_churned} KiB after the churn, {rss_end} KiB at the end (bounds \
         {bound_at_end} and {bound} KiB for at most {burst} cgroups in {BURST_SPAN:?}); index {index_paths} paths",
        LIVE + GONE + 1,
        named_gone.tenants.len(),
    );
}

/// The gone cgroups that were reported by name (their path, or their id where the agent never
/// learnt the path), as the agent's timeline shows them: it keeps ended tenants over the points
/// it shows, 10 s here, up to the cap of them.
#[derive(Default)]
struct NamedGone {
    tenants: std::collections::BTreeSet<String>,
    /// Their user page faults, from the timeline's rates.
    faults: f64,
}

impl NamedGone {
    fn look(&mut self, port: u16, prefix: &str) {
        let Ok((200, body)) = http_get(port, "/api/timeline?prefix=fault.user") else {
            return;
        };
        let timeline: serde_json::Value =
            serde_json::from_str(&body).expect("/api/timeline is JSON");
        let interval = timeline["interval_secs"].as_f64().expect("interval_secs");
        let Some(tenants) = timeline["tenants"].as_object() else {
            return;
        };
        for (tenant, series) in tenants {
            // A gone cgroup whose name the agent never learnt is reported by its id.
            let gone = tenant.starts_with(prefix) || tenant.starts_with("cgroup-id/");
            if !gone || self.tenants.contains(tenant) {
                continue;
            }
            let faults: f64 = series["fault.user"].as_array().map_or(0.0, |points| {
                points.iter().filter_map(serde_json::Value::as_f64).sum()
            });
            self.faults += (faults * interval).round();
            self.tenants.insert(tenant.clone());
        }
    }
}

/// Scrapes the agent until `check` holds, for 30 s at most; then panics with what it held.
fn wait_metrics(port: u16, what: &str, mut check: impl FnMut(&str) -> bool) -> String {
    let mut last = String::new();
    poll(Duration::from_secs(30), || {
        let m = metrics(port)?;
        last.clone_from(&m);
        check(&m).then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "timed out waiting for {what}; the agent's faults by tenant: {:?}; tenants other than \
             the churned ones: {:?}; its state:\n{}",
            all_user_faults(&last),
            last.lines()
                .filter_map(|l| l.split("tenant=\"").nth(1)?.split('"').next())
                .filter(|t| !t.contains("/live-") && !t.contains("/gone-"))
                .collect::<std::collections::BTreeSet<_>>(),
            last.lines()
                .filter(|l| l.starts_with("vmtrace_agent_state")
                    || l.starts_with("vmtrace_agent_events_dropped_total{reason=\"cgroup"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

/// Reads the helper's output up to a line that starts with `wanted`, and returns that line.
fn expect_line(from_helper: &mut impl BufRead, wanted: &str) -> String {
    let mut line = String::new();
    while !line.starts_with(wanted) {
        line.clear();
        let n = from_helper
            .read_line(&mut line)
            .expect("the helper's output");
        assert!(n > 0, "the churn helper ended before it said {wanted}");
    }
    line
}

fn remove_cgroup(path: &Path) {
    wait_for(
        &format!("{} to be removable", path.display()),
        Duration::from_secs(10),
        || (fs::remove_dir(path).is_ok() || !path.exists()).then_some(()),
    );
}

/// `cgroup.procs` of `dir`, open for writing.
fn procs_file(dir: &Path) -> OwnedFd {
    let path = CString::new(
        dir.join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("a path without NUL");
    // SAFETY: the path is a valid C string; the result is checked.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "open {}: {}",
        dir.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: just opened, owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Moves this process into the cgroup whose `cgroup.procs` is `procs`, with a buffer that is
/// already in memory, so that the move itself takes no page fault.
fn move_to(procs: &OwnedFd, pid: &[u8]) {
    // SAFETY: `pid` is a live buffer of that length; the result is checked.
    let n = unsafe { libc::write(procs.as_raw_fd(), pid.as_ptr().cast(), pid.len()) };
    assert_eq!(n, pid.len() as isize, "{}", std::io::Error::last_os_error());
}

/// Anonymous memory of `pages` pages, without huge pages, so that each first write to a page is
/// exactly one page fault.
struct Region {
    start: *mut u8,
    len: usize,
}

impl Region {
    fn new(pages: usize) -> Self {
        let len = pages * PAGE;
        // SAFETY: an anonymous private mapping; the result is checked.
        let start = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(start, libc::MAP_FAILED, "mmap");
        // SAFETY: the range was just mapped.
        let ret = unsafe { libc::madvise(start, len, libc::MADV_NOHUGEPAGE) };
        assert_eq!(ret, 0, "madvise: {}", std::io::Error::last_os_error());
        Self {
            start: start.cast(),
            len,
        }
    }

    /// Writes to pages `first..first + PAGES`: one fault each, the first time.
    #[inline(never)]
    fn touch(&self, first: usize) {
        for page in first..first + PAGES {
            assert!((page + 1) * PAGE <= self.len);
            // SAFETY: in bounds of the mapping, checked above.
            unsafe { self.start.add(page * PAGE).write_volatile(1) };
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.start.cast(), self.len) };
    }
}

/// The most of `times` (in order) that fall within one `span`.
fn most_within(times: &[Instant], span: Duration) -> usize {
    let mut first = 0;
    let mut most = 0;
    for (last, t) in times.iter().enumerate() {
        while *t - times[first] > span {
            first += 1;
        }
        most = most.max(last + 1 - first);
    }
    most
}

/// In cgroup `dir`: PAGES page faults, then back to `home`.
fn faults_in(dir: &Path, home: &OwnedFd, pid: &[u8], region: &Region, first: usize) {
    let procs = procs_file(dir);
    move_to(&procs, pid);
    region.touch(first);
    move_to(home, pid);
}

/// The helper the test runs as a subprocess: a VMM to the probes, it makes [`LIVE`] lasting and
/// [`GONE`] removed cgroups below `$VMTRACE_CHURN_BASE`, with [`PAGES`] faults in each.
#[test]
#[ignore = "run by ten_thousand_tenant_cgroups_leave_the_agent_bounded_and_its_totals_exact"]
fn churn_helper() {
    let base = PathBuf::from(std::env::var(HELPER_BASE).expect("VMTRACE_CHURN_BASE"));
    let pid = std::process::id().to_string().into_bytes();
    let home = procs_file(&base.join("home"));
    // Home first: from its doorbell on, every fault of the helper's is counted.
    move_to(&home, &pid);
    let vm = DoorbellVm::new();
    vm.doorbell(0xd000_0000, 0, false);
    // The same code, once in home, so that its own pages are in memory before it counts.
    let warm = Region::new(PAGES * 4);
    faults_in(&base.join("home"), &home, &pid, &warm, 0);
    faults_in(&base.join("home"), &home, &pid, &warm, PAGES);
    let region = Region::new(PAGES * (LIVE + GONE));
    let mut out = std::io::stdout();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "go");
    for i in 0..LIVE {
        let dir = base.join(format!("live-{i}"));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        faults_in(&dir, &home, &pid, &region, i * PAGES);
    }
    writeln!(out, "live").unwrap();
    out.flush().unwrap();
    line.clear();
    std::io::stdin().read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "go");
    let mut made = Vec::with_capacity(GONE);
    for i in 0..GONE {
        let dir = base.join(format!("gone-{i}"));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        made.push(Instant::now());
        faults_in(&dir, &home, &pid, &region, (LIVE + i) * PAGES);
        remove_cgroup(&dir);
    }
    writeln!(out, "done {}", most_within(&made, BURST_SPAN)).unwrap();
    out.flush().unwrap();
    line.clear();
    std::io::stdin().read_line(&mut line).unwrap();
    drop(vm);
}
