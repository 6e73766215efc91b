//! Test harness shared by the Kafka integration tests: the one broker of the
//! test run (started by scripts/test.sh, address in KAFKA_BOOTSTRAP), unique
//! topic and group names per test, the service binary as a child process,
//! and an independent reader (Python's confluent-kafka, read_committed).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

pub fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| {
        panic!(
            "KAFKA_BOOTSTRAP is not set: run the tests with ./scripts/test.sh, or start a broker \
             with `scripts/kafka.sh start --dir /tmp/k` and export KAFKA_BOOTSTRAP"
        )
    })
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// The topic names of one test's pipeline.
#[derive(Debug, Clone)]
pub struct Topics {
    pub prefix: String,
    pub input: String,
    pub finbox: String,
    pub sms: String,
    pub combined: String,
    pub dlq: String,
    pub delay_prefix: String,
}

impl Topics {
    pub fn new(test: &str) -> Topics {
        let p = unique(test);
        Topics {
            input: format!("{p}.onboarded"),
            finbox: format!("{p}.finbox"),
            sms: format!("{p}.sms"),
            combined: format!("{p}.ready"),
            dlq: format!("{p}.dlq"),
            delay_prefix: format!("{p}.delay"),
            prefix: p,
        }
    }

    /// Environment for the service using these topics.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("INSIGHTS__TOPICS__INPUT".into(), self.input.clone()),
            (
                "INSIGHTS__TOPICS__FINBOX_PREDICTORS".into(),
                self.finbox.clone(),
            ),
            ("INSIGHTS__TOPICS__SMS_EXTRACTION".into(), self.sms.clone()),
            ("INSIGHTS__TOPICS__COMBINED".into(), self.combined.clone()),
            ("INSIGHTS__TOPICS__DEAD_LETTER".into(), self.dlq.clone()),
            (
                "INSIGHTS__TOPICS__DELAY_PREFIX".into(),
                self.delay_prefix.clone(),
            ),
        ]
    }
}

pub fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin client")
}

pub async fn create_topic(name: &str, partitions: i32) {
    let t = NewTopic::new(name, partitions, TopicReplication::Fixed(1))
        .set("max.message.bytes", "16777216");
    let r = admin()
        .create_topics([&t], &AdminOptions::new())
        .await
        .expect("create topics");
    for x in r {
        if let Err((n, code)) = x {
            if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                panic!("create {n}: {code}");
            }
        }
    }
}

pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("message.max.bytes", "16777216")
        .set("compression.type", "zstd")
        .create()
        .expect("producer")
}

pub async fn produce(p: &FutureProducer, topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) {
    produce_with_headers(p, topic, key, value, &[]).await
}

pub async fn produce_with_headers(
    p: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[(&str, &str)],
) {
    let headers: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
    produce_at(p, topic, None, None, key, value, &headers).await;
}

/// Produces one record to an explicit partition (else the partitioner's
/// choice) with an explicit timestamp (else now); returns (partition, offset).
pub async fn produce_at(
    p: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    timestamp_ms: Option<i64>,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[(String, Vec<u8>)],
) -> (i32, i64) {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_slice()),
        });
    }
    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(h);
    if let Some(n) = partition {
        rec = rec.partition(n);
    }
    if let Some(ts) = timestamp_ms {
        rec = rec.timestamp(ts);
    }
    if let Some(k) = key {
        rec = rec.key(k);
    }
    if let Some(v) = value {
        rec = rec.payload(v);
    }
    let d = p
        .send(rec, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
    (d.partition, d.offset)
}

/// Produces `n` onboarding events for new users named `<prefix><i>-...`
/// (event id `ev-<user>`, keyed by user); returns the user ids.
pub async fn produce_users(topic: &str, prefix: &str, n: usize) -> Vec<String> {
    let p = producer();
    let mut users = Vec::new();
    for i in 0..n {
        let user = format!("{prefix}{i}-{}", unique("u"));
        produce(
            &p,
            topic,
            Some(user.as_bytes()),
            Some(&onboarded_json(&format!("ev-{user}"), &user)),
        )
        .await;
        users.push(user);
    }
    users
}

/// A JSON onboarding event.
pub fn onboarded_json(event_id: &str, user_id: &str) -> Vec<u8> {
    serde_json::json!({
        "event_id": event_id,
        "user_id": user_id,
        "onboarded_at": chrono::Utc::now().timestamp_millis(),
    })
    .to_string()
    .into_bytes()
}

/// Settings common to service processes in tests: fast polling, small tiers.
pub fn service_env(topics: &Topics, group: &str, sim_url: &str) -> Vec<(String, String)> {
    let mut env = topics.env();
    let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
    env.extend([
        // Services of different tests must never share a transactional.id
        // (they would fence each other); a restarted service of one test
        // must keep its own (so it aborts its predecessor's transaction).
        kv("INSIGHTS__KAFKA__TRANSACTIONAL_ID_PREFIX", &topics.prefix),
        kv("HOSTNAME", "test"),
        kv("INSIGHTS__KAFKA__BOOTSTRAP_SERVERS", &bootstrap()),
        kv("INSIGHTS__KAFKA__GROUP_ID", group),
        kv("INSIGHTS__KAFKA__SESSION_TIMEOUT", "6s"),
        kv("INSIGHTS__KAFKA__MAX_POLL_INTERVAL", "15s"),
        kv("INSIGHTS__SCHEDULE__RECORD_BUDGET", "5s"),
        kv("INSIGHTS__TOPICS__CREATE", "true"),
        kv("INSIGHTS__TOPICS__PARTITIONS", "3"),
        kv("INSIGHTS__SCHEDULE__DELAY_TIERS", "1s,2s,5s,10s"),
        kv("INSIGHTS__SCHEDULE__BATCH_LINGER", "50ms"),
        kv("INSIGHTS__FINBOX__BASE_URL", sim_url),
        kv("INSIGHTS__FINBOX__API_KEY", "sim-finbox-key"),
        kv("INSIGHTS__FINBOX__SERVER_HASH", "sim-server-hash"),
        kv("INSIGHTS__FINBOX__INITIAL_DELAY", "0s"),
        kv("INSIGHTS__FINBOX__POLL_INTERVAL", "10s"),
        kv("INSIGHTS__FINBOX__MAX_POLL_INTERVAL", "10s"),
        kv("INSIGHTS__FINBOX__NOT_FOUND_GRACE", "15s"),
        kv("INSIGHTS__FINBOX__DEADLINE", "25s"),
        kv("INSIGHTS__FINBOX__RETRY_DELAYS", "100ms,200ms"),
        kv("INSIGHTS__FINBOX__RATE_LIMIT_PER_MINUTE", "60000"),
        kv("INSIGHTS__CREDEAU__BASE_URL", sim_url),
        kv("INSIGHTS__CREDEAU__CLIENT_ID", "sim-client"),
        kv("INSIGHTS__CREDEAU__AUTH_TOKEN", "sim-token"),
        kv("INSIGHTS__CREDEAU__INITIAL_DELAY", "0s"),
        kv("INSIGHTS__CREDEAU__POLL_INTERVAL", "2s"),
        kv("INSIGHTS__CREDEAU__MAX_POLL_INTERVAL", "4s"),
        kv("INSIGHTS__CREDEAU__DEADLINE", "20s"),
        kv("INSIGHTS__CREDEAU__RETRY_BASE", "100ms"),
        kv("INSIGHTS__CREDEAU__RETRY_CAP", "400ms"),
        kv("INSIGHTS__CREDEAU__RATE_LIMIT_PER_MINUTE", "60000"),
        kv("INSIGHTS__SERVER__LISTEN", "127.0.0.1:0"),
        kv("INSIGHTS__SHUTDOWN__TIMEOUT", "10s"),
        kv("INSIGHTS__LOG__LEVEL", "info"),
    ]);
    env
}

/// A service process started from the built binary.
pub struct Service {
    pub child: Child,
    pub log: PathBuf,
}

impl Service {
    pub fn start(env: &[(String, String)], log: &Path) -> Service {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_insights-enricher"));
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Service {
            child: cmd.spawn().expect("spawn service"),
            log: log.to_path_buf(),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `bound` for the process to exit on its own; returns its
    /// exit status and how long the wait took.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<(ExitStatus, Duration)> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some((status, started.elapsed()));
            }
            if started.elapsed() >= bound {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then wait up to `bound`; returns how long it took.
    pub fn terminate(&mut self, bound: Duration) -> Option<Duration> {
        let started = Instant::now();
        let pid = self.child.id() as i32;
        // SAFETY-free: `kill` the command, not libc.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        self.wait_exit(bound).map(|_| started.elapsed())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "---- last lines of {} ----\n{}",
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

/// One record as read by the independent reader.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ReadRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    #[serde(default)]
    pub headers: HashMap<String, Option<String>>,
    pub value: serde_json::Value,
}

pub fn python() -> String {
    std::env::var("INSIGHTS_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Reads a whole topic with Python's confluent-kafka (read_committed),
/// waiting until `expect` records are there or `idle` passes with none new.
pub fn read_topic(topic: &str, expect: Option<usize>, idle: Duration) -> Vec<ReadRecord> {
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("tests/python/read_topic.py"))
        .arg("--bootstrap")
        .arg(bootstrap())
        .arg("--topic")
        .arg(topic)
        .arg("--idle")
        .arg(format!("{}", idle.as_secs_f64()));
    if let Some(n) = expect {
        cmd.arg("--expect").arg(n.to_string());
    }
    if let Ok(url) = std::env::var("TEST_SCHEMA_REGISTRY") {
        cmd.arg("--registry").arg(url);
    }
    let out = cmd.output().expect("run read_topic.py");
    assert!(
        out.status.success(),
        "read_topic.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l}: {e}")))
        .collect()
}

/// Polls `f` until it returns Some or `timeout` passes.
pub async fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The metrics/health address a service logged at start (JSON log format).
pub async fn service_addr(service: &Service, timeout: Duration) -> Option<String> {
    eventually(timeout, || {
        service.log_text().lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            if v["message"] == "metrics and health server up" {
                v["listen"].as_str().map(str::to_string)
            } else {
                None
            }
        })
    })
    .await
}

/// The schema registry stand-in (tests/python/registry.py) on a free port.
pub struct Registry {
    child: Child,
    pub url: String,
}

impl Registry {
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let mut child = Command::new(python())
            .arg(repo_root().join("tests/python/registry.py"))
            .args(["--port", "0", "--port-file"])
            .arg(&port_file)
            .stdin(Stdio::null())
            .spawn()
            .expect("start registry");
        for _ in 0..100 {
            if let Ok(p) = std::fs::read_to_string(&port_file) {
                if !p.trim().is_empty() {
                    return Registry {
                        child,
                        url: format!("http://127.0.0.1:{}", p.trim()),
                    };
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("registry did not start");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PUTs a JSON body to one of the simulator's admin endpoints.
pub async fn sim_admin(base_url: &str, path: &str, body: &serde_json::Value) {
    let r = reqwest::Client::new()
        .put(format!("{base_url}{path}"))
        .json(body)
        .send()
        .await
        .expect("simulator admin");
    assert!(r.status().is_success(), "PUT {path}: {}", r.status());
}

/// Registers an Avro schema under `subject` in a registry; returns its id.
pub async fn register_schema(url: &str, subject: &str, schema: &str) -> u32 {
    let r: serde_json::Value = reqwest::Client::new()
        .post(format!("{url}/subjects/{subject}/versions"))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .json(&serde_json::json!({ "schema": schema }))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("register response");
    r["id"].as_u64().expect("id") as u32
}

/// An Avro datum in the Confluent wire format: magic byte 0, the schema id
/// (4 bytes, big-endian), then the datum.
pub fn confluent_wire(id: u32, datum: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(datum);
    v
}

/// The input schema, schemas/user_onboarded.avsc.
pub fn onboarded_schema_text() -> String {
    std::fs::read_to_string(repo_root().join("schemas/user_onboarded.avsc"))
        .expect("schemas/user_onboarded.avsc")
}

/// An Avro onboarding event in the Confluent wire format, written with
/// schemas/user_onboarded.avsc registered as `schema_id`.
pub fn onboarded_avro(
    schema_id: u32,
    event_id: &str,
    user_id: &str,
    onboarded_at: i64,
    finbox_customer_id: Option<&str>,
) -> Vec<u8> {
    use apache_avro::types::Value as Av;
    let schema = apache_avro::Schema::parse_str(&onboarded_schema_text()).expect("schema");
    let optional = |v: Option<&str>| match v {
        Some(s) => Av::Union(1, Box::new(Av::String(s.to_string()))),
        None => Av::Union(0, Box::new(Av::Null)),
    };
    let record = Av::Record(vec![
        ("event_id".into(), Av::String(event_id.into())),
        ("user_id".into(), Av::String(user_id.into())),
        ("onboarded_at".into(), Av::TimestampMillis(onboarded_at)),
        ("finbox_customer_id".into(), optional(finbox_customer_id)),
        ("credeau_user_id".into(), optional(None)),
    ]);
    let datum = apache_avro::to_avro_datum(&schema, record).expect("encode onboarded event");
    confluent_wire(schema_id, &datum)
}

/// The offset `group` has committed on each partition `0..partitions` of
/// `topic` (None where it has committed none).
pub fn committed_offsets(group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(30))
        .expect("committed offsets");
    (0..partitions)
        .map(|p| {
            match committed
                .find_partition(topic, p)
                .expect("partition")
                .offset()
            {
                rdkafka::Offset::Offset(o) => Some(o),
                _ => None,
            }
        })
        .collect()
}

/// Settings for the most verbose logs the service can write: every tracing
/// event (trace) plus librdkafka's debug output for every context.
pub fn most_verbose_log_env() -> Vec<(String, String)> {
    vec![
        ("INSIGHTS__LOG__LEVEL".into(), "trace".into()),
        ("INSIGHTS__KAFKA__EXTRA__DEBUG".into(), "all".into()),
    ]
}

/// Every `(what, needle)` found in `haystack`, named by `place`: how the
/// hygiene tests search logs, metrics and dead letters for secrets.
pub fn leaks(place: &str, haystack: &str, needles: &[(String, String)]) -> Vec<String> {
    needles
        .iter()
        .filter(|(_, n)| haystack.contains(n.as_str()))
        .map(|(what, _)| format!("{what} in {place}"))
        .collect()
}

/// The port of the metrics server, from the line the service logs at start
/// (text or JSON log format).
pub fn metrics_port(log: &str) -> Option<u16> {
    let line = log
        .lines()
        .find(|l| l.contains("metrics and health server up"))?;
    let after = &line[line.rfind("127.0.0.1:")? + "127.0.0.1:".len()..];
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Waits until the service answers /readyz (its topics exist and it has
/// joined its group), so readers never look for a topic not yet created.
pub async fn wait_ready(service: &Service) {
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        if let Some(port) = metrics_port(&service.log_text()) {
            let url = format!("http://127.0.0.1:{port}/readyz");
            if let Ok(r) = reqwest::get(url).await {
                if r.status().is_success() {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("service not ready:\n{}", service.log_text());
}

/// The whole /metrics page of the service that wrote `log`.
pub async fn metrics_page(log: &str) -> String {
    let port = metrics_port(log).expect("metrics port in the log");
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("metrics answers")
        .text()
        .await
        .expect("metrics text")
}

/// The simulator's Credeau answer for `user`, asked for by hand: (status,
/// body text).
pub async fn credeau_answer(
    base_url: &str,
    client_id: &str,
    token: &str,
    user: &str,
) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{base_url}/api/fetch_extracted_data"))
        .header("x-client-id", client_id)
        .header("x-auth-token", token)
        .json(&serde_json::json!({"user_id": user, "client_id": client_id}))
        .send()
        .await
        .expect("simulator answers");
    let status = r.status().as_u16();
    (status, r.text().await.expect("answer text"))
}

/// The SMS bodies (of 20 characters or more, so a hit is never chance) the
/// simulator holds for `user`, asked for directly. Its answers are
/// deterministic per user, so these are the bodies the service received.
pub async fn sms_bodies(base_url: &str, client_id: &str, token: &str, user: &str) -> Vec<String> {
    let (status, text) = credeau_answer(base_url, client_id, token, user).await;
    assert_eq!(status, 200, "SMS of {user}: {text}");
    let answer: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    answer["extracted_sms_data"]
        .as_array()
        .expect("SMS data")
        .iter()
        .filter_map(|e| e["sms_body"].as_str())
        .filter(|b| b.len() >= 20)
        .map(str::to_string)
        .collect()
}
