//! The records of pools, machines, cost spans and leases: they live in the
//! storage seam (`pubrun_store::pools`, the [`PoolStore`] trait, with a
//! SQLite engine for `pools.db` and a PostgreSQL one for cluster mode).

pub use pubrun_store::pools::{
    Bootstrap, LeaseEnd, LeaseRow, LeaseState, MachineRow, NewLease, PoolStore, UpSpan,
};
