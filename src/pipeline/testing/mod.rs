//! Test-only: the in-memory broker and providers the consume loop is tried
//! against without a broker ([`fake`]), and the loop's tests on them
//! ([`loop_tests`]). Compiled only under `cargo test`.

pub mod fake;
mod loop_tests;
