//! `cargo xtask bench`: runs every workload of `penguiflow-bench` against throwaway
//! servers, three times each, and prints the median with min and max, one line per
//! figure, then a Markdown table. Same-box ceilings (redis-benchmark, pgbench) come from
//! the same run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// Options of one bench run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BenchArgs {
    /// Backends to measure.
    pub(crate) backends: Vec<String>,
    /// Jobs per enqueue/drain workload.
    pub(crate) n: usize,
    /// One repetition, shorter workloads.
    pub(crate) quick: bool,
}

/// Parses `[--backend memory|redis|postgres|all] [--n N] [--quick]`.
pub(crate) fn parse(args: &[String]) -> Result<BenchArgs, String> {
    let mut out = BenchArgs {
        backends: vec!["memory".into()],
        n: 20_000,
        quick: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--backend" => {
                let v = it.next().ok_or("--backend needs a value")?;
                out.backends = match v.as_str() {
                    "all" => vec!["memory".into(), "redis".into(), "postgres".into()],
                    "memory" | "redis" | "postgres" => vec![v.clone()],
                    other => {
                        return Err(format!(
                            "unknown backend `{other}` (memory, redis, postgres, all)"
                        ));
                    }
                };
            }
            "--n" => {
                out.n = it
                    .next()
                    .ok_or("--n needs a value")?
                    .parse()
                    .map_err(|e| format!("--n: {e}"))?;
                if out.n == 0 {
                    return Err("--n must be positive".into());
                }
            }
            "--quick" => out.quick = true,
            other => return Err(format!("unknown bench argument `{other}`")),
        }
    }
    Ok(out)
}

/// One measured figure, all repetitions.
#[derive(Debug, Default)]
struct Samples {
    unit: String,
    values: Vec<f64>,
}

/// Figures per (backend, workload), in the order first seen.
#[derive(Debug, Default)]
struct Table {
    order: Vec<(String, String)>,
    samples: BTreeMap<(String, String), Samples>,
}

impl Table {
    fn add(&mut self, backend: &str, workload: &str, value: f64, unit: &str) {
        let key = (backend.to_owned(), workload.to_owned());
        if !self.samples.contains_key(&key) {
            self.order.push(key.clone());
        }
        let s = self.samples.entry(key).or_default();
        s.unit = unit.to_owned();
        s.values.push(value);
    }

    /// Parses `backend=.. workload=.. value=.. unit=..` lines.
    fn add_lines(&mut self, text: &str) -> usize {
        let mut n = 0;
        for line in text.lines() {
            let mut kv = BTreeMap::new();
            for tok in line.split_whitespace() {
                if let Some((k, v)) = tok.split_once('=') {
                    kv.insert(k, v);
                }
            }
            if let (Some(b), Some(w), Some(v), Some(u)) = (
                kv.get("backend"),
                kv.get("workload"),
                kv.get("value"),
                kv.get("unit"),
            ) && let Ok(v) = v.parse::<f64>()
            {
                self.add(b, w, v, u);
                n += 1;
            }
        }
        n
    }

    fn summary(&self) -> Vec<(String, String, f64, f64, f64, String, usize)> {
        self.order
            .iter()
            .filter_map(|key| {
                let s = self.samples.get(key)?;
                let mut v = s.values.clone();
                v.sort_by(|a, b| a.total_cmp(b));
                let median = if v.len() % 2 == 1 {
                    v[v.len() / 2]
                } else {
                    (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
                };
                Some((
                    key.0.clone(),
                    key.1.clone(),
                    median,
                    v[0],
                    v[v.len() - 1],
                    s.unit.clone(),
                    v.len(),
                ))
            })
            .collect()
    }
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A backend ready to be measured: its URL for `penguiflow-bench` and the servers kept
/// alive while it runs.
struct Target {
    url: Option<String>,
    port: u16,
    _guard: Option<Box<dyn std::any::Any>>,
}

fn provide(backend: &str) -> Result<Target, String> {
    use test_support::postgres::PgServer;
    use test_support::redis::RedisServer;
    match backend {
        "memory" => Ok(Target {
            url: None,
            port: 0,
            _guard: None,
        }),
        // Redis as the peers ran it: no persistence.
        "redis" => {
            let server = RedisServer::start().map_err(|e| e.to_string())?;
            Ok(Target {
                url: Some(server.url()),
                port: server.port(),
                _guard: Some(Box::new(server)),
            })
        }
        // PostgreSQL with its durable defaults: fsync and synchronous_commit on.
        "postgres" => {
            let server = PgServer::builder()
                .durable()
                .max_connections(200)
                .start()
                .map_err(|e| e.to_string())?;
            // A fresh cluster is several times slower until its WAL segments exist.
            server.warm_up().map_err(|e| e.to_string())?;
            let url = server.create_database("bench").map_err(|e| e.to_string())?;
            Ok(Target {
                url: Some(url),
                port: server.port(),
                _guard: Some(Box::new(server)),
            })
        }
        other => Err(format!("unknown backend {other}")),
    }
}

/// Same-box ceilings for a backend, measured with the server's own tools.
fn ceilings(
    backend: &str,
    target: &Target,
    table: &mut Table,
    root: &Path,
    reps: usize,
) -> Result<(), String> {
    match backend {
        "redis" => {
            let port = target.port.to_string();
            let sha = output("redis-cli", &["-p", &port, "SCRIPT", "LOAD", "return 1"])?;
            let sha = sha.trim().to_owned();
            for rep in 1..=reps {
                eprintln!("==> redis ceiling: redis-benchmark EVALSHA (run {rep}/{reps})");
                for (clients, n, name) in [
                    ("50", "200000", "ceiling_evalsha_c50"),
                    ("1", "20000", "ceiling_evalsha_c1"),
                ] {
                    let out = output(
                        "redis-benchmark",
                        &[
                            "-p", &port, "-c", clients, "-n", n, "-q", "EVALSHA", &sha, "0",
                        ],
                    )?;
                    let rate = out
                        .split(['\r', '\n'])
                        .filter_map(|l| l.split("requests per second").next())
                        .filter_map(|l| l.rsplit(':').next())
                        .filter_map(|v| v.trim().parse::<f64>().ok())
                        .next_back()
                        .ok_or_else(|| format!("cannot read redis-benchmark output: {out}"))?;
                    table.add("redis", name, rate, "ops/s");
                }
            }
            Ok(())
        }
        "postgres" => {
            let url = target.url.as_deref().ok_or("no PostgreSQL URL")?;
            let bin = test_support::postgres::find_bin_dir().map_err(|e| e.to_string())?;
            let psql = bin.join("psql");
            let pgbench = bin.join("pgbench");
            let dir = root.join("xtask").join("bench");
            let (clients, per_client) = (16usize, 1500usize);
            for rep in 1..=reps {
                eprintln!(
                    "==> postgres ceiling: pgbench SKIP LOCKED dequeue+ack c16 (run {rep}/{reps})"
                );
                let rows = (clients * per_client + 1000).to_string();
                output_path(
                    &psql,
                    &[
                        url,
                        "-q",
                        "-v",
                        "ON_ERROR_STOP=1",
                        "-v",
                        &format!("rows={rows}"),
                        "-f",
                        &dir.join("pgbench_setup.sql").display().to_string(),
                    ],
                )?;
                let out = output_path(
                    &pgbench,
                    &[
                        "-n",
                        "-c",
                        &clients.to_string(),
                        "-j",
                        "2",
                        "-t",
                        &per_client.to_string(),
                        "-f",
                        &dir.join("pgbench_dequeue_ack.sql").display().to_string(),
                        url,
                    ],
                )?;
                let tps = pgbench_tps(&out)?;
                table.add("postgres", "ceiling_pgbench_skip_locked_c16", tps, "jobs/s");
                eprintln!(
                    "==> postgres ceiling: pgbench INSERT one job per transaction c1 (run {rep}/{reps})"
                );
                let out = output_path(
                    &pgbench,
                    &[
                        "-n",
                        "-c",
                        "1",
                        "-t",
                        "3000",
                        "-f",
                        &dir.join("pgbench_insert.sql").display().to_string(),
                        url,
                    ],
                )?;
                table.add(
                    "postgres",
                    "ceiling_pgbench_insert_c1",
                    pgbench_tps(&out)?,
                    "jobs/s",
                );
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The `tps = ...` figure of pgbench's report.
fn pgbench_tps(out: &str) -> Result<f64, String> {
    out.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| format!("cannot read pgbench output: {out}"))
}

fn output(program: &str, args: &[&str]) -> Result<String, String> {
    output_path(Path::new(program), args)
}

fn output_path(program: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn bench_binary(root: &Path) -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("==> building penguiflow-bench (release)");
    let status = Command::new(&cargo)
        .args(["build", "--release", "--quiet", "-p", "bench"])
        .current_dir(root)
        .status()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !status.success() {
        return Err("building the bench binary failed".into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release").join("penguiflow-bench"))
}

fn run_workload(
    bin: &Path,
    backend: &str,
    url: Option<&str>,
    extra: &[&str],
) -> Result<String, String> {
    let mut cmd = Command::new(bin);
    cmd.args(["--backend", backend])
        .args(extra)
        .stdin(Stdio::null());
    if let Some(u) = url {
        cmd.args(["--url", u]);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{backend} {}: {}",
            extra.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the bench and prints the results.
pub(crate) fn run(args: &BenchArgs, root: &Path) -> ExitCode {
    match run_inner(args, root) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cargo xtask bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(args: &BenchArgs, root: &Path) -> Result<(), String> {
    let bin = bench_binary(root)?;
    let reps = if args.quick { 1 } else { 3 };
    let n = if args.quick {
        args.n.min(5_000)
    } else {
        args.n
    };
    let n_s = n.to_string();
    let secs = if args.quick { "2" } else { "5" };
    let idle_secs = if args.quick { "3" } else { "10" };
    let workloads: Vec<Vec<&str>> = vec![
        vec!["--workload", "enqueue-single", "--n", &n_s],
        vec!["--workload", "enqueue-bulk", "--n", &n_s],
        vec!["--workload", "drain", "--n", &n_s, "--concurrency", "1"],
        vec!["--workload", "drain", "--n", &n_s, "--concurrency", "16"],
        vec![
            "--workload",
            "latency",
            "--rate",
            "200",
            "--seconds",
            secs,
            "--concurrency",
            "16",
        ],
        vec![
            "--workload",
            "idle",
            "--seconds",
            idle_secs,
            "--concurrency",
            "16",
        ],
    ];
    let mut table = Table::default();
    for backend in &args.backends {
        let target = provide(backend)?;
        for rep in 1..=reps {
            for w in &workloads {
                eprintln!("==> {backend} {} (run {rep}/{reps})", w.join(" "));
                let out = run_workload(&bin, backend, target.url.as_deref(), w)?;
                table.add_lines(&out);
            }
        }
        ceilings(backend, &target, &mut table, root, reps)?;
    }
    let rows = table.summary();
    for (b, w, med, min, max, unit, _) in &rows {
        println!(
            "backend={b} workload={w} value={} unit={unit} min={} max={}",
            fmt_value(*med),
            fmt_value(*min),
            fmt_value(*max)
        );
    }
    println!();
    println!("| backend | workload | median | min | max | unit | runs |");
    println!("|---|---|---:|---:|---:|---|---:|");
    for (b, w, med, min, max, unit, runs) in &rows {
        println!(
            "| {b} | {w} | {} | {} | {} | {unit} | {runs} |",
            fmt_value(*med),
            fmt_value(*min),
            fmt_value(*max)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn parses_backends_and_sizes() {
        let a = parse(&s(&["--backend", "all", "--n", "100", "--quick"])).expect("parses");
        assert_eq!(a.backends, ["memory", "redis", "postgres"]);
        assert_eq!(a.n, 100);
        assert!(a.quick);
        assert!(parse(&s(&["--backend", "mysql"])).is_err());
        assert!(parse(&s(&["--n", "0"])).is_err());
    }

    #[test]
    fn median_min_max_per_figure() {
        let mut t = Table::default();
        let text = "backend=redis workload=drain_c16 value=3 unit=jobs/s\n\
                    backend=redis workload=drain_c16 value=1 unit=jobs/s\n\
                    noise line\n\
                    backend=redis workload=drain_c16 value=2 unit=jobs/s\n";
        assert_eq!(t.add_lines(text), 3);
        let rows = t.summary();
        assert_eq!(rows.len(), 1);
        let (_, w, med, min, max, unit, runs) = &rows[0];
        assert_eq!(
            (w.as_str(), *med, *min, *max, unit.as_str(), *runs),
            ("drain_c16", 2.0, 1.0, 3.0, "jobs/s", 3)
        );
    }
}
