//! The user guide (`docs/guide/*.md`, in page order) and the README cannot rot: every `memsteer`
//! command of a `sh` block runs, from a directory whose `fixtures/` is the repository's, and must
//! succeed; a `sh no-run` block (a GPU, data the repository cannot ship) must parse.

use super::*;

/// The fenced blocks of a Markdown file: (info string, body).
fn blocks(text: &str) -> Vec<(String, String)> {
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
    out
}

/// The shell commands of a block: `\`-continued lines joined, comments and blank lines dropped.
fn commands(body: &str) -> Vec<String> {
    let joined = body.replace("\\\n", " ");
    joined
        .lines()
        .map(|l| l.split(" # ").next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// Splits a command line into words, with `'…'` and `"…"` quoting.
fn words(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quote, mut any) = (Vec::new(), String::new(), None, false);
    for c in line.chars() {
        match (quote, c) {
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
fn quoting_and_continuations_are_read_as_a_shell_would() {
    assert_eq!(words(r#"memsteer x --text "a b" 'c d' e"#), ["memsteer", "x", "--text", "a b", "c d", "e"]);
    assert_eq!(commands("a \\\n  b  # note\n# only a comment\n\nc\n"), ["a    b", "c"]);
    let md = "x\n```sh\nmemsteer a\n```\n```sh no-run\nmemsteer b\n```\n";
    assert_eq!(blocks(md), [("sh".into(), "memsteer a\n".into()), ("sh no-run".into(), "memsteer b\n".into())]);
}

#[test]
fn every_command_of_the_guide_and_the_readme_runs() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root.join("docs/guide"))
        .expect("docs/guide")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    pages.push(root.join("README.md"));
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(root.join("fixtures"), dir.path().join("fixtures")).expect("link fixtures");
    let (mut ran, mut parsed) = (0, 0);
    for page in &pages {
        let text = std::fs::read_to_string(page).expect("page");
        for (info, body) in blocks(&text) {
            let run = match info.as_str() {
                "sh" => true,
                "sh no-run" => false,
                _ => continue,
            };
            for line in commands(&body).into_iter().filter(|l| l.starts_with("memsteer ")) {
                let argv = words(&line);
                if run {
                    let out = Command::new(env!("CARGO_BIN_EXE_memsteer"))
                        .args(&argv[1..])
                        .current_dir(dir.path())
                        .output()
                        .expect("run memsteer");
                    assert!(
                        out.status.success(),
                        "{}: `{line}` failed:\n{}\n{}",
                        page.display(),
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    ran += 1;
                } else {
                    use clap::Parser;
                    if let Err(e) = memsteer_cli::Cli::try_parse_from(&argv) {
                        panic!("{}: `{line}` does not parse:\n{e}", page.display());
                    }
                    parsed += 1;
                }
            }
        }
    }
    assert!(ran >= 15 && parsed >= 2, "ran {ran} and parsed {parsed} commands: the guide lost its commands?");
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
        (&["instances", "--help"][..], "docs/pythia.md"),
    ] {
        let help = ok(args);
        assert!(help.contains(page), "memsteer {args:?} does not name {page}:\n{help}");
        assert!(root.join(page).is_file(), "{page} does not exist");
    }
}
