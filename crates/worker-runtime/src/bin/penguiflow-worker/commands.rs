//! What each command does.

use std::io::{BufRead, Write};
use std::sync::Arc;

use flow_core::queue::{
    DeadLetter, JobInfo, JobQueue, NewJob, QueueOptions, QueueStats, format_ms, now_ms,
    validate_queue_name,
};
use serde_json::{Value, json};
use uuid::Uuid;
use worker_runtime::backend::{self, redact_url};

use crate::Failure;
use crate::cli::{
    Cli, Command, DlqAction, DlqArgs, EnqueueArgs, JobArgs, QueueAction, QueueArgs, StatusArgs,
};

mod run;

/// The queue URL: `--url`/QUEUE_URL, else REDIS_URL, else DATABASE_URL.
fn resolve_url(cli_url: Option<String>) -> Result<String, Failure> {
    cli_url
        .filter(|u| !u.is_empty())
        .or_else(|| std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()))
        .or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()))
        .ok_or_else(|| {
            Failure::usage(
                "no queue URL: pass --url or set QUEUE_URL (or REDIS_URL / DATABASE_URL)",
            )
        })
}

async fn connect(url: &str) -> Result<Arc<dyn JobQueue>, Failure> {
    backend::connect(url, QueueOptions::default())
        .await
        .map_err(|e| match e {
            worker_runtime::Error::Config { .. } => Failure::usage(e.to_string()),
            other => Failure::failed(format!("cannot connect to {}: {other}", redact_url(url))),
        })
}

fn queue_name(q: &str) -> Result<(), Failure> {
    validate_queue_name(q).map_err(|e| Failure::usage(e.to_string()))
}

pub(crate) async fn dispatch(cli: Cli) -> Result<(), Failure> {
    let url = resolve_url(cli.url);
    match cli.command {
        Command::Run(args) => run::run(&url?, args).await,
        Command::Enqueue(args) => enqueue(&url?, args).await,
        Command::Status(args) => status(&url?, args).await,
        Command::Job(args) => job(&url?, args).await,
        Command::Dlq(args) => dlq(&url?, args).await,
        Command::Queue(args) => queue_cmd(&url?, args).await,
        Command::Migrate => {
            let url = url?;
            let what = backend::migrate(&url)
                .await
                .map_err(|e| Failure::failed(format!("migrate {}: {e}", redact_url(&url))))?;
            println!("{what}");
            Ok(())
        }
    }
}

fn print_json(v: &Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Failure::failed(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").map_err(|e| Failure::failed(format!("cannot write output: {e}")))
}

fn parse_payload(text: &str, what: &str) -> Result<Value, Failure> {
    serde_json::from_str(text).map_err(|e| Failure::usage(format!("{what} is not valid JSON: {e}")))
}

async fn enqueue(url: &str, a: EnqueueArgs) -> Result<(), Failure> {
    queue_name(&a.queue)?;
    let template = |payload: Value| {
        let mut job = NewJob::new(a.queue.clone(), payload)
            .priority(a.priority)
            .max_retries(a.max_retries)
            .tenant(a.tenant.clone());
        if let Some(d) = a.delay {
            job = job.delay(d);
        }
        if let Some(k) = &a.dedupe_key {
            job = job.dedupe_key(k.clone());
        }
        for (k, v) in &a.headers {
            job = job.header(k.clone(), v.clone());
        }
        job
    };
    let jobs: Vec<NewJob> = match (&a.file, &a.payload) {
        (Some(path), _) => {
            let file = std::fs::File::open(path)
                .map_err(|e| Failure::failed(format!("cannot open {}: {e}", path.display())))?;
            let mut jobs = Vec::new();
            for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = line.map_err(|e| {
                    Failure::failed(format!(
                        "cannot read {} line {}: {e}",
                        path.display(),
                        i + 1
                    ))
                })?;
                if line.trim().is_empty() {
                    continue;
                }
                let payload = parse_payload(&line, &format!("{} line {}", path.display(), i + 1))?;
                let job = template(payload);
                job.validate(QueueOptions::default().max_payload_bytes)
                    .map_err(|e| {
                        Failure::usage(format!("{} line {}: {e}", path.display(), i + 1))
                    })?;
                jobs.push(job);
            }
            jobs
        }
        (None, Some(text)) => vec![template(parse_payload(text, "PAYLOAD_JSON")?)],
        (None, None) => return Err(Failure::usage("give PAYLOAD_JSON or --file")),
    };
    if jobs.is_empty() {
        return Err(Failure::usage("the file holds no jobs"));
    }
    let q = connect(url).await?;
    // One call for the whole file: all or nothing (see `JobQueue::enqueue_many`), so a
    // file whose enqueue failed stored nothing and can simply be sent again.
    let ids = q.enqueue_many(jobs).await?;
    let mut out = std::io::stdout().lock();
    for id in ids {
        writeln!(out, "{id}").map_err(|e| Failure::failed(format!("cannot write output: {e}")))?;
    }
    Ok(())
}

/// The `status --json` shape (docs/cli.md).
pub(crate) fn status_json(s: &QueueStats) -> Value {
    json!({
        "queue": s.queue,
        "ready": s.ready,
        "scheduled": s.scheduled,
        "running": s.running,
        "completed": s.completed,
        "dead": s.dead,
        "paused": s.paused,
        "oldest_ready_age_s": s.oldest_ready_age_s,
        "dead_dropped": s.dead_dropped,
    })
}

async fn status(url: &str, a: StatusArgs) -> Result<(), Failure> {
    queue_name(&a.queue)?;
    let q = connect(url).await?;
    let s = q.stats(&a.queue).await?;
    if a.json {
        return print_json(&status_json(&s));
    }
    println!(
        "queue      {}{}",
        s.queue,
        if s.paused { " (paused)" } else { "" }
    );
    println!("ready      {}", s.ready);
    println!("scheduled  {}", s.scheduled);
    println!("running    {}", s.running);
    println!("completed  {}", s.completed);
    println!("dead       {}", s.dead);
    println!("oldest ready job waiting {:.1}s", s.oldest_ready_age_s);
    if s.dead_dropped > 0 {
        println!("dead letters dropped (set full) {}", s.dead_dropped);
    }
    Ok(())
}

fn failure_json(f: &flow_core::queue::Failure) -> Value {
    let mut v = json!({"code": f.code, "message": f.message});
    if let Some(d) = &f.details {
        v["details"] = d.clone();
    }
    v
}

/// The `job --json` shape (docs/cli.md).
pub(crate) fn job_json(j: &JobInfo) -> Value {
    let mut v = json!({
        "id": j.id.to_string(),
        "queue": j.queue,
        "state": j.state.as_str(),
        "attempts": j.attempts,
        "max_retries": j.max_retries,
        "priority": j.priority,
        "tenant": j.tenant,
        "created_at": format_ms(j.created_at_ms),
        "run_at": format_ms(j.run_at_ms),
        "finished_at": j.finished_at_ms.map(format_ms),
        "payload": j.payload,
    });
    if let Some(r) = &j.result {
        v["result"] = r.clone();
    }
    if let Some(e) = &j.error {
        v["error"] = failure_json(e);
    }
    if let Some(k) = &j.dedupe_key {
        v["dedupe_key"] = json!(k);
    }
    v
}

fn parse_id(s: &str) -> Result<Uuid, Failure> {
    Uuid::parse_str(s.trim()).map_err(|_| Failure::usage(format!("{s:?} is not a job id (a UUID)")))
}

async fn job(url: &str, a: JobArgs) -> Result<(), Failure> {
    queue_name(&a.queue)?;
    let id = parse_id(&a.job_id)?;
    let q = connect(url).await?;
    let Some(j) = q.job(&a.queue, id).await? else {
        return Err(Failure::failed(format!(
            "job {id} not found in queue {:?} (finished jobs are kept for the retention time)",
            a.queue
        )));
    };
    if a.json {
        return print_json(&job_json(&j));
    }
    println!("job        {}", j.id);
    println!("queue      {}", j.queue);
    println!("state      {}", j.state);
    println!("attempts   {} of {}", j.attempts, j.max_retries + 1);
    println!("priority   {}", j.priority);
    println!("tenant     {}", j.tenant);
    println!("created    {}", format_ms(j.created_at_ms));
    if let Some(t) = j.finished_at_ms {
        println!("finished   {}", format_ms(t));
    } else if j.run_at_ms > now_ms() {
        println!("runs at    {}", format_ms(j.run_at_ms));
    }
    if let Some(r) = &j.result {
        println!("result     {r}");
    }
    if let Some(e) = &j.error {
        println!("error      [{}] {}", e.code, e.message);
    }
    Ok(())
}

/// One `dlq list --json` entry (docs/cli.md).
pub(crate) fn dead_json(d: &DeadLetter) -> Value {
    json!({
        "id": d.id.to_string(),
        "code": d.error.code,
        "message": d.error.message,
        "attempts": d.attempts,
        "failed_at": format_ms(d.failed_at_ms),
        "payload": d.payload,
        "tenant": d.tenant,
    })
}

async fn dlq(url: &str, a: DlqArgs) -> Result<(), Failure> {
    queue_name(&a.queue)?;
    match a.action {
        DlqAction::List => {
            if a.job_id.is_some() || a.all {
                return Err(Failure::usage(
                    "dlq list takes no JOB_ID or --all; use --limit and --offset",
                ));
            }
            let q = connect(url).await?;
            let dead = q.dead_letters(&a.queue, a.offset, a.limit).await?;
            if a.json {
                return print_json(&Value::Array(dead.iter().map(dead_json).collect()));
            }
            if dead.is_empty() {
                println!("no dead letters in {}", a.queue);
            }
            for d in &dead {
                println!(
                    "{}  {}  attempts={}  [{}] {}",
                    d.id,
                    format_ms(d.failed_at_ms),
                    d.attempts,
                    d.error.code,
                    d.error.message
                );
            }
            Ok(())
        }
        DlqAction::Requeue => {
            let n = match (&a.job_id, a.all) {
                (Some(id), false) => {
                    let id = parse_id(id)?;
                    let q = connect(url).await?;
                    q.requeue_dead(&a.queue, id).await?;
                    1
                }
                (None, true) => connect(url).await?.requeue_all_dead(&a.queue).await?,
                _ => return Err(Failure::usage("dlq requeue needs a JOB_ID or --all")),
            };
            if a.json {
                return print_json(&json!({"requeued": n}));
            }
            println!("requeued {n}");
            Ok(())
        }
        DlqAction::Purge => {
            if a.job_id.is_some() {
                return Err(Failure::usage(
                    "dlq purge removes every dead letter of the queue: pass --all, not a JOB_ID",
                ));
            }
            let n = connect(url).await?.purge_dead(&a.queue).await?;
            if a.json {
                return print_json(&json!({"purged": n}));
            }
            println!("purged {n}");
            Ok(())
        }
    }
}

async fn queue_cmd(url: &str, a: QueueArgs) -> Result<(), Failure> {
    queue_name(&a.queue)?;
    let q = connect(url).await?;
    match a.action {
        QueueAction::Pause => {
            q.pause(&a.queue).await?;
            println!("paused {}", a.queue);
        }
        QueueAction::Resume => {
            q.resume(&a.queue).await?;
            println!("resumed {}", a.queue);
        }
    }
    Ok(())
}
