//! `stackwarden-emulator`: serves the emulator on loopback until SIGINT or SIGTERM.
//!
//! It prints `endpoint=<url>` on stdout once it serves, so a script can start it with
//! `--listen 127.0.0.1:0` and read the port.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use stackwarden_emulator::{Backend, Config, Emulator, Settings, Unsandboxed};

#[derive(Parser)]
#[command(
    version,
    about = "AWS emulator for stackwarden's tests: the APIs moto lacks, in front of moto"
)]
struct Args {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:4566")]
    listen: std::net::SocketAddr,
    /// Use the moto server running at this URL instead of starting one.
    #[arg(long, conflicts_with = "moto_server")]
    moto_url: Option<String>,
    /// The moto_server executable to start (default: .venv/bin/moto_server, else from PATH).
    #[arg(long, env = "STACKWARDEN_MOTO")]
    moto_server: Option<PathBuf>,
    /// Give every instance without an explicit sandbox the directory <DIR>/<instance-id>.
    #[arg(long)]
    sandbox_dir: Option<PathBuf>,
    /// Run the commands of every instance without a sandbox in this one directory.
    #[arg(long, conflicts_with = "sandbox_dir")]
    shared_sandbox: Option<PathBuf>,
    /// Environment for commands run in sandboxes, KEY=VALUE (repeatable).
    #[arg(long = "sandbox-env", value_parser = key_value)]
    sandbox_env: Vec<(String, String)>,
    /// What commands sent to an instance without a sandbox do.
    #[arg(long, value_enum, default_value_t = Unsandboxed::Succeed)]
    unsandboxed: Unsandboxed,
    /// Milliseconds that asynchronous transitions (Grafana workspaces, alertmanager
    /// definitions) take.
    #[arg(long, default_value_t = 200)]
    transition_delay_ms: u64,
    /// DescribeInstanceRefreshes calls an instance refresh takes to succeed.
    #[arg(long, default_value_t = 3)]
    refresh_polls: u32,
    /// Milliseconds after CreateInstanceProfile that RunInstances refuses the new profile.
    #[arg(long, default_value_t = 0)]
    profile_propagation_ms: u64,
    /// Milliseconds after RunInstances that SSM does not know the new instance.
    #[arg(long, default_value_t = 0)]
    ssm_registration_ms: u64,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn moto_server(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let venv = PathBuf::from(".venv/bin/moto_server");
    if venv.is_file() {
        return Ok(venv);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("moto_server"))
        .find(|p| p.is_file())
        .context("moto_server not found: install moto[server] (tests/run.sh puts it in .venv/), or pass --moto-server or --moto-url")
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let backend = match args.moto_url {
        Some(url) => Backend::Url(url),
        None => Backend::Spawn(moto_server(args.moto_server)?),
    };
    let settings = Settings {
        transition_delay: std::time::Duration::from_millis(args.transition_delay_ms),
        refresh_polls: args.refresh_polls,
        profile_propagation: std::time::Duration::from_millis(args.profile_propagation_ms),
        ssm_registration: std::time::Duration::from_millis(args.ssm_registration_ms),
        sandbox_dir: args.sandbox_dir,
        shared_sandbox: args.shared_sandbox,
        sandbox_env: args.sandbox_env.into_iter().collect(),
        unsandboxed: args.unsandboxed,
        ..Settings::default()
    };
    let emulator = Emulator::start(Config {
        listen: args.listen,
        backend,
        settings,
    })?;
    println!("endpoint={}", emulator.endpoint());
    tracing::info!(
        endpoint = emulator.endpoint(),
        moto = emulator.moto_endpoint(),
        "serving"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    drop(emulator);
    Ok(())
}
