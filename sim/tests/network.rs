//! The real-network mode: a real coordinator and real agents over QUIC on
//! loopback, checked round by round against an in-memory recomputation of
//! the same devices' work.

use fleet_aggregation::Cpu;
use fleet_sim::fleet::Fleet;
use fleet_sim::network;

#[test]
fn the_network_run_computes_what_memory_computes_for_the_same_devices() {
    let fleet = Fleet::from_toml(
        "seed = 5\ndevices = 12\n\
         [task]\nrounds = 2\ntarget = 4\nover_selection = 1.0\nmin_reports = 4\nepochs = 1\n\
         [[profiles]]\ndropout = 0.0\navailability = 1.0\nday_night_swing = 0.0\n",
    )
    .unwrap();
    let (data, test) = fleet_sim::data::load(&fleet).unwrap();
    let dir = std::env::temp_dir().join(format!("fleet-sim-network-{}", std::process::id()));
    let run = network::run(&fleet, &data, &test, &dir, |_, _| {}).unwrap();
    assert_eq!(run.rounds.len(), 2);
    assert_eq!(run.ids.len(), 12);
    assert_ne!(
        run.initial, run.rounds[0].model,
        "round 1 changed the model"
    );
    for r in &run.rounds {
        assert_eq!(r.devices.len(), 4, "{:?}", r.devices);
        assert!(r.devices.iter().all(|&d| d < 12));
    }
    let replayed = network::replay(&fleet, &data, &test, &Cpu, &run).unwrap();
    assert_eq!(replayed.len(), 2);
    for (p, r) in replayed.iter().zip(&run.rounds) {
        assert_eq!(p.round, r.round);
        assert!(
            p.max_abs_diff <= 1e-6,
            "round {}: {}",
            p.round,
            p.max_abs_diff
        );
        assert!(
            (p.accuracy - r.accuracy).abs() <= 1e-4,
            "{p:?} vs {}",
            r.accuracy
        );
    }
    // Replaying round 2 with one of its devices swapped for one that did not
    // take part does not match: the check sees which devices trained.
    let mut shuffled = run.clone();
    let devices = &mut shuffled.rounds[1].devices;
    let outsider = (0..12)
        .find(|d| !devices.contains(d))
        .expect("4 of 12 devices took part");
    devices[0] = outsider;
    devices.sort_unstable();
    let off = network::replay(&fleet, &data, &test, &Cpu, &shuffled).unwrap();
    assert!(off[1].max_abs_diff > 1e-4, "{off:?}");
    // A private task's client noise is not recorded, so it is not replayed.
    let private = Fleet::from_toml(
        "seed = 5\ndevices = 12\n[task]\nrounds = 2\ntarget = 4\n\
         [task.dp]\nnoise_multiplier = 1.0\nclip = 1.0\n",
    )
    .unwrap();
    let e = network::replay(&private, &data, &test, &Cpu, &run).unwrap_err();
    assert!(e.contains("private"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
