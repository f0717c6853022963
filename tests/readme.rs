//! README.md's walk-through, run as a user would paste it: the real binary, `curl`, `tar`.

mod common;

use common::bin::*;
use common::require_services;
use std::process::Command;
use std::time::{Duration, Instant};

const WALK_THROUGH: &str = "## Walk-through: a first build from a `data:` URI";

/// The first ```sh block under the walk-through's heading.
fn walk_through_block(readme: &str) -> String {
    let section = readme
        .split_once(WALK_THROUGH)
        .expect("README.md has the walk-through section")
        .1;
    let block = section
        .split_once("```sh\n")
        .expect("the walk-through has a sh block")
        .1;
    block
        .split_once("```")
        .expect("the sh block ends")
        .0
        .to_string()
}

/// The outputs the block shows: its lines that are only a comment, split at `…` (anything).
fn shown_outputs(block: &str) -> Vec<Vec<String>> {
    block
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .map(|l| {
            l.split('…')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect()
        })
        .collect()
}

/// Finds each piece of each shown output in `out`, in order; says which one is missing.
fn check_in_order(out: &str, shown: &[Vec<String>]) -> Result<(), String> {
    let mut at = 0;
    for pieces in shown {
        for piece in pieces {
            match out[at..].find(piece.as_str()) {
                Some(i) => at += i + piece.len(),
                None => {
                    return Err(format!(
                        "{piece:?} (of {pieces:?}) is not in the output after byte {at}"
                    ))
                }
            }
        }
    }
    Ok(())
}

#[test]
fn shown_outputs_are_found_in_order() {
    let block = "curl a\n# {\"status\":\"ok\"}\ncurl b   # a note\n# …hello…pushed…\n";
    let shown = shown_outputs(block);
    assert_eq!(shown.len(), 2, "a trailing comment is not an output");
    assert!(check_in_order("{\"status\":\"ok\"}x hello y pushed", &shown).is_ok());
    assert!(check_in_order("x hello y pushed {\"status\":\"ok\"}", &shown).is_err());
    assert!(check_in_order("{\"status\":\"ok\"} pushed hello", &shown).is_err());
}

#[test]
fn the_walk_through_runs_as_written() {
    require_services();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md");
    let block = walk_through_block(&readme);
    let shown = shown_outputs(&block);
    assert!(shown.len() >= 3, "the block shows its outputs: {block}");

    let data = tempfile::tempdir().expect("tempdir");
    let work = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    // NO_CACHE: the registry keeps the image between runs, and a cached `RUN` prints nothing.
    let _serve = spawn(data.path(), port, &[("NO_CACHE", "true")]);
    // The same commands, on this test's port and folder instead of 9000 and /tmp/hello.
    let script = block
        .replace("localhost:9000", &format!("127.0.0.1:{port}"))
        .replace(
            "/tmp/hello",
            &work.path().join("hello").display().to_string(),
        );
    // Output to files, not pipes: a full pipe would stall the script until the deadline.
    let out_path = work.path().join("stdout");
    let err_path = work.path().join("stderr");
    let mut child = Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", &script])
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("run bash");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for bash") {
            break s;
        }
        if start.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            panic!("the walk-through did not end within 180 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(&out_path).expect("read stdout");
    let err = std::fs::read_to_string(&err_path).expect("read stderr");
    assert!(
        status.success(),
        "the walk-through failed ({status}):\n{out}\n{err}"
    );
    if let Err(e) = check_in_order(&out, &shown) {
        panic!("README.md's walk-through shows an output it does not give: {e}\noutput:\n{out}");
    }
}
