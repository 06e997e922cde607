//! End-to-end: a password in the queue URL never appears in anything the
//! `penguiflow-worker` command prints, on either backend, whether the password sits in
//! the user info (percent-encoded, or with an unencoded `/`), in a `password=` or an
//! `sslpassword=` query parameter, and whether the command succeeds or fails (wrong
//! password, unreachable port, unparsable URL).
//!
//! Every URL goes through `status`, `enqueue` and `dlq list`, and through `run` at the
//! log levels info, debug and trace in both log formats (a worker that starts is given a
//! job, then stopped with SIGTERM). Both throwaway servers require a password: Redis with
//! `requirepass`, PostgreSQL with scram-sha-256 for the role the tests connect as.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{BIN, Output, cli_env, closed_port, queue_name, scratch_file};
use test_support::postgres::PgServer;
use test_support::redis::{RedisServer, ServerConfig};

/// The Redis server's password; the `/` must be percent-encoded in a URL.
const REDIS_PASSWORD: &str = "RedisLeft7q/RedisRight7q";
/// The PostgreSQL role's password; the `/` must be percent-encoded in a URL.
const PG_PASSWORD: &str = "PgLeft3k/PgRight3k";
/// A password no server accepts.
const WRONG_PASSWORD: &str = "WrongLeft9w/WrongRight9w";
/// A client-key passphrase (`sslpassword=`), which no driver here uses.
const SSL_PASSWORD: &str = "SslKeyPass5x";

/// Every secret above, cut at the reserved characters: none of these pieces may appear.
const PIECES: &[&str] = &[
    "RedisLeft7q",
    "RedisRight7q",
    "PgLeft3k",
    "PgRight3k",
    "WrongLeft9w",
    "WrongRight9w",
    "SslKeyPass5x",
];

/// The PostgreSQL role the URLs name.
const PG_ROLE: &str = "app";
/// Its database.
const PG_DATABASE: &str = "secrets";

/// Log level and format of each `run`.
const RUN_LOGS: &[(&str, &str)] = &[
    ("info", "json"),
    ("debug", "pretty"),
    ("trace", "json"),
    ("trace", "pretty"),
];

/// `/` as it must be written inside a URL's user info or query.
fn encoded(password: &str) -> String {
    password.replace('/', "%2F")
}

/// A throwaway `redis-server` that requires [`REDIS_PASSWORD`]; returns its port.
fn redis_port() -> u16 {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            RedisServer::start_with(ServerConfig {
                extra: vec![("requirepass".into(), REDIS_PASSWORD.into())],
                ..ServerConfig::default()
            })
            .unwrap_or_else(|e| panic!("cannot start a throwaway redis-server: {e}"))
        })
        .port()
}

/// A throwaway PostgreSQL server where role [`PG_ROLE`] logs in over TCP with
/// [`PG_PASSWORD`] (scram-sha-256), with database [`PG_DATABASE`] migrated through the
/// command; returns its port.
fn postgres_port() -> u16 {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let server = PgServer::start()
                .unwrap_or_else(|e| panic!("cannot start a throwaway PostgreSQL server: {e}"));
            let psql = |sql: &str| {
                server
                    .psql(sql)
                    .unwrap_or_else(|e| panic!("psql {sql:?}: {e}"))
            };
            psql(&format!(
                "CREATE ROLE {PG_ROLE} LOGIN SUPERUSER PASSWORD '{PG_PASSWORD}'"
            ));
            psql(&format!("CREATE DATABASE {PG_DATABASE} OWNER {PG_ROLE}"));
            // The role must give its password over TCP; the first matching line wins.
            let hba = server.data_dir().join("pg_hba.conf");
            let rules = std::fs::read_to_string(&hba)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", hba.display()));
            std::fs::write(
                &hba,
                format!("host all {PG_ROLE} 127.0.0.1/32 scram-sha-256\n{rules}"),
            )
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", hba.display()));
            psql("SELECT pg_reload_conf()");
            let url = pg_userinfo_url(server.port(), &encoded(PG_PASSWORD));
            let out = cli_env(&["--url", &url, "migrate"], &[]);
            assert_no_secret(&out.stdout, "migrate stdout");
            assert_no_secret(&out.stderr, "migrate stderr");
            out.assert_code(0, "penguiflow-worker migrate");
            server
        })
        .port()
}

fn redis_userinfo_url(port: u16, password: &str) -> String {
    format!("redis://:{password}@127.0.0.1:{port}/0")
}

fn pg_userinfo_url(port: u16, password: &str) -> String {
    format!("postgres://{PG_ROLE}:{password}@127.0.0.1:{port}/{PG_DATABASE}?sslmode=disable")
}

fn pg_param_url(port: u16, password: &str) -> String {
    format!(
        "postgres://127.0.0.1:{port}/{PG_DATABASE}?user={PG_ROLE}&password={password}&sslmode=disable"
    )
}

/// Panics, naming the piece, when `text` holds any piece of any secret.
#[track_caller]
fn assert_no_secret(text: &str, what: &str) {
    for piece in PIECES {
        assert!(
            !text.contains(piece),
            "{what} shows the secret piece {piece:?}:\n{text}"
        );
    }
}

/// One queue URL and whether the commands given it should work.
struct Case {
    what: &'static str,
    url: String,
    works: bool,
}

fn redis_working_cases() -> Vec<Case> {
    let port = redis_port();
    let right = encoded(REDIS_PASSWORD);
    vec![
        Case {
            what: "Redis, password in the user info",
            url: redis_userinfo_url(port, &right),
            works: true,
        },
        Case {
            what: "Redis, password in the user info and sslpassword= parameter",
            url: format!(
                "{}?sslpassword={SSL_PASSWORD}",
                redis_userinfo_url(port, &right)
            ),
            works: true,
        },
    ]
}

fn redis_failing_cases() -> Vec<Case> {
    let port = redis_port();
    vec![
        Case {
            what: "Redis, wrong password in the user info",
            url: redis_userinfo_url(port, &encoded(WRONG_PASSWORD)),
            works: false,
        },
        Case {
            what: "Redis, right password with an unencoded /",
            url: redis_userinfo_url(port, REDIS_PASSWORD),
            works: false,
        },
        Case {
            what: "Redis, password= parameter (Redis takes it from the user info only)",
            url: format!(
                "redis://127.0.0.1:{port}/0?password={}",
                encoded(REDIS_PASSWORD)
            ),
            works: false,
        },
        Case {
            what: "Redis, unreachable port, with sslpassword=",
            url: format!(
                "{}?sslpassword={SSL_PASSWORD}",
                redis_userinfo_url(closed_port(), &encoded(REDIS_PASSWORD))
            ),
            works: false,
        },
    ]
}

fn postgres_working_cases() -> Vec<Case> {
    let port = postgres_port();
    let right = encoded(PG_PASSWORD);
    vec![
        Case {
            what: "PostgreSQL, password in the user info",
            url: pg_userinfo_url(port, &right),
            works: true,
        },
        Case {
            what: "PostgreSQL, password= parameter",
            url: pg_param_url(port, &right),
            works: true,
        },
        Case {
            what: "PostgreSQL, password in the user info and sslpassword= parameter",
            url: format!(
                "{}&sslpassword={SSL_PASSWORD}",
                pg_userinfo_url(port, &right)
            ),
            works: true,
        },
    ]
}

fn postgres_failing_cases() -> Vec<Case> {
    let port = postgres_port();
    vec![
        Case {
            what: "PostgreSQL, wrong password in the user info",
            url: pg_userinfo_url(port, &encoded(WRONG_PASSWORD)),
            works: false,
        },
        Case {
            what: "PostgreSQL, wrong password= parameter",
            url: pg_param_url(port, &encoded(WRONG_PASSWORD)),
            works: false,
        },
        Case {
            what: "PostgreSQL, right password with an unencoded /",
            url: pg_userinfo_url(port, PG_PASSWORD),
            works: false,
        },
        Case {
            what: "PostgreSQL, unreachable port, password= and sslpassword= parameters",
            url: format!(
                "{}&sslpassword={SSL_PASSWORD}",
                pg_param_url(closed_port(), &encoded(PG_PASSWORD))
            ),
            works: false,
        },
    ]
}

/// Checks both streams of a finished command, and its exit code.
#[track_caller]
fn check_output(case: &Case, out: &Output) {
    let what = format!(
        "{}: penguiflow-worker {}",
        case.what,
        out.args[2..].join(" ")
    );
    assert_no_secret(&out.stdout, &format!("{what}: stdout"));
    assert_no_secret(&out.stderr, &format!("{what}: stderr"));
    if case.works {
        assert_eq!(
            out.code(),
            Some(0),
            "{what} should work\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.stdout,
            out.stderr
        );
    } else {
        assert_eq!(
            out.code(),
            Some(1),
            "{what} should fail with exit code 1\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.stdout,
            out.stderr
        );
        assert_eq!(
            out.stderr_lines().len(),
            1,
            "{what}: one line on stderr\n{}",
            out.stderr
        );
    }
}

/// `status`, `enqueue` and `dlq list` (plain and `--json`) with the case's URL.
fn one_shot_commands(case: &Case, queue: &str) {
    let env = [("LOG_LEVEL", "trace"), ("RUST_LOG", "trace")];
    let url = case.url.as_str();
    for args in [
        vec!["--url", url, "status", "--queue", queue],
        vec!["--url", url, "status", "--queue", queue, "--json"],
        vec!["--url", url, "enqueue", "--queue", queue, r#"{"n": 1}"#],
        vec!["--url", url, "dlq", "list", "--queue", queue],
        vec!["--url", url, "dlq", "list", "--queue", queue, "--json"],
    ] {
        check_output(case, &cli_env(&args, &env));
    }
}

/// Environment variables the binary reads, removed from the worker child so the test
/// does not depend on the caller's environment.
const INHERITED: &[&str] = &[
    "QUEUE_URL",
    "REDIS_URL",
    "DATABASE_URL",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "HEALTH_ADDR",
    "RUST_LOG",
];

/// `run` at one log level and format: a working URL must start, take the waiting job
/// and stop cleanly on SIGTERM; a failing one must exit 1 by itself.
fn run_once(case: &Case, queue: &str, level: &str, format: &str) {
    let stdout = scratch_file("secrets.stdout");
    let stderr = scratch_file("secrets.stderr");
    let file = |path: &PathBuf| {
        std::fs::File::create(path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()))
    };
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str()
            && (INHERITED.contains(&k) || k.starts_with("WORKER_") || k.starts_with("OTEL_"))
        {
            cmd.env_remove(k);
        }
    }
    cmd.args([
        "--url", &case.url, "run", "--queue", queue, "--flow", "echo",
    ])
    .args(["--log-level", level, "--log-format", format])
    .args(["--health-addr", "127.0.0.1:0", "--shutdown-timeout", "5s"])
    .stdin(Stdio::null())
    .stdout(file(&stdout))
    .stderr(file(&stderr));
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN} run: {e}"));
    let mut run = Run {
        child,
        stdout,
        stderr,
    };
    let what = format!(
        "{}: run --log-level {level} --log-format {format}",
        case.what
    );
    let status = if case.works {
        run.wait_for_log("worker started", &what);
        wait_until_taken(case, queue, &mut run, &what);
        // Let it refresh its stats and log a while before it is stopped.
        std::thread::sleep(Duration::from_millis(300));
        run.terminate(&what)
    } else {
        run.wait(&what)
    };
    let (out, err) = run.logs();
    assert_no_secret(&out, &format!("{what}: stdout"));
    assert_no_secret(&err, &format!("{what}: stderr"));
    let want = if case.works { 0 } else { 1 };
    assert_eq!(
        status.code(),
        Some(want),
        "{what}: exit code\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    );
}

/// Waits (up to 30 s) until `status --json` shows nothing ready or running: the worker
/// took the job enqueued before it started, and finished it.
fn wait_until_taken(case: &Case, queue: &str, run: &mut Run, what: &str) {
    let started = Instant::now();
    loop {
        let out = cli_env(
            &["--url", &case.url, "status", "--queue", queue, "--json"],
            &[],
        );
        check_output(case, &out);
        let status: serde_json::Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("{what}: status --json is not JSON ({e}): {}", out.stdout));
        let count = |field: &str| status[field].as_u64().unwrap_or(u64::MAX);
        if count("ready") == 0 && count("running") == 0 && count("completed") >= 1 {
            return;
        }
        if let Ok(Some(exit)) = run.child.try_wait() {
            let (out, err) = run.logs();
            panic!("{what}: the worker exited ({exit}) before taking its job\n{out}\n{err}");
        }
        if started.elapsed() > Duration::from_secs(30) {
            let (out, err) = run.logs();
            panic!("{what}: the job was not taken within 30 s: {status}\n{out}\n{err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `run` child; killed and its output files removed on drop.
struct Run {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Run {
    fn logs(&self) -> (String, String) {
        (
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        )
    }

    /// Waits (up to 30 s) until a log line mentions `text`.
    fn wait_for_log(&mut self, text: &str, what: &str) {
        let started = Instant::now();
        loop {
            let (out, err) = self.logs();
            if out.contains(text) || err.contains(text) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{what}: exited ({status}) before logging {text:?}\n{out}\n{err}");
            }
            if started.elapsed() > Duration::from_secs(30) {
                panic!("{what}: no {text:?} within 30 s\n{out}\n{err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to 30 s) for the process to exit.
    fn wait(&mut self, what: &str) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if started.elapsed() > Duration::from_secs(30) {
                let (out, err) = self.logs();
                panic!("{what}: still running after 30 s\n{out}\n{err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for the exit.
    fn terminate(&mut self, what: &str) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-s", "TERM", &self.child.id().to_string()])
            .stdin(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
        assert!(sent.success(), "{what}: kill -s TERM failed");
        self.wait(what)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.stdout);
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// Every command and every `run` log setting for each case; a working case gets one job
/// enqueued before each `run`, which the worker then takes.
fn check_cases(cases: &[Case]) {
    for case in cases {
        let queue = queue_name("secrets");
        one_shot_commands(case, &queue);
        for (level, format) in RUN_LOGS {
            if case.works {
                let out = cli_env(
                    &["--url", &case.url, "enqueue", "--queue", &queue, "{}"],
                    &[],
                );
                check_output(case, &out);
            }
            run_once(case, &queue, level, format);
        }
    }
}

#[test]
fn redis_working_urls_never_print_the_password() {
    check_cases(&redis_working_cases());
}

#[test]
fn redis_failing_urls_never_print_the_password() {
    check_cases(&redis_failing_cases());
}

#[test]
fn postgres_working_urls_never_print_the_password() {
    check_cases(&postgres_working_cases());
}

#[test]
fn postgres_failing_urls_never_print_the_password() {
    check_cases(&postgres_failing_cases());
}
