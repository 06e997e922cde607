//! Extension point: test backends provided before the test steps.
//!
//! Nothing is provisioned yet. To add a backend (design §7: URLs from the
//! environment, else testcontainers, else throwaway servers from local binaries):
//!
//! 1. Write a function `fn(&Ctx, &mut TestEnv) -> Result<(), String>` that
//!    - leaves the backend alone when the caller already set its variable (for
//!      example `REDIS_URL` or `DATABASE_URL`): variables of the xtask's own
//!      environment are inherited by every command anyway;
//!    - otherwise starts the server, records its URL with [`TestEnv::set`] and hands a
//!      guard whose `Drop` stops the server to [`TestEnv::keep_alive`];
//!    - returns a message saying what to install when it cannot provide the backend.
//! 2. Add it to [`PROVISIONERS`].
//!
//! A non-empty [`PROVISIONERS`] adds a `provision` step right before the `tests`
//! step of `cargo xtask ci` and `cargo xtask test`. The variables it records are set
//! for the `tests` and `doc-tests` steps; the guards live in the run's
//! [`Ctx`] and are dropped (stopping the servers) when the run ends, whether it
//! passed or failed.

use std::any::Any;
use std::fmt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::steps::{Ctx, Step};

/// Environment handed to the test steps, and the resources that back it.
#[derive(Default)]
pub(crate) struct TestEnv {
    /// Variables set on the test commands, e.g. `("REDIS_URL", "redis://127.0.0.1:7000")`.
    pub(crate) vars: Vec<(String, String)>,
    /// Kept alive until the run ends; dropped in insertion order.
    guards: Vec<Box<dyn Any>>,
}

impl TestEnv {
    /// Records a variable for the test commands, replacing an earlier value.
    #[allow(dead_code, reason = "extension point for backend provisioners")]
    pub(crate) fn set(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let key = key.into();
        let value = value.into();
        match self.vars.iter_mut().find(|(existing, _)| *existing == key) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((key, value)),
        }
    }

    /// Keeps `guard` (typically a server handle that stops the server on drop) alive
    /// until the run ends.
    #[allow(dead_code, reason = "extension point for backend provisioners")]
    pub(crate) fn keep_alive<T: 'static>(&mut self, guard: T) {
        self.guards.push(Box::new(guard));
    }

    /// Sets the recorded variables on `command`.
    pub(crate) fn apply(&self, command: &mut Command) {
        for (key, value) in &self.vars {
            command.env(key, value);
        }
    }
}

impl fmt::Debug for TestEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestEnv")
            .field("vars", &self.vars)
            .field("guards", &self.guards.len())
            .finish()
    }
}

/// Provides one test backend; see the module documentation for the contract.
pub(crate) type ProvideFn = fn(&Ctx, &mut TestEnv) -> Result<(), String>;

/// A named test backend to provide before the test steps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Provisioner {
    /// Name shown in the output, e.g. `redis-cluster`.
    pub(crate) name: &'static str,
    /// The function that provides the backend.
    pub(crate) provide: ProvideFn,
}

/// The backends provided before the test steps, in order.
pub(crate) const PROVISIONERS: &[Provisioner] = &[
    Provisioner {
        name: "redis",
        provide: crate::provision_redis::standalone,
    },
    Provisioner {
        name: "redis-cluster",
        provide: crate::provision_redis::cluster,
    },
    Provisioner {
        name: "postgres",
        provide: crate::provision_postgres::provide,
    },
    Provisioner {
        name: "faketime",
        provide: faketime,
    },
];

/// Not a server: the clock-skew tests run PostgreSQL, or a producer, under libfaketime
/// (`.ci/run` installs it). Fails early, saying what to install, when it is missing.
fn faketime(_: &Ctx, _: &mut TestEnv) -> Result<(), String> {
    test_support::clock::libfaketime()
        .map(|path| eprintln!("    libfaketime: {}", path.display()))
        .map_err(|e| e.to_string())
}

/// The `provision` step, or `None` when there is nothing to provision.
pub(crate) fn step() -> Option<Step> {
    if PROVISIONERS.is_empty() {
        return None;
    }
    Some(Step::new("provision", |ctx| {
        let mut env = std::mem::take(&mut ctx.test_env);
        let result = provide_all(ctx, &mut env);
        // Keep whatever was started, even on failure, so its guards stop it.
        ctx.test_env = env;
        result
    }))
}

/// Runs every provisioner in order, stopping at the first failure.
fn provide_all(ctx: &Ctx, env: &mut TestEnv) -> Result<(), String> {
    for provisioner in PROVISIONERS {
        eprintln!("    provisioning {}", provisioner.name);
        (provisioner.provide)(ctx, env)
            .map_err(|message| format!("provisioning {} failed: {message}", provisioner.name))?;
    }
    for (key, value) in &env.vars {
        eprintln!("    {key}={value}");
    }
    Ok(())
}

/// Whether `docker info` succeeds within 10 seconds (a CLI without an engine fails).
pub(crate) fn docker_answers() -> bool {
    let Ok(mut child) = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Runs `docker args...` and returns its trimmed standard output.
pub(crate) fn docker(args: &[&str]) -> Result<String, String> {
    let output = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(format!(
            "`docker {}` failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
