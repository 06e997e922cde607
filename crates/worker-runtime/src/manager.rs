//! Process lifecycle: the shutdown signal.
//!
//! The first SIGTERM or SIGINT resolves [`shutdown_signal`]: the pool stops fetching at
//! once and drains. A second signal exits the process at once (exit code 130); leases of
//! the jobs still running then expire and the jobs come back on another worker.

/// Exit code used when a second signal interrupts the drain.
pub const EXIT_SECOND_SIGNAL: i32 = 130;

/// Resolves on the first SIGTERM or SIGINT; a second one exits the process at once.
///
/// If the signal handlers cannot be installed, the error is logged and the future never
/// resolves (the process then stops only when killed), which is safer than shutting
/// down at once.
pub async fn shutdown_signal() {
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for shutdown signals; stop this worker with SIGKILL");
            return std::future::pending().await;
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        let mut seen = 0u32;
        loop {
            let name = signals.next().await;
            seen += 1;
            if seen == 1 {
                tracing::info!(
                    signal = name,
                    "shutdown requested: draining (send it again to exit at once)"
                );
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            } else {
                tracing::warn!(
                    signal = name,
                    "second signal: exiting now; running jobs come back when their leases expire"
                );
                std::process::exit(EXIT_SECOND_SIGNAL);
            }
        }
    });
    if rx.await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self)
    }

    async fn next(&mut self) -> &'static str {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "ctrl-c",
            Err(_) => std::future::pending().await,
        }
    }
}
