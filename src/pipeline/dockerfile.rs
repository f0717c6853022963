//! Dockerfile rewriting: an `ARG` instruction after every `FROM`, naming every build arg, so
//! each is visible to every stage's `RUN` steps. Case-insensitive, CRLF-preserving,
//! continuation-aware.

use std::collections::BTreeMap;

/// How the ARG names go in: the classic builder runs every `ARG` instruction as a build step
/// (a container created and committed, ~100 ms here), so one instruction naming them all is
/// much cheaper than one per name; builders before dockerd 20.10 take one name per `ARG`.
/// (BuildKit's ARGs are free, and a Dockerfile may pin an old frontend: one per name there.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgStyle {
    /// `ARG K1 K2 …`: dockerd 20.10's classic builder and later.
    OneInstruction,
    /// `ARG K1`, `ARG K2`, …: older builders.
    OnePerName,
}

/// Inserts the `ARG` line(s) for `keys` after every `FROM` instruction of `dockerfile`;
/// `None` when they would add more than `max_added` bytes (the ARG lines repeat per `FROM`:
/// 48 KiB of names times a Dockerfile of a million `FROM` lines is gigabytes).
pub fn inject_args(
    dockerfile: &str,
    keys: &[String],
    style: ArgStyle,
    max_added: usize,
) -> Option<String> {
    if keys.is_empty() {
        return Some(dockerfile.to_string());
    }
    let names: usize = keys.iter().map(|k| k.len() + 1).sum();
    let mut out = String::with_capacity(dockerfile.len() + names.min(max_added));
    // True while inside a FROM instruction continued with a trailing backslash.
    let mut in_from = false;
    for line in dockerfile.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let eol = if line.ends_with("\r\n") { "\r\n" } else { "\n" };
        if !in_from {
            in_from = is_from(body);
        }
        out.push_str(line);
        if in_from && !body.trim_end().ends_with('\\') {
            in_from = false;
            if !line.ends_with('\n') {
                out.push_str(eol);
            }
            let adding = match style {
                ArgStyle::OneInstruction => 3 + names + eol.len(),
                ArgStyle::OnePerName => names + keys.len() * (3 + eol.len()),
            };
            if out.len() + adding > dockerfile.len() + max_added {
                return None;
            }
            match style {
                ArgStyle::OneInstruction => {
                    out.push_str("ARG");
                    for key in keys {
                        out.push(' ');
                        out.push_str(key);
                    }
                    out.push_str(eol);
                }
                ArgStyle::OnePerName => {
                    for key in keys {
                        out.push_str("ARG ");
                        out.push_str(key);
                        out.push_str(eol);
                    }
                }
            }
        }
    }
    Some(out)
}

fn is_from(line: &str) -> bool {
    let t = line.trim_start();
    t.len() > 4
        && t.as_bytes()[..4].eq_ignore_ascii_case(b"FROM")
        && t.as_bytes()[4].is_ascii_whitespace()
}

/// The image labels as one `LABEL` instruction for the end of the Dockerfile (the final
/// stage): one build step, where the build API's `labels` option adds one step (a container
/// created and committed) per label. `None` when a key or value holds anything but
/// `[A-Za-z0-9._-]` (quoting would depend on the file's escape directive) or the file ends in
/// a line continuation: those labels go through the build API instead.
pub fn label_line(dockerfile: &str, labels: &BTreeMap<String, String>) -> Option<String> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    let continued = dockerfile
        .lines()
        .rev()
        .map(str::trim_end)
        .find(|l| !l.is_empty())
        .is_some_and(|l| l.ends_with('\\') || l.ends_with('`'));
    if labels.is_empty() || continued || !labels.iter().all(|(k, v)| plain(k) && plain(v)) {
        return None;
    }
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    Some(format!("LABEL {}", pairs.join(" ")))
}

/// `dockerfile` with `line` appended as its last instruction.
pub fn append_line(dockerfile: &str, line: &str) -> String {
    let mut out = String::with_capacity(dockerfile.len() + line.len() + 2);
    out.push_str(dockerfile);
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(line);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    const ONE: ArgStyle = ArgStyle::OneInstruction;

    fn inject(src: &str, k: &[&str], style: ArgStyle) -> String {
        inject_args(src, &keys(k), style, usize::MAX / 2).unwrap()
    }

    #[test]
    fn arg_lines_stop_at_their_budget() {
        // Exactly the budget is fine; a byte less, and a FROM bomb, are refused.
        let exact = "FROM a\nARG K1 K2\nFROM b\nARG K1 K2\n".len() - "FROM a\nFROM b\n".len();
        let src = "FROM a\nFROM b\n";
        assert!(inject_args(src, &keys(&["K1", "K2"]), ONE, exact).is_some());
        assert!(inject_args(src, &keys(&["K1", "K2"]), ONE, exact - 1).is_none());
        let bomb = "FROM \n".repeat(100_000);
        let many: Vec<String> = (0..1000).map(|i| format!("K{i}")).collect();
        assert!(inject_args(&bomb, &many, ONE, 4 << 20).is_none());
        assert!(inject_args(&bomb, &many, ArgStyle::OnePerName, 4 << 20).is_none());
    }

    #[test]
    fn after_every_from_in_a_multi_stage_file() {
        let src = "FROM a AS build\nRUN make\nfrom b\nCOPY --from=build /x /x\n";
        assert_eq!(
            inject(src, &["K1", "K2"], ONE),
            "FROM a AS build\nARG K1 K2\nRUN make\nfrom b\nARG K1 K2\nCOPY --from=build /x /x\n"
        );
        assert_eq!(
            inject(src, &["K1", "K2"], ArgStyle::OnePerName),
            "FROM a AS build\nARG K1\nARG K2\nRUN make\nfrom b\nARG K1\nARG K2\nCOPY --from=build /x /x\n"
        );
    }

    #[test]
    fn crlf_is_kept_and_last_line_without_newline() {
        assert_eq!(
            inject("FROM a\r\nRUN x\r\n", &["K"], ONE),
            "FROM a\r\nARG K\r\nRUN x\r\n"
        );
        assert_eq!(inject("  From a", &["K"], ONE), "  From a\nARG K\n");
    }

    #[test]
    fn continued_from_and_lookalikes() {
        assert_eq!(
            inject("FROM \\\n  a\nRUN echo FROM x\n", &["K"], ONE),
            "FROM \\\n  a\nARG K\nRUN echo FROM x\n"
        );
        assert_eq!(
            inject("FROMAGE x\n# FROM y\n", &["K"], ONE),
            "FROMAGE x\n# FROM y\n"
        );
        assert_eq!(inject("FROM a\n", &[], ONE), "FROM a\n");
    }

    #[test]
    fn labels_become_one_instruction_at_the_end_when_plain() {
        let labels = BTreeMap::from([
            ("app".to_string(), "web".to_string()),
            ("space".to_string(), "default".to_string()),
        ]);
        let line = label_line("FROM x\nRUN y", &labels).unwrap();
        assert_eq!(line, r#"LABEL app="web" space="default""#);
        assert_eq!(
            append_line("FROM x\nRUN y", &line),
            format!("FROM x\nRUN y\n{line}\n")
        );
        assert_eq!(append_line("FROM x\r\n", "L"), "FROM x\r\nL\n");
        assert_eq!(label_line("FROM x\nRUN a \\\n", &labels), None);
        let odd = BTreeMap::from([("app".to_string(), "a b\"c".to_string())]);
        assert_eq!(label_line("FROM x\n", &odd), None);
    }
}
