//! SeaTable's documented nginx proxy config (`nginx-proxy.conf`) on a real nginx,
//! in front of echo upstreams.

use anyhow::{Context, Result, anyhow, bail};

use crate::{Connection, Nginx, free_port, loopback};

/// The routing part of SeaTable's documented `nginx-proxy.conf`, for an `http`
/// block: the upstreams `dtable_server_a_z` (servers `{A}`) and `dtable_server_0_9`
/// (servers `{B}`) and the `map` of `$request_uri` choosing between them.
pub const ROUTING: &str = r#"    upstream dtable_server_a_z { server {A}; keepalive 15; }
    upstream dtable_server_0_9 { server {B}; keepalive 15; }
    map $request_uri $dtable_upstream {
        default dtable_server_a_z;
        "~*ff84e1a1-66e2" dtable_server_0_9;
        "~*([a-zA-Z])([0-9a-f]{7}-[0-9a-f]{4})" dtable_server_a_z;
        "~*([0-9])([0-9a-f]{7}-[0-9a-f]{4})" dtable_server_0_9;
    }"#;

/// `template` with `{ROUTING}` ([`ROUTING`]), `{A}` and `{B}` (the servers of each
/// upstream) and `{LISTEN}` filled in.
pub fn conf(template: &str, a: &str, b: &str, listen: &str) -> String {
    template
        .replace("{ROUTING}", ROUTING)
        .replace("{A}", a)
        .replace("{B}", b)
        .replace("{LISTEN}", listen)
}

/// nginx on a free loopback port running [`conf`]`(template, a, b, <that port>)`;
/// it and the config text it runs.
pub fn start(template: &str, a: &str, b: &str) -> Result<(Nginx, String)> {
    let listen = loopback(free_port()?);
    let text = conf(template, a, b, &listen.to_string());
    Ok((Nginx::start(&text, listen)?, text))
}

/// `GET uri` on `conn` (to `nginx`): the name of the echo upstream that answered
/// it with 200; otherwise an error (with nginx's logs when the request failed).
pub fn served_by(conn: &mut Connection, nginx: &Nginx, uri: &str) -> Result<String> {
    let r = conn
        .get(uri, &[])
        .with_context(|| format!("{uri} (request {})\n{}", conn.requests, nginx.logs()))?;
    if r.status != 200 {
        bail!("{uri}: status {}: {}", r.status, r.text());
    }
    r.json()?["server"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{uri}: no server in {}", r.text()))
}
