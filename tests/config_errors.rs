//! Invalid configuration, through the real binary: `check-config` and `run`
//! each exit non-zero at once with a message that names the offending key,
//! and never echo a secret value (the secrets in every case are distinctive
//! and searched for in everything the process wrote).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const API_KEY: &str = "CFGSECRETapikey5b1e";
const SERVER_HASH: &str = "CFGSECREThash77a0";
const TOKEN: &str = "CFGSECRETtoken0c3d";
const SASL_PASSWORD: &str = "CFGSECRETsasl9f12";
const FILE_SECRET: &str = "CFGSECRETinfile4e6a";
const REGISTRY_PASSWORD: &str = "CFGSECRETregistry3a7f";
/// An API key pasted into a key that wants something else.
const MISPLACED: &str = "CFGSECRETmisplaced_sk_live_8d2c";

fn secrets() -> [&'static str; 7] {
    [
        API_KEY,
        SERVER_HASH,
        TOKEN,
        SASL_PASSWORD,
        FILE_SECRET,
        REGISTRY_PASSWORD,
        MISPLACED,
    ]
}

/// A valid configuration: only the required secrets and ids.
fn valid_env() -> Vec<(String, String)> {
    [
        ("INSIGHTS__FINBOX__API_KEY", API_KEY),
        ("INSIGHTS__FINBOX__SERVER_HASH", SERVER_HASH),
        ("INSIGHTS__CREDEAU__CLIENT_ID", "client-1"),
        ("INSIGHTS__CREDEAU__AUTH_TOKEN", TOKEN),
        ("INSIGHTS__ENCODING__SCHEMA_REGISTRY_USERNAME", "SRKEY"),
        (
            "INSIGHTS__ENCODING__SCHEMA_REGISTRY_PASSWORD",
            REGISTRY_PASSWORD,
        ),
        // `run` never gets this far in these tests; a free port all the same.
        ("INSIGHTS__SERVER__LISTEN", "127.0.0.1:0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// One kind of invalid value.
struct Case {
    name: &'static str,
    set: Vec<(&'static str, String)>,
    unset: Vec<&'static str>,
    /// A TOML file passed with --config.
    file: Option<String>,
    /// What the message must name.
    key: &'static str,
}

impl Case {
    fn new(name: &'static str, key: &'static str) -> Case {
        Case {
            name,
            set: Vec::new(),
            unset: Vec::new(),
            file: None,
            key,
        }
    }
    fn set(mut self, k: &'static str, v: impl Into<String>) -> Case {
        self.set.push((k, v.into()));
        self
    }
    fn unset(mut self, k: &'static str) -> Case {
        self.unset.push(k);
        self
    }
    fn file(mut self, toml: &str) -> Case {
        self.file = Some(toml.to_string());
        self
    }
}

fn cases(dir: &std::path::Path) -> Vec<Case> {
    let empty = dir.join("empty-secret");
    std::fs::write(&empty, "\n").expect("write");
    let missing = dir.join("no-such-dir/token");
    vec![
        Case::new("bad URL", "finbox.base_url").set("INSIGHTS__FINBOX__BASE_URL", "not a url"),
        Case::new("URL with a wrong scheme", "credeau.base_url").set(
            "INSIGHTS__CREDEAU__BASE_URL",
            "ftp://deviceinsights.example",
        ),
        Case::new("negative duration", "credeau.deadline")
            .set("INSIGHTS__CREDEAU__DEADLINE", "-3m"),
        Case::new("duration without a unit", "finbox.request_timeout")
            .set("INSIGHTS__FINBOX__REQUEST_TIMEOUT", "15"),
        Case::new("zero duration", "server.stall_timeout")
            .set("INSIGHTS__SERVER__STALL_TIMEOUT", "0s"),
        Case::new("unknown key in the environment", "poll_intervl")
            .set("INSIGHTS__FINBOX__POLL_INTERVL", "10s"),
        Case::new("unknown key in the file", "sasl_pasword")
            .file(&format!("[kafka]\nsasl_pasword = \"{SASL_PASSWORD}\"\n")),
        Case::new("unknown section", "metrics").file("[metrics]\nlisten = \"0.0.0.0:9464\"\n"),
        Case::new("missing secret", "finbox.api_key").unset("INSIGHTS__FINBOX__API_KEY"),
        Case::new("missing server hash", "finbox.server_hash")
            .unset("INSIGHTS__FINBOX__SERVER_HASH"),
        Case::new("secret file missing", "credeau.auth_token_file")
            .unset("INSIGHTS__CREDEAU__AUTH_TOKEN")
            .set(
                "INSIGHTS__CREDEAU__AUTH_TOKEN_FILE",
                missing.display().to_string(),
            ),
        Case::new("secret file empty", "credeau.auth_token_file")
            .unset("INSIGHTS__CREDEAU__AUTH_TOKEN")
            .set(
                "INSIGHTS__CREDEAU__AUTH_TOKEN_FILE",
                empty.display().to_string(),
            ),
        Case::new("secret and secret file both set", "finbox.api_key_file").set(
            "INSIGHTS__FINBOX__API_KEY_FILE",
            empty.display().to_string(),
        ),
        Case::new("poll interval below 10 s", "finbox.poll_interval")
            .set("INSIGHTS__FINBOX__POLL_INTERVAL", "5s"),
        Case::new("sasl without password", "kafka.sasl_password")
            .set("INSIGHTS__KAFKA__SECURITY_PROTOCOL", "sasl_ssl")
            .set("INSIGHTS__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
            .set("INSIGHTS__KAFKA__SASL_USERNAME", "svc"),
        Case::new("sasl with an unsupported mechanism", "kafka.sasl_mechanism")
            .set("INSIGHTS__KAFKA__SECURITY_PROTOCOL", "sasl_plaintext")
            .set("INSIGHTS__KAFKA__SASL_MECHANISM", "GSSAPI")
            .set("INSIGHTS__KAFKA__SASL_USERNAME", "svc")
            .set("INSIGHTS__KAFKA__SASL_PASSWORD", SASL_PASSWORD),
        Case::new("bad listen address", "server.listen")
            .set("INSIGHTS__SERVER__LISTEN", "metrics-host:http"),
        Case::new("unknown enum value", "kafka.security_protocol")
            .set("INSIGHTS__KAFKA__SECURITY_PROTOCOL", "sasl_tls")
            .set("INSIGHTS__KAFKA__SASL_PASSWORD", SASL_PASSWORD),
        Case::new("unknown log format", "log.format").set("INSIGHTS__LOG__FORMAT", "xml"),
        Case::new("unknown output encoding", "encoding.output")
            .set("INSIGHTS__ENCODING__OUTPUT", "protobuf"),
        Case::new("negative integer", "finbox.rate_limit_per_minute")
            .set("INSIGHTS__FINBOX__RATE_LIMIT_PER_MINUTE", "-5"),
        Case::new(
            "byte budget below one input record",
            "schedule.max_in_flight_bytes",
        )
        .set("INSIGHTS__SCHEDULE__MAX_IN_FLIGHT_BYTES", "1000"),
        Case::new("CA bundle missing", "finbox.ca_bundle")
            .set("INSIGHTS__FINBOX__CA_BUNDLE", "/nonexistent/ca.pem"),
        Case::new(
            "credentials in the registry URL",
            "encoding.schema_registry_username",
        )
        .set(
            "INSIGHTS__ENCODING__SCHEMA_REGISTRY_URL",
            format!("https://SRKEY:{REGISTRY_PASSWORD}@psrc.example"),
        ),
        Case::new("credentials in a provider URL", "finbox.base_url").set(
            "INSIGHTS__FINBOX__BASE_URL",
            format!("https://key:{API_KEY}@insights.example"),
        ),
        Case::new(
            "credentials in the registry URL in the file",
            "encoding.schema_registry_url",
        )
        .file(&format!(
            "[encoding]\nschema_registry_url = \"https://SRKEY:{REGISTRY_PASSWORD}@psrc.example\"\n"
        )),
        Case::new(
            "registry password without a username",
            "encoding.schema_registry_username",
        )
        .unset("INSIGHTS__ENCODING__SCHEMA_REGISTRY_USERNAME"),
        Case::new(
            "a secret in a number's variable",
            "`finbox.rate_limit_per_minute` (set by environment variable \
             INSIGHTS__FINBOX__RATE_LIMIT_PER_MINUTE): invalid type: string, expected u32",
        )
        .set("INSIGHTS__FINBOX__RATE_LIMIT_PER_MINUTE", MISPLACED),
        Case::new(
            "a secret in a number's key in the file",
            "`topics.partitions` (set in ",
        )
        .file(&format!("[topics]\npartitions = \"{MISPLACED}\"\n")),
        Case::new(
            "a secret in an enum's variable",
            "`kafka.security_protocol` (set by environment variable \
             INSIGHTS__KAFKA__SECURITY_PROTOCOL): unknown value, expected one of `plaintext`",
        )
        .set("INSIGHTS__KAFKA__SECURITY_PROTOCOL", MISPLACED),
        Case::new(
            "a secret in an enum's key in the file",
            "`log.format` (set in ",
        )
        .file(&format!("[log]\nformat = \"{MISPLACED}\"\n")),
        Case::new("a secret in a duration's variable", "`credeau.deadline`")
            .set("INSIGHTS__CREDEAU__DEADLINE", format!("5{MISPLACED}")),
        Case::new("a secret in a duration list", "`schedule.delay_tiers`").set(
            "INSIGHTS__SCHEDULE__DELAY_TIERS",
            format!("1s,5{MISPLACED}"),
        ),
        Case::new("a secret in a boolean's key", "`topics.create`")
            .file(&format!("[topics]\ncreate = \"{MISPLACED}\"\n")),
        Case::new("a secret in a URL's variable", "`finbox.base_url`")
            .set("INSIGHTS__FINBOX__BASE_URL", format!("sklive:{MISPLACED}")),
        Case::new("config file with a syntax error on a secret", "--config")
            .file(&format!("[finbox]\napi_key = \"{FILE_SECRET}\n")),
        Case::new("config file with an unquoted secret", "--config")
            .file(&format!("[credeau]\nauth_token = {FILE_SECRET}\n")),
    ]
}

/// Runs the binary with `args` and the case's environment; returns the
/// exit code, how long it took and everything it wrote.
fn run(case: &Case, dir: &std::path::Path, subcommand: &str) -> (Option<i32>, Duration, String) {
    let mut env = valid_env();
    env.retain(|(k, _)| !case.unset.contains(&k.as_str()));
    env.retain(|(k, _)| !case.set.iter().any(|(s, _)| s == k));
    env.extend(case.set.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_insights-enricher"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .stdin(Stdio::null());
    if let Some(toml) = &case.file {
        let path = dir.join(format!("{}.toml", case.name.replace(' ', "-")));
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(toml.as_bytes()))
            .expect("write config file");
        cmd.arg("--config").arg(path);
    }
    cmd.arg(subcommand);
    let started = Instant::now();
    let out = cmd.output().expect("run the binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), started.elapsed(), text)
}

fn check_all(subcommand: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    for case in cases(dir.path()) {
        let (code, took, text) = run(&case, dir.path(), subcommand);
        let mut problems = Vec::new();
        if code == Some(0) || code.is_none() {
            problems.push(format!("exit {code:?}"));
        }
        if took > Duration::from_secs(10) {
            problems.push(format!("took {took:?}"));
        }
        if !text.contains(case.key) {
            problems.push(format!("does not name `{}`", case.key));
        }
        for s in secrets() {
            if text.contains(s) {
                problems.push(format!("echoes the secret {s}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{subcommand} / {}: {}\n  output: {}",
                case.name,
                problems.join(", "),
                text.trim()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn check_config_rejects_each_invalid_value_naming_the_key_without_secrets() {
    check_all("check-config");
}

#[test]
fn run_refuses_to_start_on_each_invalid_value_naming_the_key_without_secrets() {
    check_all("run");
}

#[test]
fn check_config_accepts_the_valid_base_and_prints_secrets_redacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let valid = Case::new("valid", "");
    let (code, _, text) = run(&valid, dir.path(), "check-config");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("api_key = \"<redacted>\""), "{text}");
    assert!(
        text.contains("schema_registry_password = \"<redacted>\""),
        "{text}"
    );
    assert!(
        text.contains("schema_registry_username = \"SRKEY\""),
        "{text}"
    );
    for s in secrets() {
        assert!(!text.contains(s), "secret {s} printed:\n{text}");
    }
}

/// The registry's credentials have keys of their own; in the URL they are
/// refused (by check-config and by run) with a message naming those keys,
/// and the password is in nothing the process wrote.
#[test]
fn registry_credentials_in_the_url_are_refused_naming_the_keys_to_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let case = Case::new("registry URL with credentials", "")
        .unset("INSIGHTS__ENCODING__SCHEMA_REGISTRY_USERNAME")
        .unset("INSIGHTS__ENCODING__SCHEMA_REGISTRY_PASSWORD")
        .set(
            "INSIGHTS__ENCODING__SCHEMA_REGISTRY_URL",
            "https://user:SECRETPW@registry.example",
        );
    for subcommand in ["check-config", "run"] {
        let (code, _, text) = run(&case, dir.path(), subcommand);
        assert_eq!(code, Some(2), "{subcommand}: {text}");
        assert!(
            text.contains(
                "`encoding.schema_registry_url` (set by environment variable \
                 INSIGHTS__ENCODING__SCHEMA_REGISTRY_URL): must not hold credentials"
            ),
            "{subcommand}: {text}"
        );
        assert!(
            text.contains("encoding.schema_registry_username")
                && text.contains("encoding.schema_registry_password_file"),
            "{subcommand}: {text}"
        );
        assert!(!text.contains("SECRETPW"), "{subcommand}: {text}");
    }
}

/// `salt` reads the configuration's layers without the per-key pass; a
/// value of the wrong type is not quoted there either.
#[test]
fn salt_does_not_echo_a_wrong_type_value() {
    let out = Command::new(env!("CARGO_BIN_EXE_insights-enricher"))
        .env_clear()
        .env("INSIGHTS__FINBOX__RATE_LIMIT_PER_MINUTE", MISPLACED)
        .args(["salt", "--customer-id", "c-1"])
        .output()
        .expect("run salt");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("expected u32"), "{text}");
    assert!(!text.contains(MISPLACED), "{text}");
}

/// A value that cannot be read, a value out of range, a contradiction
/// between two keys and an unknown section: one check-config run lists all
/// four, each once (the unknown section not again as `configuration`).
#[test]
fn check_config_lists_every_kind_of_problem_in_one_run_each_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let case = Case::new("every kind of problem", "").file(
        "[metrics]\nlisten = \"0.0.0.0:9464\"\n\
         [finbox]\npoll_interval = \"5s\"\nrate_limit_per_minute = \"lots\"\n\
         [schedule]\nmax_in_flight_bytes = 1000\n",
    );
    let (code, _, text) = run(&case, dir.path(), "check-config");
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("4 configuration problems:"), "{text}");
    for key in [
        "`finbox.rate_limit_per_minute` (set in ",
        "`metrics` (set in ",
        "`finbox.poll_interval` (set in ",
        "`schedule.max_in_flight_bytes` (set in ",
    ] {
        assert_eq!(text.matches(key).count(), 1, "{key}: {text}");
    }
    assert!(!text.contains("`configuration`"), "{text}");
}
