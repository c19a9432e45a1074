//! Unified diffs of one or more files, as `diff -u` and `git diff` write them. This module
//! only cuts a diff into its files (by each hunk's line counts, so a removed line that starts
//! `--` is not taken for a header); `diffy` parses and applies each file's hunks.

use crate::error::{ExecError, Kind, Result};

/// One file's part of a diff.
#[derive(Debug)]
pub struct FilePatch {
    /// The file before (`None`: `/dev/null`, the patch creates it).
    old: Option<String>,
    /// The file after (`None`: the patch deletes it).
    new: Option<String>,
    text: String,
}

impl FilePatch {
    /// The workspace path it changes.
    pub fn path(&self) -> &str {
        self.new
            .as_deref()
            .or(self.old.as_deref())
            .unwrap_or_default()
    }

    /// Whether it makes a new file.
    pub fn creates(&self) -> bool {
        self.old.is_none()
    }

    /// The file's content after the patch (`None`: deleted), or why the patch does not apply.
    pub fn apply(&self, original: &str) -> Result<Option<String>> {
        if self.new.is_none() {
            return Ok(None);
        }
        let patch = diffy::Patch::from_str(&self.text).map_err(|e| {
            ExecError::invalid(
                "invalid_patch",
                format!("the patch of `{}`: {e}", self.path()),
            )
        })?;
        diffy::apply(original, &patch).map(Some).map_err(|e| {
            ExecError::new(
                Kind::Unprocessable,
                "patch_failed",
                format!("the patch does not apply to `{}`: {e}", self.path()),
            )
        })
    }
}

/// The files of `diff`, in order; lines outside any file's headers and hunks (`diff --git`,
/// `index`, mode lines, commentary) are skipped.
pub fn parse(diff: &str) -> Result<Vec<FilePatch>> {
    let lines: Vec<&str> = diff.split_inclusive('\n').collect();
    let mut files = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let header =
            lines[i].starts_with("--- ") && lines.get(i + 1).is_some_and(|l| l.starts_with("+++ "));
        if !header {
            i += 1;
            continue;
        }
        let (old, new) = (name(lines[i]), name(lines[i + 1]));
        let (old, new) = strip_git_prefixes(old, new);
        let mut text = format!(
            "--- {}\n+++ {}\n",
            old.as_deref().unwrap_or("/dev/null"),
            new.as_deref().unwrap_or("/dev/null")
        );
        i += 2;
        while let Some(line) = lines.get(i).filter(|l| l.starts_with("@@")) {
            let (mut before, mut after) = counts(line)?;
            text.push_str(line);
            i += 1;
            while before + after > 0 {
                let Some(line) = lines.get(i) else {
                    return Err(invalid("a hunk ends before its line counts say"));
                };
                match line.as_bytes().first() {
                    Some(b' ') | Some(b'\n') | Some(b'\r') => {
                        before = before.saturating_sub(1);
                        after = after.saturating_sub(1);
                    }
                    Some(b'-') => before = before.saturating_sub(1),
                    Some(b'+') => after = after.saturating_sub(1),
                    Some(b'\\') => {}
                    _ => return Err(invalid("a hunk holds a line that is not ' ', '-' or '+'")),
                }
                text.push_str(line);
                i += 1;
            }
            // "\ No newline at end of file" after the last line of a hunk.
            if let Some(line) = lines.get(i).filter(|l| l.starts_with('\\')) {
                text.push_str(line);
                i += 1;
            }
        }
        if old.is_none() && new.is_none() {
            return Err(invalid("a file's headers are both /dev/null"));
        }
        files.push(FilePatch { old, new, text });
    }
    if files.is_empty() {
        return Err(invalid("no `--- a` / `+++ b` file headers found"));
    }
    Ok(files)
}

fn invalid(why: &str) -> ExecError {
    ExecError::invalid(
        "invalid_patch",
        format!("the patch is not a unified diff: {why}"),
    )
}

/// The path of a `---` or `+++` line (`None` for `/dev/null`), without a trailing timestamp.
fn name(line: &str) -> Option<String> {
    let rest = line[4..].trim_end_matches(['\n', '\r']);
    let path = rest.split('\t').next().unwrap_or(rest).trim();
    (path != "/dev/null").then(|| path.to_owned())
}

/// Drops git's `a/` and `b/` prefixes when the diff uses them on both sides.
fn strip_git_prefixes(
    old: Option<String>,
    new: Option<String>,
) -> (Option<String>, Option<String>) {
    let git = old.as_deref().is_none_or(|o| o.starts_with("a/"))
        && new.as_deref().is_none_or(|n| n.starts_with("b/"));
    if !git {
        return (old, new);
    }
    let strip = |p: Option<String>| p.map(|p| p[2..].to_owned());
    (strip(old), strip(new))
}

/// The old and new line counts of a hunk header `@@ -a[,b] +c[,d] @@`.
fn counts(header: &str) -> Result<(usize, usize)> {
    let mut parts = header.split_whitespace().skip(1);
    let mut count = |sign: char| -> Result<usize> {
        let range = parts
            .next()
            .and_then(|r| r.strip_prefix(sign))
            .ok_or_else(|| invalid("a hunk header is not `@@ -a,b +c,d @@`"))?;
        match range.split_once(',') {
            Some((_, n)) => n
                .parse()
                .map_err(|_| invalid("a hunk's line count is not a number")),
            None => Ok(1),
        }
    };
    Ok((count('-')?, count('+')?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    const GIT: &str = "diff --git a/src/a.py b/src/a.py
index 83db48f..bf269f4 100644
--- a/src/a.py
+++ b/src/a.py
@@ -1,3 +1,3 @@
 x = 1
--- y = 2
+y = 3
 z = 4
diff --git a/new.txt b/new.txt
new file mode 100644
--- /dev/null
+++ b/new.txt
@@ -0,0 +1,2 @@
+hello
+world
";

    #[test]
    fn a_git_diff_is_cut_into_its_files_by_the_hunk_counts() {
        let files = parse(GIT).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].path(), "src/a.py");
        assert!(!files[0].creates());
        let after = files[0].apply("x = 1\n-- y = 2\nz = 4\n").unwrap().unwrap();
        assert_eq!(after, "x = 1\ny = 3\nz = 4\n");
        assert_eq!(files[1].path(), "new.txt");
        assert!(files[1].creates());
        assert_eq!(files[1].apply("").unwrap().unwrap(), "hello\nworld\n");
    }

    #[test]
    fn a_patch_that_does_not_apply_says_which_file() {
        let files = parse(GIT).unwrap();
        let e = files[0].apply("something else entirely\n").unwrap_err();
        assert_eq!((e.kind, e.code), (Kind::Unprocessable, "patch_failed"));
        assert!(e.message.contains("src/a.py"), "{e}");
    }

    #[test]
    fn text_that_is_not_a_diff_is_refused() {
        for bad in [
            "hello",
            "--- a\n+++ b\n@@ -1,2 +1 @@\n x\n",
            "--- a\n+++ b\n@@ nonsense @@\n",
        ] {
            assert_eq!(parse(bad).unwrap_err().code, "invalid_patch", "{bad:?}");
        }
    }
}
