//! Operator tools for the dead-letter topic: `dlq inspect` and `dlq replay`.

pub mod inspect;
pub mod read;
pub mod replay;

use std::time::Duration;

use clap::{Args, Subcommand};

use crate::config::Settings;
use crate::kafka::check_connection;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Show dead letters: counts by reason, provider, HTTP status and stage,
    /// and the records with their headers (never secrets or SMS bodies).
    Inspect(InspectArgs),
    /// Send selected dead letters back into the pipeline, once each.
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub filter: read::Filter,
    /// Print JSON (summary and records) for scripts.
    #[arg(long)]
    pub json: bool,
    /// Print only the counts.
    #[arg(long)]
    pub summary: bool,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub filter: read::Filter,
    /// Show what would be sent, send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Send at most this many records.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How long the tools wait for a broker to answer before they give up,
/// naming `kafka.bootstrap_servers`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs a dlq command; returns what to print on stdout.
pub async fn run(settings: &Settings, cmd: DlqCommand) -> anyhow::Result<String> {
    // One short connection check first: an unreachable broker is one line
    // naming the address, not a minute of librdkafka retrying and warning.
    let k = settings.kafka.clone();
    tokio::task::spawn_blocking(move || check_connection(&k, CONNECT_TIMEOUT)).await??;
    match cmd {
        DlqCommand::Inspect(args) => {
            let s = settings.clone();
            let filter = args.filter.clone();
            let records =
                tokio::task::spawn_blocking(move || read::read_filtered(&s, &filter)).await??;
            Ok(if args.json {
                inspect::render_json(&records)
            } else {
                inspect::render_text(&records, !args.summary)
            })
        }
        DlqCommand::Replay(args) => {
            let report = replay::replay(settings, &args.filter, args.dry_run, args.limit).await?;
            Ok(if args.json {
                serde_json::to_string_pretty(&report)?
            } else {
                let mut out = format!(
                    "{}selected {}, sent {}, already replayed {}, not replayable {}\n",
                    if report.dry_run { "dry run: " } else { "" },
                    report.selected,
                    report.sent,
                    report.already_replayed,
                    report.not_replayable
                );
                for i in &report.items {
                    out.push_str(&format!(
                        "  {} ({}) -> {}{}\n",
                        i.dead_letter,
                        i.reason,
                        i.destination,
                        if report.dry_run { " (not sent)" } else { "" }
                    ));
                }
                out
            })
        }
    }
}
