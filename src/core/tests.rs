//! Unit and property tests of the decision core.

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::providers::{Predictor, ProviderErrorKind};

fn policies() -> Policies {
    Policies {
        finbox: PollPolicy {
            initial_delay: Duration::from_secs(30),
            poll_interval: Duration::from_secs(10),
            max_poll_interval: Duration::from_secs(120),
            backoff_multiplier: 1.5,
            deadline: Duration::from_secs(6 * 3600),
            not_found_grace: Some(Duration::from_secs(1800)),
            max_failed_polls: None,
            max_retry_after: Duration::from_secs(60),
        },
        credeau: PollPolicy {
            initial_delay: Duration::from_secs(30),
            poll_interval: Duration::from_secs(15),
            max_poll_interval: Duration::from_secs(300),
            backoff_multiplier: 2.0,
            deadline: Duration::from_secs(6 * 3600),
            not_found_grace: None,
            max_failed_polls: None,
            max_retry_after: Duration::from_secs(60),
        },
    }
}

fn user() -> OnboardedUser {
    OnboardedUser {
        event_id: "e".into(),
        user_id: "u".into(),
        finbox_customer_id: "u".into(),
        credeau_user_id: "u".into(),
        onboarded_at: 1_000_000,
    }
}

fn origin() -> SourceRef {
    SourceRef {
        topic: "in".into(),
        partition: 0,
        offset: 0,
    }
}

fn err(kind: ProviderErrorKind, status: Option<u16>) -> ProviderError {
    ProviderError {
        provider: Provider::Finbox,
        kind,
        http_status: status,
        message: "m".into(),
        provider_request_id: None,
        retry_after: None,
        attempts: 3,
        answered_id: None,
    }
}

#[test]
fn first_polls_are_due_after_the_initial_delay() {
    let t = start(user(), origin(), 1_000_500, &policies());
    assert_eq!(t.finbox.next_poll_at, 1_030_000);
    assert_eq!(t.credeau.next_poll_at, 1_030_000);
    assert_eq!(t.due_at, 1_030_000);
}

#[test]
fn finbox_complete_is_terminal_and_published() {
    let p = policies();
    let mut t = start(user(), origin(), 0, &p);
    let insights = FinboxInsights {
        predictors: vec![Predictor {
            name: "a".into(),
            value: 1.into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let fx = apply(
        &mut t,
        Answer::Finbox(Ok(FinboxAnswer::Complete(insights.clone()))),
        1_030_000,
        &p,
    );
    assert_eq!(fx.finbox_insights, Some(insights));
    assert_eq!(t.finbox.outcome(), Some(Outcome::Complete));
    assert_eq!(t.due_at, t.credeau.next_poll_at);
}

#[test]
fn not_found_is_retried_until_the_grace_period_ends() {
    let p = policies();
    let mut t = start(user(), origin(), 0, &p);
    let mut now = 1_030_000;
    apply(
        &mut t,
        Answer::Finbox(Ok(FinboxAnswer::NotFound { request_id: None })),
        now,
        &p,
    );
    assert!(!t.finbox.is_done());
    now += 1_800_000 - 1;
    apply(
        &mut t,
        Answer::Finbox(Ok(FinboxAnswer::NotFound { request_id: None })),
        now,
        &p,
    );
    assert!(!t.finbox.is_done());
    now += 1;
    apply(
        &mut t,
        Answer::Finbox(Ok(FinboxAnswer::NotFound { request_id: None })),
        now,
        &p,
    );
    assert_eq!(t.finbox.outcome(), Some(Outcome::NotFound));
}

#[test]
fn in_progress_resets_the_not_found_streak() {
    let p = policies();
    let mut t = start(user(), origin(), 0, &p);
    apply(
        &mut t,
        Answer::Finbox(Ok(FinboxAnswer::NotFound { request_id: None })),
        1_030_000,
        &p,
    );
    apply(
        &mut t,
        Answer::Finbox(Ok(FinboxAnswer::InProgress {
            suggested_wait: None,
            request_id: None,
        })),
        1_040_000,
        &p,
    );
    assert_eq!(t.finbox.not_found_since, None);
}

#[test]
fn non_retryable_error_fails_the_provider_and_asks_for_a_dead_letter() {
    let p = policies();
    let mut t = start(user(), origin(), 0, &p);
    let fx = apply(
        &mut t,
        Answer::Finbox(Err(err(ProviderErrorKind::Forbidden, Some(403)))),
        1_030_000,
        &p,
    );
    let f = fx.failure.expect("dead letter requested");
    assert!(!f.exhausted);
    assert_eq!(t.finbox.outcome(), Some(Outcome::Failed));
}

#[test]
fn retryable_errors_past_the_deadline_fail_as_exhausted() {
    let p = policies();
    let mut t = start(user(), origin(), 0, &p);
    let deadline = 1_000_000 + 6 * 3_600_000;
    let fx = apply(
        &mut t,
        Answer::Finbox(Err(err(ProviderErrorKind::ServerError, Some(503)))),
        deadline - 5_000,
        &p,
    );
    assert!(fx.failure.is_none());
    assert_eq!(t.finbox.next_poll_at, deadline + 5_000);
    let fx = apply(
        &mut t,
        Answer::Finbox(Err(err(ProviderErrorKind::ServerError, Some(503)))),
        deadline + 5_000,
        &p,
    );
    assert!(fx.failure.expect("exhausted").exhausted);
    assert_eq!(t.finbox.outcome(), Some(Outcome::Failed));
}

#[test]
fn the_failed_poll_budget_ends_the_provider_failed_long_before_the_deadline() {
    let mut p = policies();
    p.finbox.max_failed_polls = Some(3);
    let mut t = start(user(), origin(), 0, &p);
    let mut now = 1_030_000;
    let fail = |t: &mut Task, now: i64| {
        apply(
            t,
            Answer::Finbox(Err(err(ProviderErrorKind::ServerError, Some(503)))),
            now,
            &p,
        )
    };
    assert!(fail(&mut t, now).failure.is_none());
    now = t.finbox.next_poll_at;
    assert!(fail(&mut t, now).failure.is_none());
    assert_eq!(t.finbox.failed_polls, 2);
    // An answer in between starts the count again.
    now = t.finbox.next_poll_at;
    apply(
        &mut t,
        Answer::Finbox(Ok(FinboxAnswer::InProgress {
            suggested_wait: None,
            request_id: Some("ip-1".into()),
        })),
        now,
        &p,
    );
    assert_eq!(
        (t.finbox.failed_polls, t.finbox.last_error.clone()),
        (0, None)
    );
    assert_eq!(t.finbox.request_id.as_deref(), Some("ip-1"));
    for i in 1..=3 {
        now = t.finbox.next_poll_at;
        let fx = fail(&mut t, now);
        assert_eq!(fx.failure.is_some(), i == 3, "poll {i}");
        if i == 3 {
            assert!(fx.failure.unwrap().exhausted);
        }
    }
    assert_eq!(t.finbox.outcome(), Some(Outcome::Failed));
    assert_eq!(t.finbox.failed_polls, 3);
    assert!(now < 1_000_000 + 3_600_000, "ended within the hour");
    // Non-retryable answers are not counted: they fail at once anyway.
    let mut t = start(user(), origin(), 0, &p);
    let fx = apply(
        &mut t,
        Answer::Finbox(Err(err(ProviderErrorKind::BadRequest, Some(400)))),
        1_030_000,
        &p,
    );
    assert!(!fx.failure.unwrap().exhausted);
    assert_eq!(t.finbox.failed_polls, 0);
}

#[test]
fn the_request_id_of_every_finbox_answer_is_kept_on_the_track() {
    let p = policies();
    let mut t = start(user(), origin(), 0, &p);
    apply(
        &mut t,
        Answer::Finbox(Ok(FinboxAnswer::NotFound {
            request_id: Some("nf".into()),
        })),
        1_030_000,
        &p,
    );
    assert_eq!(t.finbox.request_id.as_deref(), Some("nf"));
    apply(
        &mut t,
        Answer::Finbox(Ok(FinboxAnswer::NoData {
            request_id: Some("nd".into()),
        })),
        1_050_000,
        &p,
    );
    assert_eq!(t.finbox.request_id.as_deref(), Some("nd"));
    assert_eq!(t.finbox.outcome(), Some(Outcome::NoData));
}

#[test]
fn credeau_empty_until_the_deadline_times_out_without_a_dead_letter() {
    let p = policies();
    let mut t = start(user(), origin(), 0, &p);
    let deadline = 1_000_000 + 6 * 3_600_000;
    let fx = apply(
        &mut t,
        Answer::Credeau(Ok(CredeauAnswer::Empty)),
        deadline,
        &p,
    );
    assert!(fx.failure.is_none());
    assert_eq!(t.credeau.outcome(), Some(Outcome::TimedOut));
}

#[test]
fn retry_after_longer_than_the_spacing_is_honoured() {
    let p = policies();
    let mut t = start(user(), origin(), 0, &p);
    let mut e = err(ProviderErrorKind::RateLimited, Some(429));
    e.retry_after = Some(Duration::from_secs(45));
    apply(&mut t, Answer::Finbox(Err(e)), 1_030_000, &p);
    assert_eq!(t.finbox.next_poll_at, 1_075_000);
}

#[test]
fn a_retry_after_beyond_the_spacing_cap_is_honoured_up_to_the_retry_cap() {
    let mut p = policies();
    p.finbox.max_poll_interval = Duration::from_secs(20);
    p.credeau.max_poll_interval = Duration::from_secs(15);
    let mut t = start(user(), origin(), 0, &p);
    let mut e = err(ProviderErrorKind::RateLimited, Some(429));
    e.retry_after = Some(Duration::from_secs(70));
    apply(&mut t, Answer::Finbox(Err(e.clone())), 1_030_000, &p);
    // Not cut to the 20 s spacing cap: the 60 s retry cap applies.
    assert_eq!(t.finbox.next_poll_at, 1_090_000);
    e.provider = Provider::Credeau;
    e.retry_after = Some(Duration::from_secs(40));
    apply(&mut t, Answer::Credeau(Err(e)), 1_030_000, &p);
    assert_eq!(t.credeau.next_poll_at, 1_070_000);
}

fn arb_finbox() -> impl Strategy<Value = Answer> {
    prop_oneof![
        Just(Answer::Finbox(Ok(FinboxAnswer::NotFound {
            request_id: None
        }))),
        (0u64..120).prop_map(|s| Answer::Finbox(Ok(FinboxAnswer::InProgress {
            suggested_wait: Some(Duration::from_secs(s)),
            request_id: None
        }))),
        Just(Answer::Finbox(Ok(FinboxAnswer::NoData {
            request_id: None
        }))),
        Just(Answer::Finbox(Ok(FinboxAnswer::Complete(
            FinboxInsights::default()
        )))),
        (0u64..90).prop_map(|s| {
            let mut e = err(ProviderErrorKind::ServerError, Some(500));
            e.retry_after = Some(Duration::from_secs(s));
            Answer::Finbox(Err(e))
        }),
        Just(Answer::Finbox(Err(err(
            ProviderErrorKind::BadRequest,
            Some(400)
        )))),
    ]
}

fn arb_credeau() -> impl Strategy<Value = Answer> {
    prop_oneof![
        4 => Just(Answer::Credeau(Ok(CredeauAnswer::Empty))),
        1 => Just(Answer::Credeau(Ok(CredeauAnswer::Data(SmsExtraction::default())))),
        2 => (0u64..90).prop_map(|s| {
            let mut e = err(ProviderErrorKind::RateLimited, Some(429));
            e.provider = Provider::Credeau;
            e.retry_after = Some(Duration::from_secs(s));
            Answer::Credeau(Err(e))
        }),
        1 => Just(Answer::Credeau(Err(err(ProviderErrorKind::Unauthorized, Some(401))))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Drives a task the way the loop does (poll each provider when due,
    /// with random lateness and answers) and checks the invariants after
    /// every step.
    #[test]
    fn polling_invariants_hold_for_any_answer_sequence(
        steps in proptest::collection::vec((arb_finbox(), arb_credeau(), 0i64..5_000), 1..200),
        mult in 1.0f64..3.0,
        budget in proptest::option::of(1u32..6),
    ) {
        let mut p = policies();
        p.finbox.backoff_multiplier = mult;
        p.finbox.max_failed_polls = budget;
        p.credeau.max_failed_polls = budget;
        p.finbox.deadline = Duration::from_secs(3600);
        p.credeau.deadline = Duration::from_secs(1800);
        let mut t = start(user(), origin(), 0, &p);
        let deadline = |pr: Provider| 1_000_000 + i64::try_from(p.get(pr).deadline.as_millis()).unwrap();
        for (fa, ca, late) in steps {
            if t.is_done() { break; }
            let now = t.due_at + late;
            for (answer, pr) in [(fa, Provider::Finbox), (ca, Provider::Credeau)] {
                let before = t.track(pr).clone();
                if before.is_done() || before.next_poll_at > now {
                    continue;
                }
                prop_assert!(now >= before.next_poll_at, "polled early");
                let fx = apply(&mut t, answer, now, &p);
                let after = t.track(pr);
                if let Some(max) = budget {
                    prop_assert!(after.failed_polls <= max);
                }
                if let Some(done) = &after.done {
                    prop_assert_eq!(done.at, now);
                    if done.outcome == Outcome::Failed {
                        prop_assert!(fx.failure.is_some());
                    } else {
                        // What docs/events.md promises: the error fields
                        // of a result are set only when it is `failed`.
                        prop_assert!(after.last_error.is_none(), "{:?} with an error", done.outcome);
                    }
                } else {
                    let floor = if pr == Provider::Finbox { 10_000 } else { 15_000 };
                    prop_assert!(after.next_poll_at - now >= floor,
                        "{pr} next poll {} ms after the last", after.next_poll_at - now);
                    prop_assert!(after.next_poll_at <= (now + floor).max(deadline(pr)),
                        "scheduled past the deadline for no reason");
                    prop_assert!(after.interval_ms >= floor);
                    prop_assert!(after.interval_ms <= i64::try_from(p.get(pr).max_poll_interval.as_millis()).unwrap());
                    prop_assert!(now < deadline(pr));
                }
            }
            // Terminal providers never change again.
            let snapshot = t.clone();
            for pr in Provider::ALL {
                if snapshot.track(pr).is_done() {
                    let again = match pr {
                        Provider::Finbox => Answer::Finbox(Ok(FinboxAnswer::NotFound { request_id: None })),
                        Provider::Credeau => Answer::Credeau(Ok(CredeauAnswer::Empty)),
                    };
                    let mut probe = snapshot.clone();
                    apply(&mut probe, again, now + 1, &p);
                    prop_assert_eq!(probe.track(pr), snapshot.track(pr));
                }
            }
        }
    }

    /// Whatever happens, a task reaches a final state by each provider's
    /// deadline plus one poll.
    #[test]
    fn every_task_ends(finbox_empty in any::<bool>()) {
        let p = policies();
        let mut t = start(user(), origin(), 0, &p);
        let mut polls = 0;
        while !t.is_done() {
            let now = t.due_at;
            for pr in t.due_providers(now) {
                let a = match (pr, finbox_empty) {
                    (Provider::Finbox, true) => Answer::Finbox(Ok(FinboxAnswer::InProgress { suggested_wait: None, request_id: None })),
                    (Provider::Finbox, false) => Answer::Finbox(Ok(FinboxAnswer::NotFound { request_id: None })),
                    (Provider::Credeau, _) => Answer::Credeau(Ok(CredeauAnswer::Empty)),
                };
                apply(&mut t, a, now, &p);
                polls += 1;
            }
            prop_assert!(polls < 10_000);
        }
        let expected = if finbox_empty { Outcome::TimedOut } else { Outcome::NotFound };
        prop_assert_eq!(t.finbox.outcome(), Some(expected));
        prop_assert_eq!(t.credeau.outcome(), Some(Outcome::TimedOut));
    }
}

#[test]
fn a_poll_cut_short_is_neither_an_answer_nor_a_failure_nor_a_request_of_its_own() {
    let p = policies();
    let t0 = 1_000_000 + 30_000;
    let mut task = start(user(), origin(), 1_000_000, &p);
    cut_short(&mut task, Provider::Credeau, t0, &p);
    let c = task.track(Provider::Credeau);
    // The request goes on (parked): it is counted when its answer is.
    assert_eq!((c.polls, c.cut_polls, c.failed_polls), (0, 1, 0));
    assert_eq!(c.first_poll_at, Some(t0));
    assert!(c.last_error.is_none() && !c.is_done());
    // Polled again after the Credeau spacing, as after an empty answer.
    assert_eq!(c.next_poll_at, t0 + 15_000);

    // The parked call's answer, taken by the next poll, is one poll.
    apply(
        &mut task,
        Answer::Credeau(Err(err(ProviderErrorKind::Timeout, None))),
        t0 + 20_000,
        &p,
    );
    let c = task.track(Provider::Credeau);
    assert_eq!((c.polls, c.cut_polls, c.failed_polls), (1, 0, 1));
}

#[test]
fn the_straggler_leash_is_the_wait_below_the_record_budget() {
    let budget = Duration::from_secs(15);
    let wait = Duration::from_secs(2);
    assert_eq!(straggler_leash(wait, budget), Some(wait));
    assert_eq!(straggler_leash(Duration::ZERO, budget), None);
    assert_eq!(straggler_leash(budget, budget), None);
}

#[test]
fn a_cut_short_poll_past_the_deadline_ends_the_provider_timed_out() {
    let p = policies();
    let mut task = start(user(), origin(), 1_000_000, &p);
    let after_deadline = 1_000_000 + 6 * 3_600_000 + 1;
    cut_short(&mut task, Provider::Credeau, after_deadline, &p);
    assert_eq!(
        task.track(Provider::Credeau).outcome(),
        Some(Outcome::TimedOut)
    );
    // A terminal provider is never changed again.
    let before = task.clone();
    cut_short(&mut task, Provider::Credeau, after_deadline + 1, &p);
    assert_eq!(task, before);
}

#[test]
fn an_output_that_cannot_be_published_fails_only_its_provider_under_publish_too_large() {
    use dead_letter::{Reason, Stage};
    let p = policies();
    let mut t = start(user(), origin(), 0, &p);
    let credeau_before = t.credeau.clone();
    let label = fail_publish(
        &mut t,
        Provider::Finbox,
        2_000_000,
        ProviderErrorKind::OutputTooLarge,
        "entry 3 is 2 MiB",
    );
    assert_eq!(label, (Stage::Publish, Reason::TooLarge));
    assert_eq!(t.finbox.outcome(), Some(Outcome::Failed));
    assert_eq!(t.finbox.done.as_ref().map(|d| d.at), Some(2_000_000));
    let last = t.finbox.last_error.as_ref().expect("last error");
    assert_eq!(last.kind, ProviderErrorKind::OutputTooLarge);
    assert_eq!(last.message, "entry 3 is 2 MiB");
    assert_eq!(last.http_status, None);
    assert_eq!(t.credeau, credeau_before);
    // The dead letter written when the task ends says the same.
    assert_eq!(
        dead_letter::provider_failed(Provider::Finbox, last.kind),
        label
    );
}

#[test]
fn a_failure_is_counted_under_the_stage_and_reason_it_is_dead_lettered_with() {
    use dead_letter::{Reason, Stage};
    // A final answer: its own label.
    let p = policies();
    let mut t = start(user(), origin(), 0, &p);
    let fx = apply(
        &mut t,
        Answer::Finbox(Err(err(ProviderErrorKind::Forbidden, Some(403)))),
        1_030_000,
        &p,
    );
    let f = fx.failure.expect("failed");
    assert_eq!(
        f.stage_reason(),
        (Stage::Poll(Provider::Finbox), Reason::Forbidden)
    );
    let kind = t.finbox.last_error.as_ref().expect("last error").kind;
    assert_eq!(
        dead_letter::provider_failed(Provider::Finbox, kind),
        f.stage_reason()
    );
    // Retries spent: exhausted.
    let mut p = policies();
    p.finbox.max_failed_polls = Some(1);
    let mut t = start(user(), origin(), 0, &p);
    let fx = apply(
        &mut t,
        Answer::Finbox(Err(err(ProviderErrorKind::ServerError, Some(503)))),
        1_030_000,
        &p,
    );
    let f = fx.failure.expect("failed");
    assert!(f.exhausted);
    assert_eq!(
        f.stage_reason(),
        (Stage::Poll(Provider::Finbox), Reason::Exhausted)
    );
    let kind = t.finbox.last_error.as_ref().expect("last error").kind;
    assert_eq!(
        dead_letter::provider_failed(Provider::Finbox, kind),
        f.stage_reason()
    );
}

#[test]
fn settle_applies_a_polls_results_in_one_pass_and_names_the_cuts() {
    let p = policies();
    let t0 = 1_000_000 + 30_000;
    let mut task = start(user(), origin(), 1_000_000, &p);
    let plan = settle(
        &mut task,
        vec![
            (
                Provider::Finbox,
                PollResult::Answered(Answer::Finbox(Err(err(ProviderErrorKind::Timeout, None)))),
            ),
            (Provider::Credeau, PollResult::Cut),
        ],
        t0,
        &p,
    );
    assert_eq!(plan.effects.len(), 1);
    assert_eq!(plan.cut, vec![Provider::Credeau]);
    let (f, c) = (task.track(Provider::Finbox), task.track(Provider::Credeau));
    assert_eq!((f.polls, f.failed_polls), (1, 1));
    assert_eq!((c.polls, c.cut_polls), (0, 1));

    let before = task.track(Provider::Credeau).clone();
    let plan = settle(
        &mut task,
        vec![(Provider::Credeau, PollResult::NotSent)],
        t0 + 20_000,
        &p,
    );
    assert!(plan.effects.is_empty() && plan.cut.is_empty());
    let c = task.track(Provider::Credeau);
    assert_eq!(
        (c.polls, c.cut_polls, c.failed_polls),
        (before.polls, before.cut_polls, 0)
    );
}
