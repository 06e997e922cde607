//! The Lua scripts, one per multi-key step, each with the shared prelude prepended.
//!
//! [`redis::Script`] calls them by SHA-1 (`EVALSHA`) and loads them again after a
//! `NOSCRIPT` reply (a restarted or flushed server). [`RedisQueue`](crate::RedisQueue)
//! also loads them all once when it connects.

use std::sync::LazyLock;

use redis::Script;

macro_rules! script {
    ($name:literal) => {
        Script::new(concat!(
            include_str!("lua/prelude.lua"),
            "\n",
            include_str!(concat!("lua/", $name, ".lua"))
        ))
    };
}

/// Every script of the backend.
pub(crate) struct Scripts {
    pub(crate) enqueue: Script,
    pub(crate) fetch: Script,
    pub(crate) heartbeat: Script,
    pub(crate) complete: Script,
    pub(crate) retry: Script,
    pub(crate) fail: Script,
    pub(crate) release: Script,
    pub(crate) mark_cancelled: Script,
    pub(crate) bury: Script,
    pub(crate) reap: Script,
    pub(crate) job: Script,
    pub(crate) cancel: Script,
    pub(crate) stats: Script,
    pub(crate) dead_letters: Script,
    pub(crate) requeue_dead: Script,
    pub(crate) purge_dead: Script,
    pub(crate) set_paused: Script,
}

impl Scripts {
    /// All scripts, to load them when connecting.
    pub(crate) fn all(&self) -> [&Script; 17] {
        [
            &self.enqueue,
            &self.fetch,
            &self.heartbeat,
            &self.complete,
            &self.retry,
            &self.fail,
            &self.release,
            &self.mark_cancelled,
            &self.bury,
            &self.reap,
            &self.job,
            &self.cancel,
            &self.stats,
            &self.dead_letters,
            &self.requeue_dead,
            &self.purge_dead,
            &self.set_paused,
        ]
    }
}

/// The scripts, hashed once per process.
pub(crate) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    enqueue: script!("enqueue"),
    fetch: script!("fetch"),
    heartbeat: script!("heartbeat"),
    complete: script!("complete"),
    retry: script!("retry"),
    fail: script!("fail"),
    release: script!("release"),
    mark_cancelled: script!("mark_cancelled"),
    bury: script!("bury"),
    reap: script!("reap"),
    job: script!("job"),
    cancel: script!("cancel"),
    stats: script!("stats"),
    dead_letters: script!("dead_letters"),
    requeue_dead: script!("requeue_dead"),
    purge_dead: script!("purge_dead"),
    set_paused: script!("set_paused"),
});
