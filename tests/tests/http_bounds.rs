//! The agent's HTTP endpoint stays bounded whatever its clients do: excess connections are refused
//! while the agent stays small, slow clients are cut off, a burst is shed with 503 while /healthz
//! answers, /api/timeline takes a tenant and a limit and streams, and a stuck sample holds up no
//! request. Each bound is provoked for real against a running agent.

use std::{
    collections::BTreeSet,
    fs,
    io::{ErrorKind, Read, Write},
    net::TcpStream,
    os::fd::FromRawFd,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use vmtrace_tests::{
    TenantCgroup, binary, free_port, http_get, privileged_host,
    process::Proc,
    run_vmm,
    wait::{poll, wait_for},
};

// The endpoint's bounds, as docs/export.md states them.
const MAX_CONNECTIONS: usize = 64;
const MAX_REFUSED_CONNECTIONS: usize = 64;
const MAX_RESPONSES_IN_PROGRESS: usize = 8;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `vmtrace agent` serving on `port`, ready.
struct RunningAgent {
    process: Proc,
    port: u16,
}

impl RunningAgent {
    fn start(args: &[&str]) -> Self {
        let port = free_port();
        let process = Proc::spawn(
            "vmtrace agent",
            Command::new(binary("vmtrace"))
                .arg("agent")
                .args(args)
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit()),
        );
        wait_for("the agent to be ready", Duration::from_mins(1), || {
            matches!(http_get(port, "/readyz"), Ok((200, _))).then_some(())
        });
        Self { process, port }
    }

    fn pid(&self) -> u32 {
        self.process.id()
    }

    /// The agent's open sockets (its listener and connections, as the kernel counts them).
    fn sockets(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("the agent's fds")
            .flatten()
            .filter(|fd| {
                fs::read_link(fd.path())
                    .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
            })
            .count()
    }

    /// The agent's open file descriptors.
    fn fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("the agent's fds")
            .count()
    }

    /// The agent's resident memory, bytes.
    fn rss(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kib * 1024
    }
}

/// Whether the server closed `stream` (end of file, or a reset) within `within`; what it sent
/// before is read and dropped.
fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buffer = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return true;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(e) => panic!("reading: {e}"),
        }
    }
}

/// A GET over HTTP/1.1: status, headers (lower-case names) and the body, de-chunked.
fn get_http11(port: u16, path: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("reading");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = response[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v == "chunked")
    {
        body = dechunk(&body);
    }
    (status, headers, body)
}

/// The data of a chunked body; panics if it is cut short (no last chunk).
fn dechunk(mut chunked: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    loop {
        let line_end = chunked
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk size line");
        let size = usize::from_str_radix(String::from_utf8_lossy(&chunked[..line_end]).trim(), 16)
            .expect("a chunk size");
        chunked = &chunked[line_end + 2..];
        if size == 0 {
            return data;
        }
        data.extend_from_slice(&chunked[..size]);
        chunked = &chunked[size + 2..];
    }
}

/// A connection whose receive buffer is as small as the kernel allows, so that a response that
/// is not read soon fills it and the server's own buffers, and waits.
fn connect_with_small_window(port: u16) -> TcpStream {
    // SAFETY: plain socket calls on a descriptor this function owns; the address is a valid
    // sockaddr_in for its length.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let small: libc::c_int = 4096;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const small).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
        let address = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let connected = libc::connect(
            fd,
            (&raw const address).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(connected, 0, "connect: {}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    }
}

#[test]
fn excess_connections_are_refused_while_the_agent_stays_small() {
    if !privileged_host("excess_connections_are_refused_while_the_agent_stays_small") {
        return;
    }
    let agent = RunningAgent::start(&["--interval", "500ms"]);
    let port = agent.port;
    // Once the connection that found it ready is gone on the agent's side too.
    thread::sleep(Duration::from_millis(500));
    let (sockets, fds, rss) = (agent.sockets(), agent.fds(), agent.rss());

    // Every connection the agent serves is taken by a client that sends nothing.
    let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    wait_for("the agent to accept them", Duration::from_secs(5), || {
        (agent.sockets() >= sockets + MAX_CONNECTIONS).then_some(())
    });
    let (status, body) = http_get(port, "/metrics").expect("GET /metrics");
    assert_eq!(
        (status, body.as_str()),
        (503, "too many connections, try again shortly\n")
    );
    // A liveness probe still gets its answer.
    assert_eq!(
        http_get(port, "/healthz").unwrap(),
        (200, "ok\n".to_owned())
    );

    // Far more than that: each is closed by the agent, the refused ones once answered or after
    // a short wait, the rest at once; none waits in a queue.
    let extra = 4 * MAX_REFUSED_CONNECTIONS;
    let mut more: Vec<TcpStream> = (0..extra)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    let held_sockets = agent.sockets();
    let (held_fds, held_rss) = (agent.fds(), agent.rss());
    let started = Instant::now();
    let closed = more
        .iter_mut()
        .map(|stream| closed_by_server(stream, Duration::from_secs(5)))
        .filter(|&closed| closed)
        .count();
    let all_closed_after = started.elapsed();
    eprintln!(
        "{} idle connections and {extra} more: agent sockets {sockets} -> {held_sockets}, fds \
         {fds} -> {held_fds}, RSS {:.1} -> {:.1} MiB; the {extra} closed by the agent within {:?}",
        MAX_CONNECTIONS,
        rss as f64 / 1048576.0,
        held_rss as f64 / 1048576.0,
        all_closed_after
    );
    assert_eq!(closed, extra, "connections the agent left open");
    // Bounded: the served, the refused, and a few that were being closed.
    assert!(
        held_sockets <= sockets + MAX_CONNECTIONS + MAX_REFUSED_CONNECTIONS + 8,
        "{held_sockets} sockets, {sockets} before"
    );
    assert!(
        held_fds <= fds + MAX_CONNECTIONS + MAX_REFUSED_CONNECTIONS + 8,
        "{held_fds} fds, {fds} before"
    );
    assert!(
        held_rss <= rss + 32 * 1024 * 1024,
        "RSS grew from {rss} to {held_rss} bytes"
    );

    // Once the idle clients go, the agent serves again.
    drop(idle);
    wait_for(
        "/metrics to be served again",
        Duration::from_secs(5),
        || matches!(http_get(port, "/metrics"), Ok((200, _))).then_some(()),
    );
}

#[test]
fn a_client_that_sends_its_headers_slowly_is_cut_off() {
    if !privileged_host("a_client_that_sends_its_headers_slowly_is_cut_off") {
        return;
    }
    let agent = RunningAgent::start(&["--interval", "500ms"]);
    let port = agent.port;
    let started = Instant::now();
    // One that drips a header byte every 200 ms (slowloris), one that sends nothing.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut idle = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut writer = slow.try_clone().unwrap();
    let dripping = thread::spawn(move || {
        let request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
        let mut sent = 0;
        for byte in request.iter().chain(std::iter::repeat(&b'a')) {
            if writer.write_all(&[*byte]).is_err() {
                break;
            }
            sent += 1;
            thread::sleep(Duration::from_millis(200));
        }
        sent
    });
    // The test gives up only well after the timeout: a close seen here is the agent's.
    let limit = HEADER_TIMEOUT + Duration::from_secs(10);
    assert!(
        closed_by_server(&mut slow, limit),
        "the slow client was not cut off"
    );
    let slow_cut = started.elapsed();
    assert!(
        closed_by_server(&mut idle, limit),
        "the idle client was not cut off"
    );
    let idle_cut = started.elapsed();
    let sent = dripping.join().unwrap();
    eprintln!(
        "header timeout {HEADER_TIMEOUT:?}: the slow client (sent {sent} bytes) cut after \
         {slow_cut:?}, the idle one after {idle_cut:?}"
    );
    for cut in [slow_cut, idle_cut] {
        assert!(
            cut + Duration::from_millis(500) >= HEADER_TIMEOUT
                && cut <= HEADER_TIMEOUT + Duration::from_secs(3),
            "cut after {cut:?}, the header timeout is {HEADER_TIMEOUT:?}"
        );
    }
    // Sending kept the slow one alive no longer than the idle one.
    assert!(sent > 10, "only {sent} bytes sent");
    assert_eq!(http_get(port, "/healthz").unwrap().0, 200);
}

/// Tenants whose guests ran, so that the timeline has something to write.
fn busy_tenants(base: &str, n: usize) -> Vec<TenantCgroup> {
    let tenants: Vec<TenantCgroup> = (0..n)
        .map(|i| TenantCgroup::new(&format!("{base}/t{i}")))
        .collect();
    for tenant in &tenants {
        run_vmm(&[
            "--scenario",
            "pio",
            "--count",
            "200",
            "--cgroup",
            &tenant.relative,
        ]);
    }
    tenants
}

#[test]
fn a_burst_is_shed_with_503_while_healthz_answers_and_stalled_readers_are_cut() {
    if !privileged_host(
        "a_burst_is_shed_with_503_while_healthz_answers_and_stalled_readers_are_cut",
    ) {
        return;
    }
    let base = format!("vmtrace-test-http-burst-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let agent = RunningAgent::start(&["--interval", "50ms", "--window", "10m"]);
    let port = agent.port;
    let _tenants = busy_tenants(&base, 40);
    // A timeline larger than what the kernel and the agent buffer for a client that does not read.
    let size = wait_for(
        "the timeline to outgrow the buffers",
        Duration::from_mins(2),
        || {
            let (status, body) = http_get(port, "/api/timeline").ok()?;
            (status == 200 && body.len() > 768 * 1024).then_some(body.len())
        },
    );

    // A burst of clients that ask and do not read.
    thread::sleep(Duration::from_millis(500));
    let sockets = agent.sockets();
    let burst = 2 * MAX_RESPONSES_IN_PROGRESS;
    let mut stalled: Vec<TcpStream> = (0..burst)
        .map(|_| {
            let mut stream = connect_with_small_window(port);
            write!(
                stream,
                "GET /api/timeline HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
            )
            .unwrap();
            stream
        })
        .collect();
    let burst_sent = Instant::now();
    // Once the agent has read the burst's requests (it may answer one of ours before).
    let body = wait_for("a 503", Duration::from_secs(5), || {
        let (status, body) = http_get(port, "/api/timeline").ok()?;
        (status == 503).then_some(body)
    });
    assert_eq!(
        body,
        format!("busy: {MAX_RESPONSES_IN_PROGRESS} responses in progress, try again shortly\n")
    );
    assert_eq!(http_get(port, "/metrics").unwrap().0, 503);
    let asked = Instant::now();
    assert_eq!(
        http_get(port, "/healthz").unwrap(),
        (200, "ok\n".to_owned())
    );
    let healthz_took = asked.elapsed();
    assert_eq!(http_get(port, "/readyz").unwrap().0, 200);

    // Those that stopped reading are cut once their request times out (the others, answered 503
    // and idle since, once the header timeout is up): the agent closes their connections, the
    // test does not.
    let cut = wait_for(
        "the stalled readers to be cut",
        REQUEST_TIMEOUT + Duration::from_secs(15),
        || (agent.sockets() <= sockets).then(|| burst_sent.elapsed()),
    );
    eprintln!(
        "timeline of {size} bytes; {burst} stalled readers: /healthz answered in {healthz_took:?} \
         meanwhile; they were cut after {cut:?} (request timeout {REQUEST_TIMEOUT:?})"
    );
    assert!(
        cut + Duration::from_secs(1) >= REQUEST_TIMEOUT,
        "cut after {cut:?}"
    );
    // What a cut client got is a response that never ended.
    let mut received = Vec::new();
    stalled[0]
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stalled[0].read_to_end(&mut received);
    assert!(!received.ends_with(b"0\r\n\r\n"), "a complete response");
    drop(stalled);
    wait_for(
        "/api/timeline to be served again",
        Duration::from_secs(10),
        || matches!(http_get(port, "/api/timeline"), Ok((200, _))).then_some(()),
    );
}

#[test]
fn the_timeline_takes_a_tenant_and_a_limit_and_streams() {
    if !privileged_host("the_timeline_takes_a_tenant_and_a_limit_and_streams") {
        return;
    }
    let base = format!("vmtrace-test-http-timeline-{}", std::process::id());
    let _base = TenantCgroup::new(&base);
    let agent = RunningAgent::start(&["--interval", "200ms", "--window", "1m"]);
    let port = agent.port;
    let tenants = busy_tenants(&base, 2);
    let tenant = tenants[0].agent_path();
    wait_for("a few points", Duration::from_secs(30), || {
        let (_, body) = http_get(port, "/api/timeline").ok()?;
        let all: Value = serde_json::from_str(&body).ok()?;
        (all["timestamps"].as_array()?.len() >= 8).then_some(())
    });

    let (status, headers, body) =
        get_http11(port, &format!("/api/timeline?limit=5&tenant={tenant}"));
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v == "chunked"),
        "not streamed: {headers:?}"
    );
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "content-type" && v == "application/json"),
        "{headers:?}"
    );
    let limited: Value = serde_json::from_slice(&body).expect("JSON");
    let keys: BTreeSet<&String> = limited.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["interval_secs", "tenants", "timestamps"]
            .iter()
            .map(|k| (*k).to_owned())
            .collect::<Vec<_>>()
            .iter()
            .collect()
    );
    assert_eq!(limited["interval_secs"], 0.2);
    let times = limited["timestamps"].as_array().unwrap();
    assert_eq!(times.len(), 5, "{limited}");
    let only = limited["tenants"].as_object().unwrap();
    assert_eq!(only.keys().collect::<Vec<_>>(), [&tenant], "{limited}");
    let series = only[&tenant].as_object().unwrap();
    assert!(series.contains_key("exit.io"), "{limited}");
    assert!(
        series.values().all(|v| v.as_array().unwrap().len() == 5),
        "{limited}"
    );

    // The whole timeline is the same shape: the tenant's series and more tenants, over every point.
    let (status, _, body) = get_http11(port, "/api/timeline");
    assert_eq!(status, 200);
    let all: Value = serde_json::from_slice(&body).expect("JSON");
    let points = all["timestamps"].as_array().unwrap().len();
    assert!(points >= 8, "{points} points");
    let every = all["tenants"].as_object().unwrap();
    assert!(every.contains_key(&tenants[1].agent_path()), "{all}");
    let whole = every[&tenant].as_object().unwrap();
    assert!(
        series.keys().all(|k| whole.contains_key(k)),
        "{series:?} vs {whole:?}"
    );
    assert!(
        whole
            .values()
            .all(|v| v.as_array().unwrap().len() == points)
    );
    // The newest points of the whole are those of the limited view, where no point came between.
    let newest: Vec<&Value> = all["timestamps"].as_array().unwrap()[points - 5..]
        .iter()
        .collect();
    if newest == times.iter().collect::<Vec<_>>() {
        assert_eq!(
            whole["exit.io"].as_array().unwrap()[points - 5..],
            series["exit.io"].as_array().unwrap()[..]
        );
    }

    let (status, body) = http_get(port, "/api/timeline?limit=0").unwrap();
    assert_eq!((status, body.as_str()), (400, "limit must be at least 1\n"));
    let (status, _) = http_get(port, "/api/timeline?limit=many").unwrap();
    assert_eq!(status, 400);
}

/// The id of the agent's thread named `name`.
fn thread_named(pid: u32, name: &str) -> Option<i32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find(|task| {
            fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })?
        .file_name()
        .to_str()?
        .parse()
        .ok()
}

/// The state letter of a thread (`t`: stopped by a tracer).
fn thread_state(pid: u32, tid: i32) -> char {
    let stat = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).expect("stat");
    let (_, rest) = stat.rsplit_once(')').expect("a stat line");
    rest.trim_start().chars().next().expect("a state")
}

/// The newest point of the agent's timeline.
fn newest_point(port: u16) -> f64 {
    let (_, body) = http_get(port, "/api/timeline?limit=1").expect("GET /api/timeline");
    let timeline: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    timeline["timestamps"][0].as_f64().expect("a point")
}

#[test]
fn healthz_answers_while_a_sample_is_stuck() {
    if !privileged_host("healthz_answers_while_a_sample_is_stuck") {
        return;
    }
    let agent = RunningAgent::start(&["--interval", "100ms"]);
    let (pid, port) = (agent.pid(), agent.port);
    let sampler = thread_named(pid, "vmtrace-sampler").expect("the agent's sampling thread");
    let before = newest_point(port);
    // The kernel stops the sampling thread where it is, alone (ptrace stops one thread), as a
    // sample stuck in a slow read would be.
    // SAFETY: ptrace and waitpid on a thread of the agent, a child of this process.
    unsafe {
        assert_eq!(
            libc::ptrace(libc::PTRACE_SEIZE, sampler, 0, 0),
            0,
            "PTRACE_SEIZE: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, sampler, 0, 0), 0);
        let mut status = 0;
        assert_eq!(
            libc::waitpid(sampler, &raw mut status, libc::__WALL),
            sampler
        );
        assert!(libc::WIFSTOPPED(status), "status {status:#x}");
    }
    let stopped_at = Instant::now();
    let stuck = newest_point(port);
    // While it stays stopped, for many intervals: no sample is taken, every request is answered.
    let mut slowest = Duration::ZERO;
    let mut answered = 0;
    while stopped_at.elapsed() < Duration::from_secs(3) {
        assert_eq!(thread_state(pid, sampler), 't', "the sampler runs again");
        let asked = Instant::now();
        assert_eq!(
            http_get(port, "/healthz").unwrap(),
            (200, "ok\n".to_owned())
        );
        slowest = slowest.max(asked.elapsed());
        assert_eq!(http_get(port, "/metrics").unwrap().0, 200);
        answered += 1;
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        newest_point(port),
        stuck,
        "a sample was taken while stopped"
    );
    assert_eq!(thread_state(pid, sampler), 't');
    let stopped_for = stopped_at.elapsed();
    // SAFETY: as above; the thread is in a ptrace stop.
    unsafe {
        assert_eq!(libc::ptrace(libc::PTRACE_DETACH, sampler, 0, 0), 0);
    }
    eprintln!(
        "sampling stopped for {stopped_for:?}: /healthz answered {answered} times, the slowest \
         in {slowest:?}"
    );
    assert!(stuck >= before);
    // Sampling goes on where it stopped.
    let resumed = poll(Duration::from_secs(10), || {
        let newest = newest_point(port);
        (newest > stuck).then_some(newest)
    });
    assert!(resumed.is_some(), "no sample after the sampler was resumed");
    assert_eq!(http_get(port, "/readyz").unwrap().0, 200);
}
