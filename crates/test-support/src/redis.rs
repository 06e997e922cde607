//! Throwaway `redis-server` processes: a standalone server ([`RedisServer`]) and a
//! cluster of masters ([`RedisCluster`]), on free loopback ports in temporary
//! directories, started from the local binaries.
//!
//! Each server runs in the foreground as a child process. A small watchdog (`sh`) kills
//! it and removes its directory if the process that started it dies without dropping it
//! (a test binary that panics or is killed, or a server kept in a `static`), so servers
//! never outlive their test run.
//!
//! ```no_run
//! use test_support::redis::RedisServer;
//!
//! let server = RedisServer::start()?;
//! println!("REDIS_URL={}", server.url());
//! # Ok::<(), test_support::common::ServerError>(())
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{ServerError, find_binary, free_port, free_port_pair, temp_dir};

/// What to say when `redis-server` is missing.
const INSTALL_HINT: &str = "install redis-server (Debian: apt-get install redis-server)";
/// How long a server may take to answer PING after starting (or loading its AOF).
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Tries to start a server before giving up (a free port may be taken meanwhile).
const START_ATTEMPTS: usize = 3;

/// Settings of a [`RedisServer`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerConfig {
    /// `--appendonly yes` with `--appendfsync always`: every acknowledged write is on
    /// disk before the reply, so it survives a kill and a [`RedisServer::restart`].
    pub durable: bool,
    /// Extra `--name value` arguments, e.g. `("maxclients", "100")`.
    pub extra: Vec<(String, String)>,
}

impl ServerConfig {
    /// The durable configuration: `appendonly yes`, `appendfsync always`.
    pub fn durable() -> Self {
        Self {
            durable: true,
            extra: Vec::new(),
        }
    }
}

/// A `redis-server` on a free loopback port, in a temporary directory of its own.
/// Dropping it kills the server and removes the directory.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    config: ServerConfig,
    /// Extra startup arguments (cluster mode); kept for restarts.
    args: Vec<String>,
    child: Option<Child>,
    watchdog: Option<Child>,
}

impl RedisServer {
    /// Starts a server with no persistence (`--save '' --appendonly no`).
    pub fn start() -> Result<Self, ServerError> {
        Self::start_with(ServerConfig::default())
    }

    /// Starts a server with `config`.
    pub fn start_with(config: ServerConfig) -> Result<Self, ServerError> {
        Self::launch(config, Vec::new(), free_port)
    }

    fn launch(
        config: ServerConfig,
        args: Vec<String>,
        pick_port: fn() -> Result<u16, ServerError>,
    ) -> Result<Self, ServerError> {
        redis_server()?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let port = pick_port()?;
            let dir = temp_dir("redis-test")?;
            let mut server = Self {
                port,
                dir,
                config: config.clone(),
                args: args.clone(),
                child: None,
                watchdog: None,
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ServerError("redis-server did not start".into())))
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (holds the AOF, `redis.log` and `redis.pid`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's process id while it runs (for fault tests that signal it, e.g.
    /// SIGSTOP to freeze it and SIGCONT to let it go on).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the server at once with SIGKILL: no shutdown, no final save.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server gracefully (`SHUTDOWN`: with `durable`, the AOF is flushed),
    /// killing it if it does not exit within 10 seconds.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = command(self.port, &["SHUTDOWN"]);
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the server again on the same port and directory (stopping it first if it
    /// runs), so durable data survives. Waits until it answers PING (after loading).
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.stop();
        let until = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                // The port may linger for a moment after the old process exits.
                Err(e) if Instant::now() >= until => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Sends one command and returns the raw RESP reply (for tests: `CLIENT LIST`,
    /// `DEBUG SLEEP`, ...). Std only: no client library needed.
    pub fn command(&self, args: &[&str]) -> Result<String, ServerError> {
        command(self.port, args)
    }

    fn spawn(&mut self) -> Result<(), ServerError> {
        let binary = redis_server()?;
        let log = self.dir.join("redis.log");
        let pidfile = self.dir.join("redis.pid");
        let port = self.port.to_string();
        let mut cmd = Command::new(binary);
        cmd.args(["--port", &port, "--bind", "127.0.0.1", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .arg("--pidfile")
            .arg(&pidfile)
            .args(["--save", ""]);
        if self.config.durable {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        for (name, value) in &self.config.extra {
            cmd.arg(format!("--{name}")).arg(value);
        }
        cmd.args(&self.args);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| ServerError(format!("cannot start redis-server: {e}")))?;
        let until = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = std::fs::read_to_string(&log)
                    .map(|text| text.lines().rev().take(3).collect::<Vec<_>>().join(" | "))
                    .unwrap_or_default();
                return Err(ServerError(format!(
                    "redis-server on port {port} exited at start ({status}): {tail}"
                )));
            }
            // Up and done loading (a server with `requirepass` answers NOAUTH).
            if command(self.port, &["PING"])
                .is_ok_and(|r| r.starts_with("+PONG") || r.starts_with("-NOAUTH"))
            {
                break;
            }
            if Instant::now() >= until {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ServerError(format!(
                    "redis-server on port {port} did not answer PING within {START_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.watch(child.id());
        self.child = Some(child);
        Ok(())
    }

    /// Starts (or restarts) the watchdog that kills server `pid` and removes the
    /// directory once this process is gone.
    fn watch(&mut self, pid: u32) {
        if let Some(mut old) = self.watchdog.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let script = format!(
            "while kill -0 {parent} 2>/dev/null; do sleep 1; done; kill -9 {pid} 2>/dev/null; \
             rm -rf '{dir}'",
            parent = std::process::id(),
            dir = self.dir.display()
        );
        self.watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of masters without replicas, each a [`RedisServer`] in cluster mode
/// on a port `p` with `p + 10000` free for the cluster bus. Dropping it stops them all.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` nodes (at least 3), joins them with
    /// `redis-cli --cluster create`, and waits until every node reports
    /// `cluster_state:ok` and knows every other node.
    pub fn start(masters: usize) -> Result<Self, ServerError> {
        if masters < 3 {
            return Err(ServerError(
                "a Redis Cluster needs at least 3 masters".into(),
            ));
        }
        let cli = find_binary("redis-cli", &[])
            .ok_or_else(|| ServerError(format!("redis-cli not found: {INSTALL_HINT}")))?;
        let mut nodes = Vec::with_capacity(masters);
        for _ in 0..masters {
            let args = vec![
                "--cluster-enabled".to_owned(),
                "yes".to_owned(),
                "--cluster-config-file".to_owned(),
                "nodes.conf".to_owned(),
                "--cluster-node-timeout".to_owned(),
                "5000".to_owned(),
            ];
            nodes.push(RedisServer::launch(ServerConfig::default(), args, || {
                free_port_pair(10000)
            })?);
        }
        let cluster = Self { nodes };
        let mut create = Command::new(cli);
        create.args(["--cluster", "create"]);
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port()));
        }
        let output = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| ServerError(format!("cannot run redis-cli --cluster create: {e}")))?;
        if !output.status.success() {
            return Err(ServerError(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .chain(String::from_utf8_lossy(&output.stderr).lines())
                    .filter(|l| l.contains("ERR") || l.contains("rror"))
                    .collect::<Vec<_>>()
                    .join(" | ")
            )));
        }
        cluster.wait_ok(START_TIMEOUT)?;
        Ok(cluster)
    }

    /// Waits until every node says `cluster_state:ok` and knows all the others.
    fn wait_ok(&self, timeout: Duration) -> Result<(), ServerError> {
        let until = Instant::now() + timeout;
        let n = self.nodes.len();
        loop {
            let ready = self.nodes.iter().all(|node| {
                let info = node.command(&["CLUSTER", "INFO"]).unwrap_or_default();
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{n}"))
            });
            if ready {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(ServerError(format!(
                    "the cluster did not reach cluster_state:ok within {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis://127.0.0.1:<port>` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes, for fault tests.
    pub fn nodes(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }
}

/// The `redis-server` binary, or an error saying what to install.
fn redis_server() -> Result<PathBuf, ServerError> {
    find_binary("redis-server", &["/usr/sbin", "/usr/local/bin"])
        .ok_or_else(|| ServerError(format!("redis-server not found: {INSTALL_HINT}")))
}

/// Sends one command in RESP over a fresh connection and reads the reply (best effort:
/// until the reply looks complete or the server stops sending for 200 ms).
fn command(port: u16, args: &[&str]) -> Result<String, ServerError> {
    let addr = ([127, 0, 0, 1], port).into();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| ServerError(format!("cannot connect to 127.0.0.1:{port}: {e}")))?;
    let io = |e: std::io::Error| ServerError(format!("talking to 127.0.0.1:{port}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if !reply.is_empty() => {
                let _ = e;
                break;
            }
            Err(e) => return Err(io(e)),
        };
        reply.extend_from_slice(&buf[..n]);
        if complete(&reply) {
            break;
        }
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(io)?;
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// Whether `reply` holds one whole simple reply (status, error, integer or bulk string).
fn complete(reply: &[u8]) -> bool {
    let Some(line_end) = reply.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    match reply.first() {
        Some(b'+' | b'-' | b':') => true,
        Some(b'$') => {
            let len: i64 = std::str::from_utf8(&reply[1..line_end])
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(-1);
            len < 0 || reply.len() >= line_end + 2 + len as usize + 2
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_recognised_when_complete() {
        assert!(complete(b"+PONG\r\n"));
        assert!(complete(b"$5\r\nhello\r\n"));
        assert!(!complete(b"$5\r\nhel"));
        assert!(complete(b"$-1\r\n"));
        assert!(!complete(b"+PON"));
    }

    #[test]
    fn a_server_starts_restarts_keeps_durable_data_and_cleans_up() {
        let mut server = match RedisServer::start_with(ServerConfig::durable()) {
            Ok(server) => server,
            Err(e) if e.0.contains("not found") => return, // no redis-server here
            Err(e) => panic!("{e}"),
        };
        let dir = server.dir().to_path_buf();
        assert!(
            server
                .command(&["SET", "k", "v"])
                .expect("set")
                .starts_with("+OK")
        );
        server.kill();
        assert!(!server.is_running());
        server.restart().expect("restart");
        assert_eq!(server.command(&["GET", "k"]).expect("get"), "$1\r\nv\r\n");
        drop(server);
        assert!(!dir.exists(), "the directory is removed on drop");
    }
}
