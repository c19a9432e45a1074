//! Writes the CRDs generated from `arl_operator::crd` into `deploy/crds/` and the Helm
//! chart's `crds/` (or into the folders given as arguments).
#![forbid(unsafe_code)]

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if dirs.is_empty() {
        dirs = vec![root.join("deploy/crds"), root.join("deploy/helm/arl/crds")];
    }
    let files = arl_operator::crd::crd_files()?;
    for dir in &dirs {
        std::fs::create_dir_all(dir)?;
        for (name, yaml) in &files {
            let path = dir.join(name);
            std::fs::write(&path, yaml)?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
