//! The schema registry in tests. `Registry` is the run's real one (Apicurio
//! Registry's Confluent API, started by scripts/test.sh with
//! scripts/registry.sh, its URL in TEST_SCHEMA_REGISTRY), shared by every
//! test: subjects are named after each test's own unique topics.
//! `FakeRegistry` is an in-process fake of the subset of Confluent's REST
//! API the service's client uses (schemas by id, registering under a
//! subject), kept only for the faults the real registry cannot produce at
//! a test's command: an outage that starts and ends mid-test without
//! disturbing the other tests, counted reads (the client's cache), and
//! writer schemas at fixed, dense ids for the fuzzer. Plus Avro onboarding
//! events in the Confluent wire format.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::repo_root;

/// An in-process schema registry on a free port. Ids start at 1, as in
/// Confluent's registry, and the same schema text always gets the same id.
#[derive(Default)]
pub struct FakeRegistry {
    pub schemas: Mutex<Vec<String>>,
    pub subjects: Mutex<HashMap<String, Vec<u32>>>,
    /// While set, every read answers 503 (a registry outage).
    pub down: AtomicBool,
    /// Reads of a schema by id so far.
    pub gets: AtomicUsize,
}

impl FakeRegistry {
    /// Adds a schema (no subject); returns its id.
    pub fn add(&self, schema: &str) -> u32 {
        let mut s = self.schemas.lock().unwrap();
        if let Some(i) = s.iter().position(|x| x == schema) {
            return i as u32 + 1;
        }
        s.push(schema.to_string());
        s.len() as u32
    }

    fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/schemas/ids/{id}", get(get_schema))
            .route("/subjects/{subject}/versions", post(register))
            .with_state(Arc::clone(self))
    }

    /// Serves it on the current tokio runtime; returns its base URL.
    pub async fn serve(self: &Arc<Self>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind registry fake");
        let addr = listener.local_addr().expect("registry fake address");
        let app = self.router();
        tokio::spawn(async move { axum::serve(listener, app).await.expect("registry fake") });
        format!("http://{addr}")
    }

    /// Serves it from a thread with its own runtime, for tests that run no
    /// runtime of their own (property tests); returns its base URL.
    pub fn serve_on_own_thread(self: &Arc<Self>) -> String {
        let (tx, rx) = std::sync::mpsc::channel();
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                tx.send(me.serve().await).expect("send url");
                std::future::pending::<()>().await
            })
        });
        rx.recv().expect("registry fake url")
    }
}

async fn get_schema(
    State(r): State<Arc<FakeRegistry>>,
    Path(id): Path<u32>,
) -> (StatusCode, Json<Value>) {
    r.gets.fetch_add(1, Ordering::SeqCst);
    if r.down.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error_code": 50003, "message": "store unavailable"})),
        );
    }
    let schemas = r.schemas.lock().unwrap();
    match id.checked_sub(1).and_then(|i| schemas.get(i as usize)) {
        Some(s) => (StatusCode::OK, Json(json!({ "schema": s }))),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error_code": 40403, "message": "Schema not found"})),
        ),
    }
}

async fn register(
    State(r): State<Arc<FakeRegistry>>,
    Path(subject): Path<String>,
    body: String,
) -> (StatusCode, Json<Value>) {
    let body: Value = serde_json::from_str(&body).unwrap();
    let schema = body["schema"].as_str().unwrap();
    if apache_avro::Schema::parse_str(schema).is_err() {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error_code": 42201, "message": "Invalid schema"})),
        );
    }
    let id = r.add(schema);
    r.subjects
        .lock()
        .unwrap()
        .entry(subject)
        .or_default()
        .push(id);
    (StatusCode::OK, Json(json!({ "id": id })))
}

/// The run's schema registry (TEST_SCHEMA_REGISTRY).
pub struct Registry {
    pub url: String,
}

impl Registry {
    pub fn start() -> Registry {
        let url = std::env::var("TEST_SCHEMA_REGISTRY").unwrap_or_else(|_| {
            panic!(
                "TEST_SCHEMA_REGISTRY is not set: run the tests with ./scripts/test.sh, or start \
                 a registry with `scripts/registry.sh start --dir /tmp/r` and export its URL"
            )
        });
        Registry { url }
    }
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
