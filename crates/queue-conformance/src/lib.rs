//! # queue-conformance
//!
//! One test suite that every [`JobQueue`] backend (memory, Redis, PostgreSQL) runs
//! unchanged. Each public function of [`tests`] proves one clause of the contract
//! (design.md section 4 and the module docs of `flow_core::queue`).
//!
//! ## Using it from a backend crate
//!
//! Add the crate as a dev-dependency and write one integration test file whose whole
//! body is the [`conformance_tests!`] macro, given a [`QueueFactory`]:
//!
//! ```ignore
//! // crates/queue-redis/tests/conformance.rs
//! use std::sync::Arc;
//! use flow_core::queue::{JobQueue, QueueOptions};
//!
//! queue_conformance::conformance_tests!(|opts: QueueOptions| async move {
//!     let url = std::env::var("REDIS_URL").expect("REDIS_URL is set by cargo xtask ci");
//!     Arc::new(queue_redis::RedisQueue::connect(&url, opts).await.expect("connect"))
//!         as Arc<dyn JobQueue>
//! });
//! ```
//!
//! The macro expands into one `#[test]` per clause, named after the clause (so
//! `cargo nextest` lists and reports every clause on its own). Each runs on its own
//! multi-threaded Tokio runtime with 4 worker threads, under a timeout of
//! [`TEST_TIMEOUT`], and calls `queue_conformance::tests::<clause>(factory)`.
//! The calling crate needs no Tokio dependency of its own for this.
//!
//! ## What a factory must do
//!
//! [`QueueFactory::build`] is called once or more per test with the [`QueueOptions`] the
//! test needs (small retention times, small dead-letter limits, small payload limits).
//! It must return a backend that honours those options. The backend may share a server
//! with other tests running at the same time: every test works on queue names of its
//! own, `conf-<clause>-<random hex>`, and never looks at any other queue. A factory
//! that cannot reach its server should panic with a message saying what to start.
//!
//! ## Connection faults
//!
//! Clauses that cut a connection in the middle of a call (see [`ConnectionFaults`]) run
//! only for a factory whose [`QueueFactory::faults`] gives them, for example a
//! [`WithFaults`]; for others they print a note and pass.
//!
//! ## Timing
//!
//! Tests use short delays and leases (a few hundred milliseconds) and generous upper
//! bounds, so a slow machine does not make them flaky; no test measures throughput.
//! Against the in-memory backend the whole suite runs in a few seconds.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use flow_core::queue::{JobQueue, QueueOptions};
use futures::future::BoxFuture;

/// Builds a fresh backend for one test.
///
/// Implemented for every `Fn(QueueOptions) -> impl Future<Output = Arc<dyn JobQueue>>`
/// closure, so most backends pass a closure to [`conformance_tests!`].
pub trait QueueFactory: Send + Sync + 'static {
    /// A backend configured with `opts`. It may share storage with other backends built
    /// by this factory (tests use queue names of their own), but must apply `opts`.
    fn build(&self, opts: QueueOptions) -> BoxFuture<'static, Arc<dyn JobQueue>>;

    /// Connection faults, for the clauses that make a connection fail in the middle of a
    /// call. `None` (the default, and what a closure gives) skips those clauses with a
    /// note on stderr: a backend without a connection (the in-memory one) has none to
    /// fail. Wrap a closure in [`WithFaults`] to provide them.
    fn faults(&self) -> Option<&dyn ConnectionFaults> {
        None
    }
}

/// Makes connections fail mid-call, for backends that talk to a server.
///
/// Cuts are aimed by content: a clause names a marker that only its own traffic carries
/// (its queue name), and the connections carrying it are closed, both ways, part-way
/// through its call. The usual implementation is a loopback TCP proxy between the backends built
/// by [`ConnectionFaults::build`] and their server (`test_support::proxy`).
pub trait ConnectionFaults: Send + Sync {
    /// A backend configured with `opts` whose every connection to its server passes
    /// through the fault injector.
    fn build(&self, opts: QueueOptions) -> BoxFuture<'static, Arc<dyn JobQueue>>;

    /// From now until [`ConnectionFaults::heal`] with the same marker: connections of
    /// backends built by [`ConnectionFaults::build`] whose bytes to the server contain
    /// `marker` may send `after` bytes in all after it, counted over every such
    /// connection (so a backend that reconnects and resends finds the budget spent). A
    /// connection about to send more is closed, both ways; the bytes beyond the budget
    /// never reach the server.
    fn cut_after_marker(&self, marker: &[u8], after: usize);

    /// Stops cutting connections for `marker`; returns how many it cut.
    fn heal(&self, marker: &[u8]) -> usize;
}

/// A [`QueueFactory`] made of a closure factory and [`ConnectionFaults`].
///
/// ```ignore
/// queue_conformance::conformance_tests!(queue_conformance::WithFaults {
///     factory: |opts: QueueOptions| async move { /* Arc<dyn JobQueue> */ },
///     faults: MyProxyFaults::shared(),
/// });
/// ```
pub struct WithFaults<F, X> {
    /// Builds the backends of every clause.
    pub factory: F,
    /// The faults, for the clauses that need them.
    pub faults: X,
}

impl<F, X> std::fmt::Debug for WithFaults<F, X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithFaults").finish_non_exhaustive()
    }
}

impl<F, Fut, X> QueueFactory for WithFaults<F, X>
where
    F: Fn(QueueOptions) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Arc<dyn JobQueue>> + Send + 'static,
    X: ConnectionFaults + 'static,
{
    fn build(&self, opts: QueueOptions) -> BoxFuture<'static, Arc<dyn JobQueue>> {
        Box::pin((self.factory)(opts))
    }

    fn faults(&self) -> Option<&dyn ConnectionFaults> {
        Some(&self.faults)
    }
}

impl<F, Fut> QueueFactory for F
where
    F: Fn(QueueOptions) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Arc<dyn JobQueue>> + Send + 'static,
{
    fn build(&self, opts: QueueOptions) -> BoxFuture<'static, Arc<dyn JobQueue>> {
        Box::pin(self(opts))
    }
}

/// Longest time one conformance test may take before it fails as hung.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs one test body on a fresh multi-threaded runtime (4 workers) under
/// [`TEST_TIMEOUT`]. Used by [`conformance_tests!`]; not meant to be called directly.
#[doc(hidden)]
pub fn run_test<F>(name: &str, body: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("cannot build a Tokio runtime for the conformance test");
    runtime.block_on(async {
        if tokio::time::timeout(TEST_TIMEOUT, body).await.is_err() {
            panic!("conformance test {name} did not finish within {TEST_TIMEOUT:?}");
        }
    });
}

/// Calls `$callback!( $($args)* ; name, name, ... )` with the name of every clause.
/// Keeps the list of clauses in one place for [`conformance_tests!`] and [`ALL`].
#[doc(hidden)]
#[macro_export]
macro_rules! __with_clauses {
    ($callback:ident ! ( $($args:tt)* )) => {
        $crate::$callback! { $($args)* ;
            enqueue_returns_unique_sortable_ids,
            enqueued_job_reads_back_ready,
            enqueue_many_returns_ids_in_order,
            enqueue_many_is_all_or_nothing,
            enqueue_many_over_the_call_limit_is_refused,
            invalid_queue_names_are_refused,
            valid_queue_name_edge_cases_are_accepted,
            payload_over_limit_is_refused,
            fields_over_their_limits_are_refused_naming_the_field,
            oversized_outcomes_are_stored_bounded,
            priority_lower_runs_first_fifo_within_priority,
            delayed_job_waits_until_its_time,
            run_at_in_the_past_is_ready,
            retry_with_delay_waits_and_records_failure,
            retry_without_delay_is_ready_at_once,
            dedupe_key_returns_live_job_id,
            dedupe_key_is_free_once_job_finished,
            dedupe_applies_within_enqueue_many,
            dedupe_keys_are_scoped_per_queue,
            fetch_waits_up_to_bound_and_returns_empty,
            fetch_wakes_promptly_on_enqueue,
            fetch_wakes_when_delayed_job_is_due,
            fetch_returns_at_most_max,
            fetch_counts_attempts_and_issues_leases,
            concurrent_fetchers_lease_each_job_once,
            dropped_fetch_never_loses_a_job,
            heartbeat_extends_lease,
            stale_lease_is_refused,
            finished_lease_is_refused,
            forged_lease_is_refused,
            expired_unreclaimed_lease_can_still_complete,
            reaped_job_returns_ready_with_attempt_counted,
            reaper_dead_letters_job_without_attempts_left,
            lease_expiring_too_often_dead_letters,
            release_does_not_count_attempt,
            held_jobs_are_not_charged_when_their_lease_expires,
            held_jobs_are_charged_once_started_or_past_the_expiry_limit,
            dropped_fetch_hands_its_jobs_back_uncharged,
            outcome_sent_again_after_a_lost_reply_is_accepted,
            every_lease_gets_a_fresh_token,
            complete_stores_result,
            complete_many_fences_per_job,
            results_expire_after_retention,
            fail_moves_job_to_dead_letters,
            dead_letters_newest_first_with_paging,
            requeue_dead_resets_attempts,
            requeue_dead_refuses_unknown_and_live_jobs,
            requeue_all_dead_and_purge_dead_count,
            dead_letter_limit_drops_oldest,
            cancel_ready_and_scheduled_jobs,
            cancel_running_job_is_requested,
            cancel_unknown_job_is_not_found,
            stats_count_every_state,
            stats_count_due_scheduled_jobs_as_ready,
            stats_report_oldest_ready_age,
            stats_of_unknown_queue_are_zero,
            pause_stops_fetch_and_resume_restarts_it,
            headers_and_tenant_round_trip,
            queues_are_isolated,
            job_of_unknown_id_is_none,
            ping_answers,
            delay_counts_from_the_backend_clock,
            enqueue_many_cut_mid_call_stores_nothing,
        }
    };
}

/// Expands one `#[test]` per clause for [`conformance_tests!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_test_fns {
    ($factory:expr ; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::run_test(
                    ::core::stringify!($name),
                    async move { $crate::tests::$name($factory).await },
                );
            }
        )*
    };
}

/// Builds the list [`ALL`].
#[doc(hidden)]
#[macro_export]
macro_rules! __clause_names {
    ( ; $($name:ident),* $(,)?) => {
        &[ $( ::core::stringify!($name) ),* ]
    };
}

/// Expands into one test per clause of the contract, each running
/// `queue_conformance::tests::<clause>(factory)` on a fresh multi-threaded runtime.
///
/// `$factory` is any expression implementing [`QueueFactory`] (usually a closure
/// `|opts: QueueOptions| async move { Arc::new(...) as Arc<dyn JobQueue> }`). It is
/// evaluated once per test. Invoke the macro once, at the top level of an integration
/// test file (or inside a module, to group the tests under its name).
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr $(,)?) => {
        $crate::__with_clauses!(__conformance_test_fns!($factory));
    };
}

/// The name of every clause the suite checks, in the order the macro expands them.
pub const ALL: &[&str] = __with_clauses!(__clause_names!());

pub mod tests;
