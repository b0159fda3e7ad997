//! `xlb`: one binary for the agent, the decapsulator, the L7 proxy and the CLI.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::cli::{self, Output};
use lb_userspace::datapath::{self, AttachMode, DEFAULT_PIN_DIR};
use lb_userspace::{agent, decap, proxy, state};

#[derive(Parser)]
#[command(
    name = "xlb",
    version,
    about = "XDP load balancer for Kubernetes edge nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--mode`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    /// In the driver; fail without driver support.
    Native,
    /// Generic (skb) XDP.
    Generic,
    /// Native, else generic with a warning.
    Auto,
}

impl From<ModeArg> for AttachMode {
    fn from(mode: ModeArg) -> Self {
        match mode {
            ModeArg::Native => AttachMode::Native,
            ModeArg::Generic => AttachMode::Generic,
            ModeArg::Auto => AttachMode::Auto,
        }
    }
}

#[derive(clap::Args)]
struct PinDirArg {
    /// bpffs directory of the pinned datapath.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

#[derive(clap::Args)]
struct OutputArg {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Subcommand)]
enum MaglevCommand {
    /// Per VIP, the share of table slots that would move if NEW were applied.
    Diff {
        /// The config that would be applied.
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        pin: PinDirArg,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run the L7 proxy (host/path routing, TLS termination).
    Proxy(proxy::ProxyArgs),
    /// Run the L4 balancer agent: load and attach XDP, apply the config file live, serve metrics.
    Agent {
        /// Config file (TOML or YAML), watched for changes. Without it: the embedded demo config.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Attach mode (overrides node.xdp_mode).
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        /// bpffs pin directory (overrides node.pin_dir).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// Metrics listen address (overrides node.metrics_listen).
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Directory of the state file the CLI reads.
        #[arg(long, default_value = state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[command(flatten)]
        kube: lb_userspace::kubernetes::KubeArgs,
    },
    /// Run the decapsulator on a backend: strip xlb's tunnels addressed to this host.
    Decap {
        /// Interface to attach to.
        #[arg(long)]
        iface: String,
        /// Tunnel endpoint addresses to accept (repeatable); default: the interface's addresses.
        #[arg(long = "address")]
        addresses: Vec<IpAddr>,
        /// Attach mode.
        #[arg(long, value_enum, default_value = "auto")]
        mode: ModeArg,
        /// bpffs pin directory of the decapsulator.
        #[arg(long, default_value = decap::DEFAULT_DECAP_PIN_DIR)]
        pin_dir: PathBuf,
        /// On exit, leave the program attached and pinned (remove later with
        /// `xlb unload --pin-dir DIR`). Default: detach and remove the pins.
        #[arg(long)]
        keep: bool,
    },
    /// VIPs: protocol/port, mode, backends active/total, packets, bytes, new connections.
    Vips {
        #[command(flatten)]
        pin: PinDirArg,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Backends of one VIP (by name, ADDRESS:PORT/PROTO, or address).
    Backends {
        vip: String,
        #[command(flatten)]
        pin: PinDirArg,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Datapath counters: outcomes, drop reasons, conntrack, decapsulation.
    Stats {
        #[command(flatten)]
        pin: PinDirArg,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Connection-table entries.
    Conntrack {
        /// Only this VIP's entries.
        #[arg(long)]
        vip: Option<String>,
        /// At most this many entries.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        pin: PinDirArg,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Which backend a flow goes to and why: hash, table slot, Maglev pick, conntrack entry.
    Explain {
        /// Client address and port (`192.0.2.7:40000`, `[2001:db8::7]:40000`).
        src: SocketAddr,
        /// VIP address and port.
        dst: SocketAddr,
        /// tcp or udp.
        proto: String,
        #[command(flatten)]
        pin: PinDirArg,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Maglev table tools.
    #[command(subcommand)]
    Maglev(MaglevCommand),
    /// Detach the programs and remove the pins (drops all connection state).
    Unload {
        #[command(flatten)]
        pin: PinDirArg,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("XLB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn run_decap(opts: decap::DecapOptions, keep: bool) -> anyhow::Result<()> {
    let running = decap::Decap::start(&opts)?;
    let addresses: Vec<String> = running.addresses.iter().map(|a| a.to_string()).collect();
    tracing::info!(
        iface = %opts.iface,
        addresses = %addresses.join(","),
        attached = ?running.attached,
        pin_dir = %opts.pin_dir.display(),
        "decapsulating"
    );
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    running.stop(keep)?;
    if keep {
        tracing::info!("exiting; decapsulation stays attached (`xlb unload --pin-dir` removes it)");
    } else {
        tracing::info!("detached and unpinned");
    }
    Ok(())
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Proxy(args) => runtime()?.block_on(proxy::run(args)),
        Command::Agent {
            config,
            mode,
            pin_dir,
            metrics_listen,
            state_dir,
            kube,
        } => {
            let opts = agent::AgentOptions {
                kubernetes: kube.options(),
                config_path: config,
                pin_dir,
                mode: mode.map(Into::into),
                metrics_listen,
                state_dir,
            };
            runtime()?.block_on(agent::run(opts))?;
            Ok(())
        }
        Command::Decap {
            iface,
            addresses,
            mode,
            pin_dir,
            keep,
        } => {
            let opts = decap::DecapOptions {
                iface,
                addresses,
                pin_dir,
                mode: mode.into(),
            };
            runtime()?.block_on(run_decap(opts, keep))
        }
        Command::Vips { pin, out } => {
            print!("{}", cli::vips(&cli::open(&pin.pin_dir)?, out.output)?);
            Ok(())
        }
        Command::Backends { vip, pin, out } => {
            print!(
                "{}",
                cli::backends(&cli::open(&pin.pin_dir)?, &vip, out.output)?
            );
            Ok(())
        }
        Command::Stats { pin, out } => {
            print!("{}", cli::stats(&cli::open(&pin.pin_dir)?, out.output)?);
            Ok(())
        }
        Command::Conntrack {
            vip,
            limit,
            pin,
            out,
        } => {
            let pinned = cli::open(&pin.pin_dir)?;
            print!(
                "{}",
                cli::conntrack(&pinned, vip.as_deref(), limit, out.output)?
            );
            Ok(())
        }
        Command::Explain {
            src,
            dst,
            proto,
            pin,
            out,
        } => {
            let protocol = cli::parse_protocol(&proto)?;
            let pinned = cli::open(&pin.pin_dir)?;
            let explanation = cli::explain(&pinned, src, dst, protocol)?;
            print!("{}", cli::render_explanation(&explanation, out.output));
            Ok(())
        }
        Command::Maglev(MaglevCommand::Diff { config, pin, out }) => {
            let pinned = cli::open(&pin.pin_dir)?;
            let rows = cli::maglev_diff(&pinned, &config)?;
            print!("{}", cli::render_maglev_diff(&rows, out.output));
            Ok(())
        }
        Command::Unload { pin } => {
            let done = datapath::unload(&pin.pin_dir)
                .with_context(|| format!("unloading {}", pin.pin_dir.display()))?;
            println!(
                "detached {} link(s) ({}), removed {} map pin(s) and {}",
                done.links.len(),
                done.links.join(", "),
                done.maps,
                pin.pin_dir.display()
            );
            Ok(())
        }
    }
}

/// jemalloc rather than glibc's malloc: see docs/agent.md ("Memory").
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once when it initialises (`_RJEM_MALLOC_CONF` in the environment
/// still overrides them). One arena: the agent's threads (tokio workers, the blocking pool,
/// the state writer, the neighbour thread) free what another allocated, and with an arena
/// per thread each kept its own freed pages — the agent's peak RSS at 10,000 Services was
/// 171 MB against ~90 MB live. A background thread returns freed pages 250 ms after they
/// fall idle. The proxy's request path does not allocate, and per-thread caches serve its
/// connection set-up, so one arena costs it nothing measurable (`cargo xtask bench l7`).
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_OPTIONS: JemallocOptions = JemallocOptions(
    c"narenas:1,background_thread:true,dirty_decay_ms:250,muzzy_decay_ms:0".as_ptr(),
);

/// A `const char *` for C to read.
#[cfg(feature = "jemalloc")]
#[repr(transparent)]
struct JemallocOptions(*const std::ffi::c_char);

// SAFETY: points at a static, immutable C string.
#[cfg(feature = "jemalloc")]
unsafe impl Sync for JemallocOptions {}

fn main() {
    init_tracing();
    let cli = Cli::parse();
    if let Err(e) = run(cli.command) {
        // One line: the error and its causes.
        eprintln!("xlb: {e:#}");
        std::process::exit(1);
    }
}
