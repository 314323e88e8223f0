//! `--token-file PATH`: the token read from a file, so it stays off the
//! command line (visible in `ps`) and can come from systemd's
//! `LoadCredential=` (`$CREDENTIALS_DIRECTORY/NAME`).

use std::path::Path;

use anyhow::{bail, Context, Result};

/// The token from `--token` or `--token-file` (clap makes them exclusive).
/// The file's content is trimmed: editors and `echo` add a newline.
pub fn resolve(token: Option<String>, file: Option<&Path>) -> Result<Option<String>> {
    let Some(path) = file else {
        return Ok(token.filter(|t| !t.is_empty()));
    };
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let t = raw.trim();
    if t.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    if t.contains(['\n', '\r']) {
        bail!(
            "the token file {} holds more than one line; it must hold only the token",
            path.display()
        );
    }
    Ok(Some(t.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_trims() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "s3cret\n").unwrap();
        assert_eq!(resolve(None, Some(&p)).unwrap().as_deref(), Some("s3cret"));
        std::fs::write(&p, "\n").unwrap();
        assert!(resolve(None, Some(&p))
            .unwrap_err()
            .to_string()
            .contains("empty"));
        std::fs::write(&p, "a\nb\n").unwrap();
        assert!(resolve(None, Some(&p)).is_err());
        let missing = dir.path().join("nope");
        let e = format!("{:#}", resolve(None, Some(&missing)).unwrap_err());
        assert!(e.contains("nope"), "{e}");
        assert_eq!(
            resolve(Some("x".into()), None).unwrap().as_deref(),
            Some("x")
        );
        assert_eq!(resolve(Some("".into()), None).unwrap(), None);
    }
}
