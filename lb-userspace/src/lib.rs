//! xlb userspace library: datapath loader and map API, agent, proxy, CLI.
