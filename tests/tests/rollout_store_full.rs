//! The disk under the SQLite store fills up mid-rollout, then gets space back: a
//! real `seactl serve` whose store sits on a small tmpfs (mounted here; root only),
//! a real Envoy, fake dtable-servers restarted by their real hook. The rollout must
//! keep its driver while the store fails and end within seconds of the space
//! returning: no rollout left running with nobody driving it, the moved base no
//! longer fenced, and the next push taken.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use seashard_tests::dtable::Cluster;
use seashard_tests::lost_writes::{ENVOY_SERVERS, SAVE_INTERVAL};
use seashard_tests::rollout::{
    ControlPlaneProcess, ServeConfig, delayed_hook, new_map, old_map, server_table, start_envoy,
};
use seashard_tests::{free_port, get, loopback, wait_until};

/// Slot 4: moves from the first server to the second.
const BASE_MOVED: &str = "4c1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
/// How long the disk stays full: longer than the 30 tries (a second and the drain
/// each) after which the driver used to give up.
const FULL_FOR: Duration = Duration::from_secs(40);

/// A tmpfs of `size` mounted on a new temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs> {
        let dir = tempfile::Builder::new()
            .prefix("seashard-full-")
            .tempdir()?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()?;
        if !out.status.success() {
            bail!(
                "mount -t tmpfs (this test needs root): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes zeros to `name` until the filesystem is full.
    fn fill(&self, name: &str) -> Result<PathBuf> {
        let path = self.path().join(name);
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e.into()),
            }
        }
        // Every last block: a short write leaves some room.
        while f.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
        let _ = f.sync_all();
        Ok(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process still holding a file there does not keep it mounted.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// The control plane's configuration: its store on `store`, a short drain, hooks
/// that take two seconds (the restart step lasts long enough to fill the disk in).
fn write_config(
    dir: &Path,
    store: &Path,
    cluster: &Cluster,
    http: std::net::SocketAddr,
    grpc: std::net::SocketAddr,
) -> Result<PathBuf> {
    let mut servers = String::new();
    for s in &cluster.servers {
        servers += &server_table(&s.name, s.addr, "", &delayed_hook("2", s.restart_hook()?))?;
    }
    ServeConfig {
        initial_map: old_map(),
        listen: "",
        store: &format!("path = {store:?}\n"),
        rollout: "ack_timeout = \"10s\"\nhealth_timeout = \"15s\"\nrestart_timeout = \"30s\"\n\
                  drain = \"300ms\"\n",
        servers,
    }
    .write(dir, http, grpc)
}

fn state(cp: &ControlPlaneProcess, id: u64) -> Result<String> {
    Ok(cp.get_json(&format!("/v1/rollouts/{id}"))?["state"]
        .as_str()
        .unwrap_or("?")
        .to_owned())
}

#[test]
fn a_store_whose_disk_fills_mid_rollout_keeps_its_driver_and_ends_once_space_is_back() -> Result<()>
{
    let fs = Tmpfs::mount("4m")?;
    let dir = tempfile::Builder::new()
        .prefix("seashard-full-cfg-")
        .tempdir()?;
    let cluster = Cluster::start(&ENVOY_SERVERS, SAVE_INTERVAL)?;
    let (http, grpc) = (loopback(free_port()?), loopback(free_port()?));
    let config = write_config(
        dir.path(),
        &fs.path().join("seashard.db"),
        &cluster,
        http,
        grpc,
    )?;
    let cp = ControlPlaneProcess::start(&config, http, grpc)?;
    let envoy = start_envoy("edge-1", grpc)?;
    cp.wait_current(&["edge-1"])?;
    let fetch = |base: &str| -> Result<u16> {
        Ok(get(
            envoy.listener_addr,
            &format!("/dtable-server/api/v1/dtables/{base}/rows/"),
            &[],
        )?
        .status)
    };
    assert_eq!(fetch(BASE_MOVED)?, 200);

    let (status, body) = cp.post("/v1/maps", &serde_json::json!({"map": new_map()}))?;
    assert_eq!(status, 202, "{body}");
    let id = body["rollout"].as_u64().context("rollout id")?;
    wait_until(Duration::from_secs(30), "the restart step", || {
        Ok((state(&cp, id)? == "restart").then_some(()))
    })?;
    let fill = fs.fill("fill")?;
    // Full: the rollout cannot store its next step; it stays fenced meanwhile.
    std::thread::sleep(FULL_FOR);
    let logs = cp.logs();
    assert!(
        logs.contains("rollout step failed"),
        "the store never failed: {logs}"
    );
    assert_ne!(state(&cp, id)?, "done");
    assert_eq!(fetch(BASE_MOVED)?, 503, "the moved base is fenced");

    std::fs::remove_file(&fill)?;
    let back = Instant::now();
    let end = cp.wait_rollout(id, Duration::from_secs(30))?["state"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    let took = back.elapsed();
    eprintln!("rollout {id} ended ({end}) {took:?} after the space came back");
    assert_eq!(end, "done");
    assert!(
        took < Duration::from_secs(10),
        "ended {took:?} after the space came back"
    );
    // No rollout left running; the moved base is served by its new server.
    assert!(cp.get_json("/v1/status")?["rollout"].is_null());
    wait_until(
        Duration::from_secs(10),
        "the moved base to be served",
        || Ok((fetch(BASE_MOVED)? == 200).then_some(())),
    )?;
    // The next push is taken and rolled out.
    let r = cp.push_and_wait(&old_map(), "back", Duration::from_secs(90))?;
    assert_eq!(r["state"], "done", "{r}");
    drop(envoy);
    drop(cp);
    drop(cluster);
    drop(fs);
    Ok(())
}
