//! `insights-enricher user USER_ID`: where one user is, from the topics the
//! service writes. Outputs and delay tiers are keyed by user id, so only
//! the user's own partition of each is read (found with the producer's
//! partitioner), from `--since` on (`offsets_for_times`) to its end as of
//! now. Text for a person, `--json` for scripts; neither ever holds an SMS
//! body or a secret.

pub mod partition;
pub mod timeline;

use clap::Args;
use serde::Serialize;

use crate::config::Settings;
use crate::core::tiers::DelayTiers;
use crate::dlq::read::{self, ReadError};
use crate::dlq::CONNECT_TIMEOUT;
use crate::events::dead_letter::headers as h;
use crate::kafka::check_connection;
use crate::printable::{printable_str, Lines};
use partition::Partitioner;
use timeline::{Deadlines, Found, Role, StepKind};

#[derive(Debug, Args)]
pub struct UserArgs {
    /// The user id (the onboarding event's `user_id`).
    pub user_id: String,
    /// How far back to look: RFC 3339, or a duration ago such as "2h".
    #[arg(long, default_value = "24h")]
    pub since: String,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

/// The journey as printed with `--json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub user_id: String,
    pub since: Option<String>,
    pub read_at: Option<String>,
    pub found: bool,
    pub onboarding: Option<timeline::Onboarding>,
    pub steps: Vec<timeline::Step>,
    pub next: timeline::Next,
}

/// The topics the service writes for a user, with their roles.
fn user_topics(settings: &Settings) -> Vec<(String, Role, Option<String>)> {
    let tiers = DelayTiers::new(&settings.schedule.delay_tiers);
    let t = &settings.topics;
    let mut v: Vec<(String, Role, Option<String>)> = (0..tiers.len())
        .map(|i| {
            (
                tiers.topic(&t.delay_prefix, i),
                Role::Tier(i),
                Some(tiers.label(i)),
            )
        })
        .collect();
    v.push((t.finbox_predictors.clone(), Role::FinboxPredictors, None));
    v.push((t.sms_extraction.clone(), Role::SmsExtraction, None));
    v.push((t.combined.clone(), Role::InsightsReady, None));
    v.push((t.dead_letter.clone(), Role::DeadLetter, None));
    v
}

/// Whether a record is the user's: keyed by the user id, or a dead letter
/// naming them.
fn is_users(r: &read::DlqRecord, user: &str) -> bool {
    r.raw_key.as_deref() == Some(user.as_bytes()) || r.header(h::USER_ID) == Some(user)
}

/// Reads the user's records written since `since` (epoch ms).
pub fn read_user(settings: &Settings, user: &str, since: i64) -> Result<Vec<Found>, ReadError> {
    let consumer = read::reader(settings)?;
    let partitioner =
        Partitioner::from_property(settings.kafka.extra.get("partitioner").map(String::as_str));
    let mut found = Vec::new();
    for (topic, role, tier_label) in user_topics(settings) {
        let all = read::partitions_of(&consumer, &topic)?;
        // An unknown partitioner: every partition, filtered by key.
        let wanted = match partitioner {
            Some(p) => vec![p.partition(user.as_bytes(), all.len() as i32)],
            None => all,
        };
        let plan = read::plan_read(&consumer, &topic, &wanted, None, Some(since))?;
        for record in read::read_planned(&consumer, &plan)? {
            if is_users(&record, user) {
                found.push(Found {
                    role,
                    tier_label: tier_label.clone(),
                    topic: topic.clone(),
                    record,
                });
            }
        }
    }
    Ok(found)
}

/// Runs `user`; returns what to print on stdout.
pub async fn run(settings: &Settings, args: UserArgs) -> anyhow::Result<String> {
    let now = chrono::Utc::now().timestamp_millis();
    let since = read::parse_time("since", &args.since, now)?;
    let k = settings.kafka.clone();
    tokio::task::spawn_blocking(move || check_connection(&k, CONNECT_TIMEOUT)).await??;
    let s = settings.clone();
    let user = args.user_id.clone();
    let found = tokio::task::spawn_blocking(move || read_user(&s, &user, since)).await??;
    let deadlines = Deadlines {
        finbox_ms: settings.finbox.poll.deadline.as_millis() as i64,
        credeau_ms: settings.credeau.poll.deadline.as_millis() as i64,
    };
    let j = timeline::build(&found, deadlines, now);
    let report = Report {
        user_id: args.user_id,
        since: crate::dlq::inspect::rfc3339(since),
        read_at: crate::dlq::inspect::rfc3339(now),
        found: !j.steps.is_empty(),
        onboarding: j.onboarding,
        steps: j.steps,
        next: j.next,
    };
    Ok(if args.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        render_text(&report)
    })
}

/// The journey for a person, one line per step; every text from a record
/// with its control characters escaped.
pub fn render_text(r: &Report) -> String {
    let p = |s: &str| printable_str(s, Lines::One);
    let since = r.since.as_deref().unwrap_or("-");
    let mut out = format!("user {} (records since {since})\n", p(&r.user_id));
    if !r.found {
        out.push_str(&format!(
            "not found: no record of user {} in the service's topics since {since} (try a longer --since)\n",
            p(&r.user_id)
        ));
        return out;
    }
    if let Some(o) = &r.onboarding {
        out.push_str(&format!(
            "onboarded {} event {} ({}/{}/{})\n",
            o.onboarded_at.as_deref().unwrap_or("-"),
            p(&o.event_id),
            p(&o.input_topic),
            o.input_partition,
            o.input_offset
        ));
    }
    for s in &r.steps {
        let at = s.at.as_deref().unwrap_or("-");
        let line = match &s.kind {
            StepKind::Scheduled {
                tier,
                due_at,
                finbox,
                credeau,
            } => format!(
                "scheduled   tier {tier}, due {}; finbox {} after {} polls, credeau {} after {} polls",
                due_at.as_deref().unwrap_or("-"),
                finbox.state,
                finbox.polls,
                credeau.state,
                credeau.polls
            ),
            StepKind::ProviderOutcome {
                provider,
                poll,
                result,
                http_status,
            } => format!(
                "{provider:<11} poll {poll}: {}{}",
                p(result),
                http_status.map(|s| format!(" (HTTP {s})")).unwrap_or_default()
            ),
            StepKind::Published { event, detail } => format!("published   {event}: {detail}"),
            StepKind::DeadLetter {
                stage,
                reason,
                provider,
                http_status,
                message,
            } => format!(
                "dead letter stage {}, reason {}{}{}: {}",
                p(stage),
                p(reason),
                provider.as_deref().map(|x| format!(", {}", p(x))).unwrap_or_default(),
                http_status
                    .as_deref()
                    .map(|x| format!(", HTTP {}", p(x)))
                    .unwrap_or_default(),
                p(message)
            ),
        };
        out.push_str(&format!(
            "  {at}  {line}  [{}/{}/{}]\n",
            p(&s.topic),
            s.partition,
            s.offset
        ));
    }
    out.push_str(&format!("now: {}\n", r.next.summary));
    for (provider, at) in &r.next.deadlines {
        out.push_str(&format!("  {provider} deadline {at} (then timed_out)\n"));
    }
    out
}
