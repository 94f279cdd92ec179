//! Files and directories that only their owner may read.
//!
//! The coordinator's home holds the CA key and a database of raw client
//! updates; an agent's state directory holds its device key and its
//! pending update. Both crates create them through these two functions, so
//! that neither ever exists readable by other local users, not even
//! briefly (on Unix; elsewhere they create and leave modes alone).

use std::path::Path;

/// Creates `dir` (and missing parents) readable by its owner only, or, if
/// it exists, takes away every group and other permission it has.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)?;
    restrict(dir)
}

/// Takes away every group and other permission of an existing file or
/// directory (for files created by a library, such as SQLite's database).
pub fn restrict(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !0o077))?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_and_existing_directories_and_files_become_private() {
        let root = std::env::temp_dir().join(format!("fleet-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let fresh = root.join("a/b");
        private_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);

        let open = root.join("open");
        std::fs::create_dir_all(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&open).unwrap();
        assert_eq!(mode(&open), 0o700);

        let file = open.join("db");
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        restrict(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
