//! Connection and behaviour settings: [`PgQueueBuilder`].

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use flow_core::queue::QueueOptions;
use flow_core::redact::{Secrets, percent_decode, redact_url};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::error::{CONFIGURATION_WITHHELD, Error, scrub};
use crate::{PgQueue, is_transient_sqlx};

/// Default schema holding the queue's tables.
pub const DEFAULT_SCHEMA: &str = "penguiflow";
/// Default largest number of pooled connections.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;
/// Default interval between fetch attempts when LISTEN/NOTIFY is off or down.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Default time to wait for a pooled connection before an operation fails as unavailable.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `application_name` reported to the server (visible in `pg_stat_activity`).
pub const DEFAULT_APPLICATION_NAME: &str = "penguiflow-worker";
/// Smallest pool a queue accepts: the queue's own statements use all but a quarter of
/// the pool (at least one connection), which stays free for [`PgQueue::pool`] and
/// [`PgQueue::enqueue_in_tx`] callers, so a pool needs one connection for each.
pub const MIN_MAX_CONNECTIONS: u32 = 2;

/// Refuses pools too small to leave callers a connection (see [`MIN_MAX_CONNECTIONS`]).
pub(crate) fn check_max_connections(max_connections: u32) -> Result<(), Error> {
    if max_connections >= MIN_MAX_CONNECTIONS {
        return Ok(());
    }
    Err(Error::Config(format!(
        "max_connections is {max_connections}, the queue needs at least \
         {MIN_MAX_CONNECTIONS}: its own statements use all but a quarter of the pool (at \
         least one connection), which stays free for pool() and enqueue_in_tx callers"
    )))
}

/// The settings a [`PgQueue`] runs with, besides its connection pool.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) schema: String,
    pub(crate) listen: bool,
    pub(crate) poll_interval: Duration,
    pub(crate) async_leases: bool,
    pub(crate) opts: QueueOptions,
    /// The URL with its password redacted, for `Debug` and messages.
    pub(crate) target: String,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("target", &self.target)
            .field("schema", &self.schema)
            .field("listen", &self.listen)
            .field("poll_interval", &self.poll_interval)
            .field("async_leases", &self.async_leases)
            .field("opts", &self.opts)
            .finish()
    }
}

/// Checks a schema name: 1 to 48 characters of `[a-z0-9_]`, not starting with a digit,
/// and not `pg_`-prefixed. It is the only identifier interpolated into SQL, so it is
/// kept to characters that need no quoting. (48 leaves room for the `_jobs` suffix of
/// the notification channel within PostgreSQL's 63-byte identifier limit.)
///
/// ```
/// use queue_postgres::validate_schema_name;
/// assert!(validate_schema_name("penguiflow").is_ok());
/// assert!(validate_schema_name("Jobs; DROP TABLE x").is_err());
/// ```
pub fn validate_schema_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && !name.starts_with("pg_")
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "schema name {name:?} is invalid: use 1 to 48 characters of a-z 0-9 _, \
             not starting with a digit or pg_"
        )))
    }
}

/// Builds a [`PgQueue`]: connection URL, pool size, schema, wake-up mode and limits.
///
/// ```no_run
/// use queue_postgres::PgQueue;
/// use std::time::Duration;
/// # async fn demo() -> Result<(), queue_postgres::Error> {
/// let queue = PgQueue::builder("postgres://app:secret@db.internal/app?sslmode=require")
///     .schema("jobs")
///     .max_connections(16)
///     .poll_only(false)
///     .connect()
///     .await?;
/// queue.migrate().await?;
/// # Ok(()) }
/// ```
///
/// `Debug` never shows the password.
#[derive(Clone)]
pub struct PgQueueBuilder {
    url: String,
    schema: String,
    max_connections: u32,
    min_connections: u32,
    acquire_timeout: Duration,
    poll_interval: Duration,
    listen: bool,
    async_leases: bool,
    statement_cache_capacity: Option<usize>,
    application_name: String,
    opts: QueueOptions,
}

impl fmt::Debug for PgQueueBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgQueueBuilder")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("min_connections", &self.min_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("poll_interval", &self.poll_interval)
            .field("listen", &self.listen)
            .field("async_leases", &self.async_leases)
            .field("statement_cache_capacity", &self.statement_cache_capacity)
            .field("application_name", &self.application_name)
            .field("opts", &self.opts)
            .finish()
    }
}

impl PgQueueBuilder {
    /// A builder for `url` (`postgres://user:password@host:port/database?sslmode=...`)
    /// with the defaults: schema [`DEFAULT_SCHEMA`], [`DEFAULT_MAX_CONNECTIONS`]
    /// connections, LISTEN/NOTIFY wake-ups, default [`QueueOptions`].
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: DEFAULT_SCHEMA.to_owned(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            min_connections: 0,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
            listen: true,
            async_leases: false,
            statement_cache_capacity: None,
            application_name: DEFAULT_APPLICATION_NAME.to_owned(),
            opts: QueueOptions::default(),
        }
    }

    /// The schema holding the tables (created by [`PgQueue::migrate`]); see
    /// [`validate_schema_name`].
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Largest number of pooled connections (the LISTEN connection comes on top); at
    /// least [`MIN_MAX_CONNECTIONS`], or [`connect`](Self::connect) fails. The queue's
    /// own statements use up to three quarters of them (all but one in a pool of 2 to
    /// 7); the rest stays free for [`PgQueue::pool`] users.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// Connections kept open even when idle.
    pub fn min_connections(mut self, n: u32) -> Self {
        self.min_connections = n;
        self
    }

    /// How long an operation waits for a pooled connection before failing as
    /// unavailable.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Poll-only mode: no LISTEN connection; waiting fetches poll every
    /// [`poll_interval`](Self::poll_interval). Use it behind PgBouncer in transaction
    /// pooling mode, where LISTEN does not work.
    pub fn poll_only(mut self, poll_only: bool) -> Self {
        self.listen = !poll_only;
        self
    }

    /// Interval between fetch attempts of a waiting fetch when LISTEN/NOTIFY is off or
    /// its connection is down (default [`DEFAULT_POLL_INTERVAL`]).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Commit the statements that grant and extend leases (fetch, heartbeat) without
    /// waiting for the WAL flush (`synchronous_commit = off` for those statements only;
    /// off by default). A fetch then costs no disk flush, which at concurrency 1 roughly
    /// halves the disk waits per job.
    ///
    /// The price, after a server crash only: leases granted or extended in the last
    /// moments before it (up to three `wal_writer_delay`s, 600 ms by default) may be
    /// forgotten. Those jobs are ready again after recovery and may run a second time,
    /// possibly while their first holder still runs them; the first holder's outcome is
    /// then refused (fenced). Nothing is lost and no outcome is recorded twice.
    /// Enqueues, outcomes and everything else always commit synchronously. A lease
    /// whose job completes is made durable by that completion's commit anyway (WAL is
    /// flushed in order).
    pub fn async_commit_leases(mut self, on: bool) -> Self {
        self.async_leases = on;
        self
    }

    /// Size of each connection's prepared-statement cache; `0` disables named prepared
    /// statements (needed behind PgBouncer older than 1.21 in transaction mode).
    pub fn statement_cache_capacity(mut self, capacity: usize) -> Self {
        self.statement_cache_capacity = Some(capacity);
        self
    }

    /// The `application_name` reported to the server.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// Limits and retention times (payload size, dead letters kept, result retention,
    /// lease expiries before dead-lettering).
    pub fn queue_options(mut self, opts: QueueOptions) -> Self {
        self.opts = opts;
        self
    }

    /// The connection options parsed from the URL, with this builder's settings.
    ///
    /// Query parameters the driver does not know (such as libpq's `sslpassword`, which
    /// it cannot use) are left out with a warning that never shows their value: the
    /// driver would log the value otherwise. Errors never contain the password.
    pub fn connect_options(&self) -> Result<PgConnectOptions, Error> {
        let (url, ignored) = driver_url(&self.url);
        for parameter in ignored {
            tracing::warn!(
                %parameter,
                "ignoring a query parameter of the database URL the driver does not support \
                 (its value is not shown)"
            );
        }
        let mut options = PgConnectOptions::from_str(&url).map_err(|e| {
            let secrets = Secrets::of_url(&self.url);
            Error::Config(format!(
                "cannot parse the database URL {}: {}{}",
                redact_url(&self.url),
                secrets.scrub(&e.to_string()),
                if reserved_in_userinfo(&self.url) {
                    " (percent-encode / ? # in the user name and password, e.g. %2F for /)"
                } else {
                    ""
                }
            ))
        })?;
        options = options.application_name(&self.application_name);
        if let Some(capacity) = self.statement_cache_capacity {
            options = options.statement_cache_capacity(capacity);
        }
        Ok(options)
    }

    fn settings(&self) -> Result<Settings, Error> {
        validate_schema_name(&self.schema)?;
        Ok(Settings {
            schema: self.schema.clone(),
            listen: self.listen,
            poll_interval: self.poll_interval,
            async_leases: self.async_leases,
            opts: self.opts.clone(),
            target: redact_url(&self.url),
        })
    }

    /// The pool options this builder uses: size, acquire timeout, and no ping before
    /// each acquire (a broken connection fails its statement, which the caller retries).
    pub fn pool_options(&self) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .min_connections(self.min_connections.min(self.max_connections))
            .acquire_timeout(self.acquire_timeout)
            .test_before_acquire(false)
    }

    /// Connects (one connection is opened at once, to fail early) and returns the
    /// queue. Does not migrate: call [`PgQueue::migrate`].
    pub async fn connect(self) -> Result<PgQueue, Error> {
        check_max_connections(self.max_connections)?;
        let settings = self.settings()?;
        let options = self.connect_options()?;
        let secrets = Secrets::of_url(&self.url);
        let pool = self
            .pool_options()
            .connect_with(options)
            .await
            .map_err(|e| connect_error(&settings.target, &e, Some(&secrets)))?;
        Ok(PgQueue::with_settings(pool, settings))
    }

    /// Builds the queue on an existing pool (the URL and pool settings of this builder
    /// are ignored; the schema, wake-up mode and queue options apply). The pool's
    /// `idle_timeout` and `max_lifetime` apply to the connections the queue keeps too.
    /// Fails when the pool has fewer than [`MIN_MAX_CONNECTIONS`] connections.
    pub fn build_with_pool(self, pool: PgPool) -> Result<PgQueue, Error> {
        check_max_connections(pool.options().get_max_connections())?;
        let mut settings = self.settings()?;
        let options = pool.connect_options();
        settings.target = format!(
            "postgres://{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("")
        );
        Ok(PgQueue::with_settings(pool, settings))
    }
}

/// The query parameters sqlx 0.9's URL parser understands (`PgConnectOptions`'s
/// `parse_from_url`), besides `options[...]`; it logs the value of any other.
const DRIVER_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// libpq's connection parameters that the driver does not support: a warning may name
/// them. Any other unknown name may be a piece of a password with an unencoded `?` or
/// `&`, so it is not shown.
const LIBPQ_ONLY_PARAMETERS: &[&str] = &[
    "channel_binding",
    "client_encoding",
    "connect_timeout",
    "fallback_application_name",
    "gssdelegation",
    "gssencmode",
    "gsslib",
    "keepalives",
    "keepalives_count",
    "keepalives_idle",
    "keepalives_interval",
    "krbsrvname",
    "load_balance_hosts",
    "passfile",
    "replication",
    "require_auth",
    "requirepeer",
    "requiressl",
    "service",
    "sslcertmode",
    "sslcompression",
    "sslcrl",
    "sslcrldir",
    "ssl_max_protocol_version",
    "ssl_min_protocol_version",
    "sslnegotiation",
    "sslpassword",
    "sslsni",
    "target_session_attrs",
    "tcp_user_timeout",
];

/// `url` without the query parameters the driver does not understand, and how to name
/// each of those in a warning.
fn driver_url(url: &str) -> (Cow<'_, str>, Vec<String>) {
    let Some(question) = url.find('?') else {
        return (Cow::Borrowed(url), Vec::new());
    };
    let (base, rest) = url.split_at(question);
    let (query, fragment) = rest.split_at(rest.find('#').unwrap_or(rest.len()));
    let mut kept = Vec::new();
    let mut ignored = Vec::new();
    for (n, pair) in query[1..].split('&').enumerate() {
        if pair.is_empty() {
            continue;
        }
        let raw_key = pair.split_once('=').map_or(pair, |(k, _)| k);
        let key = percent_decode(&raw_key.replace('+', " ")).into_owned();
        if DRIVER_PARAMETERS.contains(&key.as_str())
            || (key.starts_with("options[") && key.ends_with(']'))
        {
            kept.push(pair);
        } else if LIBPQ_ONLY_PARAMETERS.contains(&key.as_str()) {
            ignored.push(key);
        } else {
            ignored.push(format!("#{} (an unknown name, not shown)", n + 1));
        }
    }
    if ignored.is_empty() {
        return (Cow::Borrowed(url), ignored);
    }
    let mut out = base.to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    out.push_str(fragment);
    (Cow::Owned(out), ignored)
}

/// Whether the user info of `url` holds an unencoded `/`, `?` or `#` (an `@` after the
/// first of them), which URL parsers read as the end of the host.
fn reserved_in_userinfo(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.find(['/', '?', '#'])
        .is_some_and(|end| rest[end..].contains('@'))
}

/// A connection failure, rendered without secrets.
pub(crate) fn connect_error(target: &str, e: &sqlx::Error, secrets: Option<&Secrets>) -> Error {
    let message = match e {
        sqlx::Error::Configuration(_) => CONFIGURATION_WITHHELD.to_owned(),
        other => scrub(&other.to_string(), secrets),
    };
    Error::Connect {
        target: target.to_owned(),
        message,
        transient: is_transient_sqlx(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for ok in ["penguiflow", "t_0123abcd", "_x", "a"] {
            assert!(validate_schema_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Upper",
            "1abc",
            "pg_catalog",
            "a-b",
            "a\"b",
            &"x".repeat(49),
        ] {
            assert!(validate_schema_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_are_never_debug_printed() {
        for url in [
            "postgres://u:hunter2@h/d?password=hunter3",
            "postgres://u:hunter2/hunter3@h/d",
            "postgres://u@h/d?sslpassword=hunter2&sslkey=/hunter3.key",
        ] {
            let b = PgQueueBuilder::new(url);
            let shown = format!("{b:?}");
            assert!(
                !shown.contains("hunter2") && !shown.contains("hunter3"),
                "{shown}"
            );
        }
    }

    #[test]
    fn the_driver_gets_only_parameters_it_knows() {
        let (url, ignored) = driver_url(
            "postgres://u@h/d?sslmode=require&sslpassword=s3cret&options[search_path]=x\
             &pa%73sword=p&ab%2Fcd=1#frag",
        );
        assert_eq!(
            url,
            "postgres://u@h/d?sslmode=require&options[search_path]=x&pa%73sword=p#frag"
        );
        assert_eq!(
            ignored,
            vec![
                "sslpassword".to_owned(),
                "#5 (an unknown name, not shown)".to_owned()
            ]
        );
        assert!(matches!(
            driver_url("postgres://u:pw@h/d?sslmode=disable&user=u&password=x"),
            (Cow::Borrowed(_), ignored) if ignored.is_empty()
        ));
        assert_eq!(
            driver_url("postgres://h/d?sslpassword=x").0,
            "postgres://h/d"
        );
        // The password is still handed over.
        let options = PgQueueBuilder::new("postgres://h/d?user=app&password=pw&sslpassword=x")
            .connect_options()
            .expect("valid");
        assert_eq!(options.get_username(), "app");
    }

    #[test]
    fn bad_url_error_has_no_password() {
        let b = PgQueueBuilder::new("postgres://u:hunter2@h:notaport/d");
        let err = b.connect_options().expect_err("bad port");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("hunter2"), "{shown}");

        // An unencoded / ends the host for URL parsers: refused, with a hint, and no
        // piece of the password shown.
        let b = PgQueueBuilder::new("postgres://u:hunter2/hunter3@h:5432/d?sslmode=disable");
        let err = b.connect_options().expect_err("unencoded /");
        let shown = format!("{err} {err:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("hunter3"),
            "{shown}"
        );
        assert!(shown.contains("percent-encode"), "{shown}");
    }
}
