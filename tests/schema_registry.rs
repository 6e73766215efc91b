//! Against the run's real schema registry (Apicurio Registry's Confluent
//! API, TEST_SCHEMA_REGISTRY): the schema-compatibility gate (every
//! released version of each schema registered in order, then the current
//! one, under the registry's BACKWARD default; an incompatible edit
//! refused), and the service's start-up with Avro output: it waits for a
//! registry that does not answer yet, naming it without credentials; and it
//! stops on an incompatible schema with the registry's whole message,
//! having registered nothing.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use insights_enricher::events::avro::EventSchema;
use insights_enricher::events::registry::Compatibility;
use insights_enricher::events::RegistryClient;
use insights_enricher::simulator::{self, SimulatorConfig};

fn released(schema: EventSchema) -> Vec<PathBuf> {
    let dir = repo_root()
        .join("schemas/released")
        .join(schema.file_stem());
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "avsc"))
        .collect();
    out.sort();
    out
}

fn compact(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .unwrap()
        .to_string()
}

async fn versions(url: &str, subject: &str) -> reqwest::StatusCode {
    reqwest::get(format!("{url}/subjects/{subject}/versions"))
        .await
        .expect("registry answers")
        .status()
}

#[tokio::test]
async fn every_released_version_then_the_current_schema_registers_and_an_incompatible_edit_is_refused(
) {
    let registry = Registry::start();
    let client = RegistryClient::new(&registry.url).unwrap();
    for schema in EventSchema::ALL {
        let subject = format!("{}-value", unique(&format!("gate-{}", schema.file_stem())));
        for path in released(schema) {
            let text = compact(&std::fs::read_to_string(&path).unwrap());
            assert_eq!(
                client.check_compatibility(&subject, &text).await.unwrap(),
                Compatibility::Compatible,
                "{}",
                path.display()
            );
            client
                .register(&subject, &text)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        let current = compact(schema.text());
        assert_eq!(
            client
                .check_compatibility(&subject, &current)
                .await
                .unwrap(),
            Compatibility::Compatible,
            "the current {} against its released versions",
            schema.file_stem()
        );
        client.register(&subject, &current).await.unwrap();

        // A new field without a default cannot read the older data.
        let mut broken: serde_json::Value = serde_json::from_str(schema.text()).unwrap();
        broken["fields"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": "added_without_default", "type": "string"}));
        let broken = broken.to_string();
        assert!(
            matches!(
                client.check_compatibility(&subject, &broken).await.unwrap(),
                Compatibility::Incompatible(_)
            ),
            "{}: a field without a default passed",
            schema.file_stem()
        );
        let refused = client.register(&subject, &broken).await.unwrap_err();
        assert!(refused.to_string().contains("409"), "{refused}");
    }
}

/// A TCP port nothing listens on yet, and a forwarder from it to the real
/// registry that starts listening after `after`.
async fn registry_that_comes_up_after(after: Duration) -> (u16, tokio::task::JoinHandle<()>) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let target = url::Url::parse(&Registry::start().url).unwrap();
    let target = format!(
        "127.0.0.1:{}",
        target.port().expect("the registry URL names its port")
    );
    let task = tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the forwarder");
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_waits_for_a_registry_that_is_not_up_yet_and_names_it_without_credentials() {
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    let (port, forwarder) = registry_that_comes_up_after(Duration::from_secs(6)).await;
    let path = url::Url::parse(&Registry::start().url)
        .unwrap()
        .path()
        .to_string();
    let topics = Topics::new("regwait");
    create_topic(&topics.input, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = service_env(&topics, &unique("g"), &sim.base_url());
    env.extend([
        ("INSIGHTS__ENCODING__OUTPUT".into(), "avro".into()),
        (
            "INSIGHTS__ENCODING__SCHEMA_REGISTRY_URL".into(),
            format!("http://127.0.0.1:{port}{path}"),
        ),
        (
            "INSIGHTS__ENCODING__SCHEMA_REGISTRY_USERNAME".into(),
            "svc-user".into(),
        ),
        (
            "INSIGHTS__ENCODING__SCHEMA_REGISTRY_PASSWORD".into(),
            "s3cret-pw".into(),
        ),
    ]);
    let service = Service::start(&env, &dir.path().join("service.log"));
    wait_ready(&service).await;
    let log = service.log_text();
    let named = format!("http://127.0.0.1:{port}{path}");
    assert!(
        log.contains("schema registry not answering") && log.contains(&named),
        "no retry naming {named}:\n{}",
        service.log_excerpt(40)
    );
    assert!(!log.contains("s3cret-pw"), "{log}");
    let registry = Registry::start();
    for topic in [&topics.finbox, &topics.sms, &topics.combined] {
        assert!(
            versions(&registry.url, &format!("{topic}-value"))
                .await
                .is_success(),
            "{topic}-value not registered"
        );
    }
    drop(service);
    forwarder.abort();
    let _ = sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_schema_stops_start_up_with_the_whole_message_and_nothing_registered() {
    let registry = Registry::start();
    let sim = simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    let topics = Topics::new("regincompat");
    create_topic(&topics.input, 1).await;
    // What an older, unrelated producer left under the combined subject:
    // the current schema's fields have no defaults to read its data with.
    let combined_subject = format!("{}-value", topics.combined);
    register_schema(
        &registry.url,
        &combined_subject,
        r#"{"type":"record","name":"InsightsReady","namespace":"com.insightsenricher.events","fields":[{"name":"legacy_id","type":"string"}]}"#,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = service_env(&topics, &unique("g"), &sim.base_url());
    env.extend([
        ("INSIGHTS__ENCODING__OUTPUT".into(), "avro".into()),
        (
            "INSIGHTS__ENCODING__SCHEMA_REGISTRY_URL".into(),
            registry.url.clone(),
        ),
    ]);
    let mut service = Service::start(&env, &dir.path().join("service.log"));
    let (status, _) = service
        .wait_exit(Duration::from_secs(90))
        .unwrap_or_else(|| panic!("still running:\n{}", service.log_excerpt(40)));
    assert!(!status.success());
    let log = service.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("refuses the output schemas as incompatible"))
        .unwrap_or_else(|| panic!("no incompatibility message:\n{log}"));
    assert!(line.contains(&combined_subject), "{line}");
    // The registry's refusal, which lists every difference, is quoted to
    // its end: longer than the 200 characters it used to be cut at.
    let message = &line[line.find("HTTP 409: ").expect("the registry's answer") + 10..];
    assert!(
        message.len() > 200,
        "a short message proves nothing: {line}"
    );
    let list = &message[message.find("list of diff types: [").expect("the list")..];
    assert!(list.trim_end().ends_with(']'), "message cut: {line}");
    for field in ["event_id", "user_id", "completed_at", "finbox", "credeau"] {
        assert!(list.contains(field), "{field} missing from {line}");
    }
    for topic in [&topics.finbox, &topics.sms] {
        assert_eq!(
            versions(&registry.url, &format!("{topic}-value")).await,
            reqwest::StatusCode::NOT_FOUND,
            "{topic}-value was registered before the incompatibility was found"
        );
    }
    let _ = sim.shutdown().await;
}
