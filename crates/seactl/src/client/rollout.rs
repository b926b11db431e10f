//! `seactl rollout confirm|abort|follow|list`, and following a rollout to its end.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use super::*;

/// How long `follow` keeps polling a rollout, at most.
const FOLLOW_LIMIT: Duration = Duration::from_secs(24 * 3600);
/// How long `follow` waits for an unreachable control plane to come back.
const UNREACHABLE_LIMIT: Duration = Duration::from_secs(120);

/// Follows rollout `id` until it ends: prints each step with the elapsed time, the
/// Envoys owing an ACK and the server restarting. Exit 0 only when `done`.
pub(super) fn follow(client: &Client, id: u64, json_out: bool) -> Result<ExitCode> {
    let start = Instant::now();
    let mut last_line = String::new();
    let mut steps_shown = 0;
    let mut unreachable_since: Option<Instant> = None;
    let mut resumed_shown = 0;
    loop {
        // The control plane may be restarting: it resumes the rollout; keep following.
        let a = match client.get(&format!("/v1/rollouts/{id}")) {
            Ok(a) => {
                unreachable_since = None;
                a
            }
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(|| {
                    if !json_out {
                        eprintln!("  control plane unreachable ({e:#}); retrying ...");
                    }
                    Instant::now()
                });
                if since.elapsed() > UNREACHABLE_LIMIT {
                    return Err(e.context(format!(
                        "the control plane stayed unreachable for {UNREACHABLE_LIMIT:?}; \
                         `seactl rollout follow {id}` follows it again"
                    )));
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        if a.status != 200 {
            bail!("{}", describe_error(&a));
        }
        let r = &a.body;
        let state = r["state"].as_str().unwrap_or("?");
        if !json_out {
            // Every step as stored (a fast one may pass between two polls).
            let steps = r["steps"].as_array().cloned().unwrap_or_default();
            let created = r["created_at"].as_i64().unwrap_or(0);
            for st in steps.iter().skip(steps_shown) {
                println!(
                    "  step {:<12} at +{:.2}s{}",
                    st["step"].as_str().unwrap_or("?"),
                    (st["started_at"].as_i64().unwrap_or(created) - created) as f64 / 1000.0,
                    st["note"]
                        .as_str()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default()
                );
            }
            steps_shown = steps.len().max(steps_shown);
            let resumed = r["resumed"].as_u64().unwrap_or(0);
            if resumed > resumed_shown {
                println!(
                    "  [{:>7.2}s] resumed by a restarted control plane at step {state}",
                    start.elapsed().as_secs_f64()
                );
                resumed_shown = resumed;
            }
            let line = progress_line(r);
            if line != last_line && state != "done" {
                println!("  [{:>7.2}s] {line}", start.elapsed().as_secs_f64());
                last_line = line;
            }
        }
        if state == "done" || state == "rolled_back" {
            if json_out {
                println!("{}", pretty(r));
            } else {
                print_end(r);
            }
            return Ok(if state == "done" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        if start.elapsed() > FOLLOW_LIMIT {
            bail!("rollout {id} still runs after {FOLLOW_LIMIT:?}; stopped following");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One line of a rollout's progress.
pub(super) fn progress_line(r: &Value) -> String {
    let state = r["state"].as_str().unwrap_or("?");
    let mut line = match state {
        "plan" => "plan".to_owned(),
        "fence" => match r["fence_version"].as_u64() {
            Some(v) => format!("fence: version {v} (the moved bases answer 503)"),
            None => "fence".to_owned(),
        },
        "restart" => "restart".to_owned(),
        "activate" => match r["new_version"].as_u64() {
            Some(v) => format!("activate: version {v}"),
            None => "activate".to_owned(),
        },
        "rolling_back" => format!("rolling back: {}", text(&r["reason"])),
        other => other.to_owned(),
    };
    let owing = strings(&r["owing_ack"]["pending"]);
    if !owing.is_empty() {
        line.push_str(&format!("; owing an ACK: {}", owing.join(", ")));
    }
    let restarting = strings(&r["restarting_all"]);
    if !restarting.is_empty() {
        line.push_str(&format!("; restarting {}", restarting.join(", ")));
    } else if let Some(s) = r["restarting"].as_str() {
        line.push_str(&format!("; restarting {s}"));
    }
    if let Some(s) = r["waiting_for_confirm"].as_str() {
        line.push_str(&format!(
            "; restart {s} yourself, then run `seactl rollout confirm {s}`"
        ));
    }
    line
}

fn print_end(r: &Value) {
    let id = &r["id"];
    for s in r["restart"].as_array().into_iter().flatten() {
        println!(
            "  {:<20} {}{}",
            text(&s["server"]),
            text(&s["state"]),
            s["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    for w in r["warnings"].as_array().into_iter().flatten() {
        println!("  warning: {}", text(w));
    }
    if r["state"] == "done" {
        println!(
            "Rollout {id} done: version {} is active ({} ms, of which {} ms beyond the restarts).",
            r["new_version"], r["elapsed_ms"], r["overhead_ms"]
        );
    } else {
        eprintln!(
            "Rollout {id} rolled back: {}. The old map is active again (version {}).",
            r["reason"].as_str().unwrap_or("?"),
            r["rollback_version"]
        );
    }
}

/// `seactl rollout`.
#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    #[command(subcommand)]
    pub command: RolloutCommand,
    #[command(flatten)]
    pub remote: Remote,
}

/// What to do with the running rollout.
#[derive(Debug, clap::Subcommand)]
pub enum RolloutCommand {
    /// Tell the rollout that SERVER was restarted by hand (its hook is `manual`).
    Confirm { server: String },
    /// Roll the running rollout back (refused once activation began).
    Abort,
    /// Show a rollout (the running one by default) and follow it to its end.
    Follow {
        /// The rollout id; default the running one.
        id: Option<u64>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// List the latest rollouts.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

/// `seactl rollout confirm|abort|follow|list`.
pub fn rollout(args: RolloutArgs) -> Result<ExitCode> {
    let client = Client::new(&args.remote)?;
    match args.command {
        RolloutCommand::Confirm { server } => {
            let a = client.post("/v1/rollouts/current/confirm", &json!({ "server": server }))?;
            if a.status != 200 {
                return fail(false, &a);
            }
            println!(
                "Confirmed: {server} was restarted (rollout {}).",
                a.body["rollout"]
            );
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Abort => {
            let a = client.post("/v1/rollouts/current/abort", &json!({}))?;
            if a.status != 200 {
                return fail(false, &a);
            }
            println!("Rollout {} is rolling back.", a.body["rollout"]);
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Follow { id, output } => {
            let id = match id {
                Some(id) => id,
                None => {
                    let a = client.get("/v1/rollouts/current")?;
                    if a.status != 200 {
                        return fail(output == Output::Json, &a);
                    }
                    a.body["id"].as_u64().unwrap_or(0)
                }
            };
            follow(&client, id, output == Output::Json)
        }
        RolloutCommand::List { output } => {
            let a = client.get("/v1/rollouts?limit=20")?;
            if a.status != 200 {
                return fail(output == Output::Json, &a);
            }
            if output == Output::Json {
                println!("{}", pretty(&a.body));
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "  {:<4} {:<13} {:<6} {:<6} {:<24} reason",
                "id", "state", "from", "to", "restarted"
            );
            for r in a.body["rollouts"].as_array().into_iter().flatten() {
                let restarted: Vec<&str> = r["restart"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|s| s["state"] == "healthy")
                    .filter_map(|s| s["server"].as_str())
                    .collect();
                let num = |v: &Value| v.as_u64().map(|n| n.to_string()).unwrap_or("-".into());
                println!(
                    "  {:<4} {:<13} {:<6} {:<6} {:<24} {}",
                    num(&r["id"]),
                    text(&r["state"]),
                    num(&r["from_version"]),
                    num(&r["new_version"]),
                    restarted.join(","),
                    text(&r["reason"])
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
