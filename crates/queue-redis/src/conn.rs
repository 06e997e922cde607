//! Pooled connections to one server or a cluster.
//!
//! Both pools are [deadpool](deadpool::managed) pools of [`Conn`]s made by [`Manager`]:
//! a direct connection to a standalone server over plain TCP (see [`Direct`]), a
//! multiplexed connection to a standalone server over TLS or a Unix socket, or a
//! cluster connection (which routes each command to the node serving its slot). We use
//! our own manager rather than deadpool-redis' ready-made ones for four reasons:
//!
//! * no response timeout: redis-rs times requests out after 500 ms by default, which
//!   would abandon a script the server may already have run (and the blocking waits of
//!   idle fetches last longer than that). Dead peers are detected by TCP keepalive and
//!   `TCP_USER_TIMEOUT` instead, which never cut a slow but healthy reply;
//! * no `PING` on every checkout: a connection that just worked is handed out again as it
//!   is, and one whose last command failed at the connection level is marked broken and
//!   replaced at its next checkout. That saves a round trip per operation;
//! * one connection type for standalone and cluster, so the queue code is written once;
//! * a pooled connection is used by one caller at a time anyway, so over plain TCP the
//!   caller's task writes the command and reads the reply itself. A multiplexed
//!   connection hands each request to a driver task and the reply back, two task wake-ups
//!   (often across threads) per command that cost ~30 µs of CPU and latency here.

use std::time::Duration;

use combine::parser::combinator::AnySendSyncPartialState;
use combine::stream::PointerOffset;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ErrorKind, IntoConnectionInfo, Pipeline,
    ProtocolVersion, RedisConnectionInfo, RedisError, RedisFuture, Value,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

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
    Direct(Box<Direct>),
    Single(MultiplexedConnection),
    Cluster(Box<ClusterConnection>),
}

impl Conn {
    /// Whether a request went out whose reply was never read (its caller gave up on it):
    /// the next reply on the wire would be that one, so the connection is not reused.
    fn out_of_step(&self) -> bool {
        matches!(&self.inner, Inner::Direct(d) if d.awaiting_reply)
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, redis::Value> {
        match &mut self.inner {
            Inner::Direct(c) => c.req_packed_command(cmd),
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
            Inner::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Inner::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Inner::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.inner {
            Inner::Direct(c) => c.get_db(),
            Inner::Single(c) => c.get_db(),
            Inner::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection to a standalone server over plain TCP, used by one caller at a time: the
/// caller's own task writes each command and reads its reply (RESP2), with no driver
/// task in between. Replies are decoded by redis' own parser, so callers see exactly the
/// values a multiplexed connection would give them.
pub(crate) struct Direct {
    /// Replies are read through `decoder`, which buffers what it reads itself.
    stream: TcpStream,
    decoder: combine::stream::Decoder<AnySendSyncPartialState, PointerOffset<[u8]>>,
    db: i64,
    /// Set from sending a request until its reply is read.
    awaiting_reply: bool,
}

impl Direct {
    /// Connects, authenticates and selects the database, all within `timeout`.
    async fn connect(
        host: &str,
        port: u16,
        settings: &RedisConnectionInfo,
        timeout: Duration,
    ) -> Result<Self, RedisError> {
        let setup = async {
            let stream = TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            let socket = socket2::SockRef::from(&stream);
            socket.set_tcp_keepalive(&keepalive())?;
            #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
            socket.set_tcp_user_timeout(Some(USER_TIMEOUT))?;
            let mut conn = Direct {
                stream,
                decoder: combine::stream::Decoder::new(),
                db: settings.db(),
                awaiting_reply: false,
            };
            if let Some(password) = settings.password() {
                let mut auth = redis::cmd("AUTH");
                if let Some(user) = settings.username() {
                    auth.arg(user);
                }
                auth.arg(password);
                if let Err(e) = auth.query_async::<()>(&mut conn).await {
                    return Err(match e.kind() {
                        ErrorKind::Io => e,
                        _ => RedisError::from((
                            ErrorKind::AuthenticationFailed,
                            "the server refused the credentials",
                            e.to_string(),
                        )),
                    });
                }
            }
            if conn.db != 0 {
                redis::cmd("SELECT")
                    .arg(conn.db)
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            Ok(conn)
        };
        match tokio::time::timeout(timeout, setup).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting took longer than {timeout:?}"),
            )
            .into()),
        }
    }

    /// Writes `packed` (one command, or a pipeline of `offset + count` commands) and reads
    /// the replies: the one reply of a command, or the last `count` of a pipeline as an
    /// array.
    async fn request(
        &mut self,
        packed: Vec<u8>,
        offset: usize,
        count: usize,
        single: bool,
    ) -> Result<Value, RedisError> {
        if self.awaiting_reply {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the connection is out of step after an abandoned request",
            )
            .into());
        }
        self.awaiting_reply = true;
        self.stream.write_all(&packed).await?;
        let value = if single {
            redis::parse_redis_value_async(&mut self.decoder, &mut self.stream).await?
        } else {
            let mut values = Vec::with_capacity(count);
            for i in 0..offset + count {
                let v = redis::parse_redis_value_async(&mut self.decoder, &mut self.stream).await?;
                if i >= offset {
                    values.push(v);
                }
            }
            Value::Array(values)
        };
        self.awaiting_reply = false;
        Ok(value)
    }
}

impl ConnectionLike for Direct {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(self.request(cmd.get_packed_command(), 0, 1, true))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            match self
                .request(pipeline.get_packed_pipeline(), offset, count, false)
                .await?
            {
                Value::Array(values) => Ok(values),
                other => Ok(vec![other]),
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}

/// Creates and recycles [`Conn`]s.
pub(crate) struct Manager {
    client: Client,
}

enum Client {
    Direct {
        host: String,
        port: u16,
        settings: RedisConnectionInfo,
        connect_timeout: Duration,
    },
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
            Client::Direct {
                host,
                port,
                settings,
                connect_timeout,
            } => Inner::Direct(Box::new(
                Direct::connect(host, *port, settings, *connect_timeout).await?,
            )),
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
        if conn.broken || conn.out_of_step() {
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
    let settings = TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive());
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    let settings = settings.set_user_timeout(USER_TIMEOUT);
    settings
}

/// Unacknowledged data is given up after this long (Linux `TCP_USER_TIMEOUT`).
#[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Keepalive probes after 15 s of silence, every 5 s, 3 of them.
fn keepalive() -> socket2::TcpKeepalive {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(15))
        .with_interval(Duration::from_secs(5));
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    let keepalive = keepalive.with_retries(3);
    keepalive
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
            let direct = match info.addr() {
                ConnectionAddr::Tcp(host, port)
                    if info.redis_settings().protocol() == ProtocolVersion::RESP2 =>
                {
                    Some(Client::Direct {
                        host: host.clone(),
                        port: *port,
                        settings: info.redis_settings().clone(),
                        connect_timeout: config.connect_timeout,
                    })
                }
                _ => None,
            };
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
            direct.unwrap_or(Client::Single { client, config })
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
