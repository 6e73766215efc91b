//! Secret hygiene of the operator tools: recognisable secrets are planted
//! in every secret setting (the provider keys and token, the SASL and TLS
//! key passwords, the schema registry's password), and everything the tools
//! print is searched for them: `check-config`, `dlq inspect` (text and
//! JSON) over dead letters that carry a planted value in their headers,
//! `user` (text and JSON), and the Helm chart rendered with the same
//! secrets, where they may appear only inside the Secret. `salt` prints a
//! salt by design and is left out; its server hash must not appear.

mod common;

use std::process::Command;

use base64::Engine as _;
use common::*;

/// Secrets no other test uses, long enough that a hit is never chance.
struct Planted {
    finbox_api_key: String,
    finbox_server_hash: String,
    credeau_token: String,
    sasl_password: String,
    ssl_key_password: String,
    registry_password: String,
}

impl Planted {
    fn new() -> Planted {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Planted {
            finbox_api_key: format!("TOOLSfbkey{id}"),
            finbox_server_hash: format!("TOOLSfbhash{id}"),
            credeau_token: format!("TOOLScrtoken{id}"),
            sasl_password: format!("TOOLSsasl{id}"),
            ssl_key_password: format!("TOOLSsslkey{id}"),
            registry_password: format!("TOOLSregistry{id}"),
        }
    }

    fn all(&self) -> [&str; 6] {
        [
            &self.finbox_api_key,
            &self.finbox_server_hash,
            &self.credeau_token,
            &self.sasl_password,
            &self.ssl_key_password,
            &self.registry_password,
        ]
    }

    /// Every place a secret would show in: as given, and in Base64 (what a
    /// Kubernetes Secret holds).
    fn forms(&self) -> Vec<String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        self.all()
            .iter()
            .flat_map(|s| [s.to_string(), b64.encode(s)])
            .collect()
    }
}

/// The tools' configuration: the test broker and topics, every secret
/// setting set.
fn env(topics: &Topics, p: &Planted) -> Vec<(String, String)> {
    let mut env = topics.env();
    let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
    env.extend([
        kv("INSIGHTS__KAFKA__BOOTSTRAP_SERVERS", &bootstrap()),
        kv("INSIGHTS__KAFKA__SASL_PASSWORD", &p.sasl_password),
        kv("INSIGHTS__KAFKA__SSL_KEY_PASSWORD", &p.ssl_key_password),
        kv("INSIGHTS__FINBOX__API_KEY", &p.finbox_api_key),
        kv("INSIGHTS__FINBOX__SERVER_HASH", &p.finbox_server_hash),
        kv("INSIGHTS__CREDEAU__CLIENT_ID", "tools-client"),
        kv("INSIGHTS__CREDEAU__AUTH_TOKEN", &p.credeau_token),
        kv("INSIGHTS__ENCODING__SCHEMA_REGISTRY_USERNAME", "tools-user"),
        kv(
            "INSIGHTS__ENCODING__SCHEMA_REGISTRY_PASSWORD",
            &p.registry_password,
        ),
        kv("INSIGHTS__LOG__LEVEL", "trace"),
    ]);
    env
}

/// Runs the binary with `args`; returns its stdout and stderr, after
/// checking that neither holds a planted secret in any form.
fn tool(env: &[(String, String)], p: &Planted, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_insights-enricher"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run the binary");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for secret in p.forms() {
        assert!(
            !text.contains(&secret),
            "`{}` printed a planted secret:\n{text}",
            args.join(" ")
        );
    }
    (out.status.success(), text)
}

#[tokio::test]
async fn no_tool_prints_a_secret_from_any_secret_setting() {
    let p = Planted::new();
    let topics = Topics::new("toolsecrets");
    let tiers = [
        format!("{}.1s", topics.delay_prefix),
        format!("{}.5s", topics.delay_prefix),
    ];
    for t in [
        &topics.input,
        &topics.finbox,
        &topics.sms,
        &topics.combined,
        &topics.dlq,
    ]
    .into_iter()
    .chain(&tiers)
    {
        create_topic(t, 1).await;
    }
    let mut env = env(&topics, &p);
    env.push(("INSIGHTS__SCHEDULE__DELAY_TIERS".into(), "1s,5s".into()));

    // check-config: every secret setting shown redacted, none in clear.
    let (ok, text) = tool(&env, &p, &["check-config"]);
    assert!(ok, "check-config failed:\n{text}");
    assert!(text.contains("<redacted>"), "{text}");
    for key in [
        "api_key",
        "server_hash",
        "auth_token",
        "sasl_password",
        "ssl_key_password",
        "schema_registry_password",
    ] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(key) && l.contains("<redacted>")),
            "{key} is not shown redacted:\n{text}"
        );
    }

    // Dead letters whose headers and value carry what a careless producer
    // could put there: the tools show them, but a planted secret never
    // comes from the configuration.
    let producer = producer();
    produce_with_headers(
        &producer,
        &topics.dlq,
        Some(b"tools-user-1"),
        Some(b"{\"user_id\":\"tools-user-1\"}"),
        &[
            ("dlq.stage", "decode"),
            ("dlq.error.class", "malformed_json"),
            ("dlq.error.message", "the value is not valid JSON"),
            ("dlq.original.topic", &topics.input),
            ("dlq.user_id", "tools-user-1"),
            ("dlq.replay.target", "input"),
        ],
    )
    .await;
    let (ok, text) = tool(&env, &p, &["dlq", "inspect"]);
    assert!(ok, "dlq inspect failed:\n{text}");
    assert!(text.contains("malformed_json"), "{text}");
    let (ok, text) = tool(&env, &p, &["dlq", "inspect", "--json"]);
    assert!(ok, "dlq inspect --json failed:\n{text}");
    assert!(text.contains("tools-user-1"), "{text}");

    // user: one found in the dead letters, one never seen.
    let (ok, text) = tool(&env, &p, &["user", "tools-user-1"]);
    assert!(ok, "user failed:\n{text}");
    let (ok, text) = tool(&env, &p, &["user", "never-seen-user", "--json"]);
    assert!(ok, "user --json failed:\n{text}");

    // salt prints the salt (that is its job), never the server hash.
    let (ok, text) = tool(&env, &p, &["salt", "--customer-id", "tools-user-1"]);
    assert!(ok, "salt failed:\n{text}");
    assert!(text.trim().len() >= 40, "{text}");
}

#[test]
fn the_rendered_chart_holds_every_secret_only_in_its_secret() {
    let Ok(helm) = std::env::var("HELM") else {
        panic!("HELM is not set: run the tests with ./scripts/test.sh (it installs helm)");
    };
    let p = Planted::new();
    let root = repo_root();
    let out = Command::new(&helm)
        .arg("template")
        .arg("t")
        .arg(root.join("helm/insights-enricher"))
        .args([
            "-f",
            &root.join("tests/helm/minimal.yaml").to_string_lossy(),
        ])
        .args([
            "--set",
            &format!("secrets.finboxApiKey={}", p.finbox_api_key),
            "--set",
            &format!("secrets.finboxServerHash={}", p.finbox_server_hash),
            "--set",
            &format!("secrets.credeauAuthToken={}", p.credeau_token),
            "--set",
            "config.kafka.security_protocol=sasl_ssl",
            "--set",
            "config.kafka.sasl_mechanism=SCRAM-SHA-512",
            "--set",
            "config.kafka.sasl_username=svc",
            "--set",
            &format!("secrets.kafkaSaslPassword={}", p.sasl_password),
            "--set",
            "config.encoding.schema_registry_username=tools-user",
            "--set",
            &format!("secrets.schemaRegistryPassword={}", p.registry_password),
        ])
        .output()
        .expect("run helm");
    let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut in_secret = 0;
    for doc in rendered.split("\n---") {
        let is_secret = doc.lines().any(|l| l.trim() == "kind: Secret");
        for secret in [
            &p.finbox_api_key,
            &p.finbox_server_hash,
            &p.credeau_token,
            &p.sasl_password,
            &p.registry_password,
        ] {
            let encoded = b64.encode(secret);
            let found = doc.contains(secret.as_str()) || doc.contains(&encoded);
            if is_secret {
                in_secret += usize::from(found);
            } else {
                assert!(!found, "a planted secret outside the Secret:\n{doc}");
            }
        }
    }
    assert_eq!(
        in_secret, 5,
        "every secret lands in the Secret:\n{rendered}"
    );
}
