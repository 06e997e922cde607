//! Throwaway PostgreSQL clusters from the local binaries (being written).
