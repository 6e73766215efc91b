//! The consume loop, broker-free: it reads batches through the
//! [`ports::LoopConsumer`] port, has each record processed by the
//! [`worker::Worker`], and commits every batch exactly once through the
//! [`ports::TxnProducer`] port ([`transaction::run`]). The ports are
//! implemented over librdkafka in [`crate::kafka`] and in memory under
//! [`testing`]; [`crate::service`] wires them together.
//!
//! - [`consume`]: the loop (batches, commit order, aborts, rewinds, holds);
//! - [`batch`]: one batch's records and their offsets;
//! - [`worker`]: processing one record (the shell around [`crate::core`]);
//! - [`record`]: the loop's vocabulary;
//! - [`ports`]: the two Kafka clients as the loop sees them;
//! - [`transaction`]: one batch's transaction protocol;
//! - [`share`]: this instance's share of the provider rate limits;
//! - [`gate`]: the byte budget at the start of a record's work;
//! - [`guard`]: the dead-letter guard;
//! - [`health`]: liveness, readiness and the metrics endpoint.

mod batch;
pub mod consume;
pub mod gate;
pub mod guard;
pub mod health;
pub mod parked;
pub mod ports;
pub mod record;
pub mod share;
#[cfg(test)]
mod testing;
pub mod transaction;
pub mod waiting;
pub mod worker;
