//! Throwaway servers for tests, fault tests and benchmarks, started from the local
//! `redis-server` and PostgreSQL binaries on free loopback ports in temporary
//! directories, and stopped when dropped.
//!
//! Standard library only, so `xtask` can use it to provision `cargo xtask ci`.

pub mod clock;
pub mod common;
pub mod postgres;
pub mod proxy;
pub mod redis;
