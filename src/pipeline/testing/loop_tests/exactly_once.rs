//! Exactly once through aborts, fatal errors, a member removed or
//! rejoined, shutdown, budgets and read-ahead.

use std::sync::Arc;
use std::time::Duration;

use crate::pipeline::consume::LoopError;
use crate::pipeline::testing::fake::{Disruption, FakeProvider};
use crate::pipeline::worker::now_ms;

use super::harness::*;

#[tokio::test(start_paused = true)]
async fn a_backlog_beyond_the_rate_limit_keeps_polling_and_commits_each_user_once() {
    // The documented limits; 1,200 users are 72 s of Credeau's 1,000/min,
    // more than twice the poll interval.
    let broker = broker(Duration::from_secs(30));
    let users = onboard(&broker, "backlog", 1200);
    let h = start(
        broker,
        Arc::new(FakeProvider::new(6000, Duration::from_millis(30))),
        Arc::new(FakeProvider::new(1000, Duration::from_millis(80))),
        loop_settings(),
    )
    .await;
    finish(&h, &users, Duration::from_secs(600)).await;
    assert_eq!(
        h.broker.times_left(),
        0,
        "the member missed max.poll.interval"
    );
    let gap = h.broker.max_poll_gap();
    assert!(gap < Duration::from_secs(1), "{gap:?} without a poll");
    // Admission keeps every record's wait for a rate-limit slot within
    // half of the record budget (15 s).
    let waited = h.credeau.limiter.max_wait();
    assert!(
        waited <= Duration::from_millis(8500),
        "a Credeau call waited {waited:?}"
    );
    assert_exactly_once(&h, &users);
    assert_eq!(h.finbox.calls(), users.len(), "one FinBox call per user");
    assert_eq!(h.credeau.calls(), users.len(), "one Credeau call per user");
    assert_eq!(h.broker.commits_and_aborts().1, 0);
}

#[tokio::test(start_paused = true)]
async fn an_aborted_batch_is_read_again_with_the_batch_read_after_it() {
    let broker = broker(Duration::from_secs(30));
    let users = onboard(&broker, "abort", 400);
    // The second transaction fails while later batches are in flight.
    broker.fail_commit(2);
    let mut ls = loop_settings();
    ls.max_batch = 50;
    let h = start(broker, quick(200), quick(300), ls).await;
    finish(&h, &users, Duration::from_secs(120)).await;
    assert_exactly_once(&h, &users);
    assert_eq!(h.broker.commits_and_aborts().1, 1);
    // Counted once each, when committed, though the aborted batch's
    // records were processed twice.
    let text = h.metrics.render();
    let counted = |line: &str| {
        text.lines()
            .find(|l| l.starts_with(line))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(
        counted(r#"insights_events_consumed_total{result="accepted",topic="input"}"#),
        users.len() as f64
    );
    assert_eq!(
        counted(r#"insights_published_total{topic="insights_ready"}"#),
        users.len() as f64
    );
    // The aborted batch's users were asked again.
    assert!(
        h.credeau.calls() > users.len(),
        "{} calls",
        h.credeau.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn a_producer_that_fails_fatally_is_replaced_and_its_batch_read_again() {
    let broker = broker(Duration::from_secs(30));
    let users = onboard(&broker, "fatal", 400);
    // As after a long broker outage: the coordinator aborted the second
    // transaction and refuses to end it.
    broker.fail_commit_fatally(2);
    let mut ls = loop_settings();
    ls.max_batch = 50;
    let h = start(broker, quick(200), quick(300), ls).await;
    finish(&h, &users, Duration::from_secs(120)).await;
    assert_exactly_once(&h, &users);
    assert_eq!(h.broker.renewals(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_commit_given_up_on_is_settled_by_a_new_producer_and_never_duplicated() {
    // A commit call that hangs once the brokers are back (librdkafka issue
    // 5511) is given up on, the producer replaced, and the group's
    // committed offsets say whether it went through: once after the broker
    // applied it (the batch must not be processed again), once before (it
    // must be).
    for applied in [true, false] {
        let broker = broker(Duration::from_secs(30));
        let users = onboard(&broker, if applied { "applied" } else { "unapplied" }, 400);
        broker.abandon_commit(2, applied);
        let mut ls = loop_settings();
        ls.max_batch = 50;
        let h = start(broker, quick(200), quick(300), ls).await;
        finish(&h, &users, Duration::from_secs(120)).await;
        assert_exactly_once(&h, &users);
        assert_eq!(h.broker.renewals(), 1, "applied: {applied}");
        assert_eq!(h.broker.violations(), Vec::<String>::new());
        // Every user called once: the committed batch was not read again.
        if applied {
            assert_eq!(h.finbox.calls(), users.len());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_producer_that_keeps_failing_fatally_stops_the_loop() {
    let broker = broker(Duration::from_secs(30));
    onboard(&broker, "fatal", 400);
    for n in 1..=4 {
        broker.fail_commit_fatally(n);
    }
    let mut ls = loop_settings();
    ls.max_batch = 50;
    let h = start(broker, quick(10), quick(10), ls).await;
    let result = tokio::time::timeout(Duration::from_secs(60), h.running)
        .await
        .expect("the loop stops by itself")
        .expect("no panic");
    assert!(matches!(result, Err(LoopError::Fatal(_))), "{result:?}");
    assert_eq!(h.broker.renewals(), 3);
    assert!(combined(&h.broker).is_empty());
    assert_eq!(h.broker.violations(), Vec::<String>::new());
}

#[tokio::test(start_paused = true)]
async fn a_consumer_that_fails_fatally_stops_the_loop_without_committing_more() {
    let broker = broker(Duration::from_secs(30));
    // More than the loop reads ahead (six batches) and commits at once
    // (four), so that some are left when the fence is seen.
    let users = onboard(&broker, "fenced", 2000);
    let mut ls = loop_settings();
    ls.max_batch = 50;
    let h = start(broker, quick(10), quick(10), ls).await;
    assert!(wait_for(Duration::from_secs(60), || !combined(&h.broker).is_empty()).await);
    h.broker.fence_consumer(1);
    let result = tokio::time::timeout(Duration::from_secs(60), h.running)
        .await
        .expect("the loop stops by itself, not polling a dead consumer forever")
        .expect("no panic");
    assert!(
        matches!(&result, Err(LoopError::ConsumerFatal(e)) if e.contains("FencedInstanceId")),
        "{result:?}"
    );
    let done = combined(&h.broker);
    assert!(
        done.len() < users.len(),
        "the rest is left for the next process"
    );
    assert!(done.values().all(|n| *n == 1));
    assert_eq!(h.broker.violations(), Vec::<String>::new());
}

#[tokio::test(start_paused = true)]
async fn a_member_removed_mid_transaction_never_commits_what_it_read_before() {
    let broker = broker(Duration::from_secs(30));
    onboard(&broker, "zombie", 200);
    // Another member takes the partitions (and all their records) just as
    // the first transaction starts; this one is out for 5 s.
    broker.disrupt_at_commit(
        1,
        Disruption::OtherMemberTakesOver {
            out_for: Duration::from_secs(5),
        },
    );
    let h = start(broker, quick(50), quick(50), loop_settings()).await;
    wait_for(Duration::from_secs(20), || false).await;
    stop(&h).await;
    assert_eq!(h.broker.violations(), Vec::<String>::new());
    // Everything was the other member's: nothing of it is published here.
    assert_eq!(combined(&h.broker).len(), 0);
    assert_eq!(h.broker.times_left(), 1);
    assert!(h.broker.commits_and_aborts().1 >= 1);
}

#[tokio::test(start_paused = true)]
async fn a_batch_read_before_a_rejoin_is_aborted_and_read_again() {
    let broker = broker(Duration::from_secs(30));
    let users = onboard(&broker, "rejoin", 300);
    broker.disrupt_at_commit(1, Disruption::Rejoin);
    let mut ls = loop_settings();
    ls.max_batch = 100;
    let h = start(broker, quick(50), quick(50), ls).await;
    let done = wait_for(Duration::from_secs(60), || {
        combined(&h.broker).len() == users.len()
    })
    .await;
    assert!(
        done,
        "only {} of {} users done",
        combined(&h.broker).len(),
        users.len()
    );
    // Give a duplicate time to show.
    wait_for(Duration::from_secs(5), || false).await;
    finish(&h, &users, Duration::from_secs(1)).await;
    assert_exactly_once(&h, &users);
    assert!(h.broker.commits_and_aborts().1 >= 1);
}

/// As after a broker outage longer than the session: the member rejoins
/// while its transaction is stuck, reads the same partitions again under
/// new epochs, and only then learns that the old transaction failed. The
/// records read again must be read once more, not skipped.
#[tokio::test(start_paused = true)]
async fn records_read_again_under_a_new_epoch_before_the_old_batch_aborts_are_not_skipped() {
    let broker = broker(Duration::from_secs(30));
    let users = onboard(&broker, "stuck", 300);
    broker.disrupt_at_commit(
        1,
        Disruption::RejoinThenStall {
            stalls_for: Duration::from_secs(5),
        },
    );
    let mut ls = loop_settings();
    ls.max_batch = 100;
    let h = start(broker, quick(50), quick(50), ls).await;
    finish(&h, &users, Duration::from_secs(120)).await;
    assert_exactly_once(&h, &users);
    assert!(h.broker.commits_and_aborts().1 >= 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_commits_finished_batches_and_hands_the_rest_back() {
    let broker = broker(Duration::from_secs(30));
    let users = onboard(&broker, "drain", 300);
    let credeau = quick(50);
    credeau
        .slow
        .lock()
        .unwrap()
        .insert("drain-5".to_string(), Duration::from_secs(60));
    let mut ls = loop_settings();
    ls.record_budget = Duration::from_secs(25);
    ls.drain_timeout = Duration::from_secs(3);
    // No straggler cut: the slow record is still running at shutdown.
    let max = settings().topics.max_message_bytes;
    let h = start_with(broker.clone(), quick(50), credeau, ls, max, Duration::ZERO).await;
    wait_for(Duration::from_secs(2), || false).await;
    let began = tokio::time::Instant::now();
    h.shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), h.running)
        .await
        .expect("the drain bound holds")
        .expect("no panic");
    assert!(result.is_ok(), "{result:?}");
    assert!(
        began.elapsed() <= Duration::from_secs(4),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(broker.violations(), Vec::<String>::new());
    // A second run (the next owner) finishes the rest, each user once.
    broker.restart_member();
    let h2 = start(broker.clone(), quick(50), quick(50), loop_settings()).await;
    finish(&h2, &users, Duration::from_secs(60)).await;
    assert_exactly_once(&h2, &users);
}

#[tokio::test(start_paused = true)]
async fn an_answer_over_max_response_bytes_is_the_polls_failure_not_the_publish_stages() {
    let broker = broker(Duration::from_secs(30));
    let users = onboard(&broker, "big", 3);
    let credeau = quick(10);
    credeau.failing.lock().unwrap().insert(
        "big-1".into(),
        crate::providers::ProviderErrorKind::TooLarge,
    );
    let h = start(broker, quick(10), credeau, loop_settings()).await;
    finish(&h, &users, Duration::from_secs(30)).await;
    let dl = dead_letters(&h.broker);
    assert_eq!(
        dl.get("big-1"),
        Some(&("poll_credeau".to_string(), "too_large".to_string())),
        "{dl:?}"
    );
    assert_eq!(dl.len(), 1, "{dl:?}");
}

#[tokio::test(start_paused = true)]
async fn an_sms_entry_larger_than_a_record_is_the_publish_stages_failure() {
    let broker = broker(Duration::from_secs(30));
    let users = onboard(&broker, "huge", 2);
    let mut credeau = FakeProvider::new(60_000, Duration::from_millis(10));
    credeau.sms_bytes = 20_000;
    let h = start_with(
        broker,
        quick(10),
        Arc::new(credeau),
        loop_settings(),
        10_000,
        settings().schedule.straggler_wait,
    )
    .await;
    finish(&h, &users, Duration::from_secs(30)).await;
    let dl = dead_letters(&h.broker);
    for u in &users {
        assert_eq!(
            dl.get(u),
            Some(&("publish".to_string(), "too_large".to_string())),
            "{dl:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn records_of_an_assignment_made_within_the_poll_that_returned_them_are_kept() {
    let broker = broker(Duration::from_secs(30));
    let users = onboard(&broker, "inpoll", 400);
    let mut ls = loop_settings();
    ls.max_batch = 50;
    let h = start(broker.clone(), quick(300), quick(400), ls).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        broker.rebalance_in_next_poll();
    }
    finish(&h, &users, Duration::from_secs(60)).await;
    assert_exactly_once(&h, &users);
}

#[tokio::test(start_paused = true)]
async fn reading_pauses_at_the_byte_budget_of_records_not_yet_committed() {
    // 200 users whose onboarding events weigh about 2 KB each; the byte
    // budget holds about 5 of them, far fewer than the record limits
    // (256 running, 1,000 read and not committed) would let in.
    let broker = broker(Duration::from_secs(30));
    let at = now_ms() - 3_600_000;
    let users: Vec<String> = (0..200)
        .map(|i| {
            let user = format!("heavy-{i}");
            let value = serde_json::json!({
                "event_id": format!("ev-{user}"),
                "user_id": user,
                "onboarded_at": at,
                "profile": "p".repeat(2000),
            });
            broker.produce(
                INPUT,
                i % INPUT_PARTITIONS,
                &user,
                value.to_string().into_bytes(),
            );
            user
        })
        .collect();
    let mut ls = loop_settings();
    ls.max_in_flight_bytes = 10_000;
    let h = start(broker, quick(2000), quick(2000), ls).await;
    // No call has answered yet: every record read is still held.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = h.finbox.calls();
    assert!(
        (1..=6).contains(&started),
        "{started} records read within a 10,000-byte budget of 2 KB records"
    );
    finish(&h, &users, Duration::from_secs(600)).await;
    assert_exactly_once(&h, &users);
    assert_eq!(h.finbox.calls(), users.len(), "one FinBox call per user");
}

#[tokio::test(start_paused = true)]
async fn records_read_ahead_follow_the_size_of_what_records_output() {
    // The same backlog, once with small SMS answers and once with answers
    // of 256 KiB: with the large ones, as many records are read ahead as
    // the byte budget (4 MiB) holds at that size, so far fewer calls run
    // at once and far fewer outputs wait for their transactions.
    let mut peaks = Vec::new();
    for sms_bytes in [16, 256 << 10] {
        let broker = broker(Duration::from_secs(30));
        let users = onboard(&broker, "sized", 600);
        let mut ls = loop_settings();
        ls.max_in_flight_bytes = 4 << 20;
        let finbox = quick(10);
        // 10,000 calls a second: the rate limit bounds nothing here.
        let mut credeau = FakeProvider::new(600_000, Duration::from_millis(500));
        credeau.sms_bytes = sms_bytes;
        let h = start(broker, finbox, Arc::new(credeau), ls).await;
        finish(&h, &users, Duration::from_secs(600)).await;
        assert_exactly_once(&h, &users);
        peaks.push(
            h.credeau
                .peak_in_call
                .load(std::sync::atomic::Ordering::SeqCst),
        );
    }
    let (small, large) = (peaks[0], peaks[1]);
    // Small outputs: the record limits (256 running) bound it.
    assert!(small >= 200, "{small} calls at once with small answers");
    // Large: 4 MiB / 256 KiB = 16 (the first ones under the prior, 4 MiB /
    // 1 MiB = 4).
    assert!(large <= 20, "{large} calls at once with 256 KiB answers");
}

#[tokio::test(start_paused = true)]
async fn batches_that_finish_during_a_slow_commit_go_into_the_next_transaction_together() {
    // Commits take 200 ms and a batch of 50 quick users far less: the
    // batches that finish meanwhile commit together (up to four), in read
    // order, each user once.
    let broker = broker(Duration::from_secs(30));
    broker.slow_commits(Duration::from_millis(200));
    let users = onboard(&broker, "merged", 2000);
    let mut ls = loop_settings();
    ls.max_batch = 50;
    let h = start(broker, quick(10), quick(10), ls).await;
    finish(&h, &users, Duration::from_secs(600)).await;
    assert_exactly_once(&h, &users);
    let (commits, aborts) = h.broker.commits_and_aborts();
    assert_eq!(aborts, 0);
    // 40 batches; with four a transaction, at least 10 commits.
    assert!(
        (10..=20).contains(&commits),
        "{commits} transactions for 40 batches"
    );
    assert_eq!(h.broker.violations(), Vec::<String>::new());
}
