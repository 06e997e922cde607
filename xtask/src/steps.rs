//! Steps, plans of steps, and the runner that executes them.
//!
//! A [`Step`] is a named function over the shared [`Ctx`]; a [`Plan`] is the ordered
//! list of steps behind one `cargo xtask` command. The runner prints a header per
//! step (`==> [2/6] clippy`), the elapsed time per step and a final summary, and
//! stops at the first failed step.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::deploy_check;
use crate::provision::{self, TestEnv};

/// State shared by the steps of one run.
pub(crate) struct Ctx {
    /// Workspace root; every command runs from here.
    root: PathBuf,
    /// The cargo executable: `$CARGO`, else `cargo`.
    cargo: OsString,
    /// Environment for the test steps, filled by the provisioning step (if any).
    pub(crate) test_env: TestEnv,
}

impl Ctx {
    /// Builds the context from the process environment and the xtask manifest path.
    pub(crate) fn from_env() -> Result<Self, String> {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir
            .parent()
            .ok_or_else(|| {
                format!(
                    "cannot find the workspace root: {} has no parent directory",
                    manifest_dir.display()
                )
            })?
            .to_path_buf();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
        Ok(Self {
            root,
            cargo,
            test_env: TestEnv::default(),
        })
    }

    /// Workspace root directory.
    #[allow(dead_code, reason = "for provisioners and future steps")]
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// A `cargo` command with the given arguments, run from the workspace root.
    fn cargo<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut command = Command::new(&self.cargo);
        command
            .current_dir(&self.root)
            .args(args.into_iter().map(Into::into));
        command
    }

    /// Like [`Ctx::cargo`], with the provisioned test environment applied.
    fn cargo_with_test_env<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut command = self.cargo(args);
        self.test_env.apply(&mut command);
        command
    }

    /// Whether `cargo nextest --version` runs successfully.
    fn has_nextest(&self) -> bool {
        self.cargo(["nextest", "--version"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }
}

/// The function behind a step. Returns a message describing the failure.
type StepFn = Box<dyn Fn(&mut Ctx) -> Result<(), String>>;

/// One named step of a plan.
pub(crate) struct Step {
    /// Short name shown in headers and in the summary.
    name: &'static str,
    /// What the step does.
    run: StepFn,
}

impl Step {
    /// A step named `name` running `run`.
    pub(crate) fn new(
        name: &'static str,
        run: impl Fn(&mut Ctx) -> Result<(), String> + 'static,
    ) -> Self {
        Self {
            name,
            run: Box::new(run),
        }
    }
}

/// The ordered steps behind one `cargo xtask` command.
pub(crate) struct Plan {
    /// Command name, used in the summary (`cargo xtask <title>`).
    title: &'static str,
    /// Steps, run in order until one fails.
    steps: Vec<Step>,
}

impl Plan {
    /// `cargo xtask ci`: lint steps, the offline deploy checks, then (after
    /// provisioning, if any) the test steps and the examples build.
    pub(crate) fn ci() -> Self {
        let mut steps = lint_steps();
        steps.push(deploy_check::step());
        steps.extend(test_steps(Vec::new()));
        steps.push(build_examples());
        steps.push(Step::new("chaos-quick", |ctx| {
            crate::chaos::ci_step(ctx.root())
        }));
        Self { title: "ci", steps }
    }

    /// `cargo xtask test [-- ARGS]`: provisioning (if any), test suite, doc tests.
    pub(crate) fn test(extra_args: Vec<String>) -> Self {
        Self {
            title: "test",
            steps: test_steps(extra_args),
        }
    }

    /// `cargo xtask lint`: format check, clippy, rustdoc.
    pub(crate) fn lint() -> Self {
        Self {
            title: "lint",
            steps: lint_steps(),
        }
    }

    /// `cargo xtask deploy-check`: offline validation of `deploy/`.
    pub(crate) fn deploy_check() -> Self {
        Self {
            title: "deploy-check",
            steps: vec![deploy_check::step()],
        }
    }

    /// `cargo xtask fmt`: format the workspace.
    pub(crate) fn fmt() -> Self {
        Self {
            title: "fmt",
            steps: vec![Step::new("fmt", |ctx| run(ctx.cargo(["fmt", "--all"])))],
        }
    }

    /// Runs the steps in order, stopping at the first failure, then prints a summary.
    pub(crate) fn run(self, ctx: &mut Ctx) -> ExitCode {
        let total = self.steps.len();
        let started = Instant::now();
        let mut outcomes: Vec<(&'static str, Outcome)> = Vec::with_capacity(total);
        let mut failure: Option<(usize, &'static str, String)> = None;

        for (index, step) in self.steps.iter().enumerate() {
            let label = format!("[{}/{}] {}", index + 1, total, step.name);
            if failure.is_some() {
                outcomes.push((step.name, Outcome::Skipped));
                continue;
            }
            eprintln!("\n==> {label}");
            let step_started = Instant::now();
            let result = (step.run)(ctx);
            let elapsed = step_started.elapsed();
            match result {
                Ok(()) => {
                    eprintln!("<== {label}: ok ({})", format_duration(elapsed));
                    outcomes.push((step.name, Outcome::Passed(elapsed)));
                }
                Err(message) => {
                    eprintln!("<== {label}: FAILED ({})", format_duration(elapsed));
                    outcomes.push((step.name, Outcome::Failed(elapsed)));
                    failure = Some((index + 1, step.name, message));
                }
            }
        }

        eprint!(
            "\n{}",
            summary(self.title, &outcomes, started.elapsed(), failure.is_none())
        );
        match failure {
            None => ExitCode::SUCCESS,
            Some((number, name, message)) => {
                eprintln!(
                    "error: `cargo xtask {}` failed at step [{number}/{total}] {name}: {message}",
                    self.title
                );
                ExitCode::FAILURE
            }
        }
    }
}

/// What happened to one step.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// Ran and succeeded.
    Passed(Duration),
    /// Ran and failed.
    Failed(Duration),
    /// Not run because an earlier step failed.
    Skipped,
}

/// The summary table printed after a plan has run.
fn summary(
    title: &str,
    outcomes: &[(&'static str, Outcome)],
    total: Duration,
    passed: bool,
) -> String {
    let count = outcomes.len();
    let width = outcomes
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0);
    let mut out = format!("Summary of `cargo xtask {title}`:\n");
    for (index, (name, outcome)) in outcomes.iter().enumerate() {
        let (status, time) = match outcome {
            Outcome::Passed(elapsed) => ("ok", format_duration(*elapsed)),
            Outcome::Failed(elapsed) => ("FAILED", format_duration(*elapsed)),
            Outcome::Skipped => ("skipped", String::new()),
        };
        let number = format!("[{}/{}]", index + 1, count);
        let line = format!("  {number} {name:<width$}  {status:<7}  {time}");
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let verdict = if passed { "passed" } else { "FAILED" };
    let _ = writeln!(out, "{verdict} in {}", format_duration(total));
    out
}

/// Formats a duration as `4.2s` or `3m 07.5s`.
fn format_duration(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds < 60.0 {
        format!("{seconds:.1}s")
    } else {
        let minutes = (seconds / 60.0).floor();
        format!("{minutes:.0}m {:04.1}s", seconds - minutes * 60.0)
    }
}

/// Steps (1)-(3): format check, clippy, rustdoc. Shared by `ci` and `lint`.
fn lint_steps() -> Vec<Step> {
    vec![
        Step::new("fmt-check", |ctx| {
            run(ctx.cargo(["fmt", "--all", "--", "--check"]))
        }),
        Step::new("clippy", |ctx| {
            run(ctx.cargo([
                "clippy",
                "--workspace",
                "--all-targets",
                "--all-features",
                "--",
                "-D",
                "warnings",
            ]))
        }),
        Step::new("doc", |ctx| {
            let mut command = ctx.cargo(["doc", "--workspace", "--no-deps"]);
            command.env("RUSTDOCFLAGS", rustdocflags_deny_warnings());
            run(command)
        }),
    ]
}

/// Provisioning (only when [`provision::PROVISIONERS`] is not empty), then steps
/// (4)-(5): the test suite with `extra_args` for its runner, and the doc tests.
/// Shared by `ci` and `test`.
fn test_steps(extra_args: Vec<String>) -> Vec<Step> {
    let mut steps = Vec::new();
    if let Some(step) = provision::step() {
        steps.push(step);
    }
    steps.push(Step::new("tests", move |ctx| {
        let mut command = if ctx.has_nextest() {
            ctx.cargo_with_test_env([
                "nextest",
                "run",
                "--workspace",
                "--all-features",
                "--no-fail-fast",
            ])
        } else {
            eprintln!("    cargo-nextest is not available; falling back to `cargo test`");
            ctx.cargo_with_test_env(["test", "--workspace", "--all-features"])
        };
        command.args(&extra_args);
        run(command)
    }));
    steps.push(Step::new("doc-tests", |ctx| {
        run(ctx.cargo_with_test_env(["test", "--workspace", "--all-features", "--doc"]))
    }));
    steps
}

/// Step (6): build every example of the workspace.
fn build_examples() -> Step {
    Step::new("examples", |ctx| {
        run(ctx.cargo(["build", "--workspace", "--examples", "--all-features"]))
    })
}

/// `RUSTDOCFLAGS` with `-D warnings` appended to any flags already set.
fn rustdocflags_deny_warnings() -> OsString {
    match std::env::var_os("RUSTDOCFLAGS") {
        Some(existing) if !existing.is_empty() => {
            let mut flags = existing;
            flags.push(" -D warnings");
            flags
        }
        _ => OsString::from("-D warnings"),
    }
}

/// Runs `command` with inherited stdio (stdin closed); fails unless it exits with 0.
pub(crate) fn run(mut command: Command) -> Result<(), String> {
    let shown = display(&command);
    eprintln!("    $ {shown}");
    let status = command
        .stdin(Stdio::null())
        .status()
        .map_err(|error| format!("could not start `{shown}`: {error}"))?;
    if status.success() {
        Ok(())
    } else {
        let how = match status.code() {
            Some(code) => format!("exit status {code}"),
            None => format!("{status} (no exit code)"),
        };
        Err(format!("`{shown}` failed with {how}"))
    }
}

/// A shell-like rendering of `command` for messages: explicitly set environment
/// variables, program file name, arguments.
fn display(command: &Command) -> String {
    let mut out = String::new();
    for (key, value) in command.get_envs() {
        if let Some(value) = value {
            let _ = write!(
                out,
                "{}={} ",
                key.to_string_lossy(),
                quote(&value.to_string_lossy())
            );
        }
    }
    let program = Path::new(command.get_program())
        .file_name()
        .unwrap_or(command.get_program());
    out.push_str(&program.to_string_lossy());
    for arg in command.get_args() {
        out.push(' ');
        out.push_str(&quote(&arg.to_string_lossy()));
    }
    out
}

/// Quotes `text` for display when it contains characters a shell would split on.
fn quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(plan: &Plan) -> Vec<&'static str> {
        plan.steps.iter().map(|step| step.name).collect()
    }

    #[test]
    fn ci_plan_has_its_steps_in_order() {
        // With provisioners, a `provision` step precedes `tests`.
        let expected: Vec<&str> = ["fmt-check", "clippy", "doc", "deploy-check"]
            .into_iter()
            .chain(provision_step())
            .chain(["tests", "doc-tests", "examples", "chaos-quick"])
            .collect();
        assert_eq!(names(&Plan::ci()), expected);
    }

    /// `["provision"]` when there are provisioners, else nothing.
    fn provision_step() -> Option<&'static str> {
        (!provision::PROVISIONERS.is_empty()).then_some("provision")
    }

    #[test]
    fn lint_and_test_plans() {
        assert_eq!(names(&Plan::lint()), ["fmt-check", "clippy", "doc"]);
        let expected: Vec<&str> = provision_step()
            .into_iter()
            .chain(["tests", "doc-tests"])
            .collect();
        assert_eq!(names(&Plan::test(vec![])), expected);
    }

    #[test]
    fn durations_are_short_and_readable() {
        assert_eq!(format_duration(Duration::from_millis(4_240)), "4.2s");
        assert_eq!(format_duration(Duration::from_millis(187_500)), "3m 07.5s");
    }

    #[test]
    fn commands_display_with_env_and_quoting() {
        let mut command = Command::new("/opt/bin/cargo");
        command
            .args(["doc", "--workspace"])
            .env("RUSTDOCFLAGS", "-D warnings");
        assert_eq!(
            display(&command),
            "RUSTDOCFLAGS='-D warnings' cargo doc --workspace"
        );
    }

    #[test]
    fn summary_marks_failed_and_skipped_steps() {
        let text = summary(
            "lint",
            &[
                ("fmt-check", Outcome::Passed(Duration::from_secs(1))),
                ("clippy", Outcome::Failed(Duration::from_secs(2))),
                ("doc", Outcome::Skipped),
            ],
            Duration::from_secs(3),
            false,
        );
        assert!(text.contains("[2/3] clippy     FAILED   2.0s"), "{text}");
        assert!(text.contains("[3/3] doc        skipped"), "{text}");
        assert!(text.ends_with("FAILED in 3.0s\n"), "{text}");
    }
}
