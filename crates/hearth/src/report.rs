//! How hearth says what went wrong: an error and its chain of causes on one line, each cause said
//! once. hearth's library errors quote their cause in their own message (so that an HTTP error body
//! or a Kubernetes status built from `to_string()` is complete) and also expose it as `source()`;
//! printing every link of the chain would say each cause twice. [`chain`] skips a cause whose text
//! the message before it already contains.

/// `err` and its causes, joined by `: `, each cause's text once.
pub fn chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use anyhow::Context;

    use super::*;

    /// The number of times `needle` appears in `haystack`.
    fn count(haystack: &str, needle: &str) -> usize {
        haystack.matches(needle).count()
    }

    /// One real error from each layer, wrapped in the CLI's context as `main` sees it.
    #[test]
    fn each_layer_says_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let os = "Not a directory (os error 20)";

        // hearth-image: the image store in a home that is a file.
        let image = hearth_image::ImageStore::open(&file)
            .err()
            .expect("a file is no home");
        let text = chain(&anyhow::Error::new(image).context("opening the image store"));
        assert_eq!(count(&text, os), 1, "{text}");
        assert!(text.starts_with("opening the image store: "), "{text}");

        // hearth-vm, as hearth-sandbox reports it: a kernel that does not exist.
        let missing = dir.path().join("no-kernel");
        let Err(kernel) = hearth_vm::kernel::resolve_kernel(dir.path(), Some(&missing)) else {
            panic!("no kernel there");
        };
        let text = chain(&anyhow::Error::new(hearth_sandbox::SandboxError::from(
            kernel,
        )));
        assert_eq!(
            count(&text, "No such file or directory (os error 2)"),
            1,
            "{text}"
        );
        assert_eq!(count(&text, &missing.display().to_string()), 1, "{text}");

        // hearth-sandbox's node: a state directory that cannot be made.
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let node = runtime
            .block_on(hearth_sandbox::Node::open(hearth_sandbox::NodeConfig::new(
                &file,
            )))
            .err()
            .expect("a file is no home");
        let text = chain(&anyhow::Error::new(node).context("opening the node"));
        assert_eq!(count(&text, os), 1, "{text}");

        // A plain I/O error under two contexts: every link is new, so every link is said.
        let io = std::fs::read(Path::new("/nonexistent/x"))
            .context("reading x")
            .context("loading the tokens")
            .unwrap_err();
        assert_eq!(
            chain(&io),
            "loading the tokens: reading x: No such file or directory (os error 2)"
        );
    }
}
