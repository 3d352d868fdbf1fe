//! Seed inputs for the fuzz targets under `fuzz/`, and the replay of the committed corpora.
//! Every run checks that each seed goes through its harness; with
//! `FLOWSHIFT_WRITE_CORPUS=1` it also (re)writes the seeds to `fuzz/corpus/<target>/`.

mod common;

use std::path::{Path, PathBuf};

use flowshift_statesync::fuzzing;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn write_seeds(target: &str, seeds: &[(String, Vec<u8>)]) {
    if std::env::var_os("FLOWSHIFT_WRITE_CORPUS").is_none() {
        return;
    }
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Runs `harness` over every committed file of `target`'s corpus. The files this test
/// writes (`seed-*`) must be accepted: a format change without a corpus rewrite fails here.
fn replay(target: &str, harness: impl Fn(&[u8]) -> bool) {
    let dir = corpus_dir(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let accepted = harness(&std::fs::read(entry.path()).unwrap());
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            accepted || !name.starts_with("seed-"),
            "{name} is rejected: rewrite the corpus (FLOWSHIFT_WRITE_CORPUS=1)"
        );
        n += 1;
    }
    assert!(n > 0, "no corpus files in {}", dir.display());
}

#[test]
fn snapshot_seeds_round_trip() {
    let seeds: Vec<(String, Vec<u8>)> = common::snapshot_seeds()
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("seed-{i:02}"), s.to_bytes()))
        .collect();
    for (name, bytes) in &seeds {
        assert!(fuzzing::snapshot(bytes), "{name} decodes");
    }
    write_seeds("snapshot", &seeds);
}

#[test]
fn snapshot_corpus_replay() {
    replay("snapshot", fuzzing::snapshot);
}

#[test]
fn message_seeds_decode() {
    let seeds: Vec<(String, Vec<u8>)> = common::message_seeds()
        .iter()
        .enumerate()
        .map(|(i, m)| (format!("seed-{i:02}"), m.to_bytes()))
        .collect();
    let mut h = fuzzing::MessageHarness::new();
    for (name, bytes) in &seeds {
        assert!(h.run(bytes), "{name} decodes");
    }
    write_seeds("message", &seeds);
}

#[test]
fn message_corpus_replay() {
    let h = std::cell::RefCell::new(fuzzing::MessageHarness::new());
    replay("message", |b| h.borrow_mut().run(b));
}
