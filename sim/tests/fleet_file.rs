//! The fleet file: defaults, the annotated example, and errors that name
//! the field and the allowed values.

use fleet_sim::fleet::{DataConfig, Fleet, PartitionConfig};

fn err(text: &str) -> String {
    Fleet::from_toml(text).unwrap_err().to_string()
}

fn fleet_file(name: &str) -> String {
    let path = format!("{}/fleets/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn an_empty_file_and_the_annotated_example_are_the_default_fleet() {
    assert_eq!(Fleet::from_toml("").unwrap(), Fleet::default());
    assert_eq!(
        Fleet::from_toml(&fleet_file("default.toml")).unwrap(),
        Fleet::default()
    );
}

#[test]
fn every_shipped_fleet_file_is_valid() {
    let dir = format!("{}/fleets", env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Fleet::load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn partial_tables_keep_the_other_defaults() {
    let f = Fleet::from_toml("devices = 7\n[task]\nrounds = 3\ntarget = 2\n").unwrap();
    assert_eq!(f.devices, 7);
    assert_eq!(f.task.rounds, 3);
    assert_eq!(f.task.epochs, Fleet::default().task.epochs);
    let f =
        Fleet::from_toml("[data]\nset = \"fashion-full\"\n[data.partition]\nscheme = \"iid\"\n")
            .unwrap();
    assert_eq!(
        f.data,
        DataConfig::FashionFull {
            partition: PartitionConfig::Iid
        }
    );
}

#[test]
fn unknown_fields_are_named_with_the_allowed_ones() {
    let e = err("[task]\nround = 5\n");
    assert!(e.contains("round") && e.contains("`rounds`"), "{e}");
    let e = err("devcies = 5\n");
    assert!(e.contains("devcies") && e.contains("`devices`"), "{e}");
    let e = err("[[profiles]]\nupload = 3.0\n");
    assert!(e.contains("upload") && e.contains("`upload_mbps`"), "{e}");
    let e = err("[data]\nset = \"synthetic\"\nexample = 3\n");
    assert!(e.contains("example") && e.contains("`examples`"), "{e}");
}

#[test]
fn unknown_values_list_the_allowed_ones() {
    let e = err("[task]\ncodec = \"int4\"\n");
    assert!(
        e.contains("int4") && e.contains("`f32`") && e.contains("`int8`") && e.contains("`topk`"),
        "{e}"
    );
    let e = err("model = \"resnet\"\n");
    assert!(
        e.contains("resnet") && e.contains("`2nn`") && e.contains("`logreg`"),
        "{e}"
    );
    let e = err("[data]\nset = \"mnist\"\n");
    assert!(
        e.contains("mnist") && e.contains("`fashion-embedded`") && e.contains("`synthetic`"),
        "{e}"
    );
    let e =
        err("[data]\nset = \"fashion-embedded\"\n[data.partition]\nscheme = \"pathological\"\n");
    assert!(
        e.contains("pathological") && e.contains("`dirichlet`"),
        "{e}"
    );
    let e = err("[task]\nstrategy = \"fedsgd\"\n");
    assert!(e.contains("fedsgd") && e.contains("`trimmed-mean`"), "{e}");
    let e = err("[scenarios.byzantine]\nattack = \"noise\"\n");
    assert!(e.contains("noise") && e.contains("`sign-flip`"), "{e}");
    // The failing line is quoted, so the field is named even for a type error.
    let e = err("devices = \"many\"\n");
    assert!(
        e.contains("devices = \"many\"") && e.contains("expected u32"),
        "{e}"
    );
    let e = err("[task]\ncodec = \"int4\"\n");
    assert!(e.contains("codec = \"int4\""), "{e}");
}

#[test]
fn out_of_range_values_name_the_field() {
    let cases = [
        ("devices = 0\n", "devices"),
        ("[task]\ntarget = 0\n", "task.target"),
        ("devices = 10\n[task]\ntarget = 10\n", "task.target"),
        ("[task]\nover_selection = 0.5\n", "task.over_selection"),
        ("[task]\nmin_reports = 11\n", "task.min_reports"),
        ("[task]\nlr = -1.0\n", "task.lr"),
        ("[task]\nmomentum = 1.0\n", "task.momentum"),
        ("[task]\ntopk_fraction = 0.0\n", "task.topk_fraction"),
        (
            "[task]\nbound_norm_factor = 0.5\n",
            "task.bound_norm_factor",
        ),
        ("[task]\nbound_warmup = 0\n", "task.bound_warmup"),
        (
            "[task]\ncentred_radius_factor = 0.0\n",
            "task.centred_radius_factor",
        ),
        ("[task]\nmax_examples = 0\n", "task.max_examples"),
        (
            "[task]\nselection_window_s = 90.0\n",
            "task.selection_window_s",
        ),
        (
            "[scenarios.byzantine]\nexamples = 0\n",
            "scenarios.byzantine.examples",
        ),
        ("[task.dp]\ndelta = 2.0\n", "task.dp.delta"),
        (
            "[task.dp]\nnoise_multiplier = 0.0\n",
            "task.dp.noise_multiplier",
        ),
        // DP needs the plain mean.
        (
            "[task]\nstrategy = \"median\"\n[task.dp]\n",
            "task.strategy",
        ),
        ("[task]\nstrategy = \"krum\"\n[task.dp]\n", "task.strategy"),
        // Lossy codecs run after client noise.
        (
            "[task]\ncodec = \"int8\"\n[task.dp]\nplacement = \"client\"\n",
            "task.codec",
        ),
        // Not even round 1 fits (one full Gaussian step at z = 1 is several ε).
        ("[task.dp]\nbudget = 0.5\n", "task.dp.budget"),
        ("[[profiles]]\ndropout = 1.5\n", "profiles[0].dropout"),
        (
            "[[profiles]]\nname = \"a\"\n[[profiles]]\ndownload_mbps = 0.0\n",
            "profiles[1].download_mbps",
        ),
        ("profiles = []\n", "profiles"),
        (
            "[data]\nset = \"fashion-full\"\n[data.partition]\nscheme = \"dirichlet\"\nalpha = 0.0\n",
            "data.partition.alpha",
        ),
        (
            "[data]\nset = \"synthetic\"\nexamples = 0\n",
            "data.examples",
        ),
        ("model = \"cnn\"\n[data]\nset = \"synthetic\"\n", "model"),
        (
            "[scenarios.byzantine]\nfraction = 2.0\n",
            "scenarios.byzantine.fraction",
        ),
    ];
    for (text, field) in cases {
        let e = err(text);
        assert!(e.starts_with(field), "{text:?}: {e}");
    }
}

#[test]
fn a_missing_file_is_named() {
    let e = Fleet::load(std::path::Path::new("/no/such/fleet.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/no/such/fleet.toml"), "{e}");
}

#[test]
fn dp_noise_goes_on_the_server_by_default_and_lossy_codecs_then_pass() {
    let f = Fleet::from_toml("[task]\ncodec = \"int8\"\n[task.dp]\n").unwrap();
    let dp = f.dp().unwrap();
    assert_eq!(
        dp.placement,
        fleet_aggregation::privacy::NoisePlacement::Server
    );
    // The coordinator clips what it decodes, so the codec's error is bounded.
    f.task_spec().validate().unwrap();
    let client = Fleet::from_toml("[task.dp]\nplacement = \"client\"\n").unwrap();
    assert_eq!(
        client.dp().unwrap().placement,
        fleet_aggregation::privacy::NoisePlacement::Client
    );
}

/// `docs/benchmarks.md` claims ε ≤ 8 for every round of this fleet, with
/// each round charged in full: both accountants must agree.
#[test]
fn the_private_fashion_fleet_stays_within_epsilon_8_over_all_its_rounds() {
    use fleet_aggregation::privacy::accountant::ledger::PrivacyLedger;
    let fleet = Fleet::from_toml(&fleet_file("dp-fashion.toml")).unwrap();
    let spec = fleet.task_spec();
    spec.validate().unwrap();
    let (dp, budget) = (spec.dp.unwrap(), spec.budget.unwrap());
    assert_eq!((budget.epsilon, budget.delta), (8.0, 1e-5));
    assert_eq!(spec.accounting_sampling_rate(), 1.0, "no amplification");
    let ledger = PrivacyLedger::new(budget.epsilon, budget.delta).unwrap();
    let all = ledger
        .check_rounds(1.0, dp.noise_multiplier, spec.engine.rounds)
        .unwrap();
    assert!(all.would_be.epsilon_pld <= 8.0, "{:?}", all.would_be);
    assert!(all.would_be.epsilon_rdp <= 8.0, "{:?}", all.would_be);
    // The same fleet without privacy is its reference.
    let mut reference = Fleet::from_toml(&fleet_file("dp-fashion-baseline.toml")).unwrap();
    assert!(reference.task.dp.is_none());
    reference.task.dp = fleet.task.dp;
    assert_eq!(reference, fleet, "the two files differ only by [task.dp]");
}

/// `docs/benchmarks.md` claims ε ≤ 8 for this fleet with a participation
/// limit: the worst device is charged its 4 rounds, by both accountants,
/// and 4 rounds fit the fleet's devices.
#[test]
fn the_participation_limited_fashion_fleet_stays_within_epsilon_8() {
    use fleet_aggregation::privacy::accountant::ledger::PrivacyLedger;
    let fleet = Fleet::from_toml(&fleet_file("dp-fashion-limited.toml")).unwrap();
    let spec = fleet.task_spec();
    spec.validate().unwrap();
    let (dp, budget) = (spec.dp.unwrap(), spec.budget.unwrap());
    assert_eq!((budget.epsilon, budget.delta), (8.0, 1e-5));
    assert_eq!(spec.participation_bound(), Some(4));
    let ledger = PrivacyLedger::new(budget.epsilon, budget.delta)
        .unwrap()
        .with_participation_limit(4)
        .unwrap();
    let all = ledger
        .check_rounds(1.0, dp.noise_multiplier, spec.engine.rounds)
        .unwrap();
    assert!(all.would_be.epsilon_pld <= 8.0, "{:?}", all.would_be);
    assert!(all.would_be.epsilon_rdp <= 8.0, "{:?}", all.would_be);
    // Charging every round in full, the same noise would not come close.
    let full = PrivacyLedger::new(f64::MAX, budget.delta)
        .unwrap()
        .check_rounds(1.0, dp.noise_multiplier, spec.engine.rounds)
        .unwrap();
    assert!(full.would_be.epsilon > 30.0, "{:?}", full.would_be);
    let mut reference = Fleet::from_toml(&fleet_file("dp-fashion-limited-baseline.toml")).unwrap();
    assert!(reference.task.dp.is_none());
    reference.task.dp = fleet.task.dp;
    assert_eq!(reference, fleet, "the two files differ only by [task.dp]");
}
