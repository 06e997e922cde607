//! `rediss://` against a throwaway `redis-server` with TLS on, its certificate signed by a
//! private CA made with the `openssl` command: trusted through
//! [`RedisConfig::tls_root_cert`], refused without it. Feature `tls`.
#![cfg(feature = "tls")]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flow_core::queue::{JobQueue, NewJob, QueueOptions};
use queue_redis::{RedisConfig, RedisQueue};
use serde_json::json;
use test_support::common::{free_port, temp_dir};
use test_support::redis::{RedisServer, ServerConfig};

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}): install openssl"));
    assert!(status.success(), "openssl {args:?} failed");
}

/// A CA and a server certificate for 127.0.0.1 signed by it, in `dir`.
fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=queue-redis test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n\
         extendedKeyUsage=serverAuth\n",
    )
    .expect("write ext.cnf");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

#[test]
fn rediss_works_with_a_trusted_root_and_is_refused_without() {
    let dir = temp_dir("queue-redis-tls").expect("temp dir");
    certificates(&dir);
    let tls_port = free_port().expect("free port");
    let file = |name: &str| dir.join(name).display().to_string();
    let server = RedisServer::start_with(ServerConfig {
        extra: vec![
            ("tls-port".into(), tls_port.to_string()),
            ("tls-cert-file".into(), file("server.pem")),
            ("tls-key-file".into(), file("server.key")),
            ("tls-auth-clients".into(), "no".into()),
        ],
        ..ServerConfig::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let ca = std::fs::read(dir.join("ca.pem")).expect("read ca.pem");
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let config = RedisConfig::from_url(&url)
            .expect("valid URL")
            .tls_root_cert(ca)
            .queue_options(QueueOptions::default());
        let q = RedisQueue::with_config(config)
            .await
            .expect("connect over TLS");
        let id = q
            .enqueue(NewJob::new("tls", json!("secret")))
            .await
            .expect("enqueue");
        let jobs = q
            .fetch("tls", 1, Duration::from_secs(30), Duration::from_secs(2))
            .await
            .expect("fetch");
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].id, id);
        q.complete(&jobs[0].lease, json!("ok"))
            .await
            .expect("complete");

        let untrusted = RedisQueue::connect(&url, QueueOptions::default()).await;
        assert!(
            untrusted.is_err(),
            "a certificate from an unknown CA is refused by default"
        );
    });
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
