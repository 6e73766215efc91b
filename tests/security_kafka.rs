//! Kafka over TLS with SASL: a broker of this test's own (scripts/kafka.sh
//! start --sasl-ssl, never the shared test broker) with a generated CA, the
//! service talking to it only through the SASL_SSL listener with
//! SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN end to end, and wrong credentials
//! or an untrusted broker certificate stopping the service at start with a
//! message that names the cause and never the password; at the most
//! verbose log level the password is in no log line, metrics page or dead
//! letter.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use common::{
    leaks, metrics_page, most_verbose_log_env, onboarded_json, repo_root, sim_admin, unique,
    wait_ready, Service, Topics,
};
use insights_enricher::simulator::{self, SimulatorConfig};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

const TIERS: [&str; 4] = ["1s", "2s", "5s", "10s"];

/// A broker with a SASL_SSL listener, stopped when the last test using it
/// lets go.
struct SaslBroker {
    dir: tempfile::TempDir,
    sasl_bootstrap: String,
    ca: PathBuf,
    username: String,
    password: String,
}

impl SaslBroker {
    fn kafka_sh(dir: &Path, cmd: &str, extra: &[&str]) -> std::process::Output {
        Command::new(repo_root().join("scripts/kafka.sh"))
            .arg(cmd)
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/kafka.sh")
    }

    fn start() -> SaslBroker {
        let dir = tempfile::Builder::new()
            .prefix("kafka-sasl-")
            .tempdir()
            .expect("broker dir");
        let out = Self::kafka_sh(dir.path(), "start", &["--sasl-ssl"]);
        assert!(
            out.status.success(),
            "kafka.sh start --sasl-ssl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let read = |name: &str| {
            std::fs::read_to_string(dir.path().join(name))
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .trim()
                .to_string()
        };
        SaslBroker {
            sasl_bootstrap: read("sasl_ssl_bootstrap"),
            ca: dir.path().join("ca.pem"),
            username: read("sasl_username"),
            password: read("sasl_password"),
            dir,
        }
    }

    /// The broker shared by this binary's tests: started by the first
    /// test that asks, stopped when the last holder drops it.
    fn shared() -> Arc<SaslBroker> {
        static SHARED: Mutex<Weak<SaslBroker>> = Mutex::new(Weak::new());
        let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = slot.upgrade() {
            return b;
        }
        let b = Arc::new(SaslBroker::start());
        *slot = Arc::downgrade(&b);
        b
    }

    /// librdkafka settings of a test client on the SASL_SSL listener.
    fn client(&self, mechanism: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.sasl_bootstrap)
            .set("security.protocol", "sasl_ssl")
            .set("sasl.mechanism", mechanism)
            .set("sasl.username", &self.username)
            .set("sasl.password", &self.password)
            .set("ssl.ca.location", self.ca.display().to_string());
        c
    }

    /// Service settings for the SASL_SSL listener, password from a file
    /// the way a Kubernetes secret mount provides it.
    fn service_security_env(&self, mechanism: &str) -> Vec<(String, String)> {
        let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
        vec![
            kv("INSIGHTS__KAFKA__BOOTSTRAP_SERVERS", &self.sasl_bootstrap),
            kv("INSIGHTS__KAFKA__SECURITY_PROTOCOL", "sasl_ssl"),
            kv("INSIGHTS__KAFKA__SASL_MECHANISM", mechanism),
            kv("INSIGHTS__KAFKA__SASL_USERNAME", &self.username),
            kv(
                "INSIGHTS__KAFKA__SASL_PASSWORD_FILE",
                &self.dir.path().join("sasl_password").display().to_string(),
            ),
            kv(
                "INSIGHTS__KAFKA__SSL_CA_LOCATION",
                &self.ca.display().to_string(),
            ),
        ]
    }
}

impl Drop for SaslBroker {
    fn drop(&mut self) {
        let _ = Self::kafka_sh(self.dir.path(), "stop", &[]);
    }
}

/// Fast test settings (as tests/common's `service_env`, which targets the
/// shared plaintext broker) for the simulator at `sim_url`.
fn fast_env(topics: &Topics, group: &str, sim_url: &str) -> Vec<(String, String)> {
    let mut env = topics.env();
    let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
    env.extend([
        kv("INSIGHTS__KAFKA__GROUP_ID", group),
        kv("INSIGHTS__KAFKA__TRANSACTIONAL_ID_PREFIX", &unique("tx")),
        kv("INSIGHTS__KAFKA__SESSION_TIMEOUT", "6s"),
        kv("INSIGHTS__KAFKA__MAX_POLL_INTERVAL", "15s"),
        kv("INSIGHTS__SCHEDULE__RECORD_BUDGET", "5s"),
        kv("INSIGHTS__TOPICS__CREATE", "true"),
        kv("INSIGHTS__TOPICS__PARTITIONS", "2"),
        kv("INSIGHTS__SCHEDULE__DELAY_TIERS", &TIERS.join(",")),
        kv("INSIGHTS__SCHEDULE__BATCH_LINGER", "50ms"),
        kv("INSIGHTS__FINBOX__BASE_URL", sim_url),
        kv("INSIGHTS__FINBOX__API_KEY", "sim-finbox-key"),
        kv("INSIGHTS__FINBOX__SERVER_HASH", "sim-server-hash"),
        kv("INSIGHTS__FINBOX__INITIAL_DELAY", "0s"),
        kv("INSIGHTS__FINBOX__DEADLINE", "60s"),
        kv("INSIGHTS__FINBOX__RETRY_DELAYS", "100ms,200ms"),
        kv("INSIGHTS__CREDEAU__BASE_URL", sim_url),
        kv("INSIGHTS__CREDEAU__CLIENT_ID", "sim-client"),
        kv("INSIGHTS__CREDEAU__AUTH_TOKEN", "sim-token"),
        kv("INSIGHTS__CREDEAU__INITIAL_DELAY", "0s"),
        kv("INSIGHTS__CREDEAU__POLL_INTERVAL", "2s"),
        kv("INSIGHTS__CREDEAU__DEADLINE", "60s"),
        kv("INSIGHTS__SERVER__LISTEN", "127.0.0.1:0"),
        kv("INSIGHTS__SHUTDOWN__TIMEOUT", "10s"),
        kv("INSIGHTS__LOG__LEVEL", "info"),
    ]);
    env
}

/// Creates every topic of the pipeline over SASL_SSL and waits until the
/// broker's metadata lists them all. The service creates missing topics
/// itself (and does so here too, finding them present); creating them first
/// keeps its start-up check from racing the metadata propagation of topics
/// created a moment earlier.
async fn create_topics(broker: &SaslBroker, mechanism: &str, topics: &Topics) {
    let names: Vec<String> = [
        &topics.input,
        &topics.finbox,
        &topics.sms,
        &topics.combined,
        &topics.dlq,
    ]
    .into_iter()
    .cloned()
    .chain(TIERS.iter().map(|t| format!("{}.{t}", topics.delay_prefix)))
    .collect();
    let admin: AdminClient<DefaultClientContext> =
        broker.client(mechanism).create().expect("admin client");
    let new: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, 2, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .expect("create topics over SASL_SSL");
    for r in results {
        r.unwrap_or_else(|(n, code)| panic!("create {n}: {code}"));
    }
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let md = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(5))
            .expect("metadata");
        let known: HashSet<&str> = md.topics().iter().map(|t| t.name()).collect();
        if names.iter().all(|n| known.contains(n.as_str())) {
            return;
        }
        assert!(Instant::now() < end, "topics never showed in metadata");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One committed record as read back over SASL_SSL.
struct Committed {
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    headers: Vec<(String, String)>,
}

/// Every committed value of `topic`, as JSON (see [`read_committed_records`]).
fn read_committed(
    broker: &SaslBroker,
    mechanism: &str,
    topic: &str,
    expect: usize,
    timeout: Duration,
) -> Vec<serde_json::Value> {
    read_committed_records(broker, mechanism, topic, expect, timeout)
        .iter()
        .map(|r| serde_json::from_slice(&r.value).expect("JSON output"))
        .collect()
}

/// Every committed record of `topic` (read_committed, all partitions from
/// the beginning), waiting until `expect` arrived or `timeout` passed.
fn read_committed_records(
    broker: &SaslBroker,
    mechanism: &str,
    topic: &str,
    expect: usize,
    timeout: Duration,
) -> Vec<Committed> {
    let consumer: BaseConsumer = broker
        .client(mechanism)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("reader");
    let end = Instant::now() + timeout;
    let md = loop {
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(md)
                if md
                    .topics()
                    .first()
                    .is_some_and(|t| !t.partitions().is_empty()) =>
            {
                break md
            }
            _ if Instant::now() > end => panic!("topic {topic} never appeared"),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut records = Vec::new();
    while records.len() < expect && Instant::now() < end {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| {
                                let v = h.value.unwrap_or_default();
                                (h.key.to_string(), String::from_utf8_lossy(v).into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                records.push(Committed {
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
            Some(Err(e)) => panic!("read {topic}: {e}"),
            None => {}
        }
    }
    records
}

/// Produces `n` onboarding events over SASL_SSL for new users named
/// `<prefix><i>-...` (event id `ev-<user>`); returns the user ids.
async fn produce_users_over_sasl(
    producer: &FutureProducer,
    topic: &str,
    prefix: &str,
    n: usize,
) -> Vec<String> {
    let mut users = Vec::new();
    for i in 0..n {
        let user = format!("{prefix}{i}-{}", unique("u"));
        let value = onboarded_json(&format!("ev-{user}"), &user);
        producer
            .send(
                FutureRecord::to(topic).key(user.as_bytes()).payload(&value),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produce over SASL_SSL");
        users.push(user);
    }
    users
}

/// Runs the service through the SASL_SSL listener with `mechanism` for
/// `users` onboarded users and checks each gets exactly one complete
/// combined event (and its per-provider events).
async fn end_to_end(mechanism: &str, users: usize) {
    let broker = SaslBroker::shared();
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    let topics = Topics::new(&format!("sasl-{}", mechanism.to_lowercase()));
    create_topics(&broker, mechanism, &topics).await;

    let mut env = fast_env(&topics, &unique("g"), &sim.base_url());
    env.extend(broker.service_security_env(mechanism));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut service = Service::start(&env, &dir.path().join("service.log"));

    let producer: FutureProducer = broker
        .client(mechanism)
        .create()
        .expect("producer over SASL_SSL");
    let events: HashSet<String> = produce_users_over_sasl(&producer, &topics.input, "sasl-", users)
        .await
        .iter()
        .map(|u| format!("ev-{u}"))
        .collect();

    let combined = read_committed(
        &broker,
        mechanism,
        &topics.combined,
        users,
        Duration::from_secs(90),
    );
    assert_eq!(
        combined.len(),
        users,
        "{mechanism}: combined events; service log:\n{}",
        service.log_text()
    );
    let mut seen = HashSet::new();
    for v in &combined {
        let ev = v["event_id"].as_str().expect("event_id").to_string();
        assert!(events.contains(&ev), "unexpected event {ev}");
        assert!(seen.insert(ev.clone()), "duplicate combined event {ev}");
        assert_eq!(v["finbox"]["outcome"], "complete", "{v}");
        assert_eq!(v["credeau"]["outcome"], "complete", "{v}");
    }
    let sms = read_committed(
        &broker,
        mechanism,
        &topics.sms,
        users,
        Duration::from_secs(10),
    );
    assert_eq!(sms.len(), users, "{mechanism}: sms events");
    let finbox = read_committed(
        &broker,
        mechanism,
        &topics.finbox,
        users,
        Duration::from_secs(10),
    );
    assert_eq!(finbox.len(), users, "{mechanism}: finbox events");

    let log = service.log_text();
    assert!(!log.contains(&broker.password), "SASL password in the log");
    assert!(
        service.terminate(Duration::from_secs(20)).is_some(),
        "service did not stop on SIGTERM"
    );
    let _ = sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_runs_end_to_end_over_sasl_ssl_with_scram_sha_512() {
    end_to_end("SCRAM-SHA-512", 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_runs_end_to_end_over_sasl_ssl_with_scram_sha_256_and_plain() {
    end_to_end("SCRAM-SHA-256", 2).await;
    end_to_end("PLAIN", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_password_never_reaches_logs_metrics_or_dead_letters_at_the_most_verbose_level() {
    // The service at trace with librdkafka's debug=all, through the SASL_SSL
    // listener only: once with SCRAM-SHA-512 and the password from a file,
    // once with PLAIN (the password itself on the wire, inside TLS) and the
    // password from the environment. Credeau rejects our token, so every
    // user is dead-lettered for Credeau, and a poison input record is too.
    let broker = SaslBroker::shared();
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    sim_admin(
        &sim.base_url(),
        "/admin/credentials",
        &serde_json::json!({"credeau_auth_token": "rotated"}),
    )
    .await;
    let needles = [("SASL password".to_string(), broker.password.clone())];
    let dir = tempfile::tempdir().expect("tempdir");
    let mut found = Vec::new();
    for (mechanism, password_in_env) in [("SCRAM-SHA-512", false), ("PLAIN", true)] {
        let topics = Topics::new(&format!("sasl-hyg-{}", mechanism.to_lowercase()));
        create_topics(&broker, mechanism, &topics).await;
        let mut env = fast_env(&topics, &unique("g"), &sim.base_url());
        env.extend(broker.service_security_env(mechanism));
        if password_in_env {
            env.retain(|(k, _)| k != "INSIGHTS__KAFKA__SASL_PASSWORD_FILE");
            env.push((
                "INSIGHTS__KAFKA__SASL_PASSWORD".into(),
                broker.password.clone(),
            ));
        }
        env.extend(most_verbose_log_env());
        env.push(("INSIGHTS__LOG__FORMAT".into(), "json".into()));
        let log_path = dir.path().join(format!("{mechanism}.log"));
        let mut service = Service::start(&env, &log_path);
        wait_ready(&service).await;

        let producer: FutureProducer = broker
            .client(mechanism)
            .create()
            .expect("producer over SASL_SSL");
        let users = produce_users_over_sasl(&producer, &topics.input, "sasl-hyg-", 2).await;
        producer
            .send(
                FutureRecord::to(&topics.input)
                    .key("sasl-hyg-poison")
                    .payload("{\"user_id\": \"sasl-hyg-poison\", \"oops\""),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produce over SASL_SSL");

        let combined = read_committed(
            &broker,
            mechanism,
            &topics.combined,
            users.len(),
            Duration::from_secs(90),
        );
        assert_eq!(
            combined.len(),
            users.len(),
            "{mechanism}: combined events; log:\n{}",
            service.log_text()
        );
        for v in &combined {
            assert_eq!(v["finbox"]["outcome"], "complete", "{v}");
            assert_eq!(v["credeau"]["error_kind"], "unauthorized", "{v}");
        }
        let want_dlq = users.len() + 1;
        let dlq = read_committed_records(
            &broker,
            mechanism,
            &topics.dlq,
            want_dlq,
            Duration::from_secs(30),
        );
        assert_eq!(dlq.len(), want_dlq, "{mechanism}: dead letters");
        let stages: std::collections::BTreeSet<&str> = dlq
            .iter()
            .flat_map(|r| &r.headers)
            .filter(|(k, _)| k == "dlq.stage")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(
            stages,
            ["decode", "poll_credeau"].into_iter().collect(),
            "{mechanism}: dead-letter stages"
        );
        let metrics = metrics_page(&service.log_text()).await;
        assert!(metrics.contains("insights_"), "not the metrics page");
        assert!(
            service.terminate(Duration::from_secs(20)).is_some(),
            "{mechanism}: service did not stop on SIGTERM"
        );
        let log = service.log_text();

        // The log really is the most verbose one, and librdkafka's debug
        // output covers the SASL handshake.
        assert!(log.lines().count() > 200, "{mechanism}: short log");
        assert!(
            log.contains("\"level\":\"TRACE\""),
            "{mechanism}: no trace lines"
        );
        assert!(
            log.lines()
                .any(|l| l.contains("\"target\":\"librdkafka\"") && l.contains("SASL")),
            "{mechanism}: librdkafka's SASL debug output is not in the log"
        );

        for (i, line) in log.lines().enumerate() {
            found.extend(leaks(
                &format!("{mechanism} log line {}", i + 1),
                line,
                &needles,
            ));
        }
        found.extend(leaks(&format!("{mechanism} /metrics"), &metrics, &needles));
        for (n, r) in dlq.iter().enumerate() {
            for (k, v) in &r.headers {
                found.extend(leaks(
                    &format!("{mechanism} dead letter {n} header {k}"),
                    &format!("{k}={v}"),
                    &needles,
                ));
            }
            let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default());
            let value = String::from_utf8_lossy(&r.value);
            found.extend(leaks(
                &format!("{mechanism} dead letter {n} key/value"),
                &format!("{key} {value}"),
                &needles,
            ));
        }
    }
    assert!(found.is_empty(), "leaks:\n{}", found.join("\n"));
    let _ = sim.shutdown().await;
}

/// Starts the service against the SASL_SSL listener with `overrides` and
/// returns (exit status, seconds taken, everything it wrote).
fn failed_start(
    broker: &SaslBroker,
    overrides: &[(&str, &str)],
) -> (std::process::ExitStatus, Duration, String) {
    let topics = Topics::new("sasl-fail");
    let mut env = fast_env(&topics, &unique("g"), "http://127.0.0.1:9");
    env.extend(broker.service_security_env("SCRAM-SHA-512"));
    env.retain(|(k, _)| overrides.iter().all(|(o, _)| o != k));
    env.extend(
        overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut service = Service::start(&env, &dir.path().join("service.log"));
    let started = Instant::now();
    let bound = Duration::from_secs(45);
    let status = loop {
        if let Some(status) = service.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < bound,
            "service still running after {bound:?}; log:\n{}",
            service.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, started.elapsed(), service.log_text())
}

#[test]
fn wrong_sasl_password_stops_the_service_at_start_naming_sasl_authentication() {
    let broker = SaslBroker::shared();
    let wrong = "Wr0ngPassw0rd-7c1f9d";
    for mechanism in ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] {
        let (status, took, log) = failed_start(
            &broker,
            &[
                ("INSIGHTS__KAFKA__SASL_MECHANISM", mechanism),
                ("INSIGHTS__KAFKA__SASL_PASSWORD_FILE", ""),
                ("INSIGHTS__KAFKA__SASL_PASSWORD", wrong),
            ],
        );
        assert!(!status.success(), "{mechanism}: exit status {status}");
        assert!(took < Duration::from_secs(20), "{mechanism}: took {took:?}");
        assert!(
            log.contains("SASL authentication failed"),
            "{mechanism}: message does not name SASL authentication:\n{log}"
        );
        assert!(
            log.contains("kafka.sasl_password"),
            "{mechanism}: message does not name the key:\n{log}"
        );
        assert!(!log.contains(wrong), "{mechanism}: password in the output");
        assert!(
            !log.contains(&broker.password),
            "{mechanism}: real password in the output"
        );
    }
}

#[test]
fn untrusted_broker_certificate_stops_the_service_at_start_naming_tls() {
    let broker = SaslBroker::shared();
    // A CA bundle that exists but did not sign the broker's certificate.
    let other_ca =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_path = dir.path().join("other-ca.pem");
    std::fs::write(&ca_path, other_ca.cert.pem()).expect("write CA");
    let (status, took, log) = failed_start(
        &broker,
        &[(
            "INSIGHTS__KAFKA__SSL_CA_LOCATION",
            ca_path.to_str().expect("utf-8 path"),
        )],
    );
    assert!(!status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(
        log.contains("TLS handshake failed") && log.contains("certificate verify failed"),
        "message does not name the TLS failure:\n{log}"
    );
    assert!(!log.contains(&broker.password), "password in the output");
}
