//! The control plane's HTTP API, from the command line: a small blocking client and
//! the commands built on it (`push-map`, `status`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

/// Where the control plane is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct Remote {
    /// The control plane's HTTP API. Replicas: several URLs separated by commas,
    /// tried in turn (the next one on a connection error or timeout, or a `503`
    /// saying this replica cannot change anything now); the one that answered is
    /// kept for the rest of the command.
    #[arg(
        long,
        env = "SEASHARD_URL",
        default_value = "http://127.0.0.1:18080",
        value_name = "URL[,URL...]"
    )]
    pub url: String,
    /// The API token: the change token, or the read-only token for reads.
    #[arg(long, env = "SEASHARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// For an https:// URL: the CA (PEM) that signed the control plane's certificate
    /// (`seactl certs init` makes one). Without it, the webpki (Mozilla) roots.
    #[arg(long, env = "SEASHARD_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

/// The URLs of `--url`/`SEASHARD_URL`, without a trailing `/`: one, or several
/// separated by commas. Refused: none, an empty one, one given twice, one that is not
/// `http://` or `https://`.
fn urls(list: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for url in list.split(',').map(str::trim) {
        if url.is_empty() {
            bail!(
                "--url/SEASHARD_URL `{list}` holds an empty URL (several are separated by commas)"
            );
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--url/SEASHARD_URL: `{url}` is not an http:// or https:// URL");
        }
        let url = url.trim_end_matches('/').to_owned();
        if out.contains(&url) {
            bail!("--url/SEASHARD_URL: `{url}` is given twice");
        }
        out.push(url);
    }
    Ok(out)
}

/// How `remote` is reached over TLS: its CA alone when given, else the webpki
/// (Mozilla) roots. The CA is for https:// URLs only; with http:// it is not used.
fn tls_config(remote: &Remote, urls: &[String]) -> Result<ureq::tls::TlsConfig> {
    let builder = ureq::tls::TlsConfig::builder();
    let Some(ca) = &remote.ca else {
        return Ok(builder.build());
    };
    let clear: Vec<&str> = urls
        .iter()
        .filter(|u| !u.starts_with("https://"))
        .map(String::as_str)
        .collect();
    if !clear.is_empty() {
        eprintln!(
            "seactl: note: --ca/SEASHARD_CA {} is not used for {}: not an https:// URL \
             (the token and everything else travel in clear)",
            ca.display(),
            clear.join(", ")
        );
    }
    if clear.len() == urls.len() {
        return Ok(builder.build());
    }
    let pem = std::fs::read(ca).with_context(|| format!("reading the CA {}", ca.display()))?;
    let certs = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("the CA {} is not PEM", ca.display()))?;
    if certs.is_empty() {
        bail!("the CA {} holds no PEM certificate", ca.display());
    }
    Ok(builder
        .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
        .build())
}

/// A hint for an error talking to the API over the wrong protocol or with a
/// certificate that is not trusted.
pub fn tls_hint(e: &anyhow::Error) -> Option<&'static str> {
    if let Some(u) = e.chain().find_map(|c| c.downcast_ref::<NoneAnswered>()) {
        return u.hint;
    }
    let is_rustls =
        |e: &(dyn std::error::Error + 'static)| e.downcast_ref::<rustls::Error>().is_some();
    e.chain()
        .find_map(|c| ureq_hint(c.downcast_ref::<ureq::Error>()?, &is_rustls))
}

fn ureq_hint(
    e: &ureq::Error,
    is_rustls: &dyn Fn(&(dyn std::error::Error + 'static)) -> bool,
) -> Option<&'static str> {
    match e {
        ureq::Error::Rustls(_) | ureq::Error::Tls(_) => Some(UNTRUSTED),
        ureq::Error::Io(io) if io.get_ref().is_some_and(|inner| is_rustls(inner)) => {
            Some(UNTRUSTED)
        }
        ureq::Error::Protocol(_) => Some(
            "the answer is not HTTP: if the control plane serves HTTPS ([api.tls]), use an \
             https:// URL",
        ),
        _ => None,
    }
}

const UNTRUSTED: &str = "TLS: the control plane's certificate was not accepted; pass --ca FILE \
     (or set SEASHARD_CA) with the CA that signed it, and reach it by a name or address the \
     certificate holds (`seactl certs server --san`)";

/// How to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// An API answer: status and JSON body.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
}

/// A blocking client of the API, over one or several URLs (replicas).
struct Client {
    bases: Vec<String>,
    /// The index in `bases` of the URL that answered last: asked first.
    current: std::cell::Cell<usize>,
    token: Option<String>,
    agent: ureq::Agent,
}

/// The `code` of a `503` from a replica that cannot change anything now, while
/// another may: the next URL is tried.
const NOT_SERVING_CODES: [&str; 3] = ["not_leader", "no_leader", "etcd_unavailable"];

/// Every URL was tried and none gave an answer to use: each URL with its error.
#[derive(Debug)]
struct NoneAnswered {
    tried: Vec<(String, String)>,
    /// The TLS or protocol hint of the first failure that has one.
    hint: Option<&'static str>,
}

impl std::fmt::Display for NoneAnswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "none of the {} control plane URLs answered:",
            self.tried.len()
        )?;
        for (url, err) in &self.tried {
            write!(f, "\n  {url}: {err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for NoneAnswered {}

impl Client {
    fn new(remote: &Remote) -> Result<Client> {
        let bases = urls(&remote.url)?;
        Ok(Client {
            token: remote.token.clone(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                // A replica that is gone (no RST) costs this much before the next URL.
                .timeout_connect(Some(Duration::from_secs(5)))
                .tls_config(tls_config(remote, &bases)?)
                .build()
                .into(),
            bases,
            current: std::cell::Cell::new(0),
        })
    }

    fn get(&self, path: &str) -> Result<Answer> {
        self.call("GET", path, None)
    }

    fn post(&self, path: &str, body: &Value) -> Result<Answer> {
        self.call("POST", path, Some(body))
    }

    /// Sends the request to the current URL, and to the next ones while it fails
    /// where another replica may succeed: no connection (or a GET's answer lost), or
    /// a `503` with a code of [`NOT_SERVING_CODES`]; a `not_leader` answer naming the
    /// leader's API among our URLs sends it there next (never to a URL not given: the
    /// token goes only where the operator said). A POST that may have reached a
    /// replica is not sent again. With one URL, its answer or error as it comes.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Answer> {
        if let [base] = &self.bases[..] {
            return self.call_one(base, method, path, body).map_err(|(e, _)| e);
        }
        let n = self.bases.len();
        // The order to try: the current URL first, then the others in turn.
        let mut order: Vec<usize> = (0..n).map(|k| (self.current.get() + k) % n).collect();
        let mut tried = Vec::with_capacity(n);
        let mut hint = None;
        let mut k = 0;
        while k < order.len() {
            let i = order[k];
            k += 1;
            let base = &self.bases[i];
            match self.call_one(base, method, path, body) {
                Ok(a) if a.status == 503 && not_serving(&a) => {
                    tried.push((base.clone(), describe_error(&a)));
                    let leader = a.body["leader"]["api"].as_str().unwrap_or_default();
                    let leader = leader.trim_end_matches('/');
                    if let Some(at) = order[k..].iter().position(|&j| self.bases[j] == leader) {
                        let j = order.remove(k + at);
                        order.insert(k, j);
                    }
                }
                Ok(a) => {
                    self.current.set(i);
                    return Ok(a);
                }
                Err((e, retry)) => {
                    if !retry {
                        return Err(e);
                    }
                    hint = hint.or_else(|| tls_hint(&e));
                    tried.push((base.clone(), format!("{e:#}")));
                }
            }
        }
        Err(NoneAnswered { tried, hint }.into())
    }

    /// One request to one URL; an error says whether another URL may be tried.
    fn call_one(
        &self,
        base: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, (anyhow::Error, bool)> {
        let url = format!("{base}{path}");
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let sent = match body {
            None => {
                let mut req = self.agent.get(&url);
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                req.call()
            }
            Some(body) => {
                let mut req = self
                    .agent
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-seashard-author", &author());
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                req.send(body.to_string())
            }
        };
        let resp = sent.map_err(|e| {
            // A read is asked again anywhere; a change only where it surely was not
            // received (else it could be applied twice).
            let retry = body.is_none() || not_delivered(&e);
            let e = anyhow::Error::new(e).context(format!("{method} {url}"));
            if retry || self.bases.len() == 1 {
                (e, retry)
            } else {
                let e = e.context(
                    "the request may have reached the control plane: not sent to another \
                     replica; see `seactl status` or `seactl rollout list`",
                );
                (e, false)
            }
        })?;
        answer(resp, &url).map_err(|e| (e, body.is_none()))
    }
}

/// A `503` from a replica that cannot change anything now (not the leader, no
/// leader, no etcd majority).
fn not_serving(a: &Answer) -> bool {
    a.body["code"]
        .as_str()
        .is_some_and(|c| NOT_SERVING_CODES.contains(&c))
}

/// An error that happened before the request could reach the server: name
/// resolution, connecting, the TLS handshake.
fn not_delivered(e: &ureq::Error) -> bool {
    use std::io::ErrorKind as K;
    use ureq::Timeout as T;
    match e {
        ureq::Error::HostNotFound
        | ureq::Error::ConnectionFailed
        | ureq::Error::Timeout(T::Resolve | T::Connect)
        | ureq::Error::Tls(_)
        | ureq::Error::Rustls(_)
        | ureq::Error::Pem(_) => true,
        ureq::Error::Io(io) => matches!(
            io.kind(),
            K::ConnectionRefused
                | K::AddrNotAvailable
                | K::NetworkUnreachable
                | K::HostUnreachable
                | K::NotConnected
        ),
        _ => false,
    }
}

fn answer(mut resp: ureq::http::Response<ureq::Body>, url: &str) -> Result<Answer> {
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading the answer of {url}"))?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Answer { status, body })
}

/// An error answer as text: the reason and every problem.
fn describe_error(a: &Answer) -> String {
    let mut s = format!(
        "{} ({})",
        a.body["error"].as_str().unwrap_or("error"),
        a.status
    );
    for p in a.body["problems"].as_array().into_iter().flatten() {
        let at = p["at"].as_str().unwrap_or_default();
        let msg = p["message"].as_str().unwrap_or_default();
        if at.is_empty() {
            s.push_str(&format!("\n  {msg}"));
        } else {
            s.push_str(&format!("\n  {at}: {msg}"));
        }
    }
    s
}

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
        return follow(&client, id, json_out);
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
                        n["types"]["ecds"]["nack_error"].as_str().unwrap_or("")
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
    let list = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    for m in p["slots"].as_array().into_iter().flatten() {
        println!(
            "  slots {:<12} {} → {}",
            m["range"].as_str().unwrap_or(""),
            m["from"].as_str().unwrap_or(""),
            m["to"].as_str().unwrap_or("")
        );
    }
    for c in p["pins"].as_array().into_iter().flatten() {
        println!(
            "  pin   {:<12} {} → {}",
            c["pin"].as_str().unwrap_or(""),
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
    for s in list(&p["servers_added"]) {
        println!("  new server: {s}");
    }
    for s in list(&p["servers_removed"]) {
        println!("  server no longer used: {s}");
    }
    if o["needs_rollout"] == true {
        println!(
            "Moves bases from {} to {}: a rollout (fence, restart, activate).",
            list(&p["losing"]).join(", "),
            list(&p["gaining"]).join(", ")
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
                r["server"].as_str().unwrap_or(""),
                r["hook"].as_str().unwrap_or(""),
                r["why"].as_str().unwrap_or("")
            );
        }
        for r in o["skipped"].as_array().into_iter().flatten() {
            println!(
                "  not restarted: {:<20} {}",
                r["server"].as_str().unwrap_or(""),
                r["why"].as_str().unwrap_or("")
            );
        }
    } else {
        println!("No base changes server.");
    }
}

fn fail(json_out: bool, a: &Answer) -> Result<ExitCode> {
    if json_out {
        println!("{}", pretty(&a.body));
    } else {
        eprintln!("{}", describe_error(a));
    }
    Ok(ExitCode::FAILURE)
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

/// Who is pushing: `$USER@host`, for the audit log.
fn author() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    if host.is_empty() {
        user
    } else {
        format!("{user}@{host}")
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// How long `follow` keeps polling a rollout, at most.
const FOLLOW_LIMIT: Duration = Duration::from_secs(24 * 3600);
/// How long `follow` waits for an unreachable control plane to come back.
const UNREACHABLE_LIMIT: Duration = Duration::from_secs(120);

/// Follows rollout `id` until it ends: prints each step with the elapsed time, the
/// Envoys owing an ACK and the server restarting. Exit 0 only when `done`.
fn follow(client: &Client, id: u64, json_out: bool) -> Result<ExitCode> {
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
fn progress_line(r: &Value) -> String {
    let state = r["state"].as_str().unwrap_or("?");
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
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
        "rolling_back" => format!("rolling back: {}", r["reason"].as_str().unwrap_or("")),
        other => other.to_owned(),
    };
    let owing = names(&r["owing_ack"]["pending"]);
    if !owing.is_empty() {
        line.push_str(&format!("; owing an ACK: {}", owing.join(", ")));
    }
    let restarting = names(&r["restarting_all"]);
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
            s["server"].as_str().unwrap_or(""),
            s["state"].as_str().unwrap_or(""),
            s["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    for w in r["warnings"].as_array().into_iter().flatten() {
        println!("  warning: {}", w.as_str().unwrap_or(""));
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
                    r["state"].as_str().unwrap_or(""),
                    num(&r["from_version"]),
                    num(&r["new_version"]),
                    restarted.join(","),
                    r["reason"].as_str().unwrap_or("")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

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
            Some(r) => format!(
                "the leader is {r} ({})",
                l["leader"]["api"].as_str().unwrap_or("")
            ),
            None => "no replica leads right now (an election is under way)".to_owned(),
        },
        _ => format!("no leadership: {}", l["reason"].as_str().unwrap_or("")),
    };
    Some(format!(
        "  store: etcd {}, replica {}; {who}",
        store["location"].as_str().unwrap_or(""),
        store["replica"].as_str().unwrap_or("")
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
        b["kind"].as_str().unwrap_or(""),
        b["author"].as_str().unwrap_or("")
    );
    println!(
        "  filter config {}, clusters {}",
        b["ecds_version"].as_str().unwrap_or(""),
        b["cds_version"].as_str().unwrap_or("")
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
            b["store"]["error"].as_str().unwrap_or("")
        );
    }
    if b["rollout"].is_object() {
        healthy = false;
        println!(
            "\nRollout {} running ({:.1}s): {}",
            b["rollout"]["id"],
            b["rollout"]["elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0,
            progress_line(&b["rollout"])
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
        let state = n["state"]["ecds"].as_str().unwrap_or("");
        healthy &= state == "current" || state == "disconnected";
        let role = match n["role"]["kind"].as_str() {
            Some("guard") => format!("guard of {}", n["role"]["server"].as_str().unwrap_or("?")),
            _ => "edge".to_owned(),
        };
        println!(
            "  {:<30} {:<24} {:<13} {:<8} {:<8} {}",
            n["instance"].as_str().unwrap_or(""),
            role,
            state,
            n["map_version"]
                .as_u64()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            n["state"]["cds"].as_str().unwrap_or(""),
            nack
        );
    }
    let conflicts = b["conflicts"].as_array().cloned().unwrap_or_default();
    if !conflicts.is_empty() {
        healthy = false;
        println!("\nNode id CONFLICTS (rollouts waiting for these ids refuse to run):");
        for c in &conflicts {
            println!(
                "  `{}` is held by more than one Envoy:",
                c["id"].as_str().unwrap_or("")
            );
            for p in c["instances"].as_array().into_iter().flatten() {
                let from: Vec<&str> = p["streams_from"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                println!(
                    "    {:<30} {}",
                    p["instance"].as_str().unwrap_or(""),
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
        let slots: Vec<&str> = assigned["slots"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
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
                    g["instance"].as_str().unwrap_or(""),
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
            sv["name"].as_str().unwrap_or(""),
            sv["address"].as_str().unwrap_or(""),
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

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    const TOKEN: &str = "client-test-token-123";

    /// What a test server does with a request.
    #[derive(Clone)]
    enum Behaviour {
        /// Answers this status and JSON body.
        Answer(u16, String),
        /// Reads the request, then closes without answering.
        Hang,
    }

    /// A loopback HTTP server in a thread, counting requests; stops on drop.
    struct Server {
        url: String,
        hits: Arc<AtomicUsize>,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Server {
        fn start(b: Behaviour) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let hits = Arc::new(AtomicUsize::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let (h, s) = (hits.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            h.fetch_add(1, Ordering::Relaxed);
                            let _ = serve(conn, &b);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
            Server {
                url,
                hits,
                stop,
                thread: Some(thread),
            }
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::Relaxed)
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn serve(conn: TcpStream, b: &Behaviour) -> std::io::Result<()> {
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut r = BufReader::new(conn.try_clone()?);
        let mut len = 0;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
            if let Some((n, v)) = line.split_once(':')
                && n.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        match b {
            Behaviour::Answer(status, json) => {
                let mut w = conn;
                write!(
                    w,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{json}",
                    json.len()
                )
            }
            Behaviour::Hang => Ok(()),
        }
    }

    /// A loopback URL where nothing listens.
    fn closed_url() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    fn client(urls: &[&str]) -> Client {
        Client::new(&Remote {
            url: urls.join(","),
            token: Some(TOKEN.into()),
            ca: None,
        })
        .unwrap()
    }

    fn answer(status: u16, json: &str) -> Behaviour {
        Behaviour::Answer(status, json.to_owned())
    }

    fn ok() -> Behaviour {
        answer(200, r#"{"ok":true}"#)
    }

    fn not_leader() -> Behaviour {
        answer(
            503,
            r#"{"error":"this replica is not the leader","code":"not_leader"}"#,
        )
    }

    #[test]
    fn fails_over_from_a_closed_port_and_keeps_the_one_that_answered() {
        let closed = closed_url();
        let (busy, ok) = (Server::start(not_leader()), Server::start(ok()));
        let c = client(&[&closed, &busy.url, &ok.url]);
        for path in ["/v1/status", "/v1/nodes"] {
            let a = c.get(path).unwrap();
            assert_eq!((a.status, &a.body["ok"]), (200, &Value::Bool(true)));
        }
        let a = c.post("/v1/maps", &json!({})).unwrap();
        assert_eq!(a.status, 200);
        // The first call went through the refusing replica once; the next ones
        // straight to the one that answered.
        assert_eq!((busy.hits(), ok.hits()), (1, 3));
        assert_eq!(c.current.get(), 2);
    }

    #[test]
    fn a_not_leader_answer_naming_one_of_the_urls_sends_it_there_next() {
        let (other, leader) = (Server::start(ok()), Server::start(ok()));
        // The leader's URL as the replica advertises it, with a trailing `/`.
        let body = format!(
            r#"{{"error":"this replica does not lead","code":"not_leader",
                "leader":{{"replica":"cp-3","api":"{}/"}}}}"#,
            leader.url
        );
        let follower = Server::start(answer(503, &body));
        let c = client(&[&follower.url, &other.url, &leader.url]);
        assert_eq!(c.post("/v1/maps", &json!({})).unwrap().status, 200);
        assert_eq!((follower.hits(), other.hits(), leader.hits()), (1, 0, 1));
        assert_eq!(c.current.get(), 2);
        // A leader that is none of our URLs is not asked: the token stays with them.
        let stranger = Server::start(ok());
        let body = format!(
            r#"{{"error":"x","code":"not_leader","leader":{{"api":"{}"}}}}"#,
            stranger.url
        );
        let follower = Server::start(answer(503, &body));
        let c = client(&[&follower.url, &other.url]);
        assert_eq!(c.post("/v1/maps", &json!({})).unwrap().status, 200);
        assert_eq!((stranger.hits(), other.hits()), (0, 1));
    }

    #[test]
    fn an_http_answer_is_not_failed_over() {
        for b in [
            answer(409, r#"{"error":"stale base version","code":"conflict"}"#),
            answer(401, r#"{"error":"unauthorized"}"#),
            answer(503, r#"{"error":"busy","code":"rollout_running"}"#),
        ] {
            let (first, second) = (Server::start(b), Server::start(ok()));
            let c = client(&[&first.url, &second.url]);
            let a = c.post("/v1/maps", &json!({})).unwrap();
            assert_ne!(a.status, 200);
            assert_eq!((first.hits(), second.hits()), (1, 0));
        }
    }

    #[test]
    fn when_none_answers_the_error_names_each_url() {
        let closed = closed_url();
        let busy = Server::start(answer(
            503,
            r#"{"error":"etcd has no majority","code":"etcd_unavailable"}"#,
        ));
        let c = client(&[&closed, &busy.url]);
        let err = format!("{:#}", c.get("/v1/status").unwrap_err());
        assert!(
            err.contains("none of the 2 control plane URLs answered"),
            "{err}"
        );
        assert!(
            err.contains(&format!("{closed}: GET {closed}/v1/status")),
            "{err}"
        );
        assert!(
            err.contains(&format!("{}: etcd has no majority (503)", busy.url)),
            "{err}"
        );
        assert!(!err.contains(TOKEN), "{err}");
    }

    #[test]
    fn a_change_that_may_have_arrived_is_not_sent_again() {
        let (hang, ok) = (Server::start(Behaviour::Hang), Server::start(ok()));
        let c = client(&[&hang.url, &ok.url]);
        let err = format!("{:#}", c.post("/v1/maps", &json!({})).unwrap_err());
        assert!(err.contains("may have reached"), "{err}");
        assert_eq!((hang.hits(), ok.hits()), (1, 0));
        // A read is asked again elsewhere.
        assert_eq!(c.get("/v1/status").unwrap().status, 200);
        assert_eq!((hang.hits(), ok.hits()), (2, 1));
    }

    #[test]
    fn one_url_as_before() {
        let closed = closed_url();
        let c = client(&[&closed]);
        let err = format!("{:#}", c.get("/v1/status").unwrap_err());
        assert!(err.starts_with(&format!("GET {closed}/v1/status")), "{err}");
        let busy = Server::start(not_leader());
        let a = client(&[&busy.url]).get("/v1/status").unwrap();
        assert_eq!(a.status, 503);
    }

    #[test]
    fn url_lists() {
        assert_eq!(
            urls("http://a:1/, https://b:2").unwrap(),
            ["http://a:1", "https://b:2"]
        );
        for (bad, says) in [
            ("", "empty"),
            ("http://a:1,", "empty"),
            ("http://a:1,,http://b:1", "empty"),
            ("http://a:1,http://a:1/", "given twice"),
            ("a:1", "not an http:// or https:// URL"),
        ] {
            let err = urls(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }
}
