//! The `ktb` command line: flags in, [`ktb`] library calls, human output,
//! and an exit code a script can branch on ([`exit`]).

mod exit;
mod progress;

mod config;
mod config_command;
mod session_flags;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use config::Config;
use config_command::ConfigCommand;
use ktb::agent_image::ExportOptions;
use ktb::cluster::{self, Cluster, KubeOptions};
use ktb::connect;
use ktb::exchange;
use ktb::expose::Expose;
use ktb::forward::{ForwardOptions, PortSpec};
use ktb::report::{Event, Reporter};
use ktb::session::agent_pod::DEFAULT_AGENT_IMAGE;
use ktb::tunnel::{attach, AttachOptions, Direct};
use ktb::{mesh, preview};
use ktb_proto::{ClientKey, SessionConfig};

use progress::{LogWriter, Screen};
use session_flags::{AgentArgs, ConnectArgs, ExchangeArgs, MeshArgs, PreviewArgs};

// Linux releases are static musl builds, and musl's allocator gives a
// freed buffer of a few dozen KiB straight back to the kernel, so each
// port-forward message would cost fresh zeroed pages; dlmalloc keeps freed
// memory for the next one (the agent's main.rs has the measurements).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

#[derive(Parser)]
#[command(
    name = "ktb",
    version,
    about = "kube traffic bridge: your laptop and a Kubernetes cluster as one network",
    after_help = exit::HELP
)]
struct Cli {
    /// More detail (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(flatten)]
    kube: KubeArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send every caller of a cluster Service to a process on this machine;
    /// Ctrl-C (or SIGTERM, SIGHUP, closing the terminal) restores the Service.
    Exchange(ExchangeArgs),
    /// Share a Service with colleagues: only requests carrying your mark
    /// (a header, or a W3C baggage entry of the same key) reach this
    /// machine; all others reach the Service's pods. Ctrl-C leaves; the
    /// last member to leave restores the Service.
    Mesh(MeshArgs),
    /// Publish a process on this machine as a new Service of the namespace;
    /// Ctrl-C (or losing this machine for the grace period) removes it.
    Preview(PreviewArgs),
    /// Reach pod IPs, ClusterIPs and cluster DNS names from this machine;
    /// Ctrl-C puts the machine's routes and DNS back as they were.
    Connect(ConnectArgs),
    /// Repair what vanished sessions left in the namespace; live sessions
    /// of other developers are never touched.
    Clean {
        /// Only say what would be repaired.
        #[arg(long)]
        dry_run: bool,
        /// Instead: undo what a crashed `ktb connect` changed on this
        /// machine (routes, TUN device, resolv.conf, /etc/hosts).
        #[arg(long)]
        local: bool,
        /// Where `ktb connect` keeps its journal (with --local).
        #[arg(long, env = "KTB_STATE_DIR", default_value = "/var/lib/ktb")]
        state_dir: PathBuf,
    },
    /// Every ktb session in the namespace, from what the cluster holds:
    /// kind, Service, developer, machine, since, last renewal, health.
    Status {
        /// Every namespace you may list Leases in, instead of one.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// `table` for people, `json` for scripts.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Reach a Service's pods from local ports, like `kubectl port-forward
    /// svc/NAME`, following the Service to a new pod when its pod is
    /// replaced; Ctrl-C stops. Creates nothing in the cluster.
    Forward {
        /// The Service (`web`, `svc/web`).
        service: String,
        /// [LOCAL:]REMOTE: the Service port REMOTE (number or name) on local
        /// port LOCAL (default: the Service port's number). Repeatable.
        #[arg(required = true, value_name = "[LOCAL:]REMOTE")]
        ports: Vec<PortSpec>,
        /// Local addresses to listen on (repeatable, or comma-separated).
        #[arg(long = "address", value_delimiter = ',', default_value = "127.0.0.1")]
        addresses: Vec<std::net::IpAddr>,
    },
    /// Restore a Service that a vanished ktb session left exchanged or meshed.
    Recover {
        service: String,
        /// Restore even if the session's ktb still renews its lock.
        #[arg(long)]
        force: bool,
    },
    /// Check what ktb needs, one row each (PASS, WARN, FAIL, with what to
    /// do): the kubeconfig, the cluster, every command's permissions, a
    /// throwaway agent reached through a port-forward, leftovers of
    /// crashed sessions, and this machine's TUN device and DNS. Exits 1 if
    /// a check fails.
    Doctor {
        /// `table` for people, `json` for scripts.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Leave out the agent check, which creates a session Lease, an
        /// agent pod and its RBAC for a few seconds (then removes them).
        #[arg(long)]
        no_agent: bool,
        /// Where `ktb connect` keeps its journal.
        #[arg(long, env = "KTB_STATE_DIR", default_value = "/var/lib/ktb")]
        state_dir: PathBuf,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Print a completion script for SHELL to standard output, e.g.
    /// `ktb completion bash > /etc/bash_completion.d/ktb` or
    /// `ktb completion zsh > "${fpath[1]}/_ktb"`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Defaults for the flags, kept in a file, for every kubeconfig context
    /// or per context: show, get, set, unset, path.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The agent ktb runs in the cluster: its image, for clusters that
    /// cannot pull it from ghcr.io.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Attach to an agent by address and serve its callers from local ports
    /// (what `exchange --transport direct` does once the agent exists).
    /// Generates this session's key pair and prints the public key first:
    /// start the agent with `--client-key` set to it. The private key stays
    /// in this process's memory; a new `ktb attach` needs a new agent.
    Attach {
        /// The agent's tunnel endpoint, HOST:PORT.
        #[arg(long)]
        agent: String,
        /// LOCAL[:REMOTE]: serve agent port REMOTE from 127.0.0.1:LOCAL. Repeatable.
        #[arg(long, required = true)]
        expose: Vec<Expose>,
    },
}

/// `ktb agent …`.
#[derive(Subcommand)]
enum AgentCommand {
    /// The agent's container image.
    Image {
        #[command(subcommand)]
        command: AgentImageCommand,
    },
}

/// `ktb agent image …`.
#[derive(Subcommand)]
enum AgentImageCommand {
    /// Write the agent image as an OCI image-layout archive (no Docker
    /// needed), to load into a registry the cluster pulls from
    /// (`skopeo copy oci-archive:FILE docker://REGISTRY/ktb-agent:VERSION`)
    /// or into a node's containerd (`ctr -n k8s.io images import FILE`);
    /// then point --agent-image (config key `agent-image`) at it.
    Export {
        /// The archive to write.
        #[arg(short, long, value_name = "FILE", default_value = concat!("ktb-agent-", env!("CARGO_PKG_VERSION"), ".tar"))]
        output: PathBuf,
        /// The static Linux ktb-agent to put in the image; the image's
        /// architecture is its own [default: ktb-agent beside this ktb].
        #[arg(long, value_name = "PATH")]
        agent_binary: Option<PathBuf>,
        /// The image's name in the archive (what `ctr images import` calls it).
        #[arg(long, value_name = "NAME", default_value = DEFAULT_AGENT_IMAGE)]
        tag: String,
    },
}

/// kubectl-compatible connection flags.
#[derive(clap::Args, Debug, Clone, Default)]
struct KubeArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    /// Namespace (default: the config file's, else the context's namespace).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
}

impl From<KubeArgs> for KubeOptions {
    fn from(args: KubeArgs) -> KubeOptions {
        KubeOptions {
            kubeconfig: args.kubeconfig,
            context: args.context,
            namespace: args.namespace,
        }
    }
}

/// `status --output`, `config show --output`.
#[derive(Clone, Copy, ValueEnum)]
enum Output {
    /// Aligned columns.
    Table,
    /// One JSON document.
    Json,
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let (cli, config) = match parse_cli(&args, config::locate(|name| std::env::var_os(name))) {
        Ok(parsed) => parsed,
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(e) => {
                let _ = e.print();
                return ExitCode::from(if e.use_stderr() {
                    exit::USAGE
                } else {
                    exit::SUCCESS
                });
            }
            Err(e) => {
                eprintln!("ktb: error: {e:#}");
                return ExitCode::from(exit::FAILURE);
            }
        },
    };
    let screen = Arc::new(Screen::for_stderr());
    init_logging(cli.verbose, &screen);
    // One thread: the work is moving bytes between sockets, and on the small
    // machines this runs on (a laptop beside an IDE, a pod with a CPU limit)
    // cross-thread wake-ups cost more than they bring; `cargo xtask bench
    // tunnel` measured lower latency and equal throughput this way. Except
    // for `connect`: ipstack, which carries its UDP, also takes any TCP the
    // laptop sends over IPv6 and blocks in place when it drops such a
    // connection, which needs a multi-threaded runtime. One worker still:
    // `cargo xtask bench connect` measured RR p50 1.09× the port-forward
    // in two runs against 1.18× with two workers, the CLI spending 1.58–1.68
    // CPU s per GiB against 1.90, at the same throughput (2026-12-05).
    let runtime = match cli.command {
        Command::Connect(_) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ktb: error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let outcome = runtime.block_on(run(cli.kube, cli.command, &config, Arc::clone(&screen)));
    screen.finish();
    match outcome {
        Ok(()) => ExitCode::from(exit::SUCCESS),
        Err(e) => {
            eprintln!("ktb: error: {}", ktb::cluster::one_line(&e));
            exit::of(&e)
        }
    }
}

/// `args` parsed over the defaults of the config file at `config_path`.
/// A clap error (a bad flag, or `--help`) is for clap to print.
fn parse_cli(args: &[OsString], config_path: Option<PathBuf>) -> anyhow::Result<(Cli, Config)> {
    let config = Config::load(config_path, &Cli::command(), args)?;
    let mut command = config.apply(Cli::command());
    let matches = command.try_get_matches_from_mut(args)?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut command))?;
    Ok((cli, config))
}

/// Prints the library's events for the person at the terminal, with a
/// spinner while a step waits (see [`progress`]).
fn terminal_reporter(screen: Arc<Screen>) -> Reporter {
    Reporter::new(move |event| match event {
        Event::TunnelUp { .. } => tracing::info!("{event}"),
        _ => screen.show(&event),
    })
}

/// Reaches the cluster. The first contact may take until its timeout and
/// the library reports nothing meanwhile, so the wait is ktb's own to show.
async fn connect_cluster(kube: &KubeOptions, screen: &Screen) -> anyhow::Result<Cluster> {
    screen
        .during("connecting to the cluster", cluster::connect(kube))
        .await
}

async fn run(
    kube: KubeArgs,
    command: Command,
    config: &Config,
    screen: Arc<Screen>,
) -> anyhow::Result<()> {
    let kube = KubeOptions::from(kube);
    let reporter = terminal_reporter(Arc::clone(&screen));
    match command {
        Command::Exchange(args) => {
            let shutdown = shutdown_signal(Arc::clone(&screen));
            let cluster = connect_cluster(&kube, &screen).await?;
            exchange::run(&cluster, args.into(), &reporter, shutdown).await
        }
        Command::Mesh(args) => {
            let shutdown = shutdown_signal(Arc::clone(&screen));
            let cluster = connect_cluster(&kube, &screen).await?;
            mesh::run(&cluster, args.into(), &reporter, shutdown).await
        }
        Command::Preview(args) => {
            let shutdown = shutdown_signal(Arc::clone(&screen));
            let cluster = connect_cluster(&kube, &screen).await?;
            preview::run(&cluster, args.into(), &reporter, shutdown).await
        }
        Command::Connect(args) => {
            let shutdown = shutdown_signal(Arc::clone(&screen));
            let cluster = connect_cluster(&kube, &screen).await?;
            connect::run(&cluster, args.into(), &reporter, shutdown).await
        }
        Command::Clean {
            local: true,
            state_dir,
            ..
        } => ktb::clean::local(&state_dir, &reporter),
        Command::Clean { dry_run, .. } => {
            let cluster = connect_cluster(&kube, &screen).await?;
            ktb::clean::run(&cluster, dry_run, &reporter).await
        }
        Command::Status {
            all_namespaces,
            output,
        } => {
            let cluster = connect_cluster(&kube, &screen).await?;
            let rows = ktb::status::sessions(&cluster, all_namespaces).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Output::Table => print_sessions(&rows, &cluster.namespace, all_namespaces),
            }
            Ok(())
        }
        Command::Forward {
            service,
            ports,
            addresses,
        } => {
            let shutdown = shutdown_signal(Arc::clone(&screen));
            let cluster = connect_cluster(&kube, &screen).await?;
            let options = ForwardOptions {
                service,
                ports,
                addresses,
            };
            ktb::forward::run(&cluster, options, &reporter, shutdown).await
        }
        Command::Recover { service, force } => {
            let cluster = connect_cluster(&kube, &screen).await?;
            let service = service.trim_start_matches("svc/");
            ktb::recover::run(&cluster, service, force, &reporter).await
        }
        Command::Doctor {
            output,
            no_agent,
            state_dir,
            agent,
        } => {
            let shutdown = shutdown_signal(Arc::clone(&screen));
            let options = ktb::doctor::DoctorOptions {
                kube,
                agent: (!no_agent).then(|| agent.into()),
                state_dir,
            };
            let checks = ktb::doctor::run(&options, &reporter, shutdown).await?;
            screen.finish();
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&checks)?),
                Output::Table => print_checks(&checks),
            }
            ktb::doctor::verdict(&checks)
        }
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "ktb", &mut std::io::stdout());
            Ok(())
        }
        Command::Attach { agent, expose } => {
            let key = ClientKey::generate()?;
            let public = key.public();
            eprintln!(
                "ktb: this session's public key is {public}; start the agent with --client-key {public}"
            );
            let options = AttachOptions {
                key: Arc::new(key),
                exposes: expose,
                session: SessionConfig::default(),
            };
            let shutdown = shutdown_signal(Arc::clone(&screen));
            // attach has no ready line of its own: the tunnel's coming up is it.
            let shown = Arc::clone(&screen);
            let reporter = Reporter::new(move |event| shown.show(&event));
            attach(Direct { addr: agent }, options, reporter, shutdown).await?;
            eprintln!("ktb: detached");
            Ok(())
        }
        Command::Config { command } => config_command::run(command, config, &Cli::command()),
        Command::Agent {
            command:
                AgentCommand::Image {
                    command:
                        AgentImageCommand::Export {
                            output,
                            agent_binary,
                            tag,
                        },
                },
        } => export_agent_image(ExportOptions {
            binary: agent_binary,
            reference: tag,
            output,
        }),
    }
}

/// `ktb agent image export`: the archive, and how to put it to use.
fn export_agent_image(options: ExportOptions) -> anyhow::Result<()> {
    let written = ktb::agent_image::export(&options)?;
    let file = options.output.display();
    println!(
        "wrote {file}: {} (linux/{}, {})",
        options.reference,
        written.architecture.oci_name(),
        written.manifest_digest
    );
    let mirror = if options.reference == DEFAULT_AGENT_IMAGE {
        concat!("REGISTRY/ktb-agent:", env!("CARGO_PKG_VERSION")).to_owned()
    } else {
        options.reference
    };
    println!("copy it to a registry the cluster pulls from, and run agents from there:");
    println!("  skopeo copy oci-archive:{file} docker://{mirror}");
    println!("  ktb config set agent-image {mirror}");
    Ok(())
}

/// `ktb status` as a table, or a sentence when there is nothing.
fn print_sessions(rows: &[ktb::status::SessionRow], namespace: &str, all: bool) {
    if rows.is_empty() {
        let place = if all {
            "any namespace".to_owned()
        } else {
            format!("namespace {namespace}")
        };
        println!("no ktb sessions in {place}");
        return;
    }
    let header = [
        "NAMESPACE",
        "KIND",
        "SERVICE",
        "MARK",
        "USER",
        "HOST",
        "SESSION",
        "SINCE",
        "LAST RENEWAL",
        "HEALTH",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            vec![
                r.namespace.clone(),
                r.kind.clone(),
                or_dash(&r.service),
                or_dash(&r.mark),
                r.user.clone(),
                r.host.clone(),
                r.session.clone(),
                or_dash(&r.since),
                or_dash(&r.last_renewal),
                r.health.to_string(),
            ]
        })
        .collect();
    print_table(&header, &cells);
}

/// `ktb doctor` as a table: a row per check, its hint on a line of its own.
fn print_checks(checks: &[ktb::doctor::Check]) {
    let mut cells = Vec::new();
    for check in checks {
        cells.push(vec![
            check.status.to_string(),
            check.name.clone(),
            check.detail.clone(),
        ]);
        if let Some(hint) = &check.hint {
            cells.push(vec![String::new(), String::new(), format!("→ {hint}")]);
        }
    }
    print_table(&["STATUS", "CHECK", "DETAIL"], &cells);
}

/// `header` and `rows` in aligned columns.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|c| c[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |fields: Vec<&str>| {
        let padded: Vec<String> = fields
            .iter()
            .zip(&widths)
            .map(|(f, w)| format!("{f:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Ctrl-C, SIGTERM or SIGHUP (the terminal closing). The handlers are
/// installed when this is called, not when the future is first polled, so
/// a signal during start-up is held for the command to act on (undoing what
/// it already changed) instead of killing the process half-way. The steps
/// of undoing are waits, which `screen` then shows again.
#[cfg(unix)]
fn shutdown_signal(screen: Arc<Screen>) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
            _ = hangup.recv() => {}
        }
        screen.stopping();
    }
}

/// Windows: Ctrl-C or Ctrl-Break, or the console window closing; the
/// handlers installed at once for the same reason as on Unix.
#[cfg(windows)]
fn shutdown_signal(screen: Arc<Screen>) -> impl std::future::Future<Output = ()> {
    use tokio::signal::windows::{ctrl_break, ctrl_c, ctrl_close};
    let mut interrupt = ctrl_c().expect("Ctrl-C handler");
    let mut break_key = ctrl_break().expect("Ctrl-Break handler");
    let mut close = ctrl_close().expect("console close handler");
    async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = break_key.recv() => {}
            _ = close.recv() => {}
        }
        screen.stopping();
    }
}

fn init_logging(verbose: u8, screen: &Arc<Screen>) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KTB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer({
            let screen = Arc::clone(screen);
            move || LogWriter(Arc::clone(&screen))
        })
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn completion_scripts_name_every_command_and_the_kubectl_flags() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
            clap_complete::Shell::PowerShell,
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ktb", &mut script);
            let script = String::from_utf8(script).expect("a script is text");
            for word in ["exchange", "connect", "mesh", "namespace", "kubeconfig"] {
                assert!(script.contains(word), "{shell} completion lacks {word}");
            }
        }
    }
}
