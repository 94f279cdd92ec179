//! The real Fashion-MNIST: loading, rejecting damaged files, and the
//! centralised sanity check for the 2NN (one epoch, at least 84% on the test
//! set). Needs the Debian package `dataset-fashion-mnist` (or
//! `FASHION_MNIST_DIR`); `.ci/run` installs it.

use std::io::Write;
use std::path::Path;

use fleet_models::data::fashion::{self, Split};
use fleet_models::data::idx::read_idx_file;
use fleet_models::{Backend, Error, ModelSpec, TrainConfig, evaluate, train_local};

fn dir() -> std::path::PathBuf {
    let d = fashion::default_dir();
    assert!(
        fashion::available(&d),
        "Fashion-MNIST is not in {}: apt-get install dataset-fashion-mnist, or set FASHION_MNIST_DIR",
        d.display()
    );
    d
}

#[test]
fn loads_both_splits() {
    let d = dir();
    let train = fashion::load(&d, Split::Train).unwrap();
    let test = fashion::load(&d, Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!(train.shape(), &[1, 28, 28]);
    assert_eq!(train.label_histogram(), vec![6000; 10]);
    assert_eq!(test.label_histogram(), vec![1000; 10]);
    assert_eq!(train.label_names()[9], "Ankle boot");
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()),
        &mut out,
    )
    .unwrap();
    out
}

/// Writes a copy of the test split into a temporary directory with the given
/// changes to the raw image and label bytes, and returns the load result.
fn load_damaged(
    name: &str,
    images: impl Fn(&mut Vec<u8>),
    labels: impl Fn(&mut Vec<u8>),
) -> Result<usize, Error> {
    let src = dir();
    let tmp = std::env::temp_dir().join(format!("fleet-fmnist-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for split in ["train", "t10k"] {
        let mut im = gunzip(&src.join("t10k-images-idx3-ubyte.gz"));
        let mut lb = gunzip(&src.join("t10k-labels-idx1-ubyte.gz"));
        images(&mut im);
        labels(&mut lb);
        std::fs::write(tmp.join(format!("{split}-images-idx3-ubyte.gz")), gz(&im)).unwrap();
        std::fs::write(tmp.join(format!("{split}-labels-idx1-ubyte.gz")), gz(&lb)).unwrap();
    }
    let r = fashion::load(&tmp, Split::Test).map(|d| d.len());
    std::fs::remove_dir_all(&tmp).unwrap();
    r
}

#[test]
fn damaged_files_are_clear_errors() {
    assert_eq!(load_damaged("intact", |_| {}, |_| {}).unwrap(), 10_000);
    let e = load_damaged("trunc", |im| im.truncate(im.len() - 100), |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated"), "{e}");
    let e = load_damaged("magic", |im| im[2] = 0x0b, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("unsupported IDX data type"), "{e}");
    let e = load_damaged("magic0", |im| im[0] = 0x1f, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad magic"), "{e}");
    let e = load_damaged("label", |_| {}, |lb| lb[8 + 123] = 10).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LabelOutOfRange {
                index: 123,
                label: 10,
                classes: 10
            }
        ),
        "{e}"
    );
    let e = load_damaged("count", |_| {}, |lb| lb.truncate(lb.len() - 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated"), "{e}");
    let e = load_damaged("dims", |im| im[3] = 2, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("IDX"), "{e}");

    // A corrupt (not merely truncated) gzip stream.
    let tmp = std::env::temp_dir().join(format!("fleet-fmnist-gz-{}.gz", std::process::id()));
    let mut bytes = std::fs::read(dir().join("t10k-labels-idx1-ubyte.gz")).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x55;
    bytes.truncate(n - 3);
    std::fs::write(&tmp, &bytes).unwrap();
    let e = read_idx_file(&tmp).unwrap_err().to_string();
    std::fs::remove_file(&tmp).unwrap();
    assert!(e.contains("gzip"), "{e}");
}

#[test]
fn a_missing_data_set_names_the_package() {
    let e = fashion::load(Path::new("/nonexistent/fashion"), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("dataset-fashion-mnist"), "{e}");
}

#[test]
fn two_nn_reaches_84_percent_after_one_epoch() {
    let d = dir();
    let train = fashion::load(&d, Split::Train).unwrap();
    let test = fashion::load(&d, Split::Test).unwrap();
    let spec = ModelSpec::fashion_2nn();
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: 32,
        learning_rate: 0.05,
        momentum: 0.0,
        seed: 1,
        ..TrainConfig::default()
    };
    let out = train_local(
        &spec,
        &spec.init_params(1),
        train.view(),
        &cfg,
        Backend::DEFAULT,
    )
    .unwrap();
    let eval = evaluate(&spec, &out.params, test.view(), Backend::DEFAULT).unwrap();
    eprintln!(
        "2NN, 1 epoch: test accuracy {:.4}, loss {:.4}",
        eval.accuracy, eval.loss
    );
    assert_eq!(eval.examples, 10_000);
    assert!(eval.accuracy >= 0.84, "test accuracy {}", eval.accuracy);
}
