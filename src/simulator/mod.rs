//! The provider simulator (`insights-enricher simulate`): both provider
//! contracts over real HTTP, with per-user scenarios and injected faults.
//! This module owns the configuration, the shared state and the server's
//! lifecycle; each route family lives in its own submodule.

pub mod admin;
pub mod credeau;
pub mod faults;
pub mod finbox;
pub mod ratelimit;
pub mod respond;
pub mod scenario;
pub mod sms;
pub mod stats;
pub mod users;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use axum::extract::DefaultBodyLimit;
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::serve::ListenerExt as _;
use axum::Router;
use clap::Args;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::admin::CredentialsPatch;
use self::ratelimit::ProviderLimit;
use self::respond::Dropped;
pub use self::scenario::{
    CredeauScenario, Faults, FinboxDataShape, FinboxOutcome, FinboxScenario, ScenarioPatch,
    ScenarioSet, ScriptedAnswer, UserScenario,
};
use self::stats::{Channel, Stats};
use self::users::{Clock, UserBook};
use crate::providers::Provider;

/// Command-line arguments of `insights-enricher simulate`.
#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, env = "SIMULATOR_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Scenario file (JSON); without it every user is ready at once.
    #[arg(long, env = "SIMULATOR_SCENARIOS")]
    pub scenarios: Option<PathBuf>,
    /// Seed of every generated answer and fault decision.
    #[arg(long, env = "SIMULATOR_SEED", default_value_t = 42)]
    pub seed: u64,
    #[arg(
        long,
        env = "SIMULATOR_FINBOX_API_KEY",
        default_value = "sim-finbox-key",
        hide_env_values = true
    )]
    pub finbox_api_key: String,
    #[arg(
        long,
        env = "SIMULATOR_FINBOX_SERVER_HASH",
        default_value = "sim-server-hash",
        hide_env_values = true
    )]
    pub finbox_server_hash: String,
    #[arg(
        long,
        env = "SIMULATOR_CREDEAU_CLIENT_ID",
        default_value = "sim-client"
    )]
    pub credeau_client_id: String,
    #[arg(
        long,
        env = "SIMULATOR_CREDEAU_AUTH_TOKEN",
        default_value = "sim-token",
        hide_env_values = true
    )]
    pub credeau_auth_token: String,
    /// FinBox requests per minute (0 = unlimited).
    #[arg(
        long,
        env = "SIMULATOR_FINBOX_RATE_LIMIT_PER_MINUTE",
        default_value_t = 6000
    )]
    pub finbox_rate_limit_per_minute: u32,
    /// Credeau requests per minute (0 = unlimited); 1000 is the documented limit.
    #[arg(
        long,
        env = "SIMULATOR_CREDEAU_RATE_LIMIT_PER_MINUTE",
        default_value_t = 1000
    )]
    pub credeau_rate_limit_per_minute: u32,
}

/// The providers' credentials and network flags as the simulator expects them.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub finbox_api_key: String,
    pub finbox_server_hash: String,
    pub credeau_client_id: String,
    pub credeau_auth_token: String,
    /// Answer FinBox's production path with "IP address not whitelisted".
    pub finbox_ip_blocked: bool,
    /// Answer Credeau with its 403 page.
    pub credeau_ip_blocked: bool,
}

impl Default for Credentials {
    fn default() -> Self {
        Self {
            finbox_api_key: "sim-finbox-key".into(),
            finbox_server_hash: "sim-server-hash".into(),
            credeau_client_id: "sim-client".into(),
            credeau_auth_token: "sim-token".into(),
            finbox_ip_blocked: false,
            credeau_ip_blocked: false,
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("finbox_api_key", &"<redacted>")
            .field("finbox_server_hash", &"<redacted>")
            .field("credeau_client_id", &self.credeau_client_id)
            .field("credeau_auth_token", &"<redacted>")
            .field("finbox_ip_blocked", &self.finbox_ip_blocked)
            .field("credeau_ip_blocked", &self.credeau_ip_blocked)
            .finish()
    }
}

/// Everything a simulator starts with.
#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    /// `127.0.0.1:0` by default: a free port, read back with [`RunningSimulator::addr`].
    pub listen: SocketAddr,
    pub seed: u64,
    pub credentials: Credentials,
    /// Requests per minute; 0 = unlimited.
    pub finbox_rate_limit_per_minute: u32,
    pub credeau_rate_limit_per_minute: u32,
    pub scenarios: ScenarioSet,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            seed: 42,
            credentials: Credentials::default(),
            finbox_rate_limit_per_minute: 6000,
            credeau_rate_limit_per_minute: 1000,
            scenarios: ScenarioSet::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read scenario file {path}: {source}")]
    ReadScenarios {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("scenario file {path} is not a valid scenario set: {source}")]
    ParseScenarios {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    InvalidScenario(#[from] scenario::ScenarioError),
    #[error("the simulator's server failed: {0}")]
    Serve(std::io::Error),
}

/// State shared by every route.
pub struct Sim {
    pub(crate) seed: u64,
    pub(crate) clock: Clock,
    credentials: RwLock<Credentials>,
    scenarios: RwLock<Arc<ScenarioSet>>,
    pub(crate) finbox_limit: ProviderLimit,
    pub(crate) credeau_limit: ProviderLimit,
    pub(crate) users: UserBook,
    pub(crate) stats: Stats,
}

impl Sim {
    fn new(config: &SimulatorConfig) -> Self {
        Self {
            seed: config.seed,
            clock: Clock::new(),
            credentials: RwLock::new(config.credentials.clone()),
            scenarios: RwLock::new(Arc::new(config.scenarios.clone())),
            finbox_limit: ProviderLimit::new(config.finbox_rate_limit_per_minute),
            credeau_limit: ProviderLimit::new(config.credeau_rate_limit_per_minute),
            users: UserBook::default(),
            stats: Stats::default(),
        }
    }

    // A poisoned lock only means a panic elsewhere while holding it; the
    // data (plain values replaced whole) is still consistent, so keep serving.
    pub(crate) fn credentials(&self) -> RwLockReadGuard<'_, Credentials> {
        self.credentials.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn scenarios(&self) -> Arc<ScenarioSet> {
        self.scenarios
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_scenarios(&self, set: ScenarioSet) {
        *self.scenarios.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
    }

    pub(crate) fn update_credentials(&self, patch: CredentialsPatch) {
        let mut c = self.credentials.write().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = patch.finbox_api_key {
            c.finbox_api_key = v;
        }
        if let Some(v) = patch.finbox_server_hash {
            c.finbox_server_hash = v;
        }
        if let Some(v) = patch.credeau_client_id {
            c.credeau_client_id = v;
        }
        if let Some(v) = patch.credeau_auth_token {
            c.credeau_auth_token = v;
        }
        if let Some(v) = patch.finbox_ip_blocked {
            c.finbox_ip_blocked = v;
        }
        if let Some(v) = patch.credeau_ip_blocked {
            c.credeau_ip_blocked = v;
        }
    }

    /// Logs a scenario-stage answer in the user's history (0 = dropped).
    pub(crate) fn record(&self, provider: Provider, user_id: &str, resp: &Response) {
        let status = if resp.extensions().get::<Dropped>().is_some() {
            0
        } else {
            resp.status().as_u16()
        };
        self.users
            .record(provider, user_id, self.clock.now_ms(), status);
    }

    /// Counts an answer in the statistics and hands it back.
    pub(crate) fn finish(&self, channel: Channel, resp: Response) -> Response {
        let dropped = resp.extensions().get::<Dropped>().is_some();
        let body_bytes = axum::body::HttpBody::size_hint(resp.body())
            .exact()
            .unwrap_or(0);
        self.stats
            .count(channel, resp.status().as_u16(), dropped, body_bytes);
        resp
    }
}

/// The outcome of a provider's checks (credentials, payload, rate limit):
/// either the request goes on to the user's scenario, or it is answered now.
pub(crate) enum Gate<T> {
    Pass(T),
    Answer(Response),
}

/// Every path that is not an API answers like Credeau's front proxy does.
async fn wrong_path(axum::extract::State(sim): axum::extract::State<Arc<Sim>>) -> Response {
    sim.finish(Channel::Other, respond::forbidden_html())
}

fn router(sim: Arc<Sim>) -> Router {
    let admin = Router::new()
        .route(
            "/admin/scenarios",
            put(admin::replace_scenarios)
                .post(admin::merge_scenarios)
                .get(admin::get_scenarios),
        )
        .route("/admin/credentials", put(admin::update_credentials))
        .route("/admin/limits", put(admin::update_limits))
        .route("/admin/stats", get(admin::stats))
        .route("/admin/users/{user_id}", get(admin::user))
        .route("/admin/reset", post(admin::reset))
        .route("/healthz", get(admin::healthz))
        .layer(DefaultBodyLimit::max(256 * 1024 * 1024));
    Router::new()
        .route(
            "/v2/risk/predictors",
            post(finbox::production).fallback(wrong_path),
        )
        .route(
            "/staging/risk/predictors",
            post(finbox::staging).fallback(wrong_path),
        )
        .route(
            "/api/fetch_extracted_data",
            post(credeau::fetch).fallback(wrong_path),
        )
        .merge(admin)
        .fallback(wrong_path)
        .with_state(sim)
}

/// A simulator serving on a real socket until [`RunningSimulator::shutdown`].
pub struct RunningSimulator {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), SimulatorError>>,
}

impl RunningSimulator {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`, the base URL both provider clients are given.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets in-flight answers finish, and waits for the server.
    pub async fn shutdown(self) -> Result<(), SimulatorError> {
        self.stop.cancel();
        match self.task.await {
            Ok(result) => result,
            Err(join) => Err(SimulatorError::Serve(std::io::Error::other(join))),
        }
    }
}

/// Binds `config.listen` and serves in a background task.
pub async fn spawn(config: SimulatorConfig) -> Result<RunningSimulator, SimulatorError> {
    config.scenarios.validate()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| SimulatorError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| SimulatorError::Bind {
            addr: config.listen,
            source,
        })?;
    let app = router(Arc::new(Sim::new(&config)));
    let stop = CancellationToken::new();
    let stopped = stop.clone().cancelled_owned();
    // Small answers are the norm; Nagle's delay would dominate their latency.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
            .map_err(SimulatorError::Serve)
    });
    Ok(RunningSimulator { addr, stop, task })
}

/// Reads a scenario file.
pub fn load_scenarios(path: &Path) -> Result<ScenarioSet, SimulatorError> {
    let text = std::fs::read(path).map_err(|source| SimulatorError::ReadScenarios {
        path: path.to_owned(),
        source,
    })?;
    let set: ScenarioSet =
        serde_json::from_slice(&text).map_err(|source| SimulatorError::ParseScenarios {
            path: path.to_owned(),
            source,
        })?;
    set.validate()?;
    Ok(set)
}

impl SimulateArgs {
    pub fn into_config(self) -> Result<SimulatorConfig, SimulatorError> {
        let scenarios = match &self.scenarios {
            Some(path) => load_scenarios(path)?,
            None => ScenarioSet::default(),
        };
        Ok(SimulatorConfig {
            listen: self.listen,
            seed: self.seed,
            credentials: Credentials {
                finbox_api_key: self.finbox_api_key,
                finbox_server_hash: self.finbox_server_hash,
                credeau_client_id: self.credeau_client_id,
                credeau_auth_token: self.credeau_auth_token,
                finbox_ip_blocked: false,
                credeau_ip_blocked: false,
            },
            finbox_rate_limit_per_minute: self.finbox_rate_limit_per_minute,
            credeau_rate_limit_per_minute: self.credeau_rate_limit_per_minute,
            scenarios,
        })
    }
}

/// Runs the simulator until `shutdown` is cancelled.
pub async fn run(args: SimulateArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let scenario_summary = (
        config.scenarios.users.len(),
        config.scenarios.prefixes.len(),
    );
    let running = spawn(config).await?;
    tracing::info!(
        addr = %running.addr(),
        users = scenario_summary.0,
        prefixes = scenario_summary.1,
        "provider simulator listening (FinBox /v2/risk/predictors, Credeau /api/fetch_extracted_data, admin /admin/*)"
    );
    shutdown.cancelled().await;
    running.shutdown().await?;
    Ok(())
}
