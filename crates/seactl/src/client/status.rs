//! `seactl status`: the active version, each Envoy's ACK/NACK, each server's health.

use std::process::ExitCode;

use anyhow::{Result, anyhow};
use serde_json::Value;

use super::*;

/// `seactl status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub remote: Remote,
}

/// The store line, when there is more to say than "SQLite, leading": etcd, and
/// which replica leads.
fn store_line(b: &Value) -> Option<String> {
    let store = &b["store"];
    if store["kind"] != "etcd" {
        return None;
    }
    let l = &b["leadership"];
    let who = match l["role"].as_str() {
        Some("leader") => format!("this replica leads (term {})", l["term"]),
        Some("follower") => match l["leader"]["replica"].as_str() {
            Some(r) => format!("the leader is {r} ({})", text(&l["leader"]["api"])),
            None => "no replica leads right now (an election is under way)".to_owned(),
        },
        _ => format!("no leadership: {}", text(&l["reason"])),
    };
    Some(format!(
        "  store: etcd {}, replica {}; {who}",
        text(&store["location"]),
        text(&store["replica"])
    ))
}

/// Active version, each Envoy's ACK/NACK, each server's health. Exits 1 when a
/// connected Envoy does not run the current version or a server is down, or the
/// store cannot be read.
pub fn status(args: StatusArgs) -> Result<ExitCode> {
    let client = Client::new(&args.remote)?;
    let s = client.get("/v1/status")?;
    if s.status != 200 {
        return Err(anyhow!("{}", describe_error(&s)));
    }
    let b = &s.body;
    if args.output == Output::Json {
        println!("{}", pretty(b));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "Active map: version {} ({}, by {})",
        b["version"],
        text(&b["kind"]),
        text(&b["author"])
    );
    println!(
        "  filter config {}, clusters {}",
        text(&b["ecds_version"]),
        text(&b["cds_version"])
    );
    let mut healthy = true;
    if let Some(line) = store_line(b) {
        println!("{line}");
    }
    if b["store"]["ok"] == false {
        healthy = false;
        println!(
            "  the store cannot be read, so no change can be made; Envoys keep what \
             they run: {}",
            text(&b["store"]["error"])
        );
    }
    if b["rollout"].is_object() {
        healthy = false;
        println!(
            "\nRollout {} running ({:.1}s): {}",
            b["rollout"]["id"],
            b["rollout"]["elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0,
            super::rollout::progress_line(&b["rollout"])
        );
    }
    println!("\nEnvoys:");
    let nodes = b["nodes"].as_array().cloned().unwrap_or_default();
    if nodes.is_empty() {
        println!("  (none has connected yet)");
    }
    println!(
        "  {:<30} {:<24} {:<13} {:<8} {:<8} last NACK",
        "instance (node@peer)", "role", "state", "map", "clusters"
    );
    for n in &nodes {
        let ecds = &n["types"]["ecds"];
        let nack = match (ecds["nacked_version"].as_str(), ecds["nack_error"].as_str()) {
            (Some(v), Some(e)) => format!("{v}: {e}"),
            _ => String::new(),
        };
        let state = text(&n["state"]["ecds"]);
        healthy &= state == "current" || state == "disconnected";
        let role = match n["role"]["kind"].as_str() {
            Some("guard") => format!("guard of {}", n["role"]["server"].as_str().unwrap_or("?")),
            _ => "edge".to_owned(),
        };
        println!(
            "  {:<30} {:<24} {:<13} {:<8} {:<8} {}",
            text(&n["instance"]),
            role,
            state,
            n["map_version"]
                .as_u64()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            text(&n["state"]["cds"]),
            nack
        );
    }
    let conflicts = b["conflicts"].as_array().cloned().unwrap_or_default();
    if !conflicts.is_empty() {
        healthy = false;
        println!("\nNode id CONFLICTS (rollouts waiting for these ids refuse to run):");
        for c in &conflicts {
            println!("  `{}` is held by more than one Envoy:", text(&c["id"]));
            for p in c["instances"].as_array().into_iter().flatten() {
                let from = strings(&p["streams_from"]);
                println!(
                    "    {:<30} {}",
                    text(&p["instance"]),
                    if p["connected"] == true {
                        format!("connected, streams from {}", from.join(", "))
                    } else {
                        "disconnected (it may still serve with an old map)".into()
                    }
                );
            }
        }
        println!(
            "  Give each Envoy its own --node-id; forget one out of service: DELETE /v1/nodes/INSTANCE"
        );
    }
    println!("\ndtable-servers:");
    for sv in b["servers"].as_array().into_iter().flatten() {
        let h = &sv["health"];
        let up = h["up"] == true;
        healthy &= up;
        let assigned = &sv["assigned"];
        let mut what: Vec<String> = Vec::new();
        if assigned["default"] == true {
            what.push("default".into());
        }
        let slots = strings(&assigned["slots"]);
        if !slots.is_empty() {
            what.push(format!("slots {}", slots.join(",")));
        }
        let pins = assigned["pins"].as_array().map(Vec::len).unwrap_or(0);
        if pins > 0 {
            what.push(format!("{pins} pin(s)"));
        }
        let guards: Vec<String> = sv["guards"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| {
                format!(
                    "{}{}",
                    text(&g["instance"]),
                    if g["connected"] == true {
                        ""
                    } else {
                        " (disconnected)"
                    }
                )
            })
            .collect();
        if sv["guarded"] == true || !guards.is_empty() {
            what.push(format!(
                "{} by {}",
                if sv["guarded"] == true {
                    "guarded"
                } else {
                    "guards (not `guarded`)"
                },
                if guards.is_empty() {
                    "NO GUARD".into()
                } else {
                    guards.join(", ")
                }
            ));
        }
        println!(
            "  {:<20} {:<22} {:<5} {}{}",
            text(&sv["name"]),
            text(&sv["address"]),
            if up { "up" } else { "DOWN" },
            what.join("; "),
            h["error"]
                .as_str()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        );
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
