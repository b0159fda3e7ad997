//! `xlb decap` for real: attaches to an interface in a namespace, fills the address set,
//! detaches on SIGTERM (or stays with `--keep` until `xlb unload`).

use std::time::Duration;

use lb_userspace::datapath::Maps;
use lb_userspace::model::address_words;
use xlb_tests::agent_support::*;
use xlb_tests::netns::PinDir;
use xlb_tests::require_root;

fn decap_addresses(pin_dir: &PinDir) -> Vec<[u32; 4]> {
    let maps = Maps::open_pinned(&pin_dir.path).unwrap();
    let mut keys: Vec<[u32; 4]> = maps
        .decap_addrs
        .keys()
        .map(|k| k.unwrap().addr_be)
        .collect();
    keys.sort();
    keys
}

#[test]
fn decap_attaches_with_the_interface_addresses_and_detaches_on_sigterm() {
    require_root();
    let topo = Topology::new("d");
    let pin_dir = PinDir::new("decap");
    let scratch = Scratch::new("decap");
    let pin = pin_dir.path.to_str().unwrap();
    let mut decap = XlbProcess::spawn(
        &topo.lb,
        &["decap", "--iface", &topo.lb_if, "--pin-dir", pin],
        scratch.path.join("decap.log"),
    );
    decap.wait_log("decapsulating", Duration::from_secs(20));
    assert_eq!(
        Topology::xdp_program(&topo.lb, &topo.lb_if).as_deref(),
        Some("xlb_decap")
    );
    assert_eq!(
        decap_addresses(&pin_dir),
        vec![address_words("192.0.2.1".parse().unwrap()).0],
        "defaults to the interface's own address"
    );
    topo.send_to_lb(5);
    wait_for("decap counters", Duration::from_secs(10), || {
        let stats = xlb_json(&["stats"], &pin_dir.path);
        (stats["decap"]["rx_packets"].as_u64()? > 0).then_some(())
    });
    assert!(decap.terminate(), "{}", decap.log_text());
    assert_eq!(
        Topology::xdp_program(&topo.lb, &topo.lb_if),
        None,
        "detached on exit"
    );
    assert!(!pin_dir.path.exists(), "pins removed on exit");
}

#[test]
fn decap_keep_stays_attached_until_unload() {
    require_root();
    let topo = Topology::new("k");
    let pin_dir = PinDir::new("decapkeep");
    let scratch = Scratch::new("decapkeep");
    let pin = pin_dir.path.to_str().unwrap();
    let args = [
        "decap",
        "--iface",
        &topo.lb_if,
        "--pin-dir",
        pin,
        "--mode",
        "generic",
        "--keep",
        "--address",
        "198.51.100.7",
        "--address",
        "2001:db8::7",
    ];
    let mut decap = XlbProcess::spawn(&topo.lb, &args, scratch.path.join("decap1.log"));
    decap.wait_log("decapsulating", Duration::from_secs(20));
    assert_eq!(decap_addresses(&pin_dir).len(), 2);
    assert!(decap.terminate());
    assert_eq!(
        Topology::xdp_program(&topo.lb, &topo.lb_if).as_deref(),
        Some("xlb_decap"),
        "--keep leaves it attached"
    );
    // A second run adopts the pinned link and replaces the address set.
    let mut decap = XlbProcess::spawn(
        &topo.lb,
        &[
            "decap",
            "--iface",
            &topo.lb_if,
            "--pin-dir",
            pin,
            "--keep",
            "--address",
            "198.51.100.8",
        ],
        scratch.path.join("decap2.log"),
    );
    decap.wait_log("decapsulating", Duration::from_secs(20));
    assert!(decap.log_text().contains("Adopted"), "{}", decap.log_text());
    assert_eq!(
        decap_addresses(&pin_dir),
        vec![address_words("198.51.100.8".parse().unwrap()).0]
    );
    assert!(decap.terminate());
    xlb_ok(&["unload", "--pin-dir", pin]);
    assert_eq!(Topology::xdp_program(&topo.lb, &topo.lb_if), None);
    assert!(!pin_dir.path.exists());
}
