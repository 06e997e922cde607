//! The error type of this crate.

/// Everything that can go wrong setting up or running a worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range.
    #[error("invalid setting {option}: {reason}")]
    Config {
        /// The setting, named as the user gives it.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The queue backend failed in a way retrying will not fix.
    #[error(transparent)]
    Queue(#[from] flow_core::Error),
    /// The health and metrics HTTP server could not bind or serve.
    #[error("HTTP server on {addr}: {source}")]
    Http {
        /// The address it was given or bound to.
        addr: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// Logging or trace export could not be set up.
    #[error("telemetry: {0}")]
    Telemetry(String),
}
