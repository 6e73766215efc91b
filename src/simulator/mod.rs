//! The provider simulator (`insights-enricher simulate`): both provider
//! contracts over real HTTP, with per-user scenarios and injected faults.

use clap::Args;
use tokio_util::sync::CancellationToken;

/// Command-line arguments of `insights-enricher simulate`.
#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, env = "SIMULATOR_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
}

/// Runs the simulator until `shutdown` is cancelled.
pub async fn run(args: SimulateArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _ = (args, shutdown);
    anyhow::bail!("the simulator is not built yet")
}
