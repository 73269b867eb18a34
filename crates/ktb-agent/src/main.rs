//! `ktb-agent`: parses its configuration and runs [`ktb_agent::Agent`] until
//! SIGTERM or SIGINT.

use clap::Parser;
use ktb_agent::config::LogFormat;
use ktb_agent::mesh::MeshRouter;
use ktb_agent::{Agent, Config};
use tokio::signal::unix::{signal, SignalKind};

// The agent ships statically linked against musl, whose allocator gives a
// freed buffer of a few dozen KiB straight back to the kernel: in 40 s of
// `cargo xtask bench exchange` the agent made 53,614 mmap/munmap pairs and 1.2
// million page faults (7,000 and 160,000 per second of its own CPU time),
// every tunnel message costing fresh zeroed pages. dlmalloc keeps freed memory
// for the next message and trims only what stays unused past 2 MiB.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

// One thread: the work is moving bytes between sockets, and on the small
// machines this runs on (a laptop beside an IDE, a pod with a CPU limit)
// cross-thread wake-ups cost more than they bring; `cargo xtask bench
// tunnel` measured lower latency and equal throughput this way.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut config = Config::parse();
    init_logging(config.log_format);
    config.read_resolver()?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    };
    if config.mesh_of.is_some() {
        MeshRouter::bind(config).await?.run(shutdown).await
    } else {
        Agent::bind(config).await?.run(shutdown).await
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KTB_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
