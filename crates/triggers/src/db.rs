//! The durable record of schedules and trigger definitions lives behind
//! [`TriggerStore`] in `pubrun-store` (`pubrun_store::triggers`, where the
//! claim compare-and-set, the outbox and the definitions are documented):
//! [`SqliteTriggerStore`] is `<data_dir>/triggers.db` (the embedded
//! default), `PostgresTriggerStore` the cluster's PostgreSQL.

pub use pubrun_store::triggers::{
    Claim, DefKind, Definition, PostgresTriggerStore, Replacement, ScheduleState, Scope,
    SqliteTriggerStore, TickClaim, TriggerStore,
};
