//! The crate's error type and its mapping into [`flow_core::Error`].

use std::fmt;
use std::ops::Deref;

pub use flow_core::redact::redact_url;
use flow_core::redact::{RedactedError, Secrets, redact_text};

/// Everything that can go wrong in this crate.
///
/// No variant ever shows the password of a connection URL, through `Display`, `Debug`
/// or its `source()` chain: configuration and connection errors are rendered from
/// redacted text, and the driver's errors are wrapped in a [`DriverError`] whose text is
/// masked by [`flow_core::redact`].
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid: a malformed URL, a bad schema name, a bad option.
    #[error("invalid PostgreSQL queue configuration: {0}")]
    Config(String),

    /// The first connection could not be established.
    #[error("cannot connect to PostgreSQL at {target}: {message}")]
    Connect {
        /// Where it tried to connect, with any password redacted.
        target: String,
        /// Why it failed (redacted).
        message: String,
        /// Whether the failure looks transient (server down, refused, timed out).
        transient: bool,
    },

    /// A statement failed; `op` names the queue operation.
    #[error("PostgreSQL error during {op}: {source}")]
    Sql {
        /// The queue operation, such as `fetch` or `complete`.
        op: &'static str,
        /// The driver's error, shown redacted.
        source: DriverError,
    },

    /// Applying the schema migrations failed.
    #[error("PostgreSQL schema migration failed: {}", migrate_message(.0))]
    Migrate(sqlx::migrate::MigrateError),

    /// A stored row could not be decoded.
    #[error("corrupt job record {job_id}: {reason}")]
    Corrupt {
        /// The job.
        job_id: String,
        /// What could not be decoded.
        reason: String,
    },

    /// A contract error from the queue layer (invalid queue name, payload too large,
    /// lease lost, job not found, invalid state, ...).
    #[error(transparent)]
    Queue(#[from] flow_core::Error),
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(message) => f.debug_tuple("Config").field(message).finish(),
            Self::Connect {
                target,
                message,
                transient,
            } => f
                .debug_struct("Connect")
                .field("target", target)
                .field("message", message)
                .field("transient", transient)
                .finish(),
            Self::Sql { op, source } => f
                .debug_struct("Sql")
                .field("op", op)
                .field("source", source)
                .finish(),
            Self::Migrate(e) => f.debug_tuple("Migrate").field(&migrate_message(e)).finish(),
            Self::Corrupt { job_id, reason } => f
                .debug_struct("Corrupt")
                .field("job_id", job_id)
                .field("reason", reason)
                .finish(),
            Self::Queue(e) => f.debug_tuple("Queue").field(e).finish(),
        }
    }
}

/// A driver error, shown with its secrets masked.
///
/// `Display` and `Debug` show the driver's message through
/// [`redact_text`](flow_core::redact::redact_text) (a configuration error, the one kind
/// that may quote connection settings, is withheld), and `source()` continues with the
/// driver's chain masked link by link ([`RedactedError`]). It dereferences to the
/// driver's own [`sqlx::Error`] for matching on its kind or SQLSTATE; that error's own
/// `Display` and `Debug` are the driver's, unredacted.
pub struct DriverError {
    error: sqlx::Error,
    shown: RedactedError,
}

impl DriverError {
    /// Wraps a driver error.
    pub fn new(error: sqlx::Error) -> Self {
        let shown = match &error {
            sqlx::Error::Configuration(_) => {
                RedactedError::from_message(CONFIGURATION_WITHHELD, &Secrets::new())
            }
            other => RedactedError::new(other, &Secrets::new()),
        };
        Self { error, shown }
    }

    /// The driver's error (its own `Display` and `Debug` are not redacted).
    pub fn get_ref(&self) -> &sqlx::Error {
        &self.error
    }

    /// The driver's error (its own `Display` and `Debug` are not redacted).
    pub fn into_inner(self) -> sqlx::Error {
        self.error
    }
}

impl From<sqlx::Error> for DriverError {
    fn from(error: sqlx::Error) -> Self {
        Self::new(error)
    }
}

impl Deref for DriverError {
    type Target = sqlx::Error;

    fn deref(&self) -> &sqlx::Error {
        &self.error
    }
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.shown, f)
    }
}

impl fmt::Debug for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DriverError")
            .field(&self.shown.message())
            .finish()
    }
}

impl std::error::Error for DriverError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.shown)
    }
}

/// What is shown instead of a driver's configuration error.
pub(crate) const CONFIGURATION_WITHHELD: &str =
    "error with configuration (details withheld: they may hold secrets)";

/// A migration failure's message, masked; a configuration error inside is withheld.
fn migrate_message(e: &sqlx::migrate::MigrateError) -> String {
    match e {
        sqlx::migrate::MigrateError::Execute(sqlx::Error::Configuration(_))
        | sqlx::migrate::MigrateError::ExecuteMigration(sqlx::Error::Configuration(_), _) => {
            CONFIGURATION_WITHHELD.to_owned()
        }
        other => redact_text(&other.to_string()).into_owned(),
    }
}

impl Error {
    /// Wraps a driver error of operation `op`.
    pub(crate) fn sql(op: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| Self::Sql {
            op,
            source: DriverError::new(source),
        }
    }

    /// Whether retrying later may succeed: the server is unreachable, restarting, out of
    /// connections, or the connection was cut. The worker backs off and retries these.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { transient, .. } => *transient,
            Self::Sql { source, .. } => is_transient_sqlx(source),
            Self::Migrate(sqlx::migrate::MigrateError::Execute(e)) => is_transient_sqlx(e),
            Self::Queue(flow_core::Error::Unavailable(_)) => true,
            _ => false,
        }
    }
}

/// Whether a driver error means "the database is (temporarily) not there".
pub(crate) fn is_transient_sqlx(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_transient_sqlstate(&code)),
        _ => false,
    }
}

/// SQLSTATEs after which the same statement may succeed later: connection exceptions
/// (class 08), shutdowns and restarts (57P01-57P05), too many connections / out of
/// resources (class 53), serialization failures and deadlocks (40001, 40P01), and a
/// read-only server (25006, a failover in progress).
fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "57P04" | "57P05" | "40001" | "40P01" | "25006"
        )
}

impl From<Error> for flow_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Queue(inner) => inner,
            Error::Corrupt { job_id, reason } => flow_core::Error::Corrupt { job_id, reason },
            other if other.is_transient() => flow_core::Error::Unavailable(Box::new(other)),
            other => flow_core::Error::Backend(Box::new(other)),
        }
    }
}

/// `text` without `secrets` and without anything URL-shaped holding a password.
pub(crate) fn scrub(text: &str, secrets: Option<&Secrets>) -> String {
    match secrets {
        Some(secrets) => secrets.scrub(text),
        None => redact_text(text).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything `{e}`, `{e:?}` and a walk of the `source()` chain (as `{:#}` of an
    /// error-reporting crate does) would print.
    fn everything_shown(e: &(dyn std::error::Error + 'static)) -> String {
        let mut shown = String::new();
        let mut link = Some(e);
        while let Some(l) = link {
            shown.push_str(&format!("{l} / {l:?} | "));
            link = l.source();
        }
        shown
    }

    #[test]
    fn no_link_of_the_chain_shows_a_secret() {
        let url = "postgres://app:Hunter2x@db/jobs?sslpassword=Hunter3y";
        for driver in [
            sqlx::Error::Configuration(format!("bad URL {url}").into()),
            sqlx::Error::Io(std::io::Error::other(format!("cannot reach {url}"))),
            sqlx::Error::Protocol(format!("ignoring sslpassword=Hunter3y in {url}")),
            sqlx::Error::Tls(format!("client key for {url}").into()),
        ] {
            let e = Error::sql("fetch")(driver);
            let mut shown = everything_shown(&e);
            let core: flow_core::Error = e.into();
            shown.push_str(&everything_shown(&core));
            for secret in ["Hunter2x", "Hunter3y"] {
                assert!(!shown.contains(secret), "{shown}");
            }
            assert!(shown.contains("fetch"), "{shown}");
        }
        // The driver's error stays reachable for matching on its kind.
        let e = Error::sql("fetch")(sqlx::Error::PoolTimedOut);
        assert!(
            matches!(&e, Error::Sql { source, .. } if matches!(**source, sqlx::Error::PoolTimedOut))
        );
        assert!(e.is_transient());
    }

    #[test]
    fn migration_errors_show_no_secret() {
        let e = Error::Migrate(sqlx::migrate::MigrateError::Execute(sqlx::Error::Io(
            std::io::Error::other("cannot reach postgres://app:Hunter2x@db/jobs"),
        )));
        let shown = everything_shown(&e);
        assert!(!shown.contains("Hunter2x"), "{shown}");
        assert!(shown.contains("postgres://app:***@db/jobs"), "{shown}");
    }

    #[test]
    fn scrub_removes_plain_and_encoded_secret() {
        let secrets = Secrets::of_url("postgres://u:p%40ss@h/d");
        assert_eq!(scrub("x p@ss y p%40ss", Some(&secrets)), "x *** y ***");
        assert_eq!(scrub("nothing", None), "nothing");
        assert_eq!(
            scrub("at postgres://u:pw1@h/d", None),
            "at postgres://u:***@h/d"
        );
    }

    #[test]
    fn transient_sqlstates() {
        for code in ["08006", "57P01", "53300", "40P01"] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "42P01", "22P02"] {
            assert!(!is_transient_sqlstate(code), "{code}");
        }
    }

    #[test]
    fn mapping_into_flow_core() {
        let e: flow_core::Error = Error::sql("fetch")(sqlx::Error::PoolTimedOut).into();
        assert!(matches!(e, flow_core::Error::Unavailable(_)), "{e:?}");
        let e: flow_core::Error = Error::sql("fetch")(sqlx::Error::RowNotFound).into();
        assert!(matches!(e, flow_core::Error::Backend(_)), "{e:?}");
        let e: flow_core::Error = Error::Corrupt {
            job_id: "x".into(),
            reason: "y".into(),
        }
        .into();
        assert!(matches!(e, flow_core::Error::Corrupt { .. }), "{e:?}");
    }
}
