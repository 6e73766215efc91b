//! What an operator sees when something around the binary is wrong: an
//! unreachable broker (`dlq inspect`, `dlq replay`, `user`, `run`), a simulator port
//! already taken, and `salt` reading the server hash from `--config`. Each
//! runs the real binary and reads what it printed.

use std::io::Write;
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_insights-enricher");

/// A port nothing listens on: bound once by the OS, then released.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    port
}

/// A valid configuration (the required secrets and ids), brokers at `servers`.
fn command(servers: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("INSIGHTS__KAFKA__BOOTSTRAP_SERVERS", servers)
        .env("INSIGHTS__FINBOX__API_KEY", "k")
        .env("INSIGHTS__FINBOX__SERVER_HASH", "h")
        .env("INSIGHTS__CREDEAU__CLIENT_ID", "c")
        .env("INSIGHTS__CREDEAU__AUTH_TOKEN", "t")
        .env("INSIGHTS__SERVER__LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null());
    cmd
}

fn timed(cmd: &mut Command) -> (Output, Duration) {
    let started = Instant::now();
    let out = cmd.output().expect("run the binary");
    (out, started.elapsed())
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn operator_tools_fail_fast_with_one_line_naming_the_unreachable_broker() {
    let servers = format!("127.0.0.1:{}", closed_port());
    for args in [
        &["dlq", "inspect"][..],
        &["dlq", "inspect", "--json"],
        &["dlq", "replay", "--dry-run"],
        &["user", "u-1"],
        &["user", "u-1", "--json"],
    ] {
        let (out, took) = timed(command(&servers).args(args));
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{args:?} succeeded: {stdout}");
        assert!(
            took < Duration::from_secs(10),
            "{args:?} took {took:?} to give up"
        );
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            lines.len(),
            1,
            "{args:?} printed more than one line:\n{stderr}"
        );
        assert!(
            lines[0].contains("kafka.bootstrap_servers")
                && lines[0].contains(&format!("{servers:?}")),
            "{args:?}: {stderr}"
        );
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
    }
}

#[test]
fn run_names_the_unreachable_broker_address_and_its_key() {
    let servers = format!("127.0.0.1:{}", closed_port());
    let (out, took) = timed(command(&servers).arg("run"));
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{stderr}");
    assert!(
        last.contains(&format!("kafka.bootstrap_servers = {servers:?}")),
        "{stderr}"
    );
}

#[test]
fn sigterm_during_the_start_up_connection_check_stops_the_service_at_once() {
    let servers = format!("127.0.0.1:{}", closed_port());
    let mut child = command(&servers)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the service");
    // Well inside the 30 s connection check.
    std::thread::sleep(Duration::from_secs(2));
    let sent = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut exited = None;
    while sent.elapsed() < Duration::from_secs(10) {
        if let Some(status) = child.try_wait().expect("wait") {
            exited = Some((status, sent.elapsed()));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some((status, took)) = exited else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("still running 10 s after SIGTERM");
    };
    assert!(took < Duration::from_secs(2), "stopped after {took:?}");
    assert!(status.success(), "{status:?}");
}

#[test]
fn simulate_prints_the_os_error_once_when_its_port_is_taken() {
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr");
    let (out, took) = timed(
        Command::new(BIN)
            .args(["simulate", "--listen", &addr.to_string()])
            .stdin(Stdio::null()),
    );
    let (stdout, stderr) = text(&out);
    let all = format!("{stdout}{stderr}");
    assert!(!out.status.success(), "{all}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // "Address already in use (os error 98)"
    let reason = std::io::Error::from_raw_os_error(EADDRINUSE).to_string();
    assert_eq!(all.matches(&reason).count(), 1, "{all}");
    assert!(
        all.contains(&format!("error: cannot listen on {addr}: {reason}")),
        "{all}"
    );
    drop(held);
}

/// EADDRINUSE on Linux.
const EADDRINUSE: i32 = 98;

const VECTOR_CUSTOMER: &str = "1234ABCD4567";
const VECTOR_HASH: &str = "XYZ";
/// providers.md's algorithm, computed independently (see src/providers/salt.rs).
const VECTOR_SALT: &str = "yWWWSsgT7HQ8xSyZ/YP+O+vRyyAcMCLPSLvnkdQBRmU=";

fn salt(config: Option<&std::path::Path>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(["salt", "--customer-id", VECTOR_CUSTOMER])
        .output()
        .expect("run salt")
}

#[test]
fn salt_takes_the_server_hash_from_the_configuration() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Only the hash: salt needs nothing else of the configuration.
    let file = dir.path().join("c.toml");
    std::fs::File::create(&file)
        .and_then(|mut f| {
            f.write_all(format!("[finbox]\nserver_hash = \"{VECTOR_HASH}\"\n").as_bytes())
        })
        .expect("write config");
    let out = salt(Some(&file), &[]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(text(&out).0, format!("{VECTOR_SALT}\n"));

    // From finbox.server_hash_file, and from the environment over the file.
    let hash_file = dir.path().join("hash");
    std::fs::write(&hash_file, format!("{VECTOR_HASH}\n")).expect("write hash");
    let by_file = dir.path().join("f.toml");
    std::fs::write(
        &by_file,
        format!("[finbox]\nserver_hash_file = \"{}\"\n", hash_file.display()),
    )
    .expect("write config");
    assert_eq!(
        text(&salt(Some(&by_file), &[])).0,
        format!("{VECTOR_SALT}\n")
    );
    let env = salt(Some(&file), &[("INSIGHTS__FINBOX__SERVER_HASH", "other")]);
    assert_ne!(text(&env).0, format!("{VECTOR_SALT}\n"));
    assert!(env.status.success());

    // --server-hash wins over the configuration.
    let out = Command::new(BIN)
        .env_clear()
        .args(["--config"])
        .arg(&file)
        .args([
            "salt",
            "--customer-id",
            VECTOR_CUSTOMER,
            "--server-hash",
            "other",
        ])
        .output()
        .expect("run salt");
    assert_eq!(text(&out).0, text(&env).0);

    // Neither: exit 2 naming both ways to give it.
    let none = salt(None, &[]);
    assert_eq!(none.status.code(), Some(2));
    let (_, stderr) = text(&none);
    assert!(
        stderr.contains("--server-hash") && stderr.contains("finbox.server_hash"),
        "{stderr}"
    );
}

#[test]
fn salt_help_explains_both_options() {
    let out = Command::new(BIN)
        .args(["salt", "--help"])
        .output()
        .expect("run salt --help");
    let (help, _) = text(&out);
    // The option's line and the next (clap wraps long help onto it).
    let line_of = |flag: &str| {
        let lines: Vec<&str> = help.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.trim_start().starts_with(&format!("{flag} <")))
            .unwrap_or_else(|| panic!("{flag} missing:\n{help}"));
        format!("{} {}", lines[at], lines.get(at + 1).unwrap_or(&""))
    };
    assert!(line_of("--customer-id").contains("customer id"), "{help}");
    assert!(line_of("--server-hash").contains("SERVER_HASH"), "{help}");
}
