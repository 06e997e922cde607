//! PostgreSQL for the test steps (design.md section 7), in `DATABASE_URL`:
//!
//! 1. the variable from the environment, when set (it is inherited by the tests);
//! 2. else, when a Docker engine answers (`docker info`), a `postgres:15` container
//!    started with the docker CLI and removed at the end of the run;
//! 3. else a throwaway cluster from the local server binaries: `initdb` into a temporary
//!    directory, a free loopback port, run as user `postgres` when we are root
//!    ([`test_support::postgres`]);
//! 4. else a one-line error saying what to install.
//!
//! The server allows 300 connections (the suites run many tests at once, each with a
//! small pool and a LISTEN connection). Tests create fresh schemas or databases of their
//! own in it; nothing uses the machine's shared server on port 5432.

use std::time::{Duration, Instant};

use test_support::postgres::PgServer;

use crate::provision::TestEnv;
use crate::provision::{docker, docker_answers};
use crate::steps::Ctx;

/// Image used when a Docker engine answers.
const IMAGE: &str = "postgres:15";
/// What to install when nothing else works.
const INSTALL: &str = "install PostgreSQL server binaries (Debian: apt-get install postgresql), \
                       start a Docker engine, or set DATABASE_URL";

/// Provides `DATABASE_URL`.
pub(crate) fn provide(_ctx: &Ctx, env: &mut TestEnv) -> Result<(), String> {
    if std::env::var_os("DATABASE_URL").is_some_and(|v| !v.is_empty()) {
        eprintln!("    DATABASE_URL is set in the environment: using it");
        return Ok(());
    }
    if docker_answers() {
        let container = Container::start()?;
        env.set("DATABASE_URL", container.url.clone());
        env.keep_alive(container);
        return Ok(());
    }
    let server = PgServer::builder()
        .max_connections(300)
        .start()
        .map_err(|e| format!("{e}; or {INSTALL}"))?;
    env.set("DATABASE_URL", server.url());
    env.keep_alive(server);
    Ok(())
}

/// A `postgres:15` container with trust authentication, removed when dropped.
struct Container {
    id: String,
    url: String,
}

impl Container {
    fn start() -> Result<Self, String> {
        let id = docker(&[
            "run",
            "-d",
            "--rm",
            "-e",
            "POSTGRES_HOST_AUTH_METHOD=trust",
            "-p",
            "127.0.0.1::5432",
            IMAGE,
            "-c",
            "max_connections=300",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ])?;
        let mut container = Self {
            id,
            url: String::new(),
        };
        let mapping = docker(&["port", &container.id, "5432/tcp"])?;
        let addr = mapping
            .lines()
            .find(|l| l.starts_with("127.0.0.1:"))
            .ok_or("docker published no loopback port for 5432")?;
        container.url = format!("postgres://postgres@{addr}/postgres");
        container.wait_ready()?;
        Ok(container)
    }

    /// Waits for the final server (the image restarts PostgreSQL once after `initdb`;
    /// only the final one listens on TCP, which `-h 127.0.0.1` checks).
    fn wait_ready(&self) -> Result<(), String> {
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            let ready = docker(&[
                "exec",
                &self.id,
                "pg_isready",
                "-U",
                "postgres",
                "-h",
                "127.0.0.1",
            ]);
            if ready.is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(format!(
            "the {IMAGE} container did not become ready within 60s"
        ))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.id]);
    }
}
