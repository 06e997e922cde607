//! [`Error`]: what this crate's own functions return, and how it maps into
//! [`flow_core::Error`] for the [`JobQueue`](flow_core::queue::JobQueue) methods.
//!
//! Every message names the server by its redacted URL and has passwords scrubbed, so
//! errors can be logged as they are.

use deadpool::managed::PoolError;
use flow_core::redact::Secrets;
use redis::{ErrorKind, RedisError, ServerErrorKind};

/// Everything that can go wrong talking to Redis.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL cannot be used.
    #[error("invalid Redis URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, password redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting is out of range.
    #[error("invalid queue-redis setting {setting}: {reason}")]
    Config {
        /// The setting.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Redis could not be reached, or is not serving right now (connection refused or
    /// reset, loading its data, cluster down). Retrying later may succeed.
    #[error("Redis at {target} is unavailable: {message}")]
    Unavailable {
        /// The server or cluster, passwords redacted.
        target: String,
        /// What happened.
        message: String,
    },
    /// Redis answered with an error (authentication, permissions, a script error).
    #[error("Redis at {target} answered with an error: {message}")]
    Redis {
        /// The server or cluster, passwords redacted.
        target: String,
        /// What it said.
        message: String,
    },
    /// A script answered something this version of the crate does not understand.
    #[error("unexpected reply from the {script} script: {reason}")]
    Reply {
        /// The script.
        script: &'static str,
        /// What was wrong with the reply.
        reason: String,
    },
    /// A stored job record cannot be decoded.
    #[error("corrupt job record {job_id} in queue {queue:?}: {reason}")]
    Corrupt {
        /// The queue.
        queue: String,
        /// The job.
        job_id: String,
        /// What is wrong with it (never its content).
        reason: String,
    },
}

impl Error {
    /// Whether retrying later may succeed (the server was unreachable or busy).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }

    /// A second error of the same kind and message, for answers shared by several items
    /// of one batch.
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Self::InvalidUrl { url, reason } => Self::InvalidUrl {
                url: url.clone(),
                reason: reason.clone(),
            },
            Self::Config { setting, reason } => Self::Config {
                setting,
                reason: reason.clone(),
            },
            Self::Unavailable { target, message } => Self::Unavailable {
                target: target.clone(),
                message: message.clone(),
            },
            Self::Redis { target, message } => Self::Redis {
                target: target.clone(),
                message: message.clone(),
            },
            Self::Reply { script, reason } => Self::Reply {
                script,
                reason: reason.clone(),
            },
            Self::Corrupt {
                queue,
                job_id,
                reason,
            } => Self::Corrupt {
                queue: queue.clone(),
                job_id: job_id.clone(),
                reason: reason.clone(),
            },
        }
    }
}

impl From<Error> for flow_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Unavailable { .. } => flow_core::Error::Unavailable(Box::new(e)),
            Error::Corrupt { job_id, reason, .. } => flow_core::Error::Corrupt { job_id, reason },
            other => flow_core::Error::Backend(Box::new(other)),
        }
    }
}

/// Turns driver and pool errors into [`Error`]s that name the server by its redacted URL
/// and never contain a password.
#[derive(Clone)]
pub(crate) struct Describe {
    /// The redacted target, such as `redis://:***@host:6379`.
    pub(crate) target: String,
    /// The secrets of the URLs, to scrub from messages (which also go through
    /// [`flow_core::redact::redact_text`]).
    pub(crate) secrets: Secrets,
}

impl Describe {
    fn scrub(&self, message: String) -> String {
        self.secrets.scrub(&message)
    }

    /// Classifies a driver error: unreachable or busy servers are
    /// [`Error::Unavailable`], everything else [`Error::Redis`].
    pub(crate) fn redis(&self, e: &RedisError) -> Error {
        let message = self.scrub(e.to_string());
        if is_unavailable(e) {
            Error::Unavailable {
                target: self.target.clone(),
                message,
            }
        } else {
            Error::Redis {
                target: self.target.clone(),
                message,
            }
        }
    }

    /// Classifies a pool error: every way of not getting a connection is
    /// [`Error::Unavailable`] except a server that refused our credentials.
    pub(crate) fn pool(&self, e: PoolError<RedisError>) -> Error {
        match e {
            PoolError::Backend(e) => self.redis(&e),
            PoolError::Timeout(kind) => Error::Unavailable {
                target: self.target.clone(),
                message: format!("timed out waiting for a pooled connection ({kind:?})"),
            },
            PoolError::Closed => Error::Unavailable {
                target: self.target.clone(),
                message: "the connection pool is closed".into(),
            },
            other => Error::Unavailable {
                target: self.target.clone(),
                message: self.scrub(other.to_string()),
            },
        }
    }
}

/// Whether `e` means "cannot reach a serving Redis right now".
pub(crate) fn is_unavailable(e: &RedisError) -> bool {
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        return true;
    }
    match e.kind() {
        ErrorKind::Io | ErrorKind::Parse | ErrorKind::ClusterConnectionNotFound => true,
        ErrorKind::Server(kind) => matches!(
            kind,
            ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
        ),
        ErrorKind::Extension => e.code() == Some("BUSY"),
        _ => false,
    }
}

/// Whether a connection that returned `e` must be replaced rather than reused.
pub(crate) fn breaks_connection(e: &RedisError) -> bool {
    e.is_unrecoverable_error()
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || matches!(e.kind(), ErrorKind::Io | ErrorKind::Parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_scrubbed_and_classified() {
        let describe = Describe {
            target: "redis://:***@h".into(),
            secrets: Secrets::of_url("redis://:hunter2@h"),
        };
        let io = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused while using hunter2",
        ));
        let e = describe.redis(&io);
        assert!(e.is_transient());
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let flow: flow_core::Error = e.into();
        assert!(flow.is_transient());

        // A message quoting a URL with a password it does not know is masked too.
        let io = RedisError::from(std::io::Error::other(
            "cannot reach redis://:ab/cd@other:6379",
        ));
        let e = describe.redis(&io);
        assert!(!e.to_string().contains("ab/cd"), "{e}");

        let auth = RedisError::from((ErrorKind::AuthenticationFailed, "bad password"));
        let e = describe.redis(&auth);
        assert!(!e.is_transient(), "{e}");
        assert!(matches!(
            flow_core::Error::from(e),
            flow_core::Error::Backend(_)
        ));
    }
}
