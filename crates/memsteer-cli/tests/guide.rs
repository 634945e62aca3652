//! The user guide (`docs/guide/*.md`, in page order) and the README cannot rot: every `memsteer`
//! command of a `sh` block runs, from a directory whose `fixtures/` is the repository's, and must
//! succeed; a `sh no-run` block (a GPU, data the repository cannot ship) must parse.

use super::*;

/// The fenced blocks of a Markdown file: (info string, body). An unclosed fence is an error.
fn blocks(text: &str, page: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in text.lines() {
        match (&mut open, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) => open = Some((info.trim().to_string(), String::new())),
            (Some(_), Some(_)) => out.extend(open.take()),
            (Some((_, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "{page}: a fenced block is not closed");
    out
}

/// The shell commands of a block: `\`-continued lines joined, blank and comment lines dropped.
fn commands(body: &str) -> Vec<String> {
    body.replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// Splits a command line into words, with `'…'` and `"…"` quoting; an unquoted word starting with `#`
/// begins a comment.
fn words(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quote, mut any) = (Vec::new(), String::new(), None, false);
    for c in line.chars() {
        match (quote, c) {
            (None, '#') if !any => break,
            (None, '\'' | '"') => (quote, any) = (Some(c), true),
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (_, c) => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

#[test]
fn quoting_comments_and_continuations_are_read_as_a_shell_would() {
    assert_eq!(words(r#"memsteer x --text "a # b" 'c d' e # note"#), ["memsteer", "x", "--text", "a # b", "c d", "e"]);
    assert_eq!(commands("a \\\n  b  # note\n# only a comment\n\nc\n"), ["a    b  # note", "c"]);
    let md = "x\n```sh\nmemsteer a\n```\n```sh no-run\nmemsteer b\n```\n";
    assert_eq!(blocks(md, "t"), [("sh".into(), "memsteer a\n".into()), ("sh no-run".into(), "memsteer b\n".into())]);
    assert!(std::panic::catch_unwind(|| blocks("```sh\nmemsteer a\n", "t")).is_err());
}

/// Every file under `dir`, for checking that the commands wrote nothing into the fixtures.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() { stack.push(p) } else { out.push(p) }
        }
    }
    out.sort();
    out
}

/// Runs (or, for `sh no-run`, parses) every command of `page` in `dir`; returns (run, parsed).
fn run_page(page: &Path, dir: &Path) -> (usize, usize) {
    let name = page.display().to_string();
    let (mut ran, mut parsed) = (0, 0);
    for (info, body) in blocks(&std::fs::read_to_string(page).expect("page"), &name) {
        let run = match info.as_str() {
            "sh" => true,
            "sh no-run" => false,
            other => {
                let shellish = ["sh", "bash", "shell", "console", "zsh"].iter().any(|s| other.starts_with(s));
                assert!(!shellish, "{name}: a block marked `{other}`: use `sh` (run) or `sh no-run` (parsed)");
                continue;
            }
        };
        for line in commands(&body) {
            // Cargo commands, and (in blocks that do not run) a server's clients and Python installs.
            let client = ["curl ", "pip ", "python "].iter().any(|c| line.starts_with(c));
            if line.starts_with("cargo ") || (!run && client) {
                continue;
            }
            assert!(line.starts_with("memsteer "), "{name}: `{line}` is neither a memsteer nor a cargo command");
            let argv = words(&line);
            if run {
                let out = Command::new(env!("CARGO_BIN_EXE_memsteer"))
                    .args(&argv[1..])
                    .current_dir(dir)
                    .output()
                    .expect("run memsteer");
                assert!(
                    out.status.success(),
                    "{name}: `{line}` failed:\n{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                ran += 1;
            } else {
                use clap::Parser;
                if let Err(e) = memsteer_cli::Cli::try_parse_from(&argv) {
                    panic!("{name}: `{line}` does not parse:\n{e}");
                }
                parsed += 1;
            }
        }
    }
    (ran, parsed)
}

#[test]
fn every_command_of_the_guide_and_the_readme_runs() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let fixtures_before = files_under(&root.join("fixtures"));
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root.join("docs/guide"))
        .expect("docs/guide")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    // The guide's pages run in order in one directory; the README, which a reader runs alone from the
    // repository's root, in its own.
    let guide_dir = tempfile::tempdir().expect("tempdir");
    let readme_dir = tempfile::tempdir().expect("tempdir");
    let mut counts = std::collections::BTreeMap::new();
    for (pages, dir) in [(pages, guide_dir.path()), (vec![root.join("README.md")], readme_dir.path())] {
        std::os::unix::fs::symlink(root.join("fixtures"), dir.join("fixtures")).expect("link fixtures");
        for page in pages {
            let name = page.strip_prefix(&root).unwrap_or(&page).display().to_string();
            counts.insert(name, run_page(&page, dir));
        }
    }
    // Every page's commands, counted, so that a block the harness stops seeing fails here.
    let want: std::collections::BTreeMap<String, (usize, usize)> = [
        ("docs/guide/1-profile.md", (3, 0)),
        ("docs/guide/2-train-and-score.md", (3, 2)),
        ("docs/guide/3-steer.md", (8, 0)),
        ("docs/guide/4-hmm.md", (4, 0)),
        ("docs/guide/5-serve.md", (0, 1)),
        ("docs/guide/README.md", (0, 0)),
        ("README.md", (8, 4)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(counts, want, "commands run and parsed per page");
    assert_eq!(files_under(&root.join("fixtures")), fixtures_before, "a command wrote into fixtures/");
}

#[test]
fn help_names_the_guide_page_of_each_task() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    for (args, page) in [
        (&["--help"][..], "docs/guide/README.md"),
        (&["profile", "--help"][..], "docs/guide/1-profile.md"),
        (&["train", "--help"][..], "docs/guide/2-train-and-score.md"),
        (&["steer", "--help"][..], "docs/guide/3-steer.md"),
        (&["hmm", "--help"][..], "docs/guide/4-hmm.md"),
        (&["serve", "--help"][..], "docs/guide/5-serve.md"),
        (&["instances", "--help"][..], "docs/pythia.md"),
    ] {
        let help = ok(args);
        assert!(help.contains(page), "memsteer {args:?} does not name {page}:\n{help}");
        assert!(root.join(page).is_file(), "{page} does not exist");
    }
}
