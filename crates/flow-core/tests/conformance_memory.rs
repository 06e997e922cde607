//! The `queue-conformance` suite against [`MemoryQueue`]: one test per clause.

use std::sync::Arc;

use flow_core::queue::{JobQueue, MemoryQueue, QueueOptions};

queue_conformance::conformance_tests!(|opts: QueueOptions| async move {
    Arc::new(MemoryQueue::with_options(opts)) as Arc<dyn JobQueue>
});

/// Every clause the macro expands is listed in `ALL`, and each name is unique.
#[test]
fn suite_lists_its_clauses() {
    let names: std::collections::HashSet<_> = queue_conformance::ALL.iter().collect();
    assert_eq!(names.len(), queue_conformance::ALL.len());
    assert!(queue_conformance::ALL.len() >= 50);
}
