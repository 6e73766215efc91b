//! The Kafka wing: everything that names librdkafka. The consume loop in
//! [`crate::pipeline`] is broker-free and drives two ports; this wing
//! implements them over librdkafka and holds the rest of what talks to the
//! brokers:
//!
//! - [`settings`]: client settings from configuration (security, the
//!   consumer, the transactional producer, the tools' clients) and the ids
//!   an instance goes by;
//! - [`probe`]: the start-up connection check;
//! - [`context`]: the consumer's rebalance and statistics context;
//! - [`consumer`]: the [`LoopConsumer`](crate::pipeline::ports::LoopConsumer)
//!   port over librdkafka;
//! - [`transactions`]: the [`TxnProducer`](crate::pipeline::ports::TxnProducer)
//!   port over librdkafka;
//! - [`topics`]: creating and checking the service's topics;
//! - [`users_waiting`]: the users waiting in this instance's delay-tier
//!   partitions, counted from the brokers.

pub mod consumer;
pub mod context;
pub mod probe;
pub mod settings;
pub mod topics;
pub mod transactions;
pub mod users_waiting;

pub use consumer::KafkaConsumer;
pub use context::PipelineContext;
pub use probe::{check_connection, ConnectError};
pub use settings::{
    base_config, consumer_config, dlq_reader_config, dlq_replay_config, producer_config,
    static_member_id, transactional_id, COMPRESSION,
};
pub use transactions::{KafkaTransactions, MakeProducer};
