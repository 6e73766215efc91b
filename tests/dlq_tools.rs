//! `dlq inspect` and `dlq replay` (the binary, configured like the service)
//! against the real broker: a rotated FinBox key dead-letters users, the
//! operator inspects, fixes the key, dry-runs, replays once (the users
//! complete, Credeau is not asked again), and a second replay sends nothing.
//! A poison input record replays to the input topic and is dead-lettered
//! again. The time, offset and partition filters select exactly the
//! matching dead letters, and inspect never shows the SMS bodies of
//! dead-lettered users.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Command;
use std::time::Duration;

use common::*;
use insights_enricher::events::dead_letter::{DeadLetter, Reason, ReplayTarget, Stage};
use insights_enricher::simulator::{self, SimulatorConfig};
use serde_json::{json, Value};

/// Secrets of the test configuration: none may appear in the tools' output.
const SECRETS: &[&str] = &["sim-finbox-key", "sim-server-hash", "sim-token"];

/// Runs `insights-enricher dlq ARGS` with the service's environment; returns
/// (success, stdout, stderr) after asserting it printed no secret.
fn dlq_run(env: &[(String, String)], args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_insights-enricher"))
        .arg("dlq")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run dlq tool");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    for s in SECRETS {
        assert!(
            !stdout.contains(s) && !stderr.contains(s),
            "dlq {args:?} printed the secret {s:?}"
        );
    }
    (out.status.success(), stdout, stderr)
}

/// As [`dlq_run`], asserting the command succeeded; returns (stdout, stderr).
fn dlq_cli(env: &[(String, String)], args: &[&str]) -> (String, String) {
    let (ok, stdout, stderr) = dlq_run(env, args);
    assert!(ok, "dlq {args:?} failed: {stderr}\n{stdout}");
    // Reaching the end of a partition is how the tools know they are done,
    // not something to warn an operator about.
    assert!(
        !stderr.contains("PartitionEOF"),
        "dlq {args:?} warned about the end of a partition:\n{stderr}"
    );
    (stdout, stderr)
}

fn dlq_json(env: &[(String, String)], args: &[&str]) -> Value {
    let (stdout, _) = dlq_cli(env, args);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("dlq {args:?}: {e}: {stdout}"))
}

fn counts(v: &Value) -> BTreeMap<String, u64> {
    v.as_object()
        .expect("count map")
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().expect("count")))
        .collect()
}

fn map(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect()
}

fn header(r: &ReadRecord, k: &str) -> Option<String> {
    r.headers.get(k).cloned().flatten()
}

/// How many requests the simulator has seen from one user, per provider.
async fn sim_requests(http: &reqwest::Client, base: &str, user: &str) -> (u64, u64) {
    let v: Value = http
        .get(format!("{base}/admin/users/{user}"))
        .send()
        .await
        .expect("admin users")
        .json()
        .await
        .expect("admin users json");
    let n = |p: &str| v[p]["requests"].as_u64().unwrap_or(0);
    (n("finbox"), n("credeau"))
}

async fn set_finbox_key(http: &reqwest::Client, base: &str, key: &str) {
    let r = http
        .put(format!("{base}/admin/credentials"))
        .json(&json!({ "finbox_api_key": key }))
        .send()
        .await
        .expect("admin credentials");
    assert!(r.status().is_success(), "{}", r.status());
}

/// Record counts of the topics a replay could write to.
fn topic_counts(
    topics: &Topics,
    ledger: &str,
    shortest_tier: &str,
) -> HashMap<&'static str, usize> {
    let idle = Duration::from_secs(2);
    HashMap::from([
        ("input", read_topic(&topics.input, None, idle).len()),
        ("tier", read_topic(shortest_tier, None, idle).len()),
        ("ledger", read_topic(ledger, None, idle).len()),
        ("finbox", read_topic(&topics.finbox, None, idle).len()),
        ("sms", read_topic(&topics.sms, None, idle).len()),
        ("combined", read_topic(&topics.combined, None, idle).len()),
        ("dlq", read_topic(&topics.dlq, None, idle).len()),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_inspect_and_replay_recover_users_after_a_finbox_key_rotation_exactly_once() {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    let base = sim.base_url();
    let http = reqwest::Client::new();
    // The simulator now expects another key than the service sends: every
    // FinBox poll answers 403 "Incorrect API Key".
    set_finbox_key(&http, &base, "rotated").await;

    let topics = Topics::new("dlqtools");
    create_topic(&topics.input, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let env = service_env(&topics, &unique("g"), &base);
    // Both providers are polled at once, in the same round: the dead letter
    // is written when the task ends, so it holds Credeau's final state and
    // the replay must not ask Credeau again (checked below).
    let service = Service::start(&env, &dir.path().join("service.log"));

    let p = producer();
    let n = 3;
    let mut users = Vec::new();
    for i in 0..n {
        let user = format!("rot-{i}-{}", unique("u"));
        produce(
            &p,
            &topics.input,
            Some(user.as_bytes()),
            Some(&onboarded_json(&format!("ev-{user}"), &user)),
        )
        .await;
        users.push(user);
    }
    let poison = b"{\"event_id\": \"e-poison\", \"user_id\": ".to_vec();
    produce(&p, &topics.input, Some(b"poison"), Some(&poison)).await;

    // Every user ends with a combined event saying FinBox failed (403).
    let combined = read_topic(&topics.combined, Some(n), Duration::from_secs(60));
    assert_eq!(combined.len(), n, "log:\n{}", service.log_text());
    for r in &combined {
        assert_eq!(r.value["finbox"]["outcome"], "failed", "{}", r.value);
        assert_eq!(r.value["finbox"]["error_kind"], "forbidden", "{}", r.value);
        assert_eq!(r.value["finbox"]["http_status"], 403, "{}", r.value);
        assert_eq!(r.value["credeau"]["outcome"], "complete", "{}", r.value);
        assert!(r.value["replay_of"].is_null());
    }
    let dlq = read_topic(&topics.dlq, Some(n + 1), Duration::from_secs(30));
    assert_eq!(dlq.len(), n + 1, "dead letters: {dlq:?}");
    let sms_before = read_topic(&topics.sms, Some(n), Duration::from_secs(10));
    assert_eq!(sms_before.len(), n, "one SMS extraction per user");

    // inspect: the counts, and nothing secret.
    let all = dlq_json(&env, &["inspect", "--json"]);
    let s = &all["summary"];
    assert_eq!(s["total"], n + 1, "{all}");
    let nu = n as u64;
    assert_eq!(
        counts(&s["by_reason"]),
        map(&[("forbidden", nu), ("malformed_json", 1)])
    );
    assert_eq!(counts(&s["by_provider"]), map(&[("finbox", nu), ("-", 1)]));
    assert_eq!(counts(&s["by_http_status"]), map(&[("403", nu), ("-", 1)]));
    assert_eq!(
        counts(&s["by_stage"]),
        map(&[("poll_finbox", nu), ("decode", 1)])
    );
    let records = all["records"].as_array().expect("records");
    assert_eq!(records.len(), n + 1);
    for r in records {
        let h = &r["headers"];
        if h["dlq.error.class"] == "forbidden" {
            let user = r["key"].as_str().expect("key");
            assert!(users.iter().any(|u| u == user), "{r}");
            assert_eq!(h["dlq.user_id"], user);
            assert_eq!(h["dlq.replay.target"], "task");
            assert_eq!(r["value"]["finbox"], "failed", "{r}");
            assert_eq!(r["value"]["credeau"], "complete", "{r}");
        } else {
            assert_eq!(h["dlq.stage"], "decode");
            assert_eq!(h["dlq.replay.target"], "input");
            assert_eq!(r["value"]["bytes"], poison.len());
        }
    }
    let filtered = dlq_json(&env, &["inspect", "--json", "--reason", "forbidden"]);
    assert_eq!(filtered["summary"]["total"], n);
    let (text, _) = dlq_cli(&env, &["inspect", "--provider", "finbox"]);
    assert!(text.starts_with(&format!("dead letters: {n}\n")), "{text}");

    let credeau_before: Vec<u64> = {
        let mut v = Vec::new();
        for u in &users {
            v.push(sim_requests(&http, &base, u).await.1);
        }
        v
    };
    assert!(credeau_before.iter().all(|c| *c >= 1), "{credeau_before:?}");
    // The simulator logs a user's requests only once they pass the key
    // check: none of the 403s is on record.
    for u in &users {
        assert_eq!(sim_requests(&http, &base, u).await.0, 0, "{u}");
    }

    // The operator fixes the key, then dry-runs: nothing is sent.
    set_finbox_key(&http, &base, "sim-finbox-key").await;
    let ledger = format!("{}.replayed", topics.dlq);
    let shortest_tier = format!("{}.1s", topics.delay_prefix);
    let dry = dlq_json(
        &env,
        &["replay", "--dry-run", "--reason", "forbidden", "--json"],
    );
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["selected"], n);
    assert_eq!(dry["sent"], 0);
    assert_eq!(dry["items"].as_array().map(Vec::len), Some(n), "{dry}");
    for item in dry["items"].as_array().unwrap() {
        assert_eq!(item["destination"], shortest_tier.as_str(), "{item}");
    }
    let before = topic_counts(&topics, &ledger, &shortest_tier);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_dry = topic_counts(&topics, &ledger, &shortest_tier);
    assert_eq!(after_dry, before, "a dry run changed a topic");
    assert_eq!(after_dry["ledger"], 0);

    // The replay: every forbidden dead letter once.
    let report = dlq_json(&env, &["replay", "--reason", "forbidden", "--json"]);
    assert_eq!(report["sent"], n, "{report}");
    assert_eq!(report["already_replayed"], 0);
    assert_eq!(report["not_replayable"], 0);

    let finbox = read_topic(&topics.finbox, Some(n), Duration::from_secs(60));
    assert_eq!(finbox.len(), n, "log:\n{}", service.log_text());
    let combined = read_topic(&topics.combined, Some(2 * n), Duration::from_secs(60));
    assert_eq!(combined.len(), 2 * n);
    let replayed: Vec<&ReadRecord> = combined
        .iter()
        .filter(|r| !r.value["replay_of"].is_null())
        .collect();
    assert_eq!(replayed.len(), n);
    let dlq_ids: Vec<String> = dlq
        .iter()
        .filter(|r| header(r, "dlq.error.class").as_deref() == Some("forbidden"))
        .map(|r| format!("{}/{}/{}", topics.dlq, r.partition, r.offset))
        .collect();
    for r in &replayed {
        let user = r.value["user_id"].as_str().unwrap();
        assert!(users.iter().any(|u| u == user));
        assert_eq!(r.value["event_id"], format!("ev-{user}"));
        assert_eq!(r.value["finbox"]["outcome"], "complete", "{}", r.value);
        assert_eq!(r.value["credeau"]["outcome"], "complete", "{}", r.value);
        let of = r.value["replay_of"].as_str().unwrap();
        assert!(dlq_ids.iter().any(|d| d == of), "{of} not in {dlq_ids:?}");
    }
    for r in &finbox {
        assert!(users.iter().any(|u| Some(u.as_str()) == r.key.as_deref()));
        assert!(r.value["predictors"]
            .as_array()
            .is_some_and(|a| !a.is_empty()));
    }
    // Credeau was final in every replayed task: not asked again, no second
    // SMS extraction.
    for (u, before) in users.iter().zip(&credeau_before) {
        let (finbox_requests, credeau_now) = sim_requests(&http, &base, u).await;
        assert_eq!(credeau_now, *before, "Credeau polled again for {u}");
        assert_eq!(
            finbox_requests, 1,
            "{u}: FinBox answered once after the fix"
        );
    }
    assert_eq!(
        read_topic(&topics.sms, None, Duration::from_secs(2)).len(),
        n
    );
    assert_eq!(read_topic(&ledger, None, Duration::from_secs(2)).len(), n);

    // The same replay again sends nothing, and no further result appears.
    let again = dlq_json(&env, &["replay", "--reason", "forbidden", "--json"]);
    assert_eq!(again["sent"], 0, "{again}");
    assert_eq!(again["already_replayed"], n);
    let (text, _) = dlq_cli(&env, &["replay", "--reason", "forbidden"]);
    assert!(
        text.contains(&format!("selected {n}, sent 0, already replayed {n}")),
        "{text}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        read_topic(&topics.combined, None, Duration::from_secs(2)).len(),
        2 * n
    );
    assert_eq!(
        read_topic(&topics.finbox, None, Duration::from_secs(2)).len(),
        n
    );

    // The poison record: decode stage, replayed to the input topic with its
    // origin in `dlq.replayed.from`, and dead-lettered again there.
    let decode = dlq_json(&env, &["inspect", "--json", "--stage", "decode"]);
    assert_eq!(decode["summary"]["total"], 1, "{decode}");
    let poison_dl = &decode["records"][0];
    let poison_id = format!(
        "{}/{}/{}",
        topics.dlq, poison_dl["partition"], poison_dl["offset"]
    );
    let report = dlq_json(&env, &["replay", "--reason", "malformed_json", "--json"]);
    assert_eq!(report["sent"], 1, "{report}");
    assert_eq!(report["items"][0]["destination"], topics.input.as_str());
    let input = read_topic(&topics.input, Some(n + 2), Duration::from_secs(30));
    let back: Vec<&ReadRecord> = input
        .iter()
        .filter(|r| header(r, "dlq.replayed.from").is_some())
        .collect();
    assert_eq!(back.len(), 1, "{input:?}");
    assert_eq!(
        header(back[0], "dlq.replayed.from").as_deref(),
        Some(poison_id.as_str())
    );
    assert_eq!(back[0].key.as_deref(), Some("poison"));
    assert_eq!(
        back[0].value,
        Value::String(String::from_utf8(poison.clone()).unwrap())
    );
    let dlq = read_topic(&topics.dlq, Some(n + 2), Duration::from_secs(30));
    let again: Vec<&ReadRecord> = dlq
        .iter()
        .filter(|r| {
            header(r, "dlq.original.offset") == Some(back[0].offset.to_string())
                && header(r, "dlq.original.partition") == Some(back[0].partition.to_string())
        })
        .collect();
    assert_eq!(again.len(), 1, "{dlq:?}");
    assert_eq!(
        header(again[0], "dlq.error.class").as_deref(),
        Some("malformed_json")
    );
    assert_eq!(
        header(again[0], "dlq.original.topic").as_deref(),
        Some(topics.input.as_str())
    );

    let log = service.log_text();
    for s in SECRETS {
        assert!(!log.contains(s), "service log holds {s:?}");
    }
    let _ = sim.shutdown().await;
}

/// (partition, offset) of every record a `dlq inspect --json` printed,
/// after checking the summary counts the same records.
fn selected(v: &Value) -> BTreeSet<(i64, i64)> {
    let records = v["records"].as_array().expect("records");
    assert_eq!(v["summary"]["total"], records.len(), "{v}");
    let set: BTreeSet<(i64, i64)> = records
        .iter()
        .map(|r| {
            (
                r["partition"].as_i64().expect("partition"),
                r["offset"].as_i64().expect("offset"),
            )
        })
        .collect();
    assert_eq!(set.len(), records.len(), "a record shown twice: {v}");
    set
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("time")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A decode-stage dead letter of `user`'s onboarding event, failed at
/// `failed_at`, with the service's own header layout.
fn input_dead_letter(input: &str, user: &str, offset: i64, failed_at: i64) -> DeadLetter {
    DeadLetter {
        key: Some(user.as_bytes().to_vec()),
        value: Some(onboarded_json(&format!("ev-{user}"), user)),
        stage: Stage::Decode,
        reason: Reason::InvalidField,
        message: "user_id: missing".into(),
        original_topic: input.to_string(),
        original_partition: 0,
        original_offset: offset,
        original_timestamp: Some(failed_at - 1_000),
        attempts: 1,
        provider: None,
        http_status: None,
        provider_request_id: None,
        answered_id: None,
        user_id: None,
        event_id: None,
        replay_target: ReplayTarget::Input,
        failed_at,
        original_headers: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_time_offset_and_partition_filters_select_exactly_the_matching_dead_letters() {
    // Two partitions of six dead letters each, failed ten minutes apart and
    // interleaved: record i of partition p is number k = 2i + p, failed at
    // t(k) = t0 + k * 10 min (its Kafka timestamp too, as the service
    // writes them). t0 is 3 h 5 min ago, so "2h" and "150m" fall halfway
    // between two records.
    let topics = Topics::new("dlqfilter");
    create_topic(&topics.dlq, 2).await;
    create_topic(&topics.input, 1).await;
    let env = service_env(&topics, &unique("g"), "http://127.0.0.1:9");
    let minute = 60_000;
    let t0 = chrono::Utc::now().timestamp_millis() - 185 * minute;
    let t = |k: i64| t0 + k * 10 * minute;
    let per_partition = 6;
    let p = producer();
    let mut layout = Vec::new();
    for i in 0..per_partition {
        for part in 0..2 {
            let k = 2 * i + part;
            let user = format!("flt-{part}-{i}-{}", unique("u"));
            let dl = input_dead_letter(&topics.input, &user, k, t(k));
            let at = produce_at(
                &p,
                &topics.dlq,
                Some(part as i32),
                Some(t(k)),
                dl.key.as_deref(),
                dl.value.as_deref(),
                &dl.headers(),
            )
            .await;
            assert_eq!(at, (part as i32, i), "records laid out as planned");
            layout.push((part, i, k, user));
        }
    }
    let expect = |keep: &dyn Fn(i64, i64, i64) -> bool| -> BTreeSet<(i64, i64)> {
        layout
            .iter()
            .filter(|(part, i, k, _)| keep(*part, *i, *k))
            .map(|(part, i, _, _)| (*part, *i))
            .collect()
    };
    let inspect = |args: &[&str]| {
        let mut all = vec!["inspect", "--json"];
        all.extend_from_slice(args);
        selected(&dlq_json(&env, &all))
    };

    assert_eq!(inspect(&[]), expect(&|_, _, _| true));

    // Time range, RFC 3339: --since is inclusive, --until exclusive, both
    // on the time the record was dead-lettered.
    let (t3, t4, t9) = (rfc3339(t(3)), rfc3339(t(4)), rfc3339(t(9)));
    assert_eq!(inspect(&["--since", &t4]), expect(&|_, _, k| k >= 4));
    assert_eq!(inspect(&["--until", &t4]), expect(&|_, _, k| k < 4));
    assert_eq!(
        inspect(&["--since", &t3, "--until", &t9]),
        expect(&|_, _, k| (3..9).contains(&k))
    );
    // Time range as durations ago: 2 h ago lies between t(6) and t(7),
    // 150 min ago between t(3) and t(4).
    assert_eq!(inspect(&["--since", "2h"]), expect(&|_, _, k| k >= 7));
    assert_eq!(inspect(&["--until", "2h"]), expect(&|_, _, k| k <= 6));
    assert_eq!(
        inspect(&["--since", "150m", "--until", "2h"]),
        expect(&|_, _, k| (4..=6).contains(&k))
    );
    // A time range after every record selects nothing.
    assert_eq!(inspect(&["--since", "1m"]), BTreeSet::new());

    // Partition, and offset ranges (inclusive at both ends) within one.
    assert_eq!(
        inspect(&["--partition", "1"]),
        expect(&|part, _, _| part == 1)
    );
    assert_eq!(
        inspect(&[
            "--partition",
            "0",
            "--start-offset",
            "2",
            "--end-offset",
            "4"
        ]),
        expect(&|part, i, _| part == 0 && (2..=4).contains(&i))
    );
    assert_eq!(
        inspect(&["--partition", "1", "--start-offset", "4"]),
        expect(&|part, i, _| part == 1 && i >= 4)
    );
    assert_eq!(
        inspect(&["--partition", "1", "--end-offset", "1"]),
        expect(&|part, i, _| part == 1 && i <= 1)
    );
    assert_eq!(
        inspect(&["--partition", "0", "--start-offset", "9"]),
        BTreeSet::new()
    );
    assert_eq!(
        inspect(&["--partition", "2"]),
        BTreeSet::new(),
        "a partition the topic does not have"
    );
    // Filters combine.
    assert_eq!(
        inspect(&["--partition", "0", "--since", &t4]),
        expect(&|part, _, k| part == 0 && k >= 4)
    );
    assert_eq!(
        inspect(&[
            "--partition",
            "1",
            "--start-offset",
            "1",
            "--until",
            &rfc3339(t(7))
        ]),
        expect(&|part, i, k| part == 1 && i >= 1 && k < 7)
    );

    // The text form selects the same records.
    let (text, _) = dlq_cli(
        &env,
        &[
            "inspect",
            "--partition",
            "0",
            "--start-offset",
            "2",
            "--end-offset",
            "4",
        ],
    );
    assert!(text.starts_with("dead letters: 3\n"), "{text}");
    for i in 2..=4 {
        assert!(
            text.contains(&format!("- partition 0 offset {i} ")),
            "{text}"
        );
    }
    assert!(
        !text.contains("offset 1 ") && !text.contains("offset 5 "),
        "{text}"
    );

    // Offsets without a partition, and times that are neither RFC 3339 nor
    // a duration, are refused with the flag named.
    for (args, named) in [
        (
            vec!["inspect", "--start-offset", "2"],
            vec!["--start-offset", "--partition"],
        ),
        (
            vec!["inspect", "--end-offset", "2"],
            vec!["--end-offset", "--partition"],
        ),
        (
            vec!["replay", "--dry-run", "--start-offset", "2"],
            vec!["--start-offset", "--partition"],
        ),
        (vec!["inspect", "--since", "last tuesday"], vec!["--since"]),
        (vec!["inspect", "--until", "soon"], vec!["--until"]),
    ] {
        let (ok, stdout, stderr) = dlq_run(&env, &args);
        assert!(!ok, "{args:?} succeeded: {stdout}");
        for flag in named {
            assert!(
                stderr.contains(flag),
                "{args:?}: {flag} not named: {stderr}"
            );
        }
    }

    // replay --dry-run with an offset range selects exactly those records
    // and sends nothing.
    let range = [
        "--partition",
        "1",
        "--start-offset",
        "1",
        "--end-offset",
        "3",
    ];
    let ids: Vec<String> = (1..=3).map(|i| format!("{}/1/{i}", topics.dlq)).collect();
    let users_in_range: Vec<&str> = layout
        .iter()
        .filter(|(part, i, _, _)| *part == 1 && (1..=3).contains(i))
        .map(|(_, _, _, u)| u.as_str())
        .collect();
    let mut args = vec!["replay", "--dry-run", "--json"];
    args.extend_from_slice(&range);
    let dry = dlq_json(&env, &args);
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(dry["selected"], 3, "{dry}");
    assert_eq!(dry["sent"], 0, "{dry}");
    assert_eq!(dry["already_replayed"], 0, "{dry}");
    assert_eq!(dry["not_replayable"], 0, "{dry}");
    let items = dry["items"].as_array().expect("items");
    let item_ids: Vec<&str> = items
        .iter()
        .map(|i| i["dead_letter"].as_str().expect("id"))
        .collect();
    assert_eq!(item_ids, ids, "{dry}");
    for (item, user) in items.iter().zip(&users_in_range) {
        assert_eq!(item["destination"], topics.input.as_str(), "{item}");
        assert_eq!(item["key"], *user, "{item}");
    }
    let ledger = format!("{}.replayed", topics.dlq);
    let idle = Duration::from_secs(2);
    assert_eq!(read_topic(&ledger, None, idle).len(), 0, "dry run wrote");
    assert_eq!(
        read_topic(&topics.input, None, idle).len(),
        0,
        "dry run sent"
    );

    // The same range replayed for real sends exactly those records.
    let mut args = vec!["replay", "--json"];
    args.extend_from_slice(&range);
    let report = dlq_json(&env, &args);
    assert_eq!(report["sent"], 3, "{report}");
    let sent = read_topic(&topics.input, Some(3), Duration::from_secs(30));
    let mut from: Vec<String> = sent
        .iter()
        .map(|r| header(r, "dlq.replayed.from").expect("replayed from"))
        .collect();
    from.sort();
    assert_eq!(from, ids);
    let mut keys: Vec<&str> = sent.iter().filter_map(|r| r.key.as_deref()).collect();
    keys.sort();
    let mut want = users_in_range.clone();
    want.sort();
    assert_eq!(keys, want);
    let mut args = vec!["replay", "--dry-run", "--json"];
    args.extend_from_slice(&range);
    let again = dlq_json(&env, &args);
    assert_eq!(again["selected"], 3, "{again}");
    assert_eq!(again["already_replayed"], 3, "{again}");
    assert_eq!(again["items"].as_array().map(Vec::len), Some(0), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_inspect_never_shows_the_sms_bodies_of_dead_lettered_users() {
    // Two ways SMS text reaches a user whose task is dead-lettered: Credeau
    // answered with SMS data while FinBox rejected our key ("smsok-"), and
    // Credeau's every answer was its real answer cut in half, SMS bodies
    // included, until the deadline ("smscut-", FinBox rejected too).
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    let base = sim.base_url();
    let http = reqwest::Client::new();
    set_finbox_key(&http, &base, "rotated").await;
    let scenarios = |cut: bool| {
        let mut prefixes = serde_json::Map::new();
        if cut {
            prefixes.insert(
                "smscut-".into(),
                json!({"credeau": {"sms_count": 30, "faults": {"truncated_json_first": 1000}}}),
            );
        }
        json!({"default": {"credeau": {"sms_count": 30}}, "prefixes": prefixes})
    };
    sim_admin(&base, "/admin/scenarios", &scenarios(true)).await;

    let topics = Topics::new("dlqsms");
    create_topic(&topics.input, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = service_env(&topics, &unique("g"), &base);
    env.push(("INSIGHTS__CREDEAU__DEADLINE".into(), "6s".into()));
    let service = Service::start(&env, &dir.path().join("service.log"));
    let ok_users = produce_users(&topics.input, "smsok-", 2).await;
    let cut_users = produce_users(&topics.input, "smscut-", 2).await;
    let n = ok_users.len() + cut_users.len();

    let combined = read_topic(&topics.combined, Some(n), Duration::from_secs(90));
    assert_eq!(combined.len(), n, "log:\n{}", service.log_text());
    for r in &combined {
        let user = r.value["user_id"].as_str().expect("user_id");
        assert_eq!(r.value["finbox"]["error_kind"], "forbidden", "{}", r.value);
        if user.starts_with("smsok-") {
            assert_eq!(r.value["credeau"]["outcome"], "complete", "{}", r.value);
            assert_eq!(r.value["credeau"]["items"], 30, "{}", r.value);
        } else {
            assert_eq!(r.value["credeau"]["outcome"], "failed", "{}", r.value);
            assert_eq!(
                r.value["credeau"]["error_kind"], "invalid_body",
                "{}",
                r.value
            );
        }
    }
    // One dead letter per user for FinBox, one more per cut user for Credeau.
    let want = ok_users.len() + 2 * cut_users.len();
    let dlq = read_topic(&topics.dlq, Some(want), Duration::from_secs(30));
    assert_eq!(dlq.len(), want, "dead letters: {dlq:?}");

    // The SMS bodies involved, from the simulator itself: the cut answers
    // held whole bodies (asked for once more with the fault still on), and
    // the full answers once the fault is off are the same messages.
    let mut cut_answers = Vec::new();
    for user in &cut_users {
        let (status, cut) = credeau_answer(&base, "sim-client", "sim-token", user).await;
        assert_eq!(status, 200, "{cut}");
        cut_answers.push(cut);
    }
    sim_admin(&base, "/admin/scenarios", &scenarios(false)).await;
    let sms = read_topic(&topics.sms, Some(ok_users.len()), Duration::from_secs(10));
    assert_eq!(sms.len(), ok_users.len(), "one SMS extraction per ok user");
    let published: String = sms.iter().map(|r| r.value.to_string()).collect();
    let mut needles = Vec::new();
    let mut cut_bodies_seen = 0;
    for user in ok_users.iter().chain(&cut_users) {
        let mine = sms_bodies(&base, "sim-client", "sim-token", user).await;
        assert!(mine.len() >= 10, "{user}: only {} SMS bodies", mine.len());
        for body in mine {
            if user.starts_with("smsok-") {
                assert!(published.contains(&body), "{user}: {body:?} not published");
            } else if cut_answers.iter().any(|cut| cut.contains(&body)) {
                cut_bodies_seen += 1;
            }
            needles.push((format!("SMS body of {user}"), body));
        }
    }
    assert!(
        cut_bodies_seen >= 5,
        "the cut answers held only {cut_bodies_seen} whole SMS bodies"
    );

    let (text, _) = dlq_cli(&env, &["inspect"]);
    let (summary, _) = dlq_cli(&env, &["inspect", "--summary"]);
    let (credeau_text, _) = dlq_cli(&env, &["inspect", "--provider", "credeau"]);
    let json_all = dlq_json(&env, &["inspect", "--json"]);
    let (dry, _) = dlq_cli(&env, &["replay", "--dry-run"]);
    let mut found = Vec::new();
    for (place, out) in [
        ("inspect", &text),
        ("inspect --summary", &summary),
        ("inspect --provider credeau", &credeau_text),
        ("inspect --json", &json_all.to_string()),
        ("replay --dry-run", &dry),
    ] {
        found.extend(leaks(place, out, &needles));
    }
    assert!(found.is_empty(), "SMS text shown:\n{}", found.join("\n"));

    // What inspect is for is there: the count and the reasons.
    let (forbidden, exhausted) = (ok_users.len() + cut_users.len(), cut_users.len());
    for out in [&text, &summary] {
        assert!(out.starts_with(&format!("dead letters: {want}\n")), "{out}");
        assert!(
            out.contains(&format!("  {:<24} {forbidden}\n", "forbidden")),
            "{out}"
        );
        assert!(
            out.contains(&format!("  {:<24} {exhausted}\n", "exhausted")),
            "{out}"
        );
    }
    assert!(text.contains("records:\n") && !summary.contains("records:\n"));
    assert_eq!(text.matches("\n- partition ").count(), want, "{text}");
    assert!(
        credeau_text.starts_with(&format!("dead letters: {exhausted}\n")),
        "{credeau_text}"
    );
    let s = &json_all["summary"];
    assert_eq!(s["total"], want, "{json_all}");
    assert_eq!(
        counts(&s["by_reason"]),
        map(&[
            ("forbidden", forbidden as u64),
            ("exhausted", exhausted as u64)
        ])
    );
    assert_eq!(
        counts(&s["by_provider"]),
        map(&[("finbox", forbidden as u64), ("credeau", exhausted as u64)])
    );
    let records = json_all["records"].as_array().expect("records");
    assert_eq!(records.len(), want);
    for r in records {
        let user = r["headers"]["dlq.user_id"].as_str().expect("user id");
        assert!(ok_users.iter().chain(&cut_users).any(|u| u == user), "{r}");
        assert_eq!(r["value"]["user_id"], user, "{r}");
        let credeau = if user.starts_with("smsok-") {
            "complete"
        } else {
            "failed"
        };
        assert_eq!(r["value"]["credeau"], credeau, "{r}");
    }
    let _ = sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_inspect_escapes_control_characters_and_shows_utf8_as_text() {
    // Poison the service dead-letters as it found it: JSON with raw control
    // bytes (a terminal escape sequence among them) and non-ASCII text, a
    // value that is not UTF-8, and a producer header holding an escape.
    let topics = Topics::new("dlqesc");
    create_topic(&topics.input, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let env = service_env(&topics, &unique("g"), "http://127.0.0.1:9");
    let service = Service::start(&env, &dir.path().join("service.log"));
    let p = producer();
    let json_poison = b"{\"user_id\": \"caf\xc3\xa9\x00\x01\x1b[2J\x1b]0;owned\x07\"}".to_vec();
    let not_utf8 = b"\xff\xfecaf\xc3\xa9 \x1b[31m".to_vec();
    let headers = vec![("app.trace".to_string(), b"na\xc3\xafve\x1b[5m".to_vec())];
    produce_at(
        &p,
        &topics.input,
        None,
        None,
        Some(b"k1"),
        Some(&json_poison),
        &headers,
    )
    .await;
    produce_at(
        &p,
        &topics.input,
        None,
        None,
        Some(b"k2"),
        Some(&not_utf8),
        &[],
    )
    .await;
    let dlq = read_topic(&topics.dlq, Some(2), Duration::from_secs(60));
    assert_eq!(dlq.len(), 2, "log:\n{}", service.log_text());

    let out = Command::new(env!("CARGO_BIN_EXE_insights-enricher"))
        .args(["dlq", "inspect"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run dlq inspect");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = out.stdout;
    let control: Vec<u8> = raw
        .iter()
        .copied()
        .filter(|b| (*b < 0x20 && *b != b'\n') || *b == 0x7f)
        .collect();
    assert!(
        control.is_empty(),
        "control bytes {control:?} reached the terminal"
    );
    let text = String::from_utf8(raw).expect("inspect prints UTF-8");
    // The value: UTF-8 as text, controls escaped.
    assert!(
        text.contains("{\"user_id\": \"café\\x00\\x01\\x1b[2J\\x1b]0;owned\\x07\"}"),
        "{text}"
    );
    // Bytes that are not UTF-8: each invalid byte as \xNN, the rest as text.
    assert!(text.contains("not UTF-8, invalid bytes as \\xNN"), "{text}");
    assert!(text.contains("\\xff\\xfecafé \\x1b[31m"), "{text}");
    // The service's error messages quote the value as text too.
    assert!(
        text.contains("dlq.error.message: the value is not valid UTF-8 (starts with \"\\xff\\xfecafé \\x1b[31m\")"),
        "{text}"
    );
    assert!(!text.contains("\\xc3\\xa9"), "{text}");
    // A producer's header, kept in the dead letter, shown escaped.
    assert!(text.contains("app.trace: naïve\\x1b[5m"), "{text}");
}
