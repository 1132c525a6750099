//! `redis-server` processes owned by a test: started on free loopback ports in their own temp
//! directories, without persistence, killed on drop.
//!
//! Without `redis-server` on `PATH` a test prints "skipped: redis-server not found" and returns
//! — unless `CI=true`, where it fails.
#![allow(dead_code)] // each test binary uses a different part

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// How long a server may take to answer PING after start, on a loaded machine.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// Whether `redis-server` can run here. Panics under `CI=true` when it cannot.
pub(crate) fn redis_available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("redis-server not found, and CI=true: install redis-server (and redis-tools)");
        }
        eprintln!("skipped: redis-server not found");
    }
    found
}

/// A port on 127.0.0.1 free now (and, for cluster nodes, its bus port `port + 10000` too).
fn free_port(with_bus: bool) -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = l.local_addr().expect("local addr").port();
        if !with_bus {
            return port;
        }
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// One `redis-server` process on a loopback port.
#[derive(Debug)]
pub(crate) struct RedisServer {
    port: u16,
    dir: PathBuf,
    cluster: bool,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a standalone server, or `None` when the test must be skipped.
    pub(crate) fn start() -> Option<Self> {
        if !redis_available() {
            return None;
        }
        Some(Self::start_node(false))
    }

    fn start_node(cluster: bool) -> Self {
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port(cluster);
            let dir = std::env::temp_dir().join(format!(
                "tower-idempotency-redis-{}-{}-{port}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).expect("create a temp dir for redis-server");
            let mut server = RedisServer {
                port,
                dir,
                cluster,
                child: None,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_err = e,
            }
        }
        panic!("could not start redis-server: {last_err}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--logfile", "redis.log"]);
        if self.cluster {
            cmd.args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "5000"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn redis-server: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if self.ping() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                return Err(format!("redis-server exited with {status}: {log}"));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err("redis-server did not answer PING in time".into());
            }
            thread::sleep(Duration::from_millis(20)); // polling a process with a deadline
        }
    }

    /// Sends one command (inline protocol) and returns the raw reply, or `None` when the server
    /// does not answer.
    pub(crate) fn command(&self, line: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(format!("{line}\r\n").as_bytes()).ok()?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::new();
        // Replies used here fit one read, or end with a line break.
        loop {
            let n = s.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if is_complete(&out) {
                break;
            }
        }
        Some(String::from_utf8_lossy(&out).into_owned())
    }

    fn ping(&self) -> bool {
        self.command("PING").is_some_and(|r| r.starts_with("+PONG"))
    }

    /// The port the server listens on.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (empty: nothing is persisted).
    pub(crate) fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The port may linger for a moment after the kill.
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restart retry: {e}");
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("could not restart redis-server: {e}"),
            }
        }
    }

    /// `INFO commandstats` calls per command, e.g. `("evalsha", 3)`.
    pub(crate) fn command_calls(&self) -> Vec<(String, u64)> {
        let info = self.command("INFO commandstats").unwrap_or_default();
        info.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("cmdstat_")?;
                let (name, stats) = rest.split_once(':')?;
                let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.trim().parse().ok()?))
            })
            .collect()
    }

    /// Calls of one command since the server started (0 if never called).
    pub(crate) fn calls(&self, command: &str) -> u64 {
        self.command_calls()
            .into_iter()
            .find(|(n, _)| n == command)
            .map_or(0, |(_, c)| c)
    }
}

fn is_complete(reply: &[u8]) -> bool {
    if reply.first() == Some(&b'$') {
        // Bulk string: $<len>\r\n<data>\r\n
        let text = String::from_utf8_lossy(reply);
        if let Some((head, _)) = text.split_once("\r\n")
            && let Ok(len) = head[1..].parse::<i64>()
        {
            if len < 0 {
                return true;
            }
            return reply.len() >= head.len() + 2 + len as usize + 2;
        }
        return false;
    }
    reply.ends_with(b"\r\n")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A 3-master Redis Cluster on loopback, built with `redis-cli --cluster create`.
#[derive(Debug)]
pub(crate) struct RedisCluster {
    pub(crate) nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers and joins them, or `None` when skipped.
    pub(crate) fn start() -> Option<Self> {
        if !redis_available() {
            return None;
        }
        let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_node(true)).collect();
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for n in &nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = cmd
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create (install redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !nodes.iter().all(|n| {
            n.command("CLUSTER INFO")
                .is_some_and(|i| i.contains("cluster_state:ok"))
        }) {
            assert!(Instant::now() < deadline, "cluster did not become ok");
            thread::sleep(Duration::from_millis(50));
        }
        Some(RedisCluster { nodes })
    }

    /// `redis://127.0.0.1:<port>/` of every node.
    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// A server shared by the tests of one binary that overlap in time; stopped when the last of
/// them drops its handle (so no process outlives the tests).
pub(crate) fn shared<T>(
    slot: &'static Mutex<Weak<T>>,
    start: impl FnOnce() -> Option<T>,
) -> Option<Arc<T>> {
    let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(live) = s.upgrade() {
        return Some(live);
    }
    let fresh = Arc::new(start()?);
    *s = Arc::downgrade(&fresh);
    Some(fresh)
}
