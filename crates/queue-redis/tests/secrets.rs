//! Passwords in URLs never appear in errors or `Debug` output: wrong passwords,
//! unreachable servers and a password changed under a running queue.

use flow_core::queue::{JobQueue, QueueOptions};
use queue_redis::{Error, RedisConfig, RedisQueue};
use test_support::redis::{RedisServer, ServerConfig};

const RIGHT: &str = "Right-Pa55word-7f3a";
const WRONG: &str = "Wrong-Pa55word-91c2";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn protected() -> RedisServer {
    RedisServer::start_with(ServerConfig {
        extra: vec![("requirepass".into(), RIGHT.into())],
        ..ServerConfig::default()
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

#[track_caller]
fn assert_hidden(text: &str, secret: &str) {
    assert!(!text.contains(secret), "the password leaked: {text}");
}

#[test]
fn a_wrong_password_is_refused_without_showing_it() {
    let server = protected();
    runtime().block_on(async {
        let url = format!("redis://:{WRONG}@127.0.0.1:{}", server.port());
        let err = RedisQueue::connect(&url, QueueOptions::default())
            .await
            .expect_err("a wrong password is refused");
        assert!(matches!(err, Error::Redis { .. }), "{err:?}");
        assert!(
            !err.is_transient(),
            "bad credentials are not a passing outage"
        );
        let shown = format!("{err} / {err:?}");
        assert_hidden(&shown, WRONG);
        assert!(
            shown.contains(":***@127.0.0.1"),
            "names the server: {shown}"
        );
        assert_hidden(&flow_core::Error::from(err).to_string(), WRONG);
    });
}

#[test]
fn an_unreachable_server_is_unavailable_without_showing_the_password() {
    let port = test_support::common::free_port().expect("free port");
    runtime().block_on(async {
        for url in [
            format!("redis://user:{WRONG}@127.0.0.1:{port}/0"),
            format!("redis+cluster://:{WRONG}@127.0.0.1:{port},127.0.0.1:{port}"),
        ] {
            let err = RedisQueue::connect(&url, QueueOptions::default())
                .await
                .expect_err("nothing listens there");
            assert!(err.is_transient(), "unreachable is transient: {err:?}");
            assert_hidden(&format!("{err} / {err:?}"), WRONG);
        }
    });
}

#[test]
fn the_right_password_works_and_stays_hidden_when_it_changes_later() {
    let server = protected();
    runtime().block_on(async {
        let url = format!("redis://:{RIGHT}@127.0.0.1:{}", server.port());
        let config = RedisConfig::from_url(&url).expect("valid URL");
        assert_hidden(&format!("{config} {config:?}"), RIGHT);
        let q = RedisQueue::with_config(config).await.expect("connect");
        assert_hidden(&format!("{q:?}"), RIGHT);
        q.ping().await.expect("ping");

        // The password changes and every connection is dropped: reconnecting fails,
        // and the errors still do not show the (old) password.
        let client = redis::Client::open(url.as_str()).expect("client");
        let mut admin = client
            .get_multiplexed_async_connection()
            .await
            .expect("connection");
        let _: () = redis::cmd("CONFIG")
            .arg(&["SET", "requirepass", "something-else"])
            .query_async(&mut admin)
            .await
            .expect("CONFIG SET");
        let killed: u64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal"])
            .query_async(&mut admin)
            .await
            .expect("CLIENT KILL");
        assert!(killed > 0);
        let mut failures = 0;
        for _ in 0..3 {
            if let Err(e) = q.stats("jobs").await {
                failures += 1;
                assert_hidden(&format!("{e} / {e:?}"), RIGHT);
            }
        }
        assert!(failures > 0, "operations fail once the password changed");
    });
}
