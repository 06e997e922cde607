//! A loopback TCP proxy that can cut connections mid-stream, for fault tests: a client
//! connects to the proxy's port instead of the server's, and the proxy relays both ways.
//!
//! Cuts are aimed by content, so one proxy can serve many tests at once: a rule names a
//! marker (say a queue name only one test uses) and a byte budget. Once a connection's
//! bytes to the server contain the marker, what it sends after it is counted against the
//! budget (shared by every connection, so a client that reconnects and resends finds it
//! spent); the first byte beyond the budget is never sent: the connection is closed, both
//! ways, and the server sees it end mid-request. Connections that never carry the marker
//! are left alone.
//!
//! ```no_run
//! use test_support::proxy::{Cuts, TcpProxy};
//!
//! let cuts = Cuts::new();
//! let proxy = TcpProxy::start(([127, 0, 0, 1], 6379).into(), cuts.clone())?;
//! // Connect to 127.0.0.1:<proxy.port()> instead of 6379; then:
//! cuts.cut_after_marker(b"my-queue", 100_000);
//! // ... a request naming my-queue is cut 100,000 bytes after that name ...
//! cuts.heal(b"my-queue");
//! # Ok::<(), test_support::common::ServerError>(())
//! ```
//!
//! [`ProxiedCluster`] is a Redis Cluster whose nodes announce proxies as their addresses,
//! so a cluster client's every connection passes through them.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::common::ServerError;
use crate::redis::RedisCluster;

/// One cut rule.
#[derive(Debug)]
struct Rule {
    marker: Vec<u8>,
    /// Bytes still allowed after the marker, over all connections.
    left: usize,
    cuts: usize,
}

/// The cut rules shared by one or more proxies. Cheap to clone (the clones share the rules).
#[derive(Clone, Debug, Default)]
pub struct Cuts {
    rules: Arc<Mutex<Vec<Rule>>>,
}

impl Cuts {
    /// No rules yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// From now until [`Cuts::heal`] with the same marker: connections whose bytes to the
    /// server contain `marker` may send `after` bytes in all (counted over every such
    /// connection) after it; a connection about to send more is closed, both ways, and
    /// the bytes beyond the budget never reach the server. Replaces an earlier rule of
    /// the same marker.
    pub fn cut_after_marker(&self, marker: &[u8], after: usize) {
        let mut rules = self.lock();
        rules.retain(|r| r.marker != marker);
        rules.push(Rule {
            marker: marker.to_vec(),
            left: after,
            cuts: 0,
        });
    }

    /// Removes the rule of `marker`; returns how many connections it cut.
    pub fn heal(&self, marker: &[u8]) -> usize {
        let mut rules = self.lock();
        let cuts = rules
            .iter()
            .find(|r| r.marker == marker)
            .map_or(0, |r| r.cuts);
        rules.retain(|r| r.marker != marker);
        cuts
    }

    /// How many connections the rule of `marker` cut so far (0 without such a rule).
    pub fn cuts(&self, marker: &[u8]) -> usize {
        self.lock()
            .iter()
            .find(|r| r.marker == marker)
            .map_or(0, |r| r.cuts)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Rule>> {
        self.rules.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The longest marker, so a connection keeps enough of its last bytes to find a
    /// marker split across two reads.
    fn longest(&self) -> usize {
        self.lock()
            .iter()
            .map(|r| r.marker.len())
            .max()
            .unwrap_or(0)
    }

    /// The first marker found in `hay`, and where it ends in `hay`.
    fn find(&self, hay: &[u8]) -> Option<(Vec<u8>, usize)> {
        let rules = self.lock();
        rules
            .iter()
            .find_map(|r| find(hay, &r.marker).map(|pos| (r.marker.clone(), pos + r.marker.len())))
    }

    /// Takes up to `want` bytes from the budget of `marker`'s rule; all of them when the
    /// rule is gone (healed).
    fn take(&self, marker: &[u8], want: usize) -> usize {
        match self.lock().iter_mut().find(|r| r.marker == marker) {
            Some(rule) => {
                let taken = want.min(rule.left);
                rule.left -= taken;
                taken
            }
            None => want,
        }
    }

    fn count_cut(&self, marker: &[u8]) {
        if let Some(rule) = self.lock().iter_mut().find(|r| r.marker == marker) {
            rule.cuts += 1;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A proxy on a free loopback port relaying to one upstream address, applying [`Cuts`].
/// Dropping it stops accepting and closes the connections it relays.
#[derive(Debug)]
pub struct TcpProxy {
    port: u16,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl TcpProxy {
    /// Listens on a free loopback port and relays every connection to `upstream`.
    pub fn start(upstream: SocketAddr, cuts: Cuts) -> Result<Self, ServerError> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| ServerError(format!("cannot bind a proxy port: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| ServerError(format!("cannot read the proxy port: {e}")))?
            .port();
        let stop = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (stop_flag, open_list) = (Arc::clone(&stop), Arc::clone(&open));
        std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || {
                for client in listener.incoming() {
                    if stop_flag.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))
                    else {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    {
                        let mut list = open_list.lock().unwrap_or_else(PoisonError::into_inner);
                        list.retain(|s| s.peer_addr().is_ok());
                        for s in [&client, &server] {
                            if let Ok(s) = s.try_clone() {
                                list.push(s);
                            }
                        }
                    }
                    relay(client, server, cuts.clone());
                }
            })
            .map_err(|e| ServerError(format!("cannot start a proxy thread: {e}")))?;
        Ok(Self { port, stop, open })
    }

    /// The loopback port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        for s in self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Relays one connection: server to client as it comes, client to server through the
/// cut rules.
fn relay(client: TcpStream, server: TcpStream, cuts: Cuts) {
    let (Ok(client_read), Ok(server_write)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("proxy-down".into())
        .spawn(move || {
            let (mut from, mut to) = (server, client);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    let _ = std::thread::Builder::new()
        .name("proxy-up".into())
        .spawn(move || upstream(client_read, server_write, &cuts));
}

/// Copies client bytes to the server until the client closes, or a rule's budget runs
/// out: then both directions of both sockets are shut down.
fn upstream(mut from: TcpStream, mut to: TcpStream, cuts: &Cuts) {
    let mut buf = vec![0u8; 64 * 1024];
    // The last bytes seen, to find a marker split across reads.
    let mut tail: Vec<u8> = Vec::new();
    // The marker this connection carried, once seen.
    let mut armed: Option<Vec<u8>> = None;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let data = &buf[..n];
        // Bytes before the marker's end pass freely; those after it take from the budget.
        let mut free = if armed.is_some() { 0 } else { n };
        if armed.is_none() {
            let mut hay = std::mem::take(&mut tail);
            let kept = hay.len();
            hay.extend_from_slice(data);
            if let Some((marker, end)) = cuts.find(&hay) {
                // The marker ends inside this read (it was not whole in the tail).
                free = end.saturating_sub(kept);
                armed = Some(marker);
            }
            let keep = cuts.longest().saturating_sub(1);
            tail = hay[hay.len().saturating_sub(keep)..].to_vec();
        }
        let mut pass = n;
        let mut cut = None;
        if let Some(marker) = &armed {
            let want = n - free;
            let taken = cuts.take(marker, want);
            pass = free + taken;
            if taken < want {
                cut = Some(marker.clone());
            }
        }
        if to.write_all(&data[..pass]).is_err() {
            break;
        }
        if let Some(marker) = cut {
            // Counted before the client can see the connection end.
            cuts.count_cut(&marker);
            let _ = to.flush();
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// `url` with its host and port replaced by `127.0.0.1:<port>` (user info, path and
/// query kept), and the address it named: for pointing a client at a proxy.
///
/// ```
/// use test_support::proxy::via;
/// let (url, upstream) = via("postgres://u:p@127.0.0.1:5432/db?x=1", 6000).expect("url");
/// assert_eq!(url, "postgres://u:p@127.0.0.1:6000/db?x=1");
/// assert_eq!(upstream.port(), 5432);
/// ```
pub fn via(url: &str, port: u16) -> Result<(String, SocketAddr), ServerError> {
    let bad = || {
        ServerError(format!(
            "cannot route {url:?} through a proxy: expected scheme://host:port"
        ))
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    let upstream = hostport
        .replace("localhost", "127.0.0.1")
        .parse::<SocketAddr>()
        .map_err(|_| bad())?;
    if !upstream.ip().is_loopback() {
        return Err(ServerError(format!(
            "the proxy only relays to loopback servers, not {upstream}"
        )));
    }
    Ok((
        format!("{scheme}://{userinfo}127.0.0.1:{port}{tail}"),
        upstream,
    ))
}

/// A Redis Cluster whose nodes announce [`TcpProxy`]s as their addresses (the
/// `cluster-announce-port` setting), so a cluster client's every connection, to the seed
/// nodes and to the nodes it learns from `CLUSTER SLOTS` and redirections, passes
/// through them and is subject to the shared [`Cuts`].
#[derive(Debug)]
pub struct ProxiedCluster {
    // Field order: the proxies go before the servers they relay to, which are only
    // kept alive here.
    proxies: Vec<TcpProxy>,
    _cluster: RedisCluster,
    cuts: Cuts,
}

impl ProxiedCluster {
    /// Starts `masters` nodes (at least 3) and a proxy for each, and waits until every
    /// node reports only the proxies' ports.
    pub fn start(masters: usize) -> Result<Self, ServerError> {
        let mut cluster = RedisCluster::start(masters)?;
        let cuts = Cuts::new();
        let mut proxies = Vec::with_capacity(masters);
        for node in cluster.nodes().iter() {
            let proxy = TcpProxy::start(([127, 0, 0, 1], node.port()).into(), cuts.clone())?;
            for (name, value) in [
                (
                    "cluster-announce-bus-port",
                    (u32::from(node.port()) + 10000).to_string(),
                ),
                ("cluster-announce-port", proxy.port().to_string()),
            ] {
                let reply = node.command(&["CONFIG", "SET", name, &value])?;
                if !reply.starts_with("+OK") {
                    return Err(ServerError(format!("CONFIG SET {name}: {reply}")));
                }
            }
            proxies.push(proxy);
        }
        let proxy_ports: Vec<u16> = proxies.iter().map(TcpProxy::port).collect();
        let node_ports: Vec<u16> = cluster.nodes().iter().map(|n| n.port()).collect();
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            // Every node names every proxy, and no node, as a slot owner (in RESP, a port
            // is an integer `:<port>`; slot numbers stay below any port used here).
            let agreed = cluster.nodes().iter().all(|node| {
                let slots = node.command(&["CLUSTER", "SLOTS"]).unwrap_or_default();
                proxy_ports
                    .iter()
                    .all(|p| slots.contains(&format!(":{p}\r\n")))
                    && !node_ports
                        .iter()
                        .any(|p| slots.contains(&format!(":{p}\r\n")))
            });
            if agreed {
                break;
            }
            if Instant::now() >= until {
                return Err(ServerError(
                    "the cluster nodes did not announce their proxies within 20 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self {
            proxies,
            _cluster: cluster,
            cuts,
        })
    }

    /// `redis://127.0.0.1:<proxy port>` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.proxies
            .iter()
            .map(|p| format!("redis://127.0.0.1:{}", p.port()))
            .collect()
    }

    /// The cut rules of every proxy.
    pub fn cuts(&self) -> &Cuts {
        &self.cuts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A server that records everything it receives on each connection (sent on `tx`
    /// when the connection ends) and answers `ok\n` to every read.
    fn recording_server() -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                        let _ = conn.write_all(b"ok\n");
                    }
                    let _ = tx.send(got);
                });
            }
        });
        (addr, rx)
    }

    #[test]
    fn relays_both_ways_and_cuts_after_the_marker() {
        let (addr, received) = recording_server();
        let cuts = Cuts::new();
        let proxy = TcpProxy::start(addr, cuts.clone()).expect("proxy");

        // No rule: everything passes, replies come back.
        let mut c = TcpStream::connect(("127.0.0.1", proxy.port())).expect("connect");
        c.write_all(b"hello queue-a").expect("write");
        let mut reply = [0u8; 3];
        c.read_exact(&mut reply).expect("reply");
        assert_eq!(&reply, b"ok\n");
        drop(c);
        assert_eq!(
            received
                .recv_timeout(Duration::from_secs(5))
                .expect("ended"),
            b"hello queue-a"
        );

        // A rule: the marker, split across two writes, then 5 more bytes pass.
        cuts.cut_after_marker(b"queue-b", 5);
        let mut c = TcpStream::connect(("127.0.0.1", proxy.port())).expect("connect");
        c.write_all(b"first que").expect("write");
        std::thread::sleep(Duration::from_millis(50));
        let _ = c.write_all(b"ue-b 0123456789");
        let got = received.recv_timeout(Duration::from_secs(5)).expect("cut");
        assert_eq!(got, b"first queue-b 0123");
        let mut rest = Vec::new();
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = c.read_to_end(&mut rest);
        assert_eq!(cuts.cuts(b"queue-b"), 1);
        // The budget is spent: a new connection carrying the marker gets no further.
        let mut c = TcpStream::connect(("127.0.0.1", proxy.port())).expect("connect");
        let _ = c.write_all(b"again queue-b 0123456789");
        let got = received.recv_timeout(Duration::from_secs(5)).expect("cut");
        assert_eq!(got, b"again queue-b");
        assert_eq!(cuts.cuts(b"queue-b"), 2);

        // A budget spent over several reads of one connection.
        cuts.cut_after_marker(b"queue-c", 5);
        let mut c = TcpStream::connect(("127.0.0.1", proxy.port())).expect("connect");
        for part in [&b"queue-c"[..], b"01", b"2345"] {
            let _ = c.write_all(part);
            std::thread::sleep(Duration::from_millis(50));
        }
        let got = received.recv_timeout(Duration::from_secs(5)).expect("cut");
        assert_eq!(got, b"queue-c01234");
        assert_eq!(cuts.heal(b"queue-c"), 1);

        // Other connections are not touched; after heal nothing is cut.
        let mut c = TcpStream::connect(("127.0.0.1", proxy.port())).expect("connect");
        c.write_all(b"other").expect("write");
        c.read_exact(&mut reply).expect("reply");
        drop(c);
        assert_eq!(
            received
                .recv_timeout(Duration::from_secs(5))
                .expect("ended"),
            b"other"
        );
        assert_eq!(cuts.heal(b"queue-b"), 2);
        let mut c = TcpStream::connect(("127.0.0.1", proxy.port())).expect("connect");
        c.write_all(b"queue-b 0123456789").expect("write");
        c.read_exact(&mut reply).expect("reply");
        drop(c);
        assert_eq!(
            received
                .recv_timeout(Duration::from_secs(5))
                .expect("ended"),
            b"queue-b 0123456789"
        );
    }

    #[test]
    fn urls_are_pointed_at_the_proxy() {
        let (url, upstream) = via("redis://:pw@127.0.0.1:7000/2", 9).expect("url");
        assert_eq!(url, "redis://:pw@127.0.0.1:9/2");
        assert_eq!(upstream, SocketAddr::from(([127, 0, 0, 1], 7000)));
        assert!(via("redis://10.0.0.1:7000", 9).is_err(), "loopback only");
        assert!(via("no scheme", 9).is_err());
    }
}
