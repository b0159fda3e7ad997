//! `cargo xtask …`: everything a developer or CI runs, each command doing the set-up it needs.

mod bench_kubernetes;
mod bench_l7;
mod bench_maglev;
mod ebpf;
mod kube;
mod setup;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "xlb project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install everything a fresh machine needs (toolchains, bpf-linker, Debian packages).
    /// Idempotent and cached; every other command runs it first.
    Setup,
    /// Build the eBPF object (lb-ebpf) with BTF.
    BuildEbpf {
        /// Build the debug profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Build everything: the eBPF object, then the `xlb` binary (release).
    Build,
    /// Run all tests (unit, packet fixtures, privileged integration tests). Needs root.
    Test {
        /// Extra arguments passed to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// `cargo fmt --check` and `cargo clippy -D warnings` over both workspaces.
    Lint,
    /// Run the demo: xlb on network namespaces with the embedded default config.
    Demo,
    /// Build (once, cached) the kube-apiserver the Kubernetes tests run; prints its path.
    KubeApiserver,
    /// Benchmarks; each prints a table, or one JSON object per line with --json.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Per-packet cost of the XDP balancer under BPF_PROG_TEST_RUN, against a pass floor.
    Datapath {
        #[arg(long)]
        json: bool,
        /// Test runs per class per round (one packet per run).
        #[arg(long, default_value_t = 1_000_000)]
        runs: u32,
        /// Rounds per class; the median is reported.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
    },
    /// Forwarding through an LB-node namespace: xlb vs iptables DNAT vs a bare XDP redirect.
    Forwarding {
        #[arg(long)]
        json: bool,
        /// Seconds per measured run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// Interleaved rounds per case; the median is reported.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
    },
    /// Maglev table build time against the paper's figures.
    Maglev {
        #[arg(long)]
        json: bool,
    },
    /// `xlb agent --kubernetes` against the real kube-apiserver: Services × endpoints created,
    /// initial sync, change → maps latency p50/p99, the agent's peak RSS.
    Kubernetes {
        #[arg(long)]
        json: bool,
        /// LoadBalancer Services (one VIP each).
        #[arg(long, default_value_t = 10_000)]
        services: u32,
        /// Endpoints per Service (one EndpointSlice each).
        #[arg(long, default_value_t = 10)]
        endpoints: u32,
        /// Single-endpoint changes timed one at a time.
        #[arg(long, default_value_t = 1_000)]
        changes: u32,
    },
    /// L7 proxy against nginx and HAProxy with wrk.
    L7 {
        #[arg(long)]
        json: bool,
        /// Seconds per measured round.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Interleaved rounds per proxy and scheme.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Let idle CPUs halt. By default the bench holds a 0 µs CPU wake-up latency request
        /// (/dev/cpu_dma_latency, as tuned's latency-performance profile does), so a proxy
        /// that leaves its CPU idle is not timed waking a halted vCPU.
        #[arg(long)]
        idle_states: bool,
        /// Also measure HTTP/2 to the upstream (scheme `h2c-up`: xlb `protocol = "h2"`,
        /// nginx `grpc_pass`, HAProxy `proto h2`), with HTTP/1.1 clients.
        #[arg(long)]
        h2_upstream: bool,
        /// Also measure 1 KiB POST requests over HTTP (scheme `http-post`).
        #[arg(long)]
        post: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup => setup::run(),
        Command::BuildEbpf { debug } => {
            setup::run()?;
            ebpf::build(!debug).map(|_| ())
        }
        Command::Build => {
            setup::run()?;
            ebpf::build(true)?;
            util::cargo(&["build", "--release", "-p", "lb-userspace"])
        }
        Command::Test { args } => {
            setup::run()?;
            ebpf::build(true)?;
            util::require_root("the tests load XDP programs and create network namespaces")?;
            let apiserver = kube::ensure()?;
            // SAFETY: still single-threaded here; the spawned `cargo test` inherits it.
            unsafe { std::env::set_var(kube::ENV_VAR, &apiserver) };
            let mut cmd = vec!["test", "--workspace"];
            cmd.extend(args.iter().map(String::as_str));
            util::cargo_test_with_summary(&cmd)
        }
        Command::Lint => {
            setup::run()?;
            ebpf::build(true)?;
            util::cargo(&["fmt", "--all", "--", "--check"])?;
            util::cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])?;
            ebpf::clippy()
        }
        Command::Demo => {
            setup::run()?;
            ebpf::build(true)?;
            util::require_root("the demo creates network namespaces and attaches XDP")?;
            util::cargo(&["build", "--release", "-p", "lb-userspace"])?;
            util::cargo(&["build", "--release", "-p", "xlb-tests", "--example", "demo"])?;
            util::run_checked(&mut std::process::Command::new(
                util::project_root().join("target/release/examples/demo"),
            ))
        }
        Command::KubeApiserver => kube::run(),
        Command::Bench { which } => {
            setup::run()?;
            match which {
                Bench::Datapath { json, runs, rounds } => {
                    ebpf::build(true)?;
                    util::require_root("the benchmark loads XDP programs")?;
                    util::cargo(&["build", "--release", "-p", "xlb-tests", "--examples"])?;
                    let mut cmd = std::process::Command::new(
                        util::project_root().join("target/release/examples/bench_datapath"),
                    );
                    cmd.args(["--runs", &runs.to_string(), "--rounds", &rounds.to_string()]);
                    if json {
                        cmd.arg("--json");
                    }
                    util::run_checked(&mut cmd)
                }
                Bench::Forwarding {
                    json,
                    seconds,
                    rounds,
                } => {
                    ebpf::build(true)?;
                    util::require_root(
                        "the benchmark creates network namespaces and attaches XDP",
                    )?;
                    util::cargo(&[
                        "build",
                        "--release",
                        "-p",
                        "xlb-tests",
                        "--example",
                        "bench_forwarding",
                    ])?;
                    let mut cmd = std::process::Command::new(
                        util::project_root().join("target/release/examples/bench_forwarding"),
                    );
                    cmd.args([
                        "--seconds",
                        &seconds.to_string(),
                        "--rounds",
                        &rounds.to_string(),
                    ]);
                    if json {
                        cmd.arg("--json");
                    }
                    util::run_checked(&mut cmd)
                }
                Bench::Maglev { json } => bench_maglev::run(json),
                Bench::Kubernetes {
                    json,
                    services,
                    endpoints,
                    changes,
                } => bench_kubernetes::run(&bench_kubernetes::Options {
                    json,
                    services,
                    endpoints,
                    changes,
                }),
                Bench::L7 {
                    json,
                    seconds,
                    rounds,
                    idle_states,
                    h2_upstream,
                    post,
                } => bench_l7::run(json, seconds, rounds, idle_states, h2_upstream, post),
            }
        }
    }
}
