//! `insights-enricher salt` prints exactly the FinBox salt and a newline,
//! checked against an independent implementation (Python's hashlib and
//! base64) computed while the test runs.

use std::process::Command;

/// The salt as Python computes it from providers.md's definition.
fn python_salt(customer_id: &str, server_hash: &str) -> String {
    let script = "import base64, hashlib, sys\n\
        cid, server_hash = sys.argv[1], sys.argv[2]\n\
        m = hashlib.md5(cid.encode('utf-8')).hexdigest().upper()\n\
        d = hashlib.sha256((m + server_hash).encode('utf-8')).digest()\n\
        sys.stdout.write(base64.b64encode(d).decode('ascii'))\n";
    let out = Command::new("python3")
        .args(["-c", script, customer_id, server_hash])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("ASCII salt")
}

fn cli_salt(customer_id: &str, server_hash: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_insights-enricher"))
        .args([
            "salt",
            "--customer-id",
            customer_id,
            "--server-hash",
            server_hash,
        ])
        .env_remove("FINBOX_SERVER_HASH")
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stderr.is_empty(), "nothing on stderr");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn check(customer_id: &str, server_hash: &str) {
    let expected = python_salt(customer_id, server_hash);
    assert_eq!(expected.len(), 44);
    assert!(expected.ends_with('='));
    assert_eq!(
        cli_salt(customer_id, server_hash),
        format!("{expected}\n"),
        "customer_id {customer_id:?}"
    );
}

#[test]
fn ascii_ids_match_the_independent_implementation() {
    check("1234ABCD4567", "XYZ");
    check("user-42", "a-server-hash-shared-at-integration");
}

#[test]
fn utf8_ids_and_hashes_are_hashed_as_utf8_bytes() {
    check("ग्राहक-७", "hash");
    check("müller-ß", "sérveur-ħash");
}

#[test]
fn an_empty_server_hash_is_allowed() {
    check("user-1", "");
}

#[test]
fn a_64_character_id_matches() {
    let id: String = "0123456789abcdef".repeat(4);
    assert_eq!(id.len(), 64);
    check(&id, "XYZ");
}

#[test]
fn the_server_hash_can_come_from_the_environment() {
    let out = Command::new(env!("CARGO_BIN_EXE_insights-enricher"))
        .args(["salt", "--customer-id", "env-user"])
        .env("FINBOX_SERVER_HASH", "from-env")
        .output()
        .expect("the binary runs");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n", python_salt("env-user", "from-env"))
    );
}
