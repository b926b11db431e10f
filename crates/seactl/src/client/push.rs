//! `seactl push-map`: shows the plan, asks, applies, follows the ACKs or the rollout.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use super::*;

/// `seactl push-map`.
#[derive(Debug, clap::Args)]
pub struct PushMapArgs {
    /// The shard map (JSON); `-` for stdin.
    pub map: PathBuf,
    /// Show the plan only; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Apply without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Why (recorded in the history and audit log).
    #[arg(long, short = 'm', default_value = "")]
    pub comment: String,
    /// How long to wait for every Envoy's ACK, in seconds.
    #[arg(long, default_value_t = 30)]
    pub wait: u64,
    /// For a rollout: restart at most N servers at once [default: the control
    /// plane's `[rollout] max_parallel_restarts`].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub parallel: Option<u64>,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub remote: Remote,
}

/// Shows the plan, asks, applies, and follows the Envoys' ACKs.
pub fn push_map(args: PushMapArgs) -> Result<ExitCode> {
    let text = crate::offline::read(&args.map)?;
    let map: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", args.map.display()))?;
    // Re-encoding would keep only the last of a repeated key: refuse it here.
    shardmap::check_unique_keys(&text).map_err(|e| anyhow!("{}: {e}", args.map.display()))?;
    let client = Client::new(&args.remote)?;
    let json_out = args.output == Output::Json;

    let plan = client.post("/v1/maps?dry_run=true", &json!({ "map": map }))?;
    if plan.status != 200 {
        return fail(json_out, &plan);
    }
    if !json_out {
        print_plan(&plan.body);
    }
    if args.dry_run {
        if json_out {
            println!("{}", pretty(&plan.body));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if plan.body["unchanged"] == true {
        if json_out {
            println!("{}", pretty(&plan.body));
        } else {
            println!("Nothing to do: the active map is already this one.");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let rollout = plan.body["needs_rollout"] == true;
    let question = if rollout {
        "Start the rollout (fence the moved bases, restart the servers above, activate)?"
    } else {
        "Apply this map?"
    };
    if !args.yes && !confirm(question)? {
        println!("Not applied.");
        return Ok(ExitCode::FAILURE);
    }
    let from = plan.body["from_version"].as_u64().unwrap_or(0);
    let applied = client.post(
        "/v1/maps",
        &json!({
            "map": map,
            "base_version": from,
            "comment": args.comment,
            "author": author(),
            "parallel": args.parallel,
        }),
    )?;
    if applied.status == 202 {
        let id = applied.body["rollout"].as_u64().unwrap_or(0);
        if !json_out {
            println!("Rollout {id} started.");
        }
        return super::rollout::follow(&client, id, json_out);
    }
    if applied.status != 200 {
        return fail(json_out, &applied);
    }
    let version = applied.body["version"].as_u64().unwrap_or(0);
    if !json_out {
        println!("Version {version} is active; waiting for every Envoy to apply it ...");
    }
    let (ok, status) = wait_acked(&client, Duration::from_secs(args.wait), json_out)?;
    if json_out {
        println!(
            "{}",
            pretty(&json!({ "outcome": applied.body, "acked": ok, "nodes": status["nodes"] }))
        );
    } else if ok {
        println!("Every connected Envoy runs version {version}.");
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Polls the nodes (not the status: that also checks every server's health) until
/// every connected node is current on the filter config, one NACKed it, or `timeout`.
/// Returns whether all are current, and the last answer.
fn wait_acked(client: &Client, timeout: Duration, quiet: bool) -> Result<(bool, Value)> {
    let start = Instant::now();
    let mut last_owing = Vec::new();
    loop {
        let s = client.get("/v1/nodes")?;
        if s.status != 200 {
            bail!("{}", describe_error(&s));
        }
        let nodes: Vec<&Value> = s.body["nodes"]
            .as_array()
            .map(|a| a.iter().filter(|n| n["connected"] == true).collect())
            .unwrap_or_default();
        let nacked: Vec<&Value> = nodes
            .iter()
            .copied()
            .filter(|n| n["state"]["ecds"] == "nacked")
            .collect();
        let owing: Vec<String> = nodes
            .iter()
            .filter(|n| n["state"]["ecds"] != "current" && n["state"]["ecds"] != "nacked")
            .filter_map(|n| n["instance"].as_str().map(str::to_owned))
            .collect();
        if !nacked.is_empty() {
            if !quiet {
                for n in &nacked {
                    eprintln!(
                        "NACK from {}: {}",
                        n["instance"].as_str().unwrap_or("?"),
                        text(&n["types"]["ecds"]["nack_error"])
                    );
                }
            }
            return Ok((false, s.body));
        }
        if owing.is_empty() {
            if !quiet {
                println!(
                    "  {} Envoy(s) ACKed in {} ms",
                    nodes.len(),
                    start.elapsed().as_millis()
                );
            }
            return Ok((true, s.body));
        }
        if start.elapsed() >= timeout {
            if !quiet {
                eprintln!(
                    "Timed out after {}s; still owing an ACK: {}",
                    timeout.as_secs(),
                    owing.join(", ")
                );
            }
            return Ok((false, s.body));
        }
        if owing != last_owing && !quiet {
            println!("  waiting for: {}", owing.join(", "));
            last_owing = owing;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn print_plan(o: &Value) {
    let p = &o["plan"];
    println!("Active version: {}", o["from_version"]);
    if o["unchanged"] == true {
        println!("The map is the active one: no change.");
        return;
    }
    for m in p["slots"].as_array().into_iter().flatten() {
        println!(
            "  slots {:<12} {} → {}",
            text(&m["range"]),
            text(&m["from"]),
            text(&m["to"])
        );
    }
    for c in p["pins"].as_array().into_iter().flatten() {
        println!(
            "  pin   {:<12} {} → {}",
            text(&c["pin"]),
            c["before"].as_str().unwrap_or("(its slot)"),
            c["after"].as_str().unwrap_or("(its slot)")
        );
    }
    if p["default_changed"] == true {
        println!("  the default server changes (requests without a base)");
    }
    if p["paths_changed"] == true {
        println!("  path rules change (requests without a base)");
    }
    for s in strings(&p["servers_added"]) {
        println!("  new server: {s}");
    }
    for s in strings(&p["servers_removed"]) {
        println!("  server no longer used: {s}");
    }
    if o["needs_rollout"] == true {
        println!(
            "Moves bases from {} to {}: a rollout (fence, restart, activate).",
            strings(&p["losing"]).join(", "),
            strings(&p["gaining"]).join(", ")
        );
        let restart = o["restart"].as_array().cloned().unwrap_or_default();
        if restart.is_empty() {
            println!("Servers to restart: none.");
        } else {
            println!("Servers to restart:");
        }
        for r in &restart {
            println!(
                "  {:<20} ({} hook) {}",
                text(&r["server"]),
                text(&r["hook"]),
                text(&r["why"])
            );
        }
        for r in o["skipped"].as_array().into_iter().flatten() {
            println!(
                "  not restarted: {:<20} {}",
                text(&r["server"]),
                text(&r["why"])
            );
        }
    } else {
        println!("No base changes server.");
    }
}

fn confirm(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("not asking on a non-interactive stdin: pass --yes to apply, or --dry-run");
    }
    print!("{question} [y/N] ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}
