//! Pooled connections to one server or a cluster.
//!
//! Both pools are [deadpool](deadpool::managed) pools of [`Conn`]s made by [`Manager`]:
//! a multiplexed connection to a standalone server, or a cluster connection (which
//! routes each command to the node serving its slot). We use our own manager rather than
//! deadpool-redis' ready-made ones for three reasons:
//!
//! * no response timeout: redis-rs times requests out after 500 ms by default, which
//!   would abandon a script the server may already have run (and the blocking waits of
//!   idle fetches last longer than that). Dead peers are detected by TCP keepalive and
//!   `TCP_USER_TIMEOUT` instead, which never cut a slow but healthy reply;
//! * no `PING` on every checkout: a connection that just worked is handed out again as it
//!   is, and one whose last command failed at the connection level is marked broken and
//!   replaced at its next checkout. That saves a round trip per operation;
//! * one connection type for standalone and cluster, so the queue code is written once.

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::{AsyncConnectionConfig, Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture};

use crate::config::{RedisConfig, Target};
use crate::error::{Describe, Error};

/// Connections idle for longer than this are checked with a `PING` before reuse.
const PING_AFTER_IDLE: Duration = Duration::from_secs(30);

/// A pool of [`Conn`]s.
pub(crate) type Pool = deadpool::managed::Pool<Manager>;
/// A connection checked out of a [`Pool`].
pub(crate) type Pooled = deadpool::managed::Object<Manager>;

/// A connection to a standalone server or to a cluster.
pub(crate) struct Conn {
    inner: Inner,
    /// Set after an error that leaves the connection unusable; the pool then drops it.
    pub(crate) broken: bool,
}

enum Inner {
    Single(MultiplexedConnection),
    Cluster(Box<ClusterConnection>),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, redis::Value> {
        match &mut self.inner {
            Inner::Single(c) => c.req_packed_command(cmd),
            Inner::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match &mut self.inner {
            Inner::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Inner::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.inner {
            Inner::Single(c) => c.get_db(),
            Inner::Cluster(c) => c.get_db(),
        }
    }
}

/// Creates and recycles [`Conn`]s.
pub(crate) struct Manager {
    client: Client,
}

enum Client {
    Single {
        client: redis::Client,
        config: AsyncConnectionConfig,
    },
    Cluster(ClusterClient),
}

impl deadpool::managed::Manager for Manager {
    type Type = Conn;
    type Error = RedisError;

    async fn create(&self) -> Result<Conn, RedisError> {
        let inner = match &self.client {
            Client::Single { client, config } => Inner::Single(
                client
                    .get_multiplexed_async_connection_with_config(config)
                    .await?,
            ),
            Client::Cluster(client) => {
                Inner::Cluster(Box::new(client.get_async_connection().await?))
            }
        };
        Ok(Conn {
            inner,
            broken: false,
        })
    }

    async fn recycle(
        &self,
        conn: &mut Conn,
        metrics: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<RedisError> {
        if conn.broken {
            return Err(deadpool::managed::RecycleError::message(
                "the connection failed and is replaced",
            ));
        }
        if metrics.last_used() > PING_AFTER_IDLE {
            redis::cmd("PING").query_async::<()>(conn).await?;
        }
        Ok(())
    }
}

/// TCP settings of every connection: no Nagle delay, and dead peers detected by the
/// kernel (keepalive probes after 15 s of silence; unacknowledged data given up after
/// 30 s) instead of by response timeouts that could abandon a script Redis ran.
fn tcp_settings() -> TcpSettings {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(15))
        .with_interval(Duration::from_secs(5));
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    let keepalive = keepalive.with_retries(3);
    let settings = TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    let settings = settings.set_user_timeout(Duration::from_secs(30));
    settings
}

/// Builds a pool of at most `size` connections for `config`'s target.
pub(crate) fn pool(config: &RedisConfig, size: usize, describe: &Describe) -> Result<Pool, Error> {
    let client = match &config.target {
        Target::Standalone(url) => {
            let info = url
                .as_str()
                .into_connection_info()
                .map_err(|e| invalid_url(describe, &e))?
                .set_tcp_settings(tcp_settings());
            #[cfg(feature = "tls")]
            let client = match &config.tls_root_cert {
                Some(pem) => redis::Client::build_with_tls(info, tls_roots(pem)),
                None => redis::Client::open(info),
            };
            #[cfg(not(feature = "tls"))]
            let client = redis::Client::open(info);
            let client = client.map_err(|e| invalid_url(describe, &e))?;
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(config.connect_timeout))
                .set_response_timeout(None);
            Client::Single { client, config }
        }
        Target::Cluster(urls) => {
            let builder = ClusterClientBuilder::new(urls.iter().map(String::as_str))
                .connection_timeout(config.connect_timeout)
                .tcp_settings(tcp_settings());
            #[cfg(feature = "tls")]
            let builder = match &config.tls_root_cert {
                Some(pem) => builder.certs(tls_roots(pem)),
                None => builder,
            };
            let client = builder.build().map_err(|e| invalid_url(describe, &e))?;
            Client::Cluster(client)
        }
    };
    Pool::builder(Manager { client })
        .max_size(size)
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| Error::Config {
            setting: "pool_size",
            reason: e.to_string(),
        })
}

#[cfg(feature = "tls")]
fn tls_roots(pem: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.to_vec()),
    }
}

fn invalid_url(describe: &Describe, e: &RedisError) -> Error {
    match describe.redis(e) {
        Error::Redis { message, .. } | Error::Unavailable { message, .. } => Error::InvalidUrl {
            url: describe.target.clone(),
            reason: message,
        },
        other => other,
    }
}
