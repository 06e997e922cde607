//! Project automation for the workspace, run as `cargo xtask <command>`.
//!
//! Commands:
//!
//! - `ci`: the whole CI pipeline (format check, clippy, rustdoc, tests, doc tests,
//!   examples), stopping at the first failed step. This is what `.ci/run` and the
//!   hosted-forge workflow call.
//! - `test [-- ARGS]`: the test suite (nextest, or `cargo test` as a fallback) and the
//!   doc tests.
//! - `fmt`: format the whole workspace.
//! - `lint`: format check, clippy and rustdoc with warnings denied.
//! - `deploy-check`: offline validation of `deploy/` (also a step of `ci`); see
//!   [`deploy_check`].
//!
//! The tool has no dependencies so that it compiles in a few seconds. Every cargo
//! invocation uses the `CARGO` environment variable when set (it is, under
//! `cargo run`), else `cargo`, and runs from the workspace root.
//!
//! Test backends (Redis, PostgreSQL) will be provisioned by [`provision`]; see that
//! module for the extension point.

mod bench;
mod chaos;
mod deploy_check;
mod provision;
mod provision_postgres;
mod provision_redis;
mod steps;

use std::process::ExitCode;

use steps::{Ctx, Plan};

/// Usage text printed by `cargo xtask help` and on usage errors.
const USAGE: &str = "\
Usage: cargo xtask <COMMAND>

Commands:
  ci                 Run the full CI pipeline, stopping at the first failure:
                       fmt check, clippy, rustdoc, deploy checks, tests, doc tests,
                       examples
  test [-- ARGS]     Run the test suite (cargo-nextest if installed, else cargo test)
                     and the doc tests; ARGS go to the test-suite runner only
  fmt                Format the whole workspace (cargo fmt --all)
  lint               Check formatting, run clippy and rustdoc with warnings denied
  bench [--backend memory|redis|postgres|all] [--n N] [--quick]
                     Run the throughput and latency workloads against throwaway
                     servers (3 runs each; median, min, max) and the same-box ceilings
  chaos [--backend redis|postgres|all] [--rounds N] [--quick]
                     Inject faults (worker SIGKILL, killed connections, server restart)
                     while three workers drain a mixed batch; fail on lost or doubled jobs
  deploy-check       Validate deploy/ offline: Kubernetes schemas (kubernetes-validate),
                     compose spec and KEDA schema (check-jsonschema), hadolint,
                     promtool check/test rules, structural checks; installs the
                     validators under target/deploy-tools on first use
  help               Print this help

Environment:
  CARGO              cargo executable to use (default: cargo)
";

/// Exit code for usage errors (unknown command, unexpected arguments).
const EXIT_USAGE: u8 = 2;

/// A parsed command line.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    /// `ci`: the full pipeline.
    Ci,
    /// `test [-- ARGS]`: test suite and doc tests, with extra arguments for the runner.
    Test(Vec<String>),
    /// `fmt`: format the workspace.
    Fmt,
    /// `lint`: format check, clippy, rustdoc.
    Lint,
    /// `deploy-check`: offline validation of `deploy/`.
    DeployCheck,
    /// `chaos [...]`: fault injection with counts.
    Chaos(chaos::ChaosArgs),
    /// `bench [...]`: the benchmark workloads.
    Bench(bench::BenchArgs),
    /// `help`, `-h`, `--help` or no command at all.
    Help,
}

/// Parses the arguments that follow the program name.
///
/// Returns a message for the user when the command line is not understood.
fn parse_args(args: &[String]) -> Result<Command, String> {
    let Some((command, rest)) = args.split_first() else {
        return Ok(Command::Help);
    };
    let no_more_args = |command: Command| {
        if rest.is_empty() {
            Ok(command)
        } else {
            Err(format!(
                "`{}` takes no arguments, got: {}",
                args[0],
                rest.join(" ")
            ))
        }
    };
    match command.as_str() {
        "ci" => no_more_args(Command::Ci),
        "fmt" => no_more_args(Command::Fmt),
        "lint" => no_more_args(Command::Lint),
        "deploy-check" => no_more_args(Command::DeployCheck),
        "help" | "-h" | "--help" => Ok(Command::Help),
        "bench" => bench::parse(rest).map(Command::Bench),
        "chaos" => chaos::parse(rest).map(Command::Chaos),
        "test" => {
            // `cargo xtask test -- ARGS`; a leading `--` is optional.
            let extra = match rest.split_first() {
                Some((first, tail)) if first == "--" => tail,
                _ => rest,
            };
            Ok(Command::Test(extra.to_vec()))
        }
        other => Err(format!("unknown command `{other}`")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse_args(&args) {
        Ok(command) => command,
        Err(message) => {
            eprint!("error: {message}\n\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };

    let plan = match command {
        Command::Help => {
            eprint!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Command::Ci => Plan::ci(),
        Command::Test(extra) => Plan::test(extra),
        Command::Fmt => Plan::fmt(),
        Command::Lint => Plan::lint(),
        Command::DeployCheck => Plan::deploy_check(),
        Command::Chaos(args) => {
            return match Ctx::from_env() {
                Ok(ctx) => chaos::run(&args, ctx.root()),
                Err(message) => {
                    eprintln!("error: {message}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Bench(args) => {
            return match Ctx::from_env() {
                Ok(ctx) => bench::run(&args, ctx.root()),
                Err(message) => {
                    eprintln!("error: {message}");
                    ExitCode::FAILURE
                }
            };
        }
    };

    let mut ctx = match Ctx::from_env() {
        Ok(ctx) => ctx,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    };
    // `ctx` (and with it any provisioned test servers) is dropped before the process
    // exits, because `main` returns instead of calling `std::process::exit`.
    plan.run(&mut ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn no_arguments_prints_help() {
        assert_eq!(parse_args(&[]), Ok(Command::Help));
        assert_eq!(parse_args(&args(&["help"])), Ok(Command::Help));
        assert_eq!(parse_args(&args(&["--help"])), Ok(Command::Help));
    }

    #[test]
    fn simple_commands_parse() {
        assert_eq!(parse_args(&args(&["ci"])), Ok(Command::Ci));
        assert_eq!(parse_args(&args(&["fmt"])), Ok(Command::Fmt));
        assert_eq!(parse_args(&args(&["lint"])), Ok(Command::Lint));
        assert_eq!(
            parse_args(&args(&["deploy-check"])),
            Ok(Command::DeployCheck)
        );
    }

    #[test]
    fn simple_commands_reject_arguments() {
        assert!(parse_args(&args(&["ci", "--fast"])).is_err());
        assert!(parse_args(&args(&["lint", "x"])).is_err());
        assert!(parse_args(&args(&["deploy-check", "x"])).is_err());
    }

    #[test]
    fn test_takes_extra_arguments_with_or_without_separator() {
        assert_eq!(parse_args(&args(&["test"])), Ok(Command::Test(vec![])));
        assert_eq!(
            parse_args(&args(&["test", "--", "conformance", "--no-capture"])),
            Ok(Command::Test(args(&["conformance", "--no-capture"])))
        );
        assert_eq!(
            parse_args(&args(&["test", "conformance"])),
            Ok(Command::Test(args(&["conformance"])))
        );
    }

    #[test]
    fn unknown_commands_are_errors() {
        assert!(parse_args(&args(&["bench", "--backend", "nope"])).is_err());
        assert!(parse_args(&args(&["chaos", "--rounds", "0"])).is_err());
        assert!(parse_args(&args(&["nope"])).is_err());
    }
}
