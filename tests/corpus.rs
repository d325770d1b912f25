//! The corpus of invalid desired states (`tests/corpus/`, see its README): every mistake is
//! rejected by `validate` and `plan` with exit 1, a `path:line:column` message that names the
//! problem, and zero AWS calls.

use std::path::Path;

use crate::harness::{default_stack, path_str, stackwarden};

/// Copies `from` over `to`, expanding `NAME.repeat` files and leaving `EXPECT` out.
fn overlay(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let target = to.join(&name);
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            overlay(&e.path(), &target);
        } else if name == "EXPECT" || name == "README.md" {
            continue;
        } else if let Some(stem) = name.strip_suffix(".repeat") {
            let text = std::fs::read_to_string(e.path()).unwrap();
            let (count, body) = text.split_once('\n').unwrap();
            std::fs::write(to.join(stem), body.repeat(count.parse().unwrap())).unwrap();
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

#[test]
fn every_mistake_in_the_corpus_is_rejected_at_its_line_with_zero_aws_calls() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut cases: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 40, "the corpus has {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let expect = std::fs::read_to_string(case.join("EXPECT")).unwrap();
        let (file, rest) = expect
            .trim()
            .split_once(':')
            .expect("EXPECT is FILE:LINE: TEXT");
        let (line, text) = rest.split_once(": ").expect("EXPECT is FILE:LINE: TEXT");
        let dir = default_stack();
        overlay(case, dir.path());
        let at = format!("{}:{line}:", dir.path().join(file).display());
        for command in ["validate", "plan"] {
            let run = stackwarden(None, &[command, path_str(dir.path())]);
            let found = run
                .stderr
                .lines()
                .any(|l| l.starts_with(&at) && l.contains(text));
            let (calls, _) = run.calls();
            if run.code != 1 || !found || calls != 0 || !run.stdout.is_empty() {
                failures.push(format!(
                    "{name}: `{command}` exited {} with {calls} AWS calls; expected `{file}:{line}:<column>: ...{text}...` in:\n{}{}",
                    run.code, run.stderr, run.stdout
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
