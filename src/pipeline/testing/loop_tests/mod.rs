//! The consume loop against the in-memory broker and providers (`fake`),
//! in tokio's paused time: backlogs beyond the rate limit, aborts with the
//! next batch in flight, a member removed or rejoined mid-transaction, slow
//! providers, the dead-letter guard and shutdown. Each test checks the
//! exactly-once outcome from the broker's side: one combined event per
//! user, every input offset committed once, no transaction committing
//! offsets that do not follow the group's.

mod exactly_once;
mod guard;
mod harness;
mod isolation;
