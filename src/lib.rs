//! insights-enricher: waits, durably through Kafka, for FinBox DeviceConnect
//! insights and Credeau SMS extraction per onboarded user, and publishes them
//! as events for decision engines.

pub mod config;
pub mod core;
pub mod dlq;
pub mod events;
pub mod journey;
pub mod kafka;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod pipeline;
pub mod printable;
pub mod providers;
pub mod service;
pub mod simulator;
pub mod task;
