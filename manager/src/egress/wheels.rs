//! `pip install` in a session: pure-Python wheels, found in the operator's wheelhouse
//! (`--wheelhouse`, open to every session) or in the package index (`--pip-index`, used only
//! where the session's policy allows its host), unpacked by the host into the session's
//! `/workspace/.arl/site-packages`, so that they travel with its files (fork, snapshot,
//! export). Downloads are kept once per manager. Native wheels are refused by name: their
//! code cannot run in WebAssembly.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use cap_std::ambient_authority;
use cap_std::fs::Dir;
use pep508_rs::pep440_rs::Version;
use pep508_rs::{
    ExtraName, MarkerEnvironment, MarkerEnvironmentBuilder, PackageName, Requirement, VersionOrUrl,
};
use sha2::{Digest, Sha256};

use super::broker::{Broker, HttpCall};
use super::{Failure, Policy, Usage};

/// Where installed packages go, relative to `/workspace`.
pub const SITE: &str = ".arl/site-packages";
/// The largest wheel unpacked: its files count against the workspace quota besides.
const MAX_UNPACKED: u64 = 256 << 20;
/// Packages one `pip install` may bring in, dependencies included.
const MAX_PACKAGES: usize = 64;

/// What the guest's `%pip install` asks.
#[derive(Debug, serde::Deserialize)]
pub struct PipCall {
    pub requirements: Vec<String>,
    /// Install only what is named, not what it requires.
    #[serde(default)]
    pub no_deps: bool,
    /// Install the newest allowed version even where one is present.
    #[serde(default)]
    pub upgrade: bool,
}

/// The manager's installer: where wheels are found and kept.
pub struct Installer {
    wheelhouse: Option<PathBuf>,
    index: Option<url::Url>,
    cache: PathBuf,
    /// The distributions in the runtimes' stdlib zips, which count as installed.
    bundled: std::sync::RwLock<BTreeMap<PackageName, Version>>,
}

/// What an install reaches through.
pub struct Context<'a> {
    pub broker: &'a Broker,
    pub policy: &'a Policy,
    pub usage: &'a Usage,
    /// The session's `/workspace` on the host.
    pub workspace: &'a Path,
}

/// One wheel found for a requirement.
#[derive(Debug, Clone)]
struct Candidate {
    filename: String,
    version: Version,
    pure: bool,
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    File(PathBuf),
    Url {
        url: url::Url,
        sha256: Option<String>,
    },
}

fn install_error(m: impl Into<String>) -> Failure {
    Failure::Install(m.into())
}

impl Installer {
    pub fn new(wheelhouse: Option<PathBuf>, index: Option<url::Url>, cache: PathBuf) -> Self {
        Self {
            wheelhouse,
            index,
            cache,
            bundled: std::sync::RwLock::default(),
        }
    }

    /// Counts the distributions in a runtime's read-only mounts (the `.dist-info` folders of
    /// its stdlib zip) as installed. Blocking: the zips' directories are read (~10 ms).
    pub fn add_runtime(&self, mounts: &[arl_runtimes::Mount]) {
        let zips = mounts
            .iter()
            .filter_map(|m| std::fs::read_dir(&m.host).ok())
            .flat_map(|entries| entries.flatten().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "zip"));
        let mut found = BTreeMap::new();
        for path in zips {
            let Ok(zip) = std::fs::File::open(&path).map(zip::ZipArchive::new) else {
                continue;
            };
            let Ok(zip) = zip else { continue };
            for entry in zip.file_names() {
                if let Some(dir) = entry
                    .split('/')
                    .next()
                    .and_then(|d| d.strip_suffix(".dist-info"))
                    && let Some((name, version)) = dir.split_once('-')
                    && let (Ok(name), Ok(version)) =
                        (PackageName::from_str(name), Version::from_str(version))
                {
                    found.insert(name, version);
                }
            }
        }
        self.bundled
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(found);
    }

    /// Installs `call`'s requirements and what they require; answers what was installed.
    pub async fn install(
        &self,
        cx: &Context<'_>,
        call: &PipCall,
    ) -> Result<serde_json::Value, Failure> {
        let env = guest_environment();
        let mut queue: VecDeque<(Requirement, bool)> = VecDeque::new();
        for text in &call.requirements {
            let requirement = Requirement::from_str(text)
                .map_err(|e| install_error(format!("`{text}` is not a requirement: {e}")))?;
            queue.push_back((requirement, true));
        }
        if queue.is_empty() {
            return Err(install_error("pip install needs at least one requirement"));
        }
        let site = site_dir(cx.workspace)?;
        let mut installed = Vec::new();
        while let Some((requirement, named)) = queue.pop_front() {
            if !requirement.evaluate_markers(&env, &[]) {
                continue;
            }
            let specifiers = match &requirement.version_or_url {
                Some(VersionOrUrl::VersionSpecifier(s)) => Some(s.clone()),
                Some(VersionOrUrl::Url(_)) => {
                    return Err(install_error(format!(
                        "`{requirement}`: requirements by URL are not installed; name a version"
                    )));
                }
                None => None,
            };
            let present = self.present(&site, &requirement.name);
            let satisfied = present
                .as_ref()
                .is_some_and(|v| specifiers.as_ref().is_none_or(|s| s.contains(v)));
            if satisfied && !(named && call.upgrade) {
                continue;
            }
            if installed.len() >= MAX_PACKAGES {
                return Err(install_error(format!(
                    "more than {MAX_PACKAGES} packages to install at once"
                )));
            }
            let allowed =
                |c: &&Candidate| specifiers.as_ref().is_none_or(|s| s.contains(&c.version));
            let mut candidates = self.in_wheelhouse(&requirement.name);
            if !candidates.iter().filter(|c| c.pure).any(|c| allowed(&c)) {
                candidates.extend(self.in_index(cx, &requirement.name).await?);
            }
            let pick = candidates
                .iter()
                .filter(|c| c.pure)
                .filter(allowed)
                .filter(|c| !c.version.any_prerelease())
                .max_by(|a, b| a.version.cmp(&b.version))
                .or_else(|| {
                    candidates
                        .iter()
                        .filter(|c| c.pure)
                        .filter(allowed)
                        .max_by(|a, b| a.version.cmp(&b.version))
                });
            let Some(pick) = pick else {
                let native: Vec<&str> = candidates
                    .iter()
                    .filter(|c| !c.pure)
                    .filter(allowed)
                    .map(|c| c.filename.as_str())
                    .take(3)
                    .collect();
                return Err(install_error(if native.is_empty() {
                    format!("no wheel of `{requirement}` found ({})", self.searched(cx))
                } else {
                    format!(
                        "`{requirement}` has only native wheels ({}): native code cannot run in \
                         WebAssembly",
                        native.join(", ")
                    )
                }));
            };
            let wheel = self.fetch(cx, pick).await?;
            let pick = pick.clone();
            let site_path = cx.workspace.join(SITE);
            let (requires, name) =
                tokio::task::spawn_blocking(move || unpack(&site_path, &wheel, &pick.filename))
                    .await
                    .map_err(|e| install_error(format!("unpacking failed: {e}")))??;
            installed.push(serde_json::json!({"name": name, "version": pick.version.to_string()}));
            if !call.no_deps {
                let extras: Vec<ExtraName> = requirement.extras.clone();
                for line in requires {
                    if let Ok(dep) = Requirement::from_str(&line)
                        && dep.evaluate_markers(&env, &extras)
                    {
                        queue.push_back((dep, false));
                    }
                }
            }
        }
        Ok(serde_json::json!({"installed": installed, "site": format!("/workspace/{SITE}")}))
    }

    fn searched(&self, cx: &Context<'_>) -> String {
        let mut places = Vec::new();
        if let Some(w) = &self.wheelhouse {
            places.push(format!("wheelhouse {}", w.display()));
        }
        match &self.index {
            Some(index) if self.index_allowed(cx.policy, index) => {
                places.push(format!("index {index}"))
            }
            Some(index) => places.push(format!(
                "index {index} not searched: this session's network does not allow its host"
            )),
            None => {}
        }
        if places.is_empty() {
            "this manager has no wheelhouse and no index".into()
        } else {
            places.join("; ")
        }
    }

    fn index_allowed(&self, policy: &Policy, index: &url::Url) -> bool {
        match (
            super::policy::Host::of(index),
            index.port_or_known_default(),
        ) {
            (Some(host), Some(port)) => policy.find(&host, port).is_some(),
            _ => false,
        }
    }

    /// The version of `name` the session has, in its own site folder or bundled.
    fn present(&self, site: &Dir, name: &PackageName) -> Option<Version> {
        installed(site).remove(name).or_else(|| {
            let bundled = self
                .bundled
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            bundled.get(name).cloned()
        })
    }

    /// Every wheel of `name` in the wheelhouse.
    fn in_wheelhouse(&self, name: &PackageName) -> Vec<Candidate> {
        let mut all = Vec::new();
        if let Some(dir) = &self.wheelhouse
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            for entry in entries.flatten() {
                let filename = entry.file_name().to_string_lossy().into_owned();
                if let Some((n, version, pure)) = parse_filename(&filename)
                    && &n == name
                {
                    all.push(Candidate {
                        filename,
                        version,
                        pure,
                        source: Source::File(entry.path()),
                    });
                }
            }
        }
        all
    }

    /// Every wheel of `name` in the index, where the session's policy allows its host.
    async fn in_index(
        &self,
        cx: &Context<'_>,
        name: &PackageName,
    ) -> Result<Vec<Candidate>, Failure> {
        let mut all = Vec::new();
        if let Some(index) = &self.index
            && self.index_allowed(cx.policy, index)
        {
            let page = index
                .join(&format!("{name}/"))
                .map_err(|e| install_error(format!("the index URL: {e}")))?;
            let call = HttpCall {
                method: "GET".into(),
                url: page.to_string(),
                headers: vec![(
                    "accept".into(),
                    "application/vnd.pypi.simple.v1+json".into(),
                )],
                body: None,
                timeout: None,
            };
            let (answer, _) = cx.broker.http(cx.policy, cx.usage, call, None).await;
            let answer = answer?;
            if answer.status == 200 {
                #[derive(serde::Deserialize)]
                struct Page {
                    files: Vec<File>,
                }
                #[derive(serde::Deserialize)]
                struct File {
                    filename: String,
                    url: String,
                    #[serde(default)]
                    hashes: BTreeMap<String, String>,
                    #[serde(default)]
                    yanked: serde_json::Value,
                }
                let body = STANDARD.decode(&answer.body).unwrap_or_default();
                let listed: Page = serde_json::from_slice(&body).map_err(|e| {
                    install_error(format!("{page} is not a PEP 691 JSON index page: {e}"))
                })?;
                for file in listed.files {
                    let yanked = !matches!(
                        file.yanked,
                        serde_json::Value::Null | serde_json::Value::Bool(false)
                    );
                    if let Some((n, version, pure)) = parse_filename(&file.filename)
                        && &n == name
                        && !yanked
                        && let Ok(url) = page.join(&file.url)
                    {
                        let sha256 = file.hashes.get("sha256").cloned();
                        all.push(Candidate {
                            filename: file.filename,
                            version,
                            pure,
                            source: Source::Url { url, sha256 },
                        });
                    }
                }
            } else if answer.status != 404 {
                return Err(install_error(format!("{page} answered {}", answer.status)));
            }
        }
        Ok(all)
    }

    /// The wheel's bytes: from the wheelhouse, the manager's cache, or downloaded (through
    /// the session's policy and budget) into the cache.
    async fn fetch(&self, cx: &Context<'_>, pick: &Candidate) -> Result<Vec<u8>, Failure> {
        let read = |path: &Path| {
            std::fs::read(path)
                .map_err(|e| install_error(format!("reading {}: {e}", path.display())))
        };
        let (url, sha256) = match &pick.source {
            Source::File(path) => return read(path),
            Source::Url { url, sha256 } => (url, sha256),
        };
        let cached = self.cache.join(&pick.filename);
        let matches = |bytes: &[u8]| {
            sha256
                .as_ref()
                .is_none_or(|want| hex::encode(Sha256::digest(bytes)) == *want)
        };
        if let Ok(bytes) = std::fs::read(&cached)
            && matches(&bytes)
        {
            return Ok(bytes);
        }
        let call = HttpCall {
            method: "GET".into(),
            url: url.to_string(),
            headers: vec![],
            body: None,
            timeout: None,
        };
        let (answer, _) = cx.broker.http(cx.policy, cx.usage, call, None).await;
        let answer = answer?;
        if answer.status != 200 {
            return Err(install_error(format!("{url} answered {}", answer.status)));
        }
        let bytes = STANDARD.decode(&answer.body).unwrap_or_default();
        if !matches(&bytes) {
            return Err(install_error(format!(
                "{} does not have the sha256 the index lists",
                pick.filename
            )));
        }
        if std::fs::create_dir_all(&self.cache).is_ok() {
            let partial =
                cached.with_extension(format!("partial-{}", uuid::Uuid::new_v4().simple()));
            if std::fs::write(&partial, &bytes).is_ok() {
                let _ = std::fs::rename(&partial, &cached);
            }
        }
        Ok(bytes)
    }
}

/// `name-version(-build)?-python-abi-platform.whl`: the name, the version, and whether it is
/// pure Python (`none` ABI, `any` platform, a Python 3 tag).
fn parse_filename(filename: &str) -> Option<(PackageName, Version, bool)> {
    let stem = filename.strip_suffix(".whl")?;
    let parts: Vec<&str> = stem.split('-').collect();
    if !(5..=6).contains(&parts.len()) {
        return None;
    }
    let name = PackageName::from_str(parts[0]).ok()?;
    let version = Version::from_str(parts[1]).ok()?;
    let [python, abi, platform] = parts[parts.len() - 3..] else {
        return None;
    };
    let pure = abi == "none"
        && platform == "any"
        && python
            .split('.')
            .any(|t| t == "py3" || t.starts_with("py3"));
    Some((name, version, pure))
}

/// Markers as the guest's interpreter answers them.
fn guest_environment() -> MarkerEnvironment {
    MarkerEnvironment::try_from(MarkerEnvironmentBuilder {
        implementation_name: "cpython",
        implementation_version: "3.15.0",
        os_name: "posix",
        platform_machine: "wasm32",
        platform_python_implementation: "CPython",
        platform_release: "",
        platform_system: "WASI",
        platform_version: "",
        python_full_version: "3.15.0",
        python_version: "3.15",
        sys_platform: "wasi",
    })
    .unwrap_or_else(|_| unreachable!("the versions above parse"))
}

/// The session's site folder, made if missing, opened inside its workspace (a link the guest
/// made cannot lead the host out of it).
fn site_dir(workspace: &Path) -> Result<Dir, Failure> {
    let root = Dir::open_ambient_dir(workspace, ambient_authority())
        .map_err(|e| install_error(format!("opening the workspace: {e}")))?;
    root.create_dir_all(SITE)
        .and_then(|()| root.open_dir(SITE))
        .map_err(|e| install_error(format!("making /workspace/{SITE}: {e}")))
}

/// What the site folder holds: each `*.dist-info`'s name and version.
fn installed(site: &Dir) -> BTreeMap<PackageName, Version> {
    let mut all = BTreeMap::new();
    if let Ok(entries) = site.entries() {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((n, v)) = name
                .strip_suffix(".dist-info")
                .and_then(|d| d.split_once('-'))
                && let (Ok(n), Ok(v)) = (PackageName::from_str(n), Version::from_str(v))
            {
                all.insert(n, v);
            }
        }
    }
    all
}

/// Unpacks `wheel` into the site folder at `site` (replacing another version of it), after
/// checking it holds no native code; answers its `Requires-Dist` lines and its name.
fn unpack(site: &Path, wheel: &[u8], filename: &str) -> Result<(Vec<String>, String), Failure> {
    let bad = |m: String| install_error(format!("{filename}: {m}"));
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(wheel))
        .map_err(|e| bad(format!("not a wheel: {e}")))?;
    let mut total = 0u64;
    let mut metadata = String::new();
    let mut purelib = false;
    let mut dist_info = None;
    for i in 0..zip.len() {
        let entry = zip.by_index(i).map_err(|e| bad(e.to_string()))?;
        let name = entry.name().to_owned();
        total = total.saturating_add(entry.size());
        if [".so", ".pyd", ".dylib", ".dll", ".wasm"]
            .iter()
            .any(|ext| name.ends_with(ext))
        {
            return Err(bad(format!(
                "holds native code ({name}), which cannot run in WebAssembly"
            )));
        }
        if let Some(dir) = name.strip_suffix(".dist-info/WHEEL") {
            dist_info = Some(dir.to_owned());
            let mut text = String::new();
            let _ = entry.take(64 << 10).read_to_string(&mut text);
            purelib = text
                .lines()
                .any(|l| l.trim().eq_ignore_ascii_case("Root-Is-Purelib: true"));
        } else if name.ends_with(".dist-info/METADATA") {
            let _ = entry.take(4 << 20).read_to_string(&mut metadata);
        }
    }
    let Some(dist_info) = dist_info else {
        return Err(bad("has no .dist-info/WHEEL".into()));
    };
    if !purelib {
        return Err(bad(
            "is not a pure-Python wheel (Root-Is-Purelib is not true)".into(),
        ));
    }
    if total > MAX_UNPACKED {
        return Err(bad(format!(
            "unpacks to {total} bytes, more than {MAX_UNPACKED}"
        )));
    }
    let site = Dir::open_ambient_dir(site, ambient_authority()).map_err(|e| bad(e.to_string()))?;
    let project = dist_info
        .split_once('-')
        .map_or(dist_info.as_str(), |(n, _)| n)
        .to_owned();
    remove_other_versions(&site, &project);
    let data = format!("{}.data/", dist_info);
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| bad(e.to_string()))?;
        let Some(path) = entry.enclosed_name() else {
            return Err(bad(format!("entry `{}` leaves its folder", entry.name())));
        };
        let path = path.to_string_lossy().into_owned();
        let path = match path.strip_prefix(&data) {
            None => path,
            Some(rest) => match rest
                .strip_prefix("purelib/")
                .or_else(|| rest.strip_prefix("platlib/"))
            {
                Some(inner) => inner.to_owned(),
                None => continue, // scripts, headers, data: nothing a session imports
            },
        };
        if entry.is_dir() {
            site.create_dir_all(&path)
                .map_err(|e| bad(format!("{path}: {e}")))?;
            continue;
        }
        if let Some(parent) = Path::new(&path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            site.create_dir_all(parent)
                .map_err(|e| bad(format!("{path}: {e}")))?;
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("{path}: {e}")))?;
        site.write(&path, &bytes)
            .map_err(|e| bad(format!("{path}: {e}")))?;
    }
    let requires = metadata
        .lines()
        .filter_map(|l| l.strip_prefix("Requires-Dist:"))
        .map(|l| l.trim().to_owned())
        .collect();
    let name = metadata
        .lines()
        .find_map(|l| l.strip_prefix("Name:"))
        .map_or(project, |n| n.trim().to_owned());
    Ok((requires, name))
}

/// Removes the files another installed version of `project` listed in its RECORD, and its
/// `.dist-info`.
fn remove_other_versions(site: &Dir, project: &str) {
    let Ok(want) = PackageName::from_str(project) else {
        return;
    };
    let Ok(entries) = site.entries() else { return };
    for entry in entries.flatten() {
        let dir = entry.file_name().to_string_lossy().into_owned();
        let Some((n, _)) = dir
            .strip_suffix(".dist-info")
            .and_then(|d| d.split_once('-'))
        else {
            continue;
        };
        if PackageName::from_str(n).ok().as_ref() != Some(&want) {
            continue;
        }
        if let Ok(record) = site.read_to_string(format!("{dir}/RECORD")) {
            for line in record.lines() {
                if let Some(path) = line.split(',').next().filter(|p| !p.contains("..")) {
                    let _ = site.remove_file(path);
                }
            }
        }
        let _ = site.remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wheel_names_say_whether_they_are_pure() {
        let (name, version, pure) =
            parse_filename("Hello_World-1.2.3-py3-none-any.whl").unwrap_or_else(|| panic!());
        assert_eq!(name.to_string(), "hello-world");
        assert_eq!(version.to_string(), "1.2.3");
        assert!(pure);
        assert!(parse_filename("six-1.17.0-py2.py3-none-any.whl").is_some_and(|w| w.2));
        assert!(
            parse_filename("numpy-2.0.0-cp311-cp311-manylinux_2_17_x86_64.whl")
                .is_some_and(|w| !w.2)
        );
        assert!(parse_filename("x-1.0-1-py3-none-any.whl").is_some_and(|w| w.2));
        assert!(parse_filename("not-a-wheel.tar.gz").is_none());
    }

    #[test]
    fn markers_are_the_guests() {
        let env = guest_environment();
        let wasi: Requirement =
            Requirement::from_str("a; sys_platform == 'wasi'").unwrap_or_else(|e| panic!("{e}"));
        let win: Requirement =
            Requirement::from_str("b; sys_platform == 'win32'").unwrap_or_else(|e| panic!("{e}"));
        let new: Requirement =
            Requirement::from_str("c; python_version >= '3.10'").unwrap_or_else(|e| panic!("{e}"));
        assert!(wasi.evaluate_markers(&env, &[]));
        assert!(!win.evaluate_markers(&env, &[]));
        assert!(new.evaluate_markers(&env, &[]));
    }
}
