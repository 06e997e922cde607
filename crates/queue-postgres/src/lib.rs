//! JobQueue on postgres (being written).
