//! The Lua scripts, one per multi-key step, each with the shared prelude prepended and,
//! where it has rare paths, the helper library (`lua/lib.lua`, whose helpers are built
//! only when a call needs them: every closure costs on every call).
//!
//! [`redis::Script`] calls them by SHA-1 (`EVALSHA`) and loads them again after a
//! `NOSCRIPT` reply (a restarted or flushed server). [`RedisQueue`](crate::RedisQueue)
//! also loads them all once when it connects.

use std::sync::LazyLock;

use redis::Script;

macro_rules! script {
    ($name:literal $(; $($lib:literal),+)?) => {
        Script::new(concat!(
            include_str!("lua/prelude.lua"),
            "\n",
            $($(include_str!(concat!("lua/", $lib, ".lua")), "\n",)+)?
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
    pub(crate) mark_started: Script,
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
    pub(crate) fn all(&self) -> [&Script; 18] {
        [
            &self.enqueue,
            &self.fetch,
            &self.heartbeat,
            &self.complete,
            &self.retry,
            &self.fail,
            &self.release,
            &self.mark_cancelled,
            &self.mark_started,
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
    enqueue: script!("enqueue"; "lib"),
    fetch: script!("fetch"; "lib"),
    heartbeat: script!("heartbeat"),
    complete: script!("complete"; "lib"),
    retry: script!("retry"; "lib"),
    fail: script!("fail"; "lib"),
    release: script!("release"; "lib"),
    mark_cancelled: script!("mark_cancelled"; "lib"),
    mark_started: script!("mark_started"),
    bury: script!("bury"; "lib"),
    reap: script!("reap"; "lib"),
    job: script!("job"; "lib"),
    cancel: script!("cancel"; "lib"),
    stats: script!("stats"),
    dead_letters: script!("dead_letters"),
    requeue_dead: script!("requeue_dead"; "lib"),
    purge_dead: script!("purge_dead"),
    set_paused: script!("set_paused"; "lib"),
});

/// One script call being built: `EVALSHA <sha> 1 <key> <args...>` in one
/// [`Cmd`](redis::Cmd), whose arguments share one buffer (a
/// [`redis::ScriptInvocation`] keeps each argument in an allocation of its own and
/// copies them all again when it sends).
pub(crate) struct Call {
    pub(crate) script: &'static Script,
    pub(crate) cmd: redis::Cmd,
}

impl Call {
    /// A call of `script` on the queue whose base key is `key`.
    pub(crate) fn new(script: &'static Script, key: &str) -> Self {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(1).arg(key);
        Self { script, cmd }
    }

    /// Appends an argument (`ARGV[i]`).
    pub(crate) fn arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.cmd.arg(arg);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scripts in the order of [`Scripts::all`].
    const NAMES: [&str; 18] = [
        "enqueue",
        "fetch",
        "heartbeat",
        "complete",
        "retry",
        "fail",
        "release",
        "mark_cancelled",
        "mark_started",
        "bury",
        "reap",
        "job",
        "cancel",
        "stats",
        "dead_letters",
        "requeue_dead",
        "purge_dead",
        "set_paused",
    ];

    #[test]
    fn a_script_that_calls_lib_includes_it_and_no_other_does() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lua");
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(format!("{name}.lua")))
                .unwrap_or_else(|e| panic!("{name}.lua: {e}"))
        };
        let prelude = read("prelude");
        let lib = read("lib");
        for (name, script) in NAMES.iter().zip(SCRIPTS.all()) {
            let body = read(name);
            let text = if body.contains("lib()") {
                format!("{prelude}\n{lib}\n{body}")
            } else {
                format!("{prelude}\n{body}")
            };
            assert_eq!(
                Script::new(&text).get_hash(),
                script.get_hash(),
                "{name}: lib.lua must be included exactly when the script calls lib()"
            );
        }
    }
}
