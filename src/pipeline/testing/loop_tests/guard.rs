//! The dead-letter guard in the loop: what trips it, what does not, and
//! that the crossing batch is never committed.

use std::time::Duration;

use crate::pipeline::consume::LoopError;
use crate::pipeline::guard::GuardTripped;
use crate::pipeline::record::TopicPartition;
use crate::pipeline::testing::fake::FakeBroker;
use crate::pipeline::worker::now_ms;

use super::harness::*;

#[tokio::test(start_paused = true)]
async fn the_dead_letter_guard_stops_the_loop_without_committing_the_batch() {
    let broker = broker(Duration::from_secs(30));
    for i in 0..150 {
        broker.produce(INPUT, 0, &format!("bad-{i}"), b"not json".to_vec());
    }
    let h = start(broker, quick(10), quick(10), loop_settings()).await;
    let result = tokio::time::timeout(Duration::from_secs(30), h.running)
        .await
        .expect("the loop stops by itself")
        .expect("no panic");
    assert!(matches!(result, Err(LoopError::Guard(_))), "{result:?}");
    // max_consecutive (100) is reached within the first batch: nothing of
    // it is committed or dead-lettered.
    assert_eq!(h.broker.committed(&TopicPartition::new(INPUT, 0)), 0);
    assert!(h
        .broker
        .read_topic(&settings().topics.dead_letter)
        .is_empty());
}

/// 150 users (more than `max_consecutive`) whose FinBox calls all fail
/// with `kind`. They were onboarded past FinBox's deadline (6 h), so a
/// retryable error ends FinBox at once (exhausted), as the last of its
/// failed polls would: a paused test cannot wait for wall-clock repolls.
async fn all_failing_with(kind: crate::providers::ProviderErrorKind) -> (Harness, Vec<String>) {
    let broker = broker(Duration::from_secs(30));
    let ago = Duration::from_secs(6 * 3_600 + 600);
    let users = onboarded_ago(&broker, kind.as_str(), 150, ago);
    let finbox = quick(10);
    for u in &users {
        finbox.failing.lock().unwrap().insert(u.clone(), kind);
    }
    let h = start(broker, finbox, quick(10), loop_settings()).await;
    (h, users)
}

#[tokio::test(start_paused = true)]
async fn a_provider_outage_that_exhausts_many_users_does_not_trip_the_guard() {
    // A brown-out, not a person's mistake: each user gets its final answer
    // (FinBox failed) and its dead letter, and the loop goes on.
    let (h, users) = all_failing_with(crate::providers::ProviderErrorKind::ServerError).await;
    finish(&h, &users, Duration::from_secs(60)).await;
    assert_exactly_once(&h, &users);
    let dl = dead_letters(&h.broker);
    assert_eq!(dl.len(), users.len(), "{dl:?}");
    assert!(
        dl.values()
            .all(|v| v == &("poll_finbox".to_string(), "exhausted".to_string())),
        "{dl:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_revoked_key_failing_many_users_trips_the_guard() {
    let (h, _) = all_failing_with(crate::providers::ProviderErrorKind::Forbidden).await;
    let result = tokio::time::timeout(Duration::from_secs(60), h.running)
        .await
        .expect("the loop stops by itself")
        .expect("no panic");
    assert!(matches!(result, Err(LoopError::Guard(_))), "{result:?}");
    assert!(h.broker.read_topic(&settings().topics.dead_letter).len() < 100);
}

/// Onboarding events on input partition 0, two undecodable ones (dead
/// letters that count for the guard) for every good one.
fn two_bad_one_good(broker: &FakeBroker, prefix: &str, n: usize) {
    for i in 0..n {
        let user = format!("{prefix}-{i}");
        let value = if i % 3 == 2 {
            serde_json::json!({
                "event_id": format!("ev-{user}"),
                "user_id": user,
                "onboarded_at": now_ms() - 3_600_000,
            })
            .to_string()
            .into_bytes()
        } else {
            b"not json".to_vec()
        };
        broker.produce(INPUT, 0, &user, value);
    }
}

#[tokio::test(start_paused = true)]
async fn the_batch_that_crosses_the_dead_letter_ratio_is_aborted_not_committed() {
    // dead_letter defaults: more than 100 of the last 200, or 100 in a row.
    let broker = broker(Duration::from_secs(30));
    let p0 = TopicPartition::new(INPUT, 0);
    two_bad_one_good(&broker, "first", 60);
    let h = start(broker.clone(), quick(10), quick(10), loop_settings()).await;
    // 40 dead letters of 60 records: committed.
    assert!(wait_for(Duration::from_secs(10), || broker.committed(&p0) == 60).await);
    let dlq = &settings().topics.dead_letter;
    assert_eq!(broker.read_topic(dlq).len(), 40);
    // 100 more of 150: the 101st dead letter of the last 200 records is in
    // this batch, which is aborted.
    two_bad_one_good(&broker, "second", 150);
    let result = tokio::time::timeout(Duration::from_secs(30), h.running)
        .await
        .expect("the loop stops by itself")
        .expect("no panic");
    let Err(LoopError::Guard(tripped)) = result else {
        panic!("{result:?}");
    };
    assert!(matches!(tripped, GuardTripped::Ratio { dead: 101, .. }));
    assert!(
        tripped
            .to_string()
            .ends_with("Last dead letter: stage decode, reason malformed_json"),
        "{tripped}"
    );
    assert_eq!(broker.committed(&p0), 60);
    assert_eq!(broker.read_topic(dlq).len(), 40);
    assert!(!combined(&broker).keys().any(|u| u.starts_with("second")));
}

#[tokio::test(start_paused = true)]
async fn a_provider_rejecting_many_users_does_not_trip_the_guard() {
    // A contract change on the provider's side: 422 for 150 users in one
    // burst. Each is dead-lettered once with its reason and gets its final
    // answer; the loop goes on.
    let (h, users) = all_failing_with(crate::providers::ProviderErrorKind::Unprocessable).await;
    finish(&h, &users, Duration::from_secs(60)).await;
    assert_exactly_once(&h, &users);
    let dl = dead_letters(&h.broker);
    assert_eq!(dl.len(), users.len(), "{dl:?}");
    assert!(
        dl.values()
            .all(|v| v == &("poll_finbox".to_string(), "unprocessable".to_string())),
        "{dl:?}"
    );
    let result = tokio::time::timeout(Duration::from_secs(30), h.running)
        .await
        .expect("stops when asked")
        .expect("no panic");
    assert!(result.is_ok(), "{result:?}");
}
