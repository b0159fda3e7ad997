//! The manager against real maps (no interface needed): reading the applied state back
//! from the maps after a restart, ring flips that never touch the live ring, and the RCU
//! grace-period barrier.

use lb_userspace::config::{Config, Format};
use lb_userspace::datapath::{Datapath, GracePeriod, LoadOptions};
use lb_userspace::maglev::{self, WeightedBackend};
use lb_userspace::manager::Manager;
use lb_userspace::model::{DesiredState, VipSpec};
use lb_userspace::plan::{self, MapOp};
use lb_userspace::state::rebuild_applied;
use xlb_tests::netns::PinDir;
use xlb_tests::require_root;

const M: u32 = 251;

fn desired(vips: &str) -> (DesiredState, plan::Limits) {
    let text = format!(
        "[node]\ninterfaces = [\"lo\"]\ntunnel_source_v4 = \"192.0.2.1\"\nmaglev_table_size = {M}\n\
         max_vips = 8\nmax_backends = 32\nconntrack_entries = 1024\n{vips}"
    );
    let resolved = Config::parse(&text, Format::Toml)
        .unwrap()
        .resolve()
        .unwrap();
    (resolved.desired, resolved.node.limits)
}

fn vip(name: &str, address: &str, port: u16, backends: &[&str]) -> String {
    let mut text = format!("[[vips]]\nname = \"{name}\"\naddress = \"{address}\"\nport = {port}\n");
    for b in backends {
        text.push_str(&format!("[[vips.backends]]\naddress = \"{b}\"\n"));
    }
    text
}

fn load(pin_dir: &PinDir, limits: plan::Limits) -> Datapath {
    Datapath::load(&LoadOptions {
        pin_dir: pin_dir.path.clone(),
        maglev_table_size: limits.table_size,
        max_vips: limits.max_vips,
        max_backends: limits.max_backends,
        conntrack_entries: 1024,
    })
    .unwrap()
}

#[test]
fn state_read_back_from_the_maps_plans_no_writes_and_keeps_ids() {
    require_root();
    let pin_dir = PinDir::new("rebuild");
    let first = [
        vip(
            "a",
            "203.0.113.1",
            80,
            &["198.51.100.1", "198.51.100.2", "198.51.100.3"],
        ),
        vip("b", "203.0.113.2", 443, &["198.51.100.4"]),
        vip("c", "203.0.113.3", 0, &["198.51.100.5", "198.51.100.6"]),
    ]
    .concat();
    // Then: a backend and a VIP go (holes in both id spaces), one table changes.
    let second = [
        vip("a", "203.0.113.1", 80, &["198.51.100.1", "198.51.100.3"]),
        vip(
            "c",
            "203.0.113.3",
            0,
            &["198.51.100.5", "198.51.100.6", "198.51.100.7"],
        ),
    ]
    .concat();
    let (desired1, limits) = desired(&first);
    let (desired2, _) = desired(&second);
    let mut datapath = load(&pin_dir, limits);
    let mut manager = Manager::adopt(&datapath.maps, limits).unwrap();
    manager.apply(&mut datapath.maps, &desired1).unwrap();
    manager.apply(&mut datapath.maps, &desired2).unwrap();
    let live = manager.applied().clone();
    drop(manager);
    drop(datapath);

    // A new process: fresh load adopting the pins, state rebuilt from the maps.
    let datapath = load(&pin_dir, limits);
    let rebuilt = rebuild_applied(&datapath.maps, limits).unwrap();
    let plan = plan::plan(&desired2, &rebuilt).unwrap();
    assert!(
        plan.ops.is_empty(),
        "nothing to write after adoption: {:?}",
        plan.ops
    );
    for address in [
        "198.51.100.1",
        "198.51.100.3",
        "198.51.100.5",
        "198.51.100.7",
    ] {
        let address = address.parse().unwrap();
        assert_eq!(rebuilt.backend_id(address), live.backend_id(address));
    }
    for (key, info) in live.vips() {
        assert_eq!(rebuilt.vip(key), Some(*info));
    }
    // The next change plans the same writes from either state: ids and rings agree.
    let third = [
        vip("a", "203.0.113.1", 80, &["198.51.100.1", "198.51.100.8"]),
        vip("d", "203.0.113.4", 53, &["198.51.100.9"]),
    ]
    .concat();
    let (desired3, _) = desired(&third);
    let from_live = plan::plan(&desired3, &live).unwrap().ops;
    let from_rebuilt = plan::plan(&desired3, &rebuilt).unwrap().ops;
    assert_eq!(from_rebuilt, from_live);
}

#[test]
fn a_changed_table_goes_to_the_idle_ring_and_the_live_ring_is_untouched() {
    require_root();
    let pin_dir = PinDir::new("flip");
    let (one, limits) = desired(&vip(
        "a",
        "203.0.113.1",
        80,
        &["198.51.100.1", "198.51.100.2"],
    ));
    let (two, _) = desired(&vip(
        "a",
        "203.0.113.1",
        80,
        &["198.51.100.1", "198.51.100.3"],
    ));
    let mut datapath = load(&pin_dir, limits);
    let mut manager = Manager::adopt(&datapath.maps, limits).unwrap();
    manager.apply(&mut datapath.maps, &one).unwrap();
    let key = one.vips[0].key.to_map_key();
    let first = datapath.maps.vips.get(&key, 0).unwrap();
    let live_table = datapath.maps.maglev.read_ring(first.ring).unwrap();

    let plan = plan::plan(&two, manager.applied()).unwrap();
    let written: Vec<u32> = plan
        .ops
        .iter()
        .filter_map(|op| match op {
            MapOp::WriteRing { ring, .. } => Some(*ring),
            _ => None,
        })
        .collect();
    assert_eq!(
        written,
        vec![first.ring ^ 1],
        "only the idle ring is written"
    );
    let report = manager.apply(&mut datapath.maps, &two).unwrap();
    assert_eq!(report.rings_written, 1);
    let second = datapath.maps.vips.get(&key, 0).unwrap();
    assert_eq!(second.ring, first.ring ^ 1, "one update flips the ring");
    assert_eq!(second.vip_id, first.vip_id);
    assert_eq!(
        datapath.maps.maglev.read_ring(first.ring).unwrap(),
        live_table,
        "the retired ring still holds the old table, whole"
    );
    let new_table = datapath.maps.maglev.read_ring(second.ring).unwrap();
    assert!(
        new_table.iter().all(|id| *id != 0),
        "no empty slot in the new table"
    );
}

/// The table `maglev::build` makes for `vip` with the backend ids of `applied`.
fn expected_table(vip: &VipSpec, applied: &plan::AppliedState, table_size: u32) -> Vec<u32> {
    let backends: Vec<WeightedBackend> = vip
        .backends
        .iter()
        .map(|b| WeightedBackend {
            address: b.address,
            weight: b.effective_weight(),
            id: applied.backend_id(b.address).unwrap(),
        })
        .collect();
    maglev::build("x", table_size, &backends).unwrap().table
}

/// With the production M, more tables than fit in one batch of the writer: every VIP's
/// ring holds its own table, after a first sync and after every VIP changed (tables the
/// plan kept and tables rebuilt when written); a restarted agent plans no write.
#[test]
fn rings_of_many_vips_with_a_large_table_are_built_when_written() {
    require_root();
    const BIG_M: u32 = 65_537;
    let count = plan::TABLE_BATCH_BYTES / (4 * BIG_M as usize) + 8;
    let config = |third: u32| {
        let mut text = format!(
            "[node]\ninterfaces = [\"lo\"]\ntunnel_source_v4 = \"192.0.2.1\"\n\
             maglev_table_size = {BIG_M}\nmax_vips = {count}\nmax_backends = 256\n\
             conntrack_entries = 1024\n"
        );
        for i in 0..count {
            text += &vip(
                &format!("v{i}"),
                &format!("203.0.113.{}", i + 1),
                80,
                &[
                    &format!("198.51.100.{}", i % 50 + 1),
                    &format!("198.51.100.{}", i % 7 + 100),
                    &format!("198.51.100.{}", third + i as u32 % 3),
                ],
            );
        }
        let resolved = Config::parse(&text, Format::Toml)
            .unwrap()
            .resolve()
            .unwrap();
        (resolved.desired, resolved.node.limits)
    };
    let (first, limits) = config(200);
    let pin_dir = PinDir::new("batches");
    let mut datapath = load(&pin_dir, limits);
    let mut manager = Manager::adopt(&datapath.maps, limits).unwrap();
    let check_rings = |datapath: &Datapath, manager: &Manager, desired: &DesiredState| {
        for v in &desired.vips {
            let info = datapath.maps.vips.get(&v.key.to_map_key(), 0).unwrap();
            assert_eq!(
                datapath.maps.maglev.read_ring(info.ring).unwrap(),
                expected_table(v, manager.applied(), BIG_M),
                "VIP {}",
                v.name
            );
        }
    };
    let report = manager.apply(&mut datapath.maps, &first).unwrap();
    assert_eq!(report.rings_written, count);
    check_rings(&datapath, &manager, &first);
    assert_eq!(manager.apply(&mut datapath.maps, &first).unwrap().ops, 0);

    let (second, _) = config(210);
    let report = manager.apply(&mut datapath.maps, &second).unwrap();
    assert_eq!(report.rings_written, count);
    check_rings(&datapath, &manager, &second);

    drop(manager);
    let rebuilt = rebuild_applied(&datapath.maps, limits).unwrap();
    let plan = plan::plan(&second, &rebuilt).unwrap();
    assert!(plan.is_empty(), "a restart writes nothing: {:?}", plan.ops);
}

/// The Maglev builder's warnings reach the apply report (the agent logs them).
#[test]
fn maglev_warnings_reach_the_apply_report() {
    require_root();
    let pin_dir = PinDir::new("warnings");
    let backends = ["198.51.100.1", "198.51.100.2", "198.51.100.3"];
    let (desired, limits) = desired(&vip("small", "203.0.113.1", 80, &backends));
    let mut datapath = load(&pin_dir, limits);
    let mut manager = Manager::adopt(&datapath.maps, limits).unwrap();
    let report = manager.apply(&mut datapath.maps, &desired).unwrap();
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    let text = report.warnings[0].to_string();
    assert!(
        text.starts_with("VIP small (203.0.113.1:80/tcp): "),
        "{text}"
    );
}

#[test]
fn grace_period_barrier_returns() {
    require_root();
    let barrier = GracePeriod::new().unwrap();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        barrier.wait().unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}

/// The Maglev array is mapped a window at a time: rings written all over an array of
/// several windows (in an order that moves the window back and forth) read back intact
/// through the map syscall, and the process never maps more than one window.
#[test]
fn rings_written_through_a_moving_window_read_back_through_the_map() {
    require_root();
    let pin_dir = PinDir::new("window");
    let limits = plan::Limits {
        table_size: M,
        max_vips: 2048,
        max_backends: 32,
    };
    let mut datapath = load(&pin_dir, limits);
    let rings = datapath.maps.maglev.rings();
    assert_eq!(rings, 4096);
    let array_bytes = rings as usize * M as usize * 8;
    assert!(array_bytes > 3 * lb_userspace::datapath::MAGLEV_WINDOW);
    let table = |ring: u32| -> Vec<u32> { (0..M).map(|i| ring * 7 + i % 13 + 1).collect() };
    let order: Vec<u32> = [0, rings - 1, rings / 2, 1, rings - 2, 1500, 3000, 2]
        .into_iter()
        .chain((0..rings).step_by(97))
        .collect();
    for &ring in &order {
        datapath.maps.maglev.write_ring(ring, &table(ring)).unwrap();
        assert!(datapath.maps.maglev.mapped_bytes() <= lb_userspace::datapath::MAGLEV_WINDOW);
    }
    for &ring in &order {
        for slot in [0, 1, M / 2, M - 1] {
            assert_eq!(
                datapath.maps.maglev.slot(ring, slot).unwrap(),
                table(ring)[slot as usize],
                "ring {ring} slot {slot} through the syscall"
            );
        }
        assert_eq!(datapath.maps.maglev.read_ring(ring).unwrap(), table(ring));
    }
    // A ring never written is still all zeros (nothing spilled over).
    assert!(
        datapath
            .maps
            .maglev
            .read_ring(5)
            .unwrap()
            .iter()
            .all(|id| *id == 0)
    );
}
