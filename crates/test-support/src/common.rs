//! Helpers shared by the server launchers: free ports, temporary directories, waiting.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Why a throwaway server could not be provided.
#[derive(Debug)]
pub struct ServerError(pub String);

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ServerError {}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> Result<u16, ServerError> {
    let l = TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| ServerError(format!("cannot find a free loopback port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| ServerError(format!("cannot read the bound port: {e}")))
}

/// A loopback port `p` such that `p` and `p + offset` are both free (Redis Cluster uses
/// `port + 10000` for its bus).
pub fn free_port_pair(offset: u16) -> Result<u16, ServerError> {
    for _ in 0..200 {
        let p = free_port()?;
        if p.checked_add(offset)
            .is_some_and(|q| TcpListener::bind(("127.0.0.1", q)).is_ok())
        {
            return Ok(p);
        }
    }
    Err(ServerError(format!("no free port pair {offset} apart")))
}

/// Creates a fresh directory under the system temporary directory, world-traversable
/// so a server running as another user (PostgreSQL as `postgres`) can enter it.
pub fn temp_dir(prefix: &str) -> Result<PathBuf, ServerError> {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|e| ServerError(format!("cannot create {}: {e}", dir.display())))?;
    set_mode_0755(&dir)?;
    Ok(dir)
}

#[cfg(unix)]
fn set_mode_0755(dir: &std::path::Path) -> Result<(), ServerError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| ServerError(format!("cannot chmod {}: {e}", dir.display())))
}

#[cfg(not(unix))]
fn set_mode_0755(_dir: &std::path::Path) -> Result<(), ServerError> {
    Ok(())
}

/// Waits until something accepts TCP connections on `127.0.0.1:port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> Result<(), ServerError> {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
            .is_ok()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(ServerError(format!(
        "nothing listens on 127.0.0.1:{port} after {timeout:?}"
    )))
}

/// Finds `name` on the `PATH` or in the extra directories given.
pub fn find_binary(name: &str, extra_dirs: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra_dirs.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
