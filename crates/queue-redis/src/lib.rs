//! JobQueue on redis (being written).
