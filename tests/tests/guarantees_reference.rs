//! Every promise in docs/guarantees.md and in the README names the tests that try to break it,
//! and those tests exist: a promise whose test was renamed or deleted fails here instead of
//! going stale.

use std::path::Path;

use ordo_testkit::paths::workspace_root;

/// A test reference as docs/guarantees.md writes it: `` `path/to/file.rs::test_name` ``.
#[derive(Debug)]
struct TestRef {
    file: String,
    name: String,
}

fn test_refs(line: &str) -> Vec<TestRef> {
    line.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|code| {
            let (file, name) = code.rsplit_once("::")?;
            file.ends_with(".rs").then(|| TestRef {
                file: file.to_owned(),
                name: name.to_owned(),
            })
        })
        .collect()
}

/// The bullets of the "Guarantees" section, each joined into one line.
fn promises(doc: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut inside = false;
    for line in doc.lines() {
        if line.starts_with("## ") {
            inside = line.trim() == "## Guarantees";
            continue;
        }
        if !inside {
            continue;
        }
        if let Some(rest) = line.strip_prefix("- ") {
            out.push(rest.to_owned());
        } else if line.starts_with("  ") {
            if let Some(last) = out.last_mut() {
                last.push(' ');
                last.push_str(line.trim());
            }
        }
    }
    out
}

fn defines_test(root: &Path, r: &TestRef) -> Result<(), String> {
    let text = std::fs::read_to_string(root.join(&r.file))
        .map_err(|e| format!("{}: cannot read: {e}", r.file))?;
    let needle = format!("fn {}(", r.name);
    let at = text
        .find(&needle)
        .ok_or_else(|| format!("{}: no fn {}", r.file, r.name))?;
    // The attribute lines just above the function must mark it as a test.
    let before = &text[..at];
    let head: String = before.lines().rev().take(6).collect::<Vec<_>>().join("\n");
    if head.contains("test") || head.contains("proptest") {
        Ok(())
    } else {
        Err(format!("{}::{} is not a test", r.file, r.name))
    }
}

#[test]
fn every_guarantee_names_existing_tests() {
    let root = workspace_root();
    let doc = std::fs::read_to_string(root.join("docs/guarantees.md")).unwrap();
    let promises = promises(&doc);
    assert!(
        promises.len() >= 6,
        "docs/guarantees.md lists {} guarantees; the section was not found or lost bullets",
        promises.len()
    );
    let mut problems = Vec::new();
    for p in &promises {
        let refs = test_refs(p);
        if refs.is_empty() {
            problems.push(format!(
                "names no test: {}",
                p.chars().take(80).collect::<String>()
            ));
        }
        for r in refs {
            if let Err(e) = defines_test(&root, &r) {
                problems.push(e);
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/guarantees.md:\n{}",
        problems.join("\n")
    );
}

/// The README's paragraphs and list items, each joined into one line.
fn paragraphs(doc: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut open = false;
    let mut code = false;
    for line in doc.lines() {
        if line.starts_with("```") {
            code = !code;
            open = false;
            continue;
        }
        if code || line.trim().is_empty() || line.starts_with('#') {
            open = false;
            continue;
        }
        if line.starts_with("- ") || !open {
            out.push(line.to_owned());
            open = true;
        } else if let Some(last) = out.last_mut() {
            last.push(' ');
            last.push_str(line.trim());
        }
    }
    out
}

/// Promises the README makes in its own words; the paragraph that makes each must name the
/// tests that attack it, as docs/guarantees.md does.
const README_PROMISES: &[&str] = &[
    "is never dropped silently",
    "republishes at most what was in flight",
    "fenced by the lease epoch",
    "instead of skipping",
    "blocks its aggregate until `ordo-projector repair",
    "gap filling and blocking for both kinds",
    "with exit status 2",
    "from the moment SIGTERM arrives",
];

#[test]
fn every_readme_promise_names_existing_tests() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let paragraphs = paragraphs(&readme);
    let mut problems = Vec::new();
    for promise in README_PROMISES {
        let Some(p) = paragraphs.iter().find(|p| p.contains(promise)) else {
            problems.push(format!(
                "the README no longer says {promise:?}: update README_PROMISES"
            ));
            continue;
        };
        if test_refs(p).is_empty() {
            problems.push(format!("names no test: {promise:?}"));
        }
    }
    for r in paragraphs.iter().flat_map(|p| test_refs(p)) {
        if let Err(e) = defines_test(&root, &r) {
            problems.push(e);
        }
    }
    assert!(problems.is_empty(), "README.md:\n{}", problems.join("\n"));
}

#[test]
fn the_reference_parser_reads_what_the_doc_writes() {
    let refs = test_refs("x (`bins/a.rs::one`, `not code`, `crates/b.rs::two`)");
    let names: Vec<_> = refs
        .iter()
        .map(|r| (r.file.as_str(), r.name.as_str()))
        .collect();
    assert_eq!(names, [("bins/a.rs", "one"), ("crates/b.rs", "two")]);
    let doc = "## Guarantees\n\n- **A.** one\n  two\n- **B.** three\n\n## Other\n- not\n";
    assert_eq!(promises(doc), ["**A.** one two", "**B.** three"]);
    let readme = "# T\n\nOne\ntwo.\n\n- a\n  b\n- c\n```sh\nx\n```\n";
    assert_eq!(paragraphs(readme), ["One two.", "- a b", "- c"]);
}

/// The paths of the README's "Where each behaviour lives" table, one `{a,b}` group expanded.
fn source_map_paths(readme: &str) -> Vec<String> {
    let table = readme
        .lines()
        .skip_while(|l| !l.starts_with("Where each behaviour lives"))
        .skip(1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'));
    let mut out = Vec::new();
    for row in table {
        let files = row.rsplit('|').nth(1).unwrap_or_default();
        for code in files.split('`').skip(1).step_by(2) {
            match code.split_once('{') {
                Some((head, rest)) => {
                    let (alternatives, tail) = rest.split_once('}').unwrap_or((rest, ""));
                    out.extend(alternatives.split(',').map(|a| format!("{head}{a}{tail}")));
                }
                None => out.push(code.to_owned()),
            }
        }
    }
    out
}

/// A newcomer finds each behaviour of the design in the file the README names for it: a file
/// renamed, moved or split without the map following fails here.
#[test]
fn the_readme_source_map_names_files_that_exist() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let paths = source_map_paths(&readme);
    assert!(paths.len() > 20, "the source map was not found: {paths:?}");
    let missing: Vec<_> = paths.iter().filter(|p| !root.join(p).exists()).collect();
    assert!(
        missing.is_empty(),
        "README.md names files that do not exist: {missing:?}"
    );
    assert_eq!(
        source_map_paths("Where each behaviour lives:\n\n| a | b |\n|---|---|\n| x | `d/{a,b}.rs`, `e/` |\n\nafter `z.rs`"),
        ["d/a.rs", "d/b.rs", "e/"]
    );
}
