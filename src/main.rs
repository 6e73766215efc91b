//! The `insights-enricher` command line: the service, the provider
//! simulator, and operator tools.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use insights_enricher::config::Settings;
use insights_enricher::providers::salt;
use insights_enricher::{dlq, journey, logging, service, simulator};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "insights-enricher", version, about)]
struct Cli {
    /// TOML configuration file, applied over the built-in defaults
    /// (see config/default.toml); INSIGHTS__SECTION__KEY variables win over it.
    #[arg(long, global = true, env = "INSIGHTS_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: consume onboarded users, poll the providers, publish insights.
    Run,
    /// Run the provider simulator (FinBox and Credeau on one local HTTP server).
    Simulate(simulator::SimulateArgs),
    /// Print the FinBox salt for a customer id (and nothing else).
    Salt {
        /// The customer id the request is for (FinBox's `customer_id`: the
        /// service sends the user id).
        #[arg(long)]
        customer_id: String,
        /// The SERVER_HASH FinBox shared at integration; without it,
        /// `finbox.server_hash` (or `finbox.server_hash_file`) of the
        /// configuration (`--config`, INSIGHTS__FINBOX__SERVER_HASH).
        #[arg(long, env = "FINBOX_SERVER_HASH", hide_env_values = true)]
        server_hash: Option<String>,
    },
    /// Load and validate the configuration; print it with secrets redacted.
    CheckConfig,
    /// Dead-letter tools: inspect and replay.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Where is this user? Their journey from the topics the service writes:
    /// onboarding, scheduled polls, provider outcomes, events, dead letters,
    /// and what happens next (never SMS bodies or secrets).
    User(journey::UserArgs),
}

/// jemalloc serves every allocation of the process: Rust's, and through
/// its unprefixed `malloc`/`free`, librdkafka's and OpenSSL's. With glibc's
/// malloc a worked-off backlog left the resident size several megabytes
/// (and at its peak, a hundred) above what waiting users need, in free but
/// partly used pages that no trim returns; jemalloc's size classes and
/// decay give them back, and its allocation is cheaper on the hot path
/// (docs/benchmarks.md).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its first allocation: purge freed pages
/// after a quarter of a second on a background thread, with
/// `MADV_DONTNEED` (straight out of the resident size) rather than through
/// lazily reclaimed pages. With a second, a backlog's short-lived buffers
/// kept the resident size about 20 MB above what was allocated.
///
/// One arena: by default jemalloc makes four per CPU it sees (on a
/// Kubernetes node, the node's CPUs, not the pod's limit) and spreads the
/// threads over them, so the tokio workers, librdkafka's threads and the
/// blocking pool each keep partly used pages of their own. With one, the
/// 10,000-user backlog peaked at 55-61 MB instead of 57-68 MB on this
/// 2-core machine, at the same CPU per user (per-thread caches take most
/// allocations without touching the arena's lock).
#[cfg(feature = "jemalloc")]
#[allow(non_upper_case_globals)]
#[export_name = "malloc_conf"]
pub static malloc_conf: &[u8; 69] =
    b"background_thread:true,narenas:1,dirty_decay_ms:250,muzzy_decay_ms:0\0";

/// `finbox.server_hash` as configured (defaults, the `--config` file, then
/// the environment, a `finbox.server_hash_file` read), without requiring
/// the rest of the configuration to be complete: `salt` is a debugging aid
/// and needs only this one value.
fn server_hash_from_config(file: Option<&std::path::Path>) -> Result<String, String> {
    let hash = Settings::finbox_server_hash(file, std::env::vars()).map_err(|e| e.to_string())?;
    if hash.is_empty() {
        Err("no server hash: pass --server-hash (or FINBOX_SERVER_HASH), or set finbox.server_hash (or finbox.server_hash_file) in --config or INSIGHTS__FINBOX__SERVER_HASH".into())
    } else {
        Ok(hash)
    }
}

/// jemalloc's purge of every arena's freed pages, for
/// [`insights_enricher::memory::return_freed`].
#[cfg(feature = "jemalloc")]
fn purge_freed_pages() {
    // MALLCTL_ARENAS_ALL is 4096.
    let name = c"arena.4096.purge";
    // SAFETY: a void mallctl with no old or new value, by a NUL-terminated
    // name jemalloc documents.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

fn main() -> ExitCode {
    #[cfg(feature = "jemalloc")]
    insights_enricher::memory::set_return_freed(purge_freed_pages);
    let cli = Cli::parse();
    match cli.command {
        Command::Salt {
            customer_id,
            server_hash,
        } => {
            let hash = match server_hash {
                Some(h) => h,
                None => match server_hash_from_config(cli.config.as_deref()) {
                    Ok(h) => h,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                },
            };
            println!("{}", salt::finbox_salt(&customer_id, &hash));
            ExitCode::SUCCESS
        }
        Command::CheckConfig => match Settings::load(cli.config.as_deref()) {
            Ok(settings) => {
                print!("{}", settings.to_redacted_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Simulate(args) => {
            logging::init(insights_enricher::config::LogFormat::Text, "info");
            block_on(false, async move {
                let shutdown = shutdown_on_signal();
                simulator::run(args, shutdown).await
            })
        }
        Command::Dlq(cmd) => {
            let settings = match Settings::load(cli.config.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            logging::init(settings.log.format, "warn");
            block_on(false, async move {
                let out = dlq::run(&settings, cmd).await?;
                print!("{out}");
                Ok(())
            })
        }
        Command::User(args) => {
            let settings = match Settings::load(cli.config.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            logging::init(settings.log.format, "warn");
            block_on(false, async move {
                print!("{}", journey::run(&settings, args).await?);
                Ok(())
            })
        }
        Command::Run => {
            let settings = match Settings::load(cli.config.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            logging::init(settings.log.format, &settings.log.level);
            // JSON logs go to a log pipeline: the reason goes there too.
            let log_error = settings.log.format == insights_enricher::config::LogFormat::Json;
            block_on(log_error, async move {
                let shutdown = shutdown_on_signal();
                // On a worker thread, not the main one: the loop and the
                // records' tasks wake each other within the pool.
                match tokio::spawn(service::run(settings, shutdown)).await {
                    Ok(r) => r,
                    Err(e) => Err(anyhow::anyhow!("the pipeline task failed: {e}")),
                }
            })
        }
    }
}

/// Runs `fut` to completion; a failure is printed once on stderr (and, with
/// `log_error`, logged as well).
fn block_on(
    log_error: bool,
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(fut);
    // Blocking work still running (a start-up connection check cut short
    // by SIGTERM, a client close that overran) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = error_line(&e);
            if log_error {
                tracing::error!(error = text, "exiting");
            }
            eprintln!("error: {text}");
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose text the
/// line already holds (an error that quotes its source, such as "cannot
/// listen on ADDR: Address already in use", would otherwise show it twice).
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// A token cancelled on SIGTERM or SIGINT.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install SIGTERM handler");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}
