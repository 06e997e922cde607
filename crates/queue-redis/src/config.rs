//! Where Redis is and how to talk to it: [`RedisConfig`], and URL redaction.
//!
//! URLs:
//!
//! * `redis://[user[:password]@]host[:port][/db]`: one standalone server.
//! * `rediss://...`: the same over TLS (cargo feature `tls`).
//! * `redis+cluster://[user[:password]@]host:port,host:port,...`: a Redis Cluster, given
//!   by one or more of its nodes (`rediss+cluster://` over TLS). The credentials apply
//!   to every node. [`RedisConfig::cluster`] takes a list of node URLs instead.
//!
//! Passwords never leave this module in clear: [`redact_url`] (the workspace's one
//! redaction, [`flow_core::redact`]) replaces them with `***`, and the `Debug` and
//! `Display` forms of [`RedisConfig`] show only redacted URLs.

use std::fmt;
use std::time::Duration;

use flow_core::queue::QueueOptions;
use flow_core::redact::Secrets;
pub use flow_core::redact::redact_url;

use crate::error::Error;

/// Default key prefix: keys of queue `q` start with `{pf:q}`.
pub const DEFAULT_KEY_PREFIX: &str = "pf";
/// Default number of pooled connections for commands and scripts.
pub const DEFAULT_POOL_SIZE: usize = 16;
/// Default number of pooled connections reserved for blocking waits (idle fetches).
pub const DEFAULT_WAIT_POOL_SIZE: usize = 16;
/// Default time allowed to open one connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach Redis and how to lay out the queues in it.
///
/// Build it from a URL, adjust it with the chained setters, and pass it to
/// [`RedisQueue::with_config`](crate::RedisQueue::with_config):
///
/// ```
/// use queue_redis::RedisConfig;
/// use std::time::Duration;
///
/// let config = RedisConfig::from_url("redis://:s3cret@127.0.0.1:6379/0")?
///     .key_prefix("jobs")
///     .pool_size(32)
///     .connect_timeout(Duration::from_secs(2));
/// assert_eq!(config.to_string(), "redis://:***@127.0.0.1:6379/0 (key prefix jobs)");
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), queue_redis::Error>(())
/// ```
#[derive(Clone)]
pub struct RedisConfig {
    pub(crate) target: Target,
    pub(crate) key_prefix: String,
    pub(crate) pool_size: usize,
    pub(crate) wait_pool_size: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) queue_options: QueueOptions,
    /// PEM root certificates trusted for `rediss://` instead of the webpki roots.
    #[cfg(feature = "tls")]
    pub(crate) tls_root_cert: Option<Vec<u8>>,
}

/// One server or the nodes of a cluster, as URLs redis-rs understands.
#[derive(Clone)]
pub(crate) enum Target {
    /// One server.
    Standalone(String),
    /// Seed nodes of a cluster.
    Cluster(Vec<String>),
}

impl RedisConfig {
    /// A configuration for `url`: `redis://`, `rediss://` (feature `tls`),
    /// `redis+cluster://host:port,host:port,...` or `rediss+cluster://...`.
    ///
    /// Defaults: key prefix [`DEFAULT_KEY_PREFIX`], [`DEFAULT_POOL_SIZE`] connections,
    /// [`DEFAULT_WAIT_POOL_SIZE`] connections for blocking waits,
    /// [`DEFAULT_CONNECT_TIMEOUT`], and the default [`QueueOptions`].
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let (scheme, _) = split_scheme(url)?;
        let target = match scheme {
            "redis+cluster" | "rediss+cluster" => Target::Cluster(expand_cluster_url(url)?),
            _ => {
                check_node_url(url)?;
                Target::Standalone(url.to_owned())
            }
        };
        Ok(Self::with_target(target))
    }

    /// A configuration for a Redis Cluster given by the URLs of some of its nodes
    /// (`redis://` or `rediss://` each). One reachable node is enough; the client
    /// discovers the others.
    pub fn cluster<I, S>(urls: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let urls: Vec<String> = urls.into_iter().map(|u| u.as_ref().to_owned()).collect();
        if urls.is_empty() {
            return Err(Error::InvalidUrl {
                url: String::new(),
                reason: "a cluster needs the URL of at least one node".into(),
            });
        }
        for url in &urls {
            check_node_url(url)?;
        }
        Ok(Self::with_target(Target::Cluster(urls)))
    }

    fn with_target(target: Target) -> Self {
        Self {
            target,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            pool_size: DEFAULT_POOL_SIZE,
            wait_pool_size: DEFAULT_WAIT_POOL_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            queue_options: QueueOptions::default(),
            #[cfg(feature = "tls")]
            tls_root_cert: None,
        }
    }

    /// Sets the key prefix (default `pf`): keys of queue `q` start with `{<prefix>:q}`.
    /// 1 to 64 characters of `A-Z a-z 0-9 . _ : -`; checked when connecting.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Sets the number of pooled connections for commands and scripts (at least 1).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// Sets the number of connections reserved for blocking waits (at least 1). A fetch
    /// that finds nothing blocks one of them until work arrives or its wait ends; when
    /// all are busy, further idle fetches poll every 50 ms instead.
    pub fn wait_pool_size(mut self, size: usize) -> Self {
        self.wait_pool_size = size;
        self
    }

    /// Sets the time allowed to open one connection (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the limits and retention times of the queues.
    pub fn queue_options(mut self, options: QueueOptions) -> Self {
        self.queue_options = options;
        self
    }

    /// Trusts the PEM certificate(s) in `pem` as the roots for `rediss://` servers, instead
    /// of the bundled webpki roots: for a server whose certificate a private CA signed.
    /// Feature `tls`.
    #[cfg(feature = "tls")]
    pub fn tls_root_cert(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_cert = Some(pem.into());
        self
    }

    /// Whether this configuration points at a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.key_prefix
    }

    /// The queue options.
    pub fn options(&self) -> &QueueOptions {
        &self.queue_options
    }

    /// The server or node URLs with passwords replaced by `***`, comma-separated.
    pub fn redacted(&self) -> String {
        match &self.target {
            Target::Standalone(url) => redact_url(url),
            Target::Cluster(urls) => {
                let nodes: Vec<String> = urls.iter().map(|u| redact_url(u)).collect();
                format!("cluster {}", nodes.join(","))
            }
        }
    }

    /// Every secret of the URLs (passwords, secret parameters), for scrubbing error
    /// messages that might echo them.
    pub(crate) fn secrets(&self) -> Secrets {
        match &self.target {
            Target::Standalone(url) => Secrets::of_url(url),
            Target::Cluster(urls) => Secrets::of_urls(urls),
        }
    }

    /// Checks the settings that are not checked by the setters.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let prefix = &self.key_prefix;
        if prefix.is_empty()
            || prefix.len() > 64
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err(Error::Config {
                setting: "key_prefix",
                reason: format!(
                    "{prefix:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ : - (braces would \
                     break the hash tag that keeps a queue in one cluster slot)"
                ),
            });
        }
        if self.pool_size == 0 {
            return Err(Error::Config {
                setting: "pool_size",
                reason: "must be at least 1".into(),
            });
        }
        if self.wait_pool_size == 0 {
            return Err(Error::Config {
                setting: "wait_pool_size",
                reason: "must be at least 1".into(),
            });
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::Config {
                setting: "connect_timeout",
                reason: "must be more than zero".into(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (key prefix {})", self.redacted(), self.key_prefix)
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut f = f.debug_struct("RedisConfig");
        f.field("target", &self.redacted())
            .field("key_prefix", &self.key_prefix)
            .field("pool_size", &self.pool_size)
            .field("wait_pool_size", &self.wait_pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("queue_options", &self.queue_options);
        #[cfg(feature = "tls")]
        f.field("tls_root_cert", &self.tls_root_cert.as_ref().map(|_| "set"));
        f.finish()
    }
}

fn split_scheme(url: &str) -> Result<(&str, &str), Error> {
    match url.find("://") {
        Some(i) => Ok((&url[..i], &url[i + 3..])),
        None => Err(Error::InvalidUrl {
            url: redact_url(url),
            reason: "expected redis://, rediss://, redis+cluster:// or rediss+cluster://".into(),
        }),
    }
}

/// Checks a URL of one node: a scheme redis-rs accepts, TLS only with the feature.
fn check_node_url(url: &str) -> Result<(), Error> {
    let (scheme, rest) = split_scheme(url)?;
    match scheme {
        "redis" | "redis+unix" | "unix" => {}
        "rediss" => {
            if !cfg!(feature = "tls") {
                return Err(Error::InvalidUrl {
                    url: redact_url(url),
                    reason: "rediss:// needs TLS support: build queue-redis with the `tls` \
                             feature"
                        .into(),
                });
            }
        }
        other => {
            return Err(Error::InvalidUrl {
                url: redact_url(url),
                reason: format!(
                    "unknown scheme {other:?}: expected redis://, rediss://, redis+cluster:// \
                     or rediss+cluster://"
                ),
            });
        }
    }
    if rest.is_empty() {
        return Err(Error::InvalidUrl {
            url: redact_url(url),
            reason: "no host given".into(),
        });
    }
    // An '@' after the host ends can only come from user info holding an unencoded '/',
    // '?' or '#' (a TCP URL's path is a database number, its query `protocol=`).
    if matches!(scheme, "redis" | "rediss")
        && rest
            .find(['/', '?', '#'])
            .is_some_and(|end| rest[end..].contains('@'))
    {
        return Err(Error::InvalidUrl {
            url: redact_url(url),
            reason: "the user name or password holds an unencoded / ? or #: percent-encode \
                     them (%2F, %3F, %23)"
                .into(),
        });
    }
    Ok(())
}

/// `redis+cluster://user:pw@h1:p1,h2:p2/db` into `redis://user:pw@h1:p1/db`, ...
fn expand_cluster_url(url: &str) -> Result<Vec<String>, Error> {
    let (scheme, rest) = split_scheme(url)?;
    let node_scheme = if scheme == "rediss+cluster" {
        "rediss"
    } else {
        "redis"
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|host| format!("{node_scheme}://{userinfo}{host}{tail}"))
        .collect();
    if nodes.is_empty() {
        return Err(Error::InvalidUrl {
            url: redact_url(url),
            reason: "a cluster URL needs at least one host:port".into(),
        });
    }
    for node in &nodes {
        check_node_url(node)?;
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_with_reserved_characters_and_secret_parameters_stay_hidden() {
        for (url, secret) in [
            ("redis://user:Left7%2FRight7@host:6379/0", "Left7/Right7"),
            ("redis+cluster://:Left7%3FRight7@a:1,b:2", "Left7?Right7"),
            (
                "redis://host:6379/0?password=Left7Right7&sslpassword=Left7Right7",
                "Left7Right7",
            ),
            (
                "redis+unix:///run/redis.sock?pass=Left7Right7",
                "Left7Right7",
            ),
        ] {
            let config = RedisConfig::from_url(url).expect("valid");
            let shown = format!("{config} / {config:?} / {}", config.redacted());
            for piece in ["Left7", "Right7"] {
                assert!(!shown.contains(piece), "{url}: {shown}");
            }
            // A driver message quoting the password on its own is scrubbed too.
            let scrubbed = config.secrets().scrub(&format!("server said {secret}"));
            assert_eq!(scrubbed, "server said ***", "{url}");
        }
        // Unencoded reserved characters: refused, saying what to do, showing no piece.
        for url in [
            "redis://:Left7/Right7@host:6379/0",
            "rediss://user:Left7?Right7#x@host",
            "redis+cluster://:Left7/Right7@a:1,b:2",
            "http://:Left7/Right7@host",
        ] {
            let err = RedisConfig::from_url(url).expect_err("refused");
            let shown = format!("{err} / {err:?}");
            for piece in ["Left7", "Right7"] {
                assert!(!shown.contains(piece), "{url}: {shown}");
            }
            // (`rediss://` without the `tls` feature is refused for that first.)
            if url.starts_with("redis://") || url.starts_with("redis+cluster://") {
                assert!(shown.contains("percent-encode"), "{url}: {shown}");
            }
        }
    }

    #[test]
    fn cluster_urls_expand_per_node_with_credentials() {
        let nodes = expand_cluster_url("redis+cluster://u:pw@a:1, b:2/0").expect("valid");
        assert_eq!(nodes, vec!["redis://u:pw@a:1/0", "redis://u:pw@b:2/0"]);
        let config = RedisConfig::from_url("redis+cluster://a:1,b:2").expect("valid");
        assert!(config.is_cluster());
        assert_eq!(config.redacted(), "cluster redis://a:1,redis://b:2");
        assert!(RedisConfig::from_url("redis+cluster://").is_err());
    }

    #[test]
    fn secrets_cover_raw_and_decoded_passwords() {
        let config = RedisConfig::from_url("redis://:p%40ss@host").expect("valid");
        assert_eq!(
            config.secrets().scrub("AUTH p%40ss / p@ss"),
            "AUTH *** / ***"
        );
        let shown = format!("{config} {config:?}");
        assert!(
            !shown.contains("p%40ss") && !shown.contains("p@ss"),
            "{shown}"
        );
    }

    #[test]
    fn bad_urls_and_settings_are_refused_without_echoing_secrets() {
        let err = RedisConfig::from_url("http://:pw@host").expect_err("bad scheme");
        assert!(!err.to_string().contains("pw@"), "{err}");
        assert!(RedisConfig::from_url("no scheme").is_err());
        let config = RedisConfig::from_url("redis://h").expect("valid");
        assert!(config.clone().key_prefix("a{b}").validate().is_err());
        assert!(config.clone().key_prefix("").validate().is_err());
        assert!(config.clone().pool_size(0).validate().is_err());
        assert!(config.validate().is_ok());
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn tls_urls_need_the_feature() {
        let err = RedisConfig::from_url("rediss://host").expect_err("no tls");
        assert!(err.to_string().contains("`tls` feature"), "{err}");
    }
}
