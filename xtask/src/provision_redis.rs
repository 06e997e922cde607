//! Redis for the test steps (design.md section 7): a standalone server in `REDIS_URL`
//! and a three-master cluster in `REDIS_CLUSTER_URLS` (comma-separated node URLs).
//!
//! For each, in order:
//!
//! 1. the variable from the environment, when set (it is inherited by the tests);
//! 2. else, when a Docker engine answers (`docker info`), `redis:7` containers started
//!    with the docker CLI and removed at the end of the run (the cluster uses host
//!    networking so its nodes can announce loopback addresses);
//! 3. else throwaway `redis-server` processes from the local binaries, on free loopback
//!    ports in temporary directories ([`test_support::redis`]);
//! 4. else a one-line error saying what to install.
//!
//! Tests never fall back to a shared server such as the one on port 6379.

use std::time::{Duration, Instant};

use test_support::common::free_port_pair;
use test_support::redis::{RedisCluster, RedisServer};

use crate::provision::TestEnv;
use crate::provision::{docker, docker_answers};
use crate::steps::Ctx;

/// Image used when a Docker engine answers.
const IMAGE: &str = "redis:7";
/// What to install when nothing else works.
const INSTALL: &str = "install redis-server (Debian: apt-get install redis-server), start a \
                       Docker engine, or set REDIS_URL and REDIS_CLUSTER_URLS";

/// Provides `REDIS_URL`: a standalone server.
pub(crate) fn standalone(_ctx: &Ctx, env: &mut TestEnv) -> Result<(), String> {
    if is_set("REDIS_URL") {
        eprintln!("    REDIS_URL is set in the environment: using it");
        return Ok(());
    }
    if docker_answers() {
        let container = Container::run(&["-p", "127.0.0.1::6379"], &[])?;
        let url = format!("redis://{}", container.published_port("6379/tcp")?);
        container.wait_ping(None)?;
        env.set("REDIS_URL", url);
        env.keep_alive(container);
        return Ok(());
    }
    let server = RedisServer::start().map_err(|e| format!("{e}; or {INSTALL}"))?;
    env.set("REDIS_URL", server.url());
    env.keep_alive(server);
    Ok(())
}

/// Provides `REDIS_CLUSTER_URLS`: a cluster of three masters.
pub(crate) fn cluster(_ctx: &Ctx, env: &mut TestEnv) -> Result<(), String> {
    if is_set("REDIS_CLUSTER_URLS") {
        eprintln!("    REDIS_CLUSTER_URLS is set in the environment: using it");
        return Ok(());
    }
    if docker_answers() {
        let nodes = DockerCluster::start(3)?;
        env.set("REDIS_CLUSTER_URLS", nodes.urls().join(","));
        env.keep_alive(nodes);
        return Ok(());
    }
    let cluster = RedisCluster::start(3).map_err(|e| format!("{e}; or {INSTALL}"))?;
    env.set("REDIS_CLUSTER_URLS", cluster.urls().join(","));
    env.keep_alive(cluster);
    Ok(())
}

fn is_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// A `redis:7` container, removed when dropped.
struct Container {
    id: String,
}

impl Container {
    /// `docker run -d --rm <docker_args> redis:7 redis-server --save '' --appendonly no <server_args>`.
    fn run(docker_args: &[&str], server_args: &[&str]) -> Result<Self, String> {
        let mut args = vec!["run", "-d", "--rm"];
        args.extend_from_slice(docker_args);
        args.extend_from_slice(&[IMAGE, "redis-server", "--save", "", "--appendonly", "no"]);
        args.extend_from_slice(server_args);
        Ok(Self { id: docker(&args)? })
    }

    /// `127.0.0.1:<port>` published for the container's `port`.
    fn published_port(&self, port: &str) -> Result<String, String> {
        let mapping = docker(&["port", &self.id, port])?;
        mapping
            .lines()
            .find(|l| l.starts_with("127.0.0.1:"))
            .map(str::to_owned)
            .ok_or_else(|| format!("docker published no loopback port for {port}"))
    }

    /// Waits until `redis-cli [-p port] ping` inside the container says PONG.
    fn wait_ping(&self, port: Option<u16>) -> Result<(), String> {
        let port = port.map(|p| p.to_string());
        let mut args = vec!["exec", self.id.as_str(), "redis-cli"];
        if let Some(port) = &port {
            args.extend_from_slice(&["-p", port]);
        }
        args.push("ping");
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if docker(&args).is_ok_and(|out| out == "PONG") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err("the redis container did not answer PING within 30s".into())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.id]);
    }
}

/// Cluster-mode containers on the host network, joined into one cluster.
struct DockerCluster {
    nodes: Vec<(u16, Container)>,
}

impl DockerCluster {
    fn start(masters: usize) -> Result<Self, String> {
        let mut nodes = Vec::with_capacity(masters);
        for _ in 0..masters {
            let port = free_port_pair(10000).map_err(|e| e.to_string())?;
            let port_text = port.to_string();
            let container = Container::run(
                &["--network", "host"],
                &[
                    "--port",
                    &port_text,
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ],
            )?;
            container.wait_ping(Some(port))?;
            nodes.push((port, container));
        }
        let cluster = Self { nodes };
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        let first = cluster
            .nodes
            .first()
            .map(|(_, c)| c.id.clone())
            .ok_or("no cluster node started")?;
        let mut args = vec!["exec", first.as_str(), "redis-cli", "--cluster", "create"];
        args.extend(addresses.iter().map(String::as_str));
        args.extend_from_slice(&["--cluster-replicas", "0", "--cluster-yes"]);
        docker(&args)?;
        let until = Instant::now() + Duration::from_secs(30);
        for (port, container) in &cluster.nodes {
            let port = port.to_string();
            loop {
                let info = docker(&[
                    "exec",
                    &container.id,
                    "redis-cli",
                    "-p",
                    &port,
                    "cluster",
                    "info",
                ]);
                if info.is_ok_and(|text| text.contains("cluster_state:ok")) {
                    break;
                }
                if Instant::now() >= until {
                    return Err("the docker Redis Cluster did not reach cluster_state:ok".into());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(cluster)
    }

    fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(port, _)| format!("redis://127.0.0.1:{port}"))
            .collect()
    }
}
