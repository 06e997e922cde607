//! Throwaway PostgreSQL clusters from the local server binaries: [`PgServer`].
//!
//! `initdb` into a temporary directory, a free loopback port, the Unix socket inside the
//! temporary directory, `trust` authentication for user `postgres`. When the tests run
//! as root (CI containers), the server tools run as user `postgres` through
//! `runuser -u postgres --`, since PostgreSQL refuses to run as root.
//!
//! By default the server trades durability for speed (`fsync=off`,
//! `synchronous_commit=off`, `full_page_writes=off`); [`PgServerBuilder::durable`] keeps
//! PostgreSQL's defaults, for fault tests that crash the server and for benchmarks.
//!
//! A small watchdog (`sh`) stops the server and removes its directory if the process
//! that started it dies without dropping it (a killed test binary, or a server kept in a
//! `static`), so servers never outlive their test run.
//!
//! ```no_run
//! use test_support::postgres::PgServer;
//!
//! let server = PgServer::start()?;
//! let url = server.create_database("app")?;
//! println!("DATABASE_URL={url}");
//! # Ok::<(), test_support::common::ServerError>(())
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{ServerError, find_binary, free_port, temp_dir, wait_for_port};

/// What to say when the server binaries are missing.
pub const INSTALL_HINT: &str =
    "install PostgreSQL server binaries (Debian: apt-get install postgresql)";
/// How long the server may take to accept connections after starting.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Tries to start a fresh server before giving up (a free port may be taken meanwhile).
const START_ATTEMPTS: usize = 3;

/// Settings of a [`PgServer`]; build one with [`PgServer::builder`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgServerBuilder {
    durable: bool,
    max_connections: u32,
    tls: bool,
    settings: Vec<(String, String)>,
    env: Vec<(String, String)>,
}

impl Default for PgServerBuilder {
    fn default() -> Self {
        Self {
            durable: false,
            max_connections: 300,
            tls: false,
            settings: Vec::new(),
            env: Vec::new(),
        }
    }
}

impl PgServerBuilder {
    /// Keep PostgreSQL's durable defaults (`fsync`, `synchronous_commit` and
    /// `full_page_writes` on) instead of the fast test settings.
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// `max_connections` of the server (default 300: the conformance suite runs many
    /// tests at once, each with a small pool and a LISTEN connection).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// Turns TLS on with a self-signed certificate made by the `openssl` command, so
    /// clients can connect with `sslmode=require`. Plain connections still work.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Adds a `name = value` line to `postgresql.conf`.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Adds an environment variable to the server's processes (every start, restarts
    /// included), e.g. those of [`crate::clock::shifted_clock_env`] to run the server with
    /// its clock shifted.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Creates the cluster and starts the server.
    pub fn start(self) -> Result<PgServer, ServerError> {
        let bin = find_bin_dir()?;
        let as_postgres = running_as_root();
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            match PgServer::create(&self, &bin, as_postgres) {
                Ok(server) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ServerError("PostgreSQL did not start".into())))
    }
}

/// A running throwaway PostgreSQL server. Dropping it stops the server and deletes
/// its directory.
pub struct PgServer {
    bin: PathBuf,
    /// Temporary root: holds `data/`, `sock/`, `server.log` (and TLS files).
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
    running: bool,
    watchdog: Option<Child>,
    /// Extra environment of the server processes.
    env: Vec<(String, String)>,
}

impl fmt::Debug for PgServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgServer")
            .field("dir", &self.dir)
            .field("port", &self.port)
            .field("as_postgres", &self.as_postgres)
            .field("running", &self.running)
            .finish()
    }
}

impl PgServer {
    /// Starts a server with the fast test settings.
    pub fn start() -> Result<Self, ServerError> {
        PgServerBuilder::default().start()
    }

    /// Starts a server with PostgreSQL's durable defaults.
    pub fn start_durable() -> Result<Self, ServerError> {
        PgServerBuilder::default().durable().start()
    }

    /// A builder for the other settings.
    pub fn builder() -> PgServerBuilder {
        PgServerBuilder::default()
    }

    fn create(cfg: &PgServerBuilder, bin: &Path, as_postgres: bool) -> Result<Self, ServerError> {
        let dir = server_temp_dir()?;
        let port = free_port()?;
        let mut server = Self {
            bin: bin.to_path_buf(),
            dir,
            port,
            as_postgres,
            running: false,
            watchdog: None,
            env: cfg.env.clone(),
        };
        server.init(cfg)?;
        server.start_again()?;
        Ok(server)
    }

    /// `initdb` and the configuration.
    fn init(&mut self, cfg: &PgServerBuilder) -> Result<(), ServerError> {
        let sock = self.dir.join("sock");
        std::fs::create_dir_all(&sock)
            .map_err(|e| ServerError(format!("cannot create {}: {e}", sock.display())))?;
        if self.as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&self.dir)
                .status()
                .map_err(|e| ServerError(format!("cannot run chown: {e}")))?;
            if !status.success() {
                return Err(ServerError(format!(
                    "chown postgres {} failed (does user postgres exist? {INSTALL_HINT})",
                    self.dir.display()
                )));
            }
        }
        let data = self.data_dir();
        let out = self
            .tool("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .map_err(|e| ServerError(format!("cannot run initdb: {e} ({INSTALL_HINT})")))?;
        check(&out, "initdb")?;

        let mut conf = String::from("\n# throwaway test server (test-support)\n");
        let mut set = |k: &str, v: &str| conf.push_str(&format!("{k} = '{v}'\n"));
        set("listen_addresses", "127.0.0.1");
        set("port", &self.port.to_string());
        set("unix_socket_directories", &sock.display().to_string());
        set("max_connections", &cfg.max_connections.to_string());
        set("logging_collector", "off");
        if !cfg.durable {
            set("fsync", "off");
            set("synchronous_commit", "off");
            set("full_page_writes", "off");
        }
        if cfg.tls {
            self.make_certificate()?;
            set("ssl", "on");
            set(
                "ssl_cert_file",
                &self.dir.join("server.crt").display().to_string(),
            );
            set(
                "ssl_key_file",
                &self.dir.join("server.key").display().to_string(),
            );
        }
        for (k, v) in &cfg.settings {
            set(k, &v.replace('\'', "''"));
        }
        let path = data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&path)
            .map_err(|e| ServerError(format!("cannot read {}: {e}", path.display())))?;
        existing.push_str(&conf);
        std::fs::write(&path, existing)
            .map_err(|e| ServerError(format!("cannot write {}: {e}", path.display())))
    }

    /// A self-signed certificate for `localhost` / 127.0.0.1, readable only by the server.
    fn make_certificate(&self) -> Result<(), ServerError> {
        let key = self.dir.join("server.key");
        let crt = self.dir.join("server.crt");
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .output()
            .map_err(|e| ServerError(format!("cannot run openssl (needed for TLS): {e}")))?;
        check(&out, "openssl req")?;
        if self.as_postgres {
            let out = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&key)
                .arg(&crt)
                .output()
                .map_err(|e| ServerError(format!("cannot run chown: {e}")))?;
            check(&out, "chown")?;
        }
        set_mode(&key, 0o600)
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The loopback TCP port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server log (useful when a test fails).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The URL of database `postgres` as user `postgres` (no password: trust auth).
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The URL of database `name` on this server.
    pub fn database_url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates database `name` (letters, digits and `_`) and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, ServerError> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(ServerError(format!(
                "database name {name:?}: use a-z 0-9 _ only"
            )));
        }
        self.psql(&format!("CREATE DATABASE {name}"))?;
        Ok(self.database_url(name))
    }

    /// Runs `sql` with `psql` against database `postgres`; returns its unaligned,
    /// tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String, ServerError> {
        let psql = find_binary("psql", &[&self.bin.display().to_string()])
            .unwrap_or_else(|| self.bin.join("psql"));
        let out = Command::new(psql)
            .args([
                "-X",
                "-q",
                "-tA",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| ServerError(format!("cannot run psql: {e} ({INSTALL_HINT})")))?;
        check(&out, "psql")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Writes about 100 MiB of WAL and checkpoints, so that WAL segment files exist for
    /// PostgreSQL to recycle. A fresh cluster otherwise creates (zero-fills and, when
    /// durable, fsyncs) a new 16 MiB segment every few thousand commits, which makes its
    /// first seconds several times slower than its steady state (measured here: 380
    /// single-row commits/s cold against 2,300/s warm). Call it before measuring.
    pub fn warm_up(&self) -> Result<(), ServerError> {
        self.psql(
            "CREATE TABLE test_support_warm_up AS \
               SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 400000) g; \
             DROP TABLE test_support_warm_up; \
             CHECKPOINT;",
        )
        .map(|_| ())
    }

    /// Whether the server is running (as far as this handle knows).
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Stops the server with `pg_ctl -m fast stop`: clients are disconnected, open
    /// transactions roll back, and a checkpoint is written.
    pub fn stop_fast(&mut self) -> Result<(), ServerError> {
        self.stop("fast")
    }

    fn stop(&mut self, mode: &str) -> Result<(), ServerError> {
        if !self.running {
            return Ok(());
        }
        let out = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", mode, "-w", "-t", "60", "stop"])
            .output()
            .map_err(|e| ServerError(format!("cannot run pg_ctl: {e}")))?;
        check(&out, "pg_ctl stop")?;
        self.running = false;
        Ok(())
    }

    /// Starts the server again on the same data directory and port (after
    /// [`PgServer::stop_fast`] or [`PgServer::kill`]; after a kill it runs crash
    /// recovery first).
    pub fn start_again(&mut self) -> Result<(), ServerError> {
        if self.running {
            return Ok(());
        }
        // After a SIGKILL of the postmaster, its backends may take a moment to notice
        // and exit; until then the old shared memory is in use and start-up fails.
        let until = Instant::now() + START_TIMEOUT;
        loop {
            let out = self
                .tool("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", "60", "start"])
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .output()
                .map_err(|e| ServerError(format!("cannot run pg_ctl: {e} ({INSTALL_HINT})")))?;
            if out.status.success() {
                break;
            }
            if Instant::now() >= until {
                return Err(ServerError(format!(
                    "pg_ctl start failed: {}; server log: {}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        wait_for_port(self.port, START_TIMEOUT)?;
        self.running = true;
        self.watch();
        Ok(())
    }

    /// Kills the postmaster with SIGKILL (a crash: no checkpoint, no goodbye to
    /// clients; the backends exit when they notice). [`PgServer::start_again`] recovers.
    pub fn kill(&mut self) -> Result<(), ServerError> {
        let Some(pid) = self.postmaster_pid() else {
            self.running = false;
            return Ok(());
        };
        let out = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .output()
            .map_err(|e| ServerError(format!("cannot run kill: {e}")))?;
        check(&out, "kill -9")?;
        self.running = false;
        // Wait for the postmaster to be gone.
        let until = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The postmaster's process id, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// The postmaster's process id followed by those of its children (the backends
    /// serving connections and the background processes), read from `/proc`: what a
    /// fault test signals to freeze the whole server (SIGSTOP) and let it go on
    /// (SIGCONT). Empty when the server does not run.
    pub fn pids(&self) -> Vec<u32> {
        let Some(postmaster) = self.postmaster_pid() else {
            return Vec::new();
        };
        let mut pids = vec![postmaster];
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u32>().ok())
            else {
                continue;
            };
            // `/proc/<pid>/stat`: `pid (comm) state ppid ...`; comm may hold spaces or
            // parentheses, so the fields are read after the last `)`.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|ppid| ppid.parse::<u32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        pids
    }

    /// A server tool (`initdb`, `pg_ctl`), run as user `postgres` when we are root.
    fn tool(&self, name: &str) -> Command {
        let path = self.bin.join(name);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// Starts (or restarts) the watchdog that stops the server and removes the
    /// directory once this process is gone.
    fn watch(&mut self) {
        if let Some(mut old) = self.watchdog.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = if self.as_postgres {
            format!("runuser -u postgres -- '{}'", pg_ctl.display())
        } else {
            format!("'{}'", pg_ctl.display())
        };
        let script = format!(
            "while kill -0 {parent} 2>/dev/null; do sleep 1; done; \
             {stop} -D '{data}' -m immediate -w -t 30 stop >/dev/null 2>&1; rm -rf '{dir}'",
            parent = std::process::id(),
            data = self.data_dir().display(),
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

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join(" | ")
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let _ = self.stop("immediate");
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn check(out: &Output, what: &str) -> Result<(), ServerError> {
    if out.status.success() {
        Ok(())
    } else {
        Err(ServerError(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        )))
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb`, else
/// `pg_config --bindir`, else the directory of `initdb` on the `PATH`.
pub fn find_bin_dir() -> Result<PathBuf, ServerError> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if bin.join("initdb").is_file() {
            return Ok(bin);
        }
    }
    if let Some(initdb) = find_binary("initdb", &[])
        && let Some(bin) = initdb.parent()
    {
        return Ok(bin.to_path_buf());
    }
    Err(ServerError(format!(
        "no PostgreSQL server binaries (initdb) found: {INSTALL_HINT}"
    )))
}

/// Whether this process runs as root (PostgreSQL refuses to; we use `runuser`).
fn running_as_root() -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::metadata("/proc/self") {
            return meta.uid() == 0;
        }
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    }
    #[cfg(not(unix))]
    {
        false
    }
}

/// A temporary directory user `postgres` can reach: under the system temporary
/// directory when every ancestor is world-traversable, else under `/tmp`.
fn server_temp_dir() -> Result<PathBuf, ServerError> {
    let dir = temp_dir("pg")?;
    if traversable(&dir) {
        return Ok(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let fallback = PathBuf::from("/tmp").join(
        dir.file_name()
            .map(|n| n.to_owned())
            .unwrap_or_else(|| "pg".into()),
    );
    std::fs::create_dir_all(&fallback)
        .map_err(|e| ServerError(format!("cannot create {}: {e}", fallback.display())))?;
    set_mode(&fallback, 0o755)?;
    Ok(fallback)
}

#[cfg(unix)]
fn traversable(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    dir.ancestors()
        .skip(1)
        .all(|a| std::fs::metadata(a).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

#[cfg(not(unix))]
fn traversable(_dir: &Path) -> bool {
    true
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> Result<(), ServerError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| ServerError(format!("cannot chmod {}: {e}", path.display())))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> Result<(), ServerError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts a server, creates a database, restarts it, kills it and recovers.
    /// Skips (passes) when the binaries are not installed.
    #[test]
    fn lifecycle() {
        let mut server = match PgServer::start() {
            Ok(s) => s,
            Err(e) if e.0.contains("no PostgreSQL server binaries") => {
                eprintln!("skipped: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(server.psql("SELECT 1").expect("psql"), "1");
        server.warm_up().expect("warm up");
        let url = server.create_database("t_one").expect("create");
        assert!(url.ends_with(&format!(":{}/t_one", server.port())), "{url}");
        server
            .psql("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
            .expect("write");
        server.stop_fast().expect("stop");
        assert!(server.psql("SELECT 1").is_err(), "stopped");
        server.start_again().expect("start again");
        assert_eq!(server.psql("SELECT x FROM t").expect("read"), "7");
        server.kill().expect("kill");
        server.start_again().expect("recover after kill");
        assert_eq!(server.psql("SELECT count(*) FROM t").expect("read"), "1");
        let dir = server.dir.clone();
        drop(server);
        assert!(!dir.exists(), "directory removed");
    }
}
