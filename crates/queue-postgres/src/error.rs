//! The crate's error type and its mapping into [`flow_core::Error`].

use std::fmt;

/// Everything that can go wrong in this crate.
///
/// No variant ever carries the password of a connection URL: configuration and
/// connection errors are rendered from redacted text, and the database's own messages
/// never contain it.
#[derive(Debug, thiserror::Error)]
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
    #[error("PostgreSQL error during {op}: {}", Sanitized(source))]
    Sql {
        /// The queue operation, such as `fetch` or `complete`.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// Applying the schema migrations failed.
    #[error("PostgreSQL schema migration failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),

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

impl Error {
    /// Wraps a driver error of operation `op`.
    pub(crate) fn sql(op: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| Self::Sql { op, source }
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

/// Displays a driver error, replacing configuration errors (the only kind that could
/// echo connection settings) by a generic text.
struct Sanitized<'a>(&'a sqlx::Error);

impl fmt::Display for Sanitized<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            sqlx::Error::Configuration(_) => {
                f.write_str("error with configuration (details withheld: they may hold secrets)")
            }
            other => fmt::Display::fmt(other, f),
        }
    }
}

/// Replaces the password of a PostgreSQL URL (`user:password@` and `password=` query
/// parameters) by `***`, for logs and error messages.
///
/// ```
/// use queue_postgres::redact_url;
/// assert_eq!(
///     redact_url("postgres://app:s3cret@db:5432/jobs?sslmode=require"),
///     "postgres://app:***@db:5432/jobs?sslmode=require"
/// );
/// assert_eq!(
///     redact_url("postgres://db/jobs?user=app&password=s3cret"),
///     "postgres://db/jobs?user=app&password=***"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    let (head, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.find(':') {
                Some(colon) => format!("{}:***{host}", &userinfo[..colon]),
                None => authority.to_owned(),
            }
        }
        None => authority.to_owned(),
    };
    redact_password_params(&format!("{head}{authority}{tail}"))
}

/// Redacts `password=...` in a query string or key-value connection string.
fn redact_password_params(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = find_ascii_ci(rest, "password=") {
        let start_ok = i == 0 || matches!(rest.as_bytes()[i - 1], b'?' | b'&' | b' ' | b';');
        let value_start = i + "password=".len();
        out.push_str(&rest[..value_start]);
        rest = &rest[value_start..];
        if start_ok {
            let end = rest.find(['&', ' ', ';', '#']).unwrap_or(rest.len());
            out.push_str("***");
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

fn find_ascii_ci(haystack: &str, needle: &str) -> Option<usize> {
    haystack
        .as_bytes()
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// Removes every occurrence of `secret` (and its percent-encoded form) from `text`.
pub(crate) fn scrub(text: &str, secret: Option<&str>) -> String {
    match secret {
        Some(s) if !s.is_empty() => {
            let mut out = text.replace(s, "***");
            let encoded = percent_encode(s);
            if encoded != s {
                out = out.replace(&encoded, "***");
            }
            out
        }
        _ => text.to_owned(),
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:p%40ss@h:1/d"),
            "postgres://u:***@h:1/d"
        );
        assert_eq!(redact_url("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(redact_url("postgres://h/d"), "postgres://h/d");
        assert_eq!(
            redact_url("postgresql://u:pw@h/d?PASSWORD=x&sslmode=require"),
            "postgresql://u:***@h/d?PASSWORD=***&sslmode=require"
        );
        assert_eq!(
            redact_url("host=h password=x user=u"),
            "host=h password=*** user=u"
        );
        // A colon after the @ (the port) is not a password.
        assert_eq!(redact_url("postgres://u@h:5432"), "postgres://u@h:5432");
        // An @ inside the password: the last @ ends the userinfo.
        assert_eq!(redact_url("postgres://u:a@b@h/d"), "postgres://u:***@h/d");
    }

    #[test]
    fn scrub_removes_plain_and_encoded_secret() {
        assert_eq!(scrub("x p@ss y p%40ss", Some("p@ss")), "x *** y ***");
        assert_eq!(scrub("nothing", None), "nothing");
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
        let e: flow_core::Error = Error::Sql {
            op: "fetch",
            source: sqlx::Error::PoolTimedOut,
        }
        .into();
        assert!(matches!(e, flow_core::Error::Unavailable(_)), "{e:?}");
        let e: flow_core::Error = Error::Sql {
            op: "fetch",
            source: sqlx::Error::RowNotFound,
        }
        .into();
        assert!(matches!(e, flow_core::Error::Backend(_)), "{e:?}");
        let e: flow_core::Error = Error::Corrupt {
            job_id: "x".into(),
            reason: "y".into(),
        }
        .into();
        assert!(matches!(e, flow_core::Error::Corrupt { .. }), "{e:?}");
    }
}
