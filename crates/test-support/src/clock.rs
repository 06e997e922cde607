//! Processes whose wall clock is shifted, through libfaketime (Debian package
//! `faketime`): for tests that need a server, or a producer, whose clock disagrees with
//! the test's.
//!
//! Only the wall clock (`CLOCK_REALTIME`, `gettimeofday`, `time`) moves; the monotonic
//! clocks are left alone, so timeouts and sleeps inside the process behave as usual.
//!
//! ```no_run
//! use std::process::Command;
//! use test_support::clock::shifted_clock_env;
//!
//! // `date` five minutes behind this machine.
//! let env = shifted_clock_env(-300)?;
//! Command::new("date").envs(env).status().expect("date");
//! # Ok::<(), test_support::common::ServerError>(())
//! ```
//!
//! libfaketime does not work with every program: `redis-server` (built with jemalloc)
//! aborts at start under it, so Redis tests shift the producer's clock instead.

use std::path::PathBuf;

use crate::common::ServerError;

/// What to say when libfaketime is missing.
pub const INSTALL_HINT: &str = "install libfaketime (Debian: apt-get install faketime)";

/// Where distributions put `libfaketime.so.1`.
const LIB_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime",
    "/usr/lib/aarch64-linux-gnu/faketime",
    "/usr/lib/faketime",
    "/usr/lib64/faketime",
    "/usr/local/lib/faketime",
];

/// The libfaketime library, or an error saying what to install.
pub fn libfaketime() -> Result<PathBuf, ServerError> {
    LIB_DIRS
        .iter()
        .map(|dir| PathBuf::from(dir).join("libfaketime.so.1"))
        .find(|path| path.is_file())
        .ok_or_else(|| ServerError(format!("libfaketime.so.1 not found: {INSTALL_HINT}")))
}

/// The environment that starts a process with its wall clock `offset_secs` seconds ahead
/// of this machine's (behind when negative): `LD_PRELOAD` of libfaketime and its
/// settings. Give it to `Command::envs`.
pub fn shifted_clock_env(offset_secs: i64) -> Result<Vec<(String, String)>, ServerError> {
    let lib = libfaketime()?;
    Ok(vec![
        ("LD_PRELOAD".to_owned(), lib.display().to_string()),
        ("FAKETIME".to_owned(), format!("{offset_secs:+}")),
        ("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
        // No shared-memory control channel: nothing here changes the offset later.
        ("FAKETIME_DISABLE_SHM".to_owned(), "1".to_owned()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{SystemTime, UNIX_EPOCH};

    #[test]
    fn a_process_started_with_the_env_sees_the_shifted_clock() {
        let env = match shifted_clock_env(-300) {
            Ok(env) => env,
            Err(e) if e.0.contains("not found") => return, // no libfaketime here
            Err(e) => panic!("{e}"),
        };
        let out = Command::new("date")
            .arg("+%s")
            .envs(env)
            .output()
            .expect("run date");
        let theirs: i64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("date +%s prints seconds");
        let ours = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        assert!(
            (ours - 300 - theirs).abs() <= 5,
            "date said {theirs}, we are at {ours}: expected five minutes behind"
        );
    }
}
