//! xlb userspace: the datapath loader and map API, the agent, the L7 proxy and the CLI.
//!
//! Pure logic (Maglev, config validation, diffing, routing) lives in plain modules that are
//! tested on the host without root; only `datapath` touches the kernel.

pub mod agent;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod decap;
pub mod filewatch;
pub mod kubernetes;
pub mod maglev;
pub mod manager;
pub mod metrics;
pub mod model;
pub mod neighbours;
pub mod plan;
pub mod proxy;
pub mod state;
