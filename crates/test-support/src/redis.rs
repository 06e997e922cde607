//! Throwaway `redis-server` processes: standalone and a three-master cluster (being written).
