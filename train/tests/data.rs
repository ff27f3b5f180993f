//! Data loading: seeded batches, augmentation shapes and invalid inputs.

mod common;

use fleet_train::{
    Augmentation, DigitAugmentation, ImageSet, ImageShape, Loader, PhotoAugmentation, TrainError,
    TrainRng,
};
use rand::SeedableRng;

use common::{MNIST_SHAPE, mnist_test, repo_root};

#[test]
fn loader_is_deterministic_for_a_seed() {
    let data = mnist_test(100);
    let augmentation = Augmentation::Digits(DigitAugmentation::default());
    let first: Vec<_> = Loader::new(&data, 16, 5, augmentation.clone())
        .epoch(2)
        .collect();
    let second: Vec<_> = Loader::new(&data, 16, 5, augmentation.clone())
        .epoch(2)
        .collect();
    assert_eq!(first.len(), 7);
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a.indices, b.indices);
        assert_eq!(a.labels, b.labels);
        assert_eq!(a.images, b.images);
    }

    let other_seed: Vec<_> = Loader::new(&data, 16, 6, augmentation.clone())
        .epoch(2)
        .collect();
    assert_ne!(first[0].indices, other_seed[0].indices);
    let other_epoch: Vec<_> = Loader::new(&data, 16, 5, augmentation).epoch(3).collect();
    assert_ne!(first[0].indices, other_epoch[0].indices);
}

#[test]
fn augmentation_does_not_depend_on_batch_size() {
    let data = mnist_test(40);
    let augmentation = Augmentation::Digits(DigitAugmentation::default());
    let small = Loader::new(&data, 4, 9, augmentation.clone());
    let large = Loader::new(&data, 40, 9, augmentation);
    let from_small = small.build_batch(1, vec![17]);
    let from_large = large.build_batch(1, vec![3, 17, 25]);
    let size = MNIST_SHAPE.len();
    assert_eq!(from_small.images[..], from_large.images[size..2 * size]);
}

#[test]
fn every_sample_appears_once_per_epoch() {
    let data = mnist_test(50);
    let loader = Loader::new(&data, 8, 1, Augmentation::None);
    let mut seen: Vec<usize> = loader.epoch(0).flat_map(|b| b.indices).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..50).collect::<Vec<_>>());
    let sequential = Loader::sequential(&data, 8);
    assert_eq!(sequential.order(4), (0..50).collect::<Vec<_>>());
}

#[test]
fn digit_augmentation_keeps_shape_and_range() {
    let data = mnist_test(8);
    let augmentation = Augmentation::Digits(DigitAugmentation {
        elastic_probability: 1.0,
        ..DigitAugmentation::default()
    });
    let batch = Loader::new(&data, 8, 3, augmentation).build_batch(0, (0..8).collect());
    assert_eq!(batch.shape, [8, 1, 28, 28]);
    assert_eq!(batch.images.len(), 8 * 784);
    assert!(
        batch
            .images
            .iter()
            .all(|v| (-1e-6..=1.0 + 1e-6).contains(v))
    );
    let original = data.scaled_batch(&(0..8).collect::<Vec<_>>());
    assert_ne!(batch.images, original, "augmentation changed nothing");
}

#[test]
fn photo_augmentation_keeps_shape_and_range() {
    let shape = ImageShape {
        channels: 3,
        height: 12,
        width: 10,
    };
    let image: Vec<f32> = (0..shape.len()).map(|i| (i % 17) as f32 / 16.0).collect();
    let augmentation = Augmentation::Photos(PhotoAugmentation {
        flip_probability: 1.0,
        ..PhotoAugmentation::default()
    });
    let mut rng = TrainRng::seed_from_u64(4);
    let out = augmentation.apply(&image, shape, &mut rng);
    assert_eq!(out.len(), shape.len());
    assert!(out.iter().all(|v| (0.0..=1.0).contains(v)));
    assert_ne!(out, image);
}

#[test]
fn photo_folder_loads_resized_rgb() {
    let dir = repo_root().join("models/efficientnet-lite0/images");
    let shape = ImageShape {
        channels: 3,
        height: 32,
        width: 32,
    };
    let set = ImageSet::from_folder(&dir, shape, 1000).unwrap();
    assert!(set.len() >= 2, "{} images", set.len());
    assert_eq!(set.image(0).len(), 3 * 32 * 32);
    assert!(set.labels().iter().all(|&label| label < 1000));
}

#[test]
fn idx_of_wrong_shape_is_rejected() {
    let dir = repo_root().join("models/mnist");
    let expected = ImageShape {
        channels: 1,
        height: 32,
        width: 32,
    };
    let error = ImageSet::from_idx(
        &dir.join("t10k-images-idx3-ubyte.gz"),
        &dir.join("t10k-labels-idx1-ubyte.gz"),
        expected,
        10,
    )
    .unwrap_err();
    assert!(
        matches!(error, TrainError::ImageShapeMismatch { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("1x28x28"), "{error}");
}

#[test]
fn labels_out_of_range_are_rejected() {
    let dir = repo_root().join("models/mnist");
    let error = ImageSet::from_idx(
        &dir.join("t10k-images-idx3-ubyte.gz"),
        &dir.join("t10k-labels-idx1-ubyte.gz"),
        MNIST_SHAPE,
        5,
    )
    .unwrap_err();
    assert!(
        matches!(error, TrainError::LabelOutOfRange { classes: 5, .. }),
        "{error}"
    );
}

#[test]
fn labels_of_another_file_are_rejected() {
    let dir = repo_root().join("models/mnist");
    let error = ImageSet::from_idx(
        &dir.join("t10k-images-idx3-ubyte.gz"),
        &dir.join("train-labels-idx1-ubyte.gz"),
        MNIST_SHAPE,
        10,
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("60000 labels for 10000 images"),
        "{error}"
    );
}

#[test]
fn empty_data_is_rejected() {
    let error = ImageSet::new("empty", MNIST_SHAPE, 10, vec![], vec![]).unwrap_err();
    assert!(matches!(error, TrainError::EmptyData { .. }), "{error}");

    let dir = tempfile::tempdir().unwrap();
    let error = ImageSet::from_folder(dir.path(), MNIST_SHAPE, 10).unwrap_err();
    assert!(error.to_string().contains("no .jpg"), "{error}");
}
