//! The `penguiflow-worker` command (being written).
fn main() {}
