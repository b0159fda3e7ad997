//! The test bed run by the real binaries: `xlb agent` on the LB node with a config file,
//! `xlb decap` on every backend, servers on the VIPs. Used by the end-to-end scenarios.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use aya::programs::XdpMode;
use lb_common::program_names;
use lb_userspace::datapath::{Datapath, DatapathError};

use crate::agent_support::{Scratch, XlbProcess, write_atomically};
use crate::netns::PinDir;
use crate::testbed::*;

/// One backend of a VIP in a generated config.
#[derive(Clone, Debug)]
pub struct BackendSpec {
    pub address: IpAddr,
    pub weight: u32,
    pub draining: bool,
}

/// One VIP of a generated config.
#[derive(Clone, Debug)]
pub struct VipSpec {
    pub name: String,
    pub address: IpAddr,
    pub protocol: &'static str,
    pub port: u16,
    pub backends: Vec<BackendSpec>,
}

/// The test bed with the agent, decapsulators and servers running.
pub struct AgentBed {
    pub bed: Testbed,
    pub scratch: Scratch,
    pub pins: PinDir,
    pub config_path: PathBuf,
    pub agent: Option<XlbProcess>,
    applies_seen: usize,
    agent_starts: usize,
    _decaps: Vec<(PinDir, XlbProcess)>,
    _servers: Vec<BackendServer>,
    _client_pass: (PinDir, Datapath),
}

impl AgentBed {
    /// Builds the topology with `backends` backend hosts and starts the decapsulators and
    /// servers (TCP and UDP on ports 80 and 53). The agent is started by [`Self::start_agent`].
    pub fn new(tag: &str, backends: usize) -> Self {
        let bed = Testbed::new(&TestbedOptions {
            backends,
            client_addresses: 50,
        });
        bed.wait_for_neighbours();
        let scratch = Scratch::new(tag);
        let mut servers = Vec::new();
        let mut decaps = Vec::new();
        for b in &bed.backends {
            servers.push(BackendServer::start(b, 80));
            servers.push(BackendServer::start(b, 53));
            let pins = PinDir::new(&format!("{tag}-decap{}", b.index));
            let log = scratch.path.join(format!("decap{}.log", b.index));
            let pin = pins.path.to_str().expect("utf-8").to_owned();
            let mut p = XlbProcess::spawn(
                &b.ns,
                &[
                    "decap",
                    "--iface",
                    "eth0",
                    "--mode",
                    "native",
                    "--pin-dir",
                    &pin,
                ],
                log,
            );
            p.wait_log("decapsulating", Duration::from_secs(20));
            decaps.push((pins, p));
        }
        // Native XDP_TX toward the client (ICMP "too big" replies) is delivered only when
        // the client's veth runs an XDP program.
        let pass_pins = PinDir::new(&format!("{tag}-clientpass"));
        let opts = lb_userspace::datapath::LoadOptions {
            pin_dir: pass_pins.path.clone(),
            maglev_table_size: 3,
            max_vips: 1,
            max_backends: 2,
            conntrack_entries: 16,
        };
        let pass = in_ns(&bed.client, move || -> Result<Datapath, DatapathError> {
            let mut dp = Datapath::load(&opts)?;
            dp.attach(program_names::PASS, "c0", XdpMode::Driver)?;
            Ok(dp)
        })
        .expect("attach the pass program on the client");
        let pins = PinDir::new(&format!("{tag}-lb"));
        let config_path = scratch.path.join("xlb.toml");
        Self {
            bed,
            scratch,
            pins,
            config_path,
            agent: None,
            applies_seen: 0,
            agent_starts: 0,
            _decaps: decaps,
            _servers: servers,
            _client_pass: (pass_pins, pass),
        }
    }

    /// The agent's config file for these VIPs.
    pub fn config_text(&self, vips: &[VipSpec]) -> String {
        let mut out = format!(
            "[node]\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\ntunnel_source_v4 = \"192.0.2.1\"\n\
             tunnel_source_v6 = \"2001:db8:c::1\"\nmax_vips = 8\nmax_backends = 32\n\
             conntrack_entries = 65536\npin_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:9430\"\n",
            self.pins.path.display()
        );
        for v in vips {
            let _ = write!(
                out,
                "\n[[vips]]\nname = \"{}\"\naddress = \"{}\"\nprotocol = \"{}\"\nport = {}\n",
                v.name, v.address, v.protocol, v.port
            );
            for b in &v.backends {
                let state = if b.draining { "draining" } else { "active" };
                let _ = write!(
                    out,
                    "\n[[vips.backends]]\naddress = \"{}\"\nweight = {}\nstate = \"{state}\"\n",
                    b.address, b.weight
                );
            }
        }
        out
    }

    /// Writes the config (atomically, as config management does).
    pub fn write_config(&self, vips: &[VipSpec]) {
        write_atomically(&self.config_path, &self.config_text(vips));
    }

    /// Starts `xlb agent` on the LB node with the current config and waits until it applied it.
    pub fn start_agent(&mut self) {
        let config = self.config_path.to_str().expect("utf-8").to_owned();
        self.start_agent_with(&["--config", &config]);
    }

    /// The agent's state directory (read by the CLI through the pin directory's link).
    pub fn state_dir(&self) -> String {
        self.scratch
            .path
            .join("state")
            .to_str()
            .expect("utf-8")
            .to_owned()
    }

    /// Starts `xlb agent EXTRA… --state-dir <scratch>` on the LB node and waits until it
    /// applied its config.
    pub fn start_agent_with(&mut self, extra: &[&str]) {
        let log = self
            .scratch
            .path
            .join(format!("agent{}.log", self.agent_starts));
        self.agent_starts += 1;
        let state = self.state_dir();
        let mut args = vec!["agent"];
        args.extend_from_slice(extra);
        args.extend(["--state-dir", state.as_str()]);
        let mut agent = XlbProcess::spawn(&self.bed.lb, &args, log);
        agent.wait_log("agent ready", Duration::from_secs(30));
        self.applies_seen = 0;
        self.agent = Some(agent);
        self.wait_applied();
    }

    /// Rewrites the config and waits until the agent logs that it applied it.
    pub fn apply(&mut self, vips: &[VipSpec]) {
        self.write_config(vips);
        self.wait_applied();
    }

    /// Waits for one more "config applied" line than seen so far.
    pub fn wait_applied(&mut self) {
        let want = self.applies_seen + 1;
        let agent = self.agent.as_ref().expect("agent running");
        crate::agent_support::wait_for(
            "the agent to apply the config",
            Duration::from_secs(20),
            || (agent.log_text().matches("config applied").count() >= want).then_some(()),
        );
        self.applies_seen = want;
    }

    /// The running agent's log.
    pub fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map(XlbProcess::log_text)
            .unwrap_or_default()
    }

    /// SIGKILLs the agent (no clean-up of any kind runs).
    pub fn kill_agent(&mut self) {
        drop(self.agent.take());
    }

    /// The balancer's counters, read from the pins as the CLI does.
    pub fn stats(&self) -> lb_common::DatapathStats {
        lb_userspace::datapath::Maps::open_pinned(&self.pins.path)
            .and_then(|m| m.stats())
            .expect("read pinned counters")
    }
}

/// A TCP VIP on 203.0.113.10:80 over the first `n` backends with these weights.
pub fn web_vip(bed: &Testbed, weights: &[u32]) -> VipSpec {
    VipSpec {
        name: "web".into(),
        address: IpAddr::V4(VIP4),
        protocol: "tcp",
        port: 80,
        backends: bed
            .backends
            .iter()
            .zip(weights)
            .map(|(b, w)| BackendSpec {
                address: IpAddr::V4(b.addr),
                weight: *w,
                draining: false,
            })
            .collect(),
    }
}

/// Runs `count` short TCP requests to `vip` from the client's addresses (ephemeral ports)
/// and returns the answers per backend plus the number of failures.
pub fn spread(bed: &Testbed, vip: SocketAddr, count: usize) -> (BTreeMap<String, usize>, usize) {
    let srcs: Vec<Ipv4Addr> = bed.client_addrs.clone();
    in_ns(&bed.client, move || {
        let mut seen = BTreeMap::new();
        let mut failed = 0;
        for src in srcs.iter().cycle().take(count) {
            match tcp_request_here(IpAddr::V4(*src), 0, vip) {
                Ok(who) => *seen.entry(who).or_insert(0) += 1,
                Err(_) => failed += 1,
            }
        }
        (seen, failed)
    })
}
