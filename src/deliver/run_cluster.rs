//! `kiln run --all`: every node of a cluster booted at once in QEMU, on a private network that only
//! they share, each console in its own log, one status line for all, and one stop for all.
//!
//! The network. Each QEMU connects its NIC to kiln with `-netdev stream` over a Unix socket (QEMU's
//! stream framing: a 4-byte big-endian length before each Ethernet frame), and a hub thread in kiln
//! repeats every frame to the other nodes. QEMU alone cannot do this safely: `hubport` does not span
//! processes, `dgram` and `socket connect=` join exactly two peers, `socket mcast=` puts the frames
//! on the host's multicast, and user-mode networking or a tap reach beyond the cluster. A Unix
//! socket in a private directory reaches nothing but these QEMUs. A hub rather than a learning
//! switch: a handful of nodes on a test link, where flooding costs nothing and there is no address
//! table to age or to get wrong.
//!
//! The QEMUs run in their own process group, so Ctrl-C reaches kiln alone, which then stops them
//! all (and removes the socket) instead of leaving some of them running.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::run::{Arch, Nic, RunOptions};
use crate::util::cmd;

/// One node of a cluster run.
#[derive(Debug, Clone)]
pub struct NodeBoot {
    pub name: String,
    pub image: PathBuf,
    /// The NIC's MAC (from the cluster file, or derived from the seed).
    pub mac: String,
    /// The node counts as up when its console prints this; without it, it just runs.
    pub until: Option<String>,
    /// Its serial console, line by line.
    pub log: PathBuf,
}

pub struct ClusterRun {
    pub nodes: Vec<NodeBoot>,
    pub arch: Arch,
    pub memory_mib: u32,
    pub cpus: u32,
    pub persist: bool,
    /// Give up (and fail) when not every `until` has appeared by then.
    pub timeout: Option<Duration>,
}

/// The largest frame the hub relays: a jumbo frame and its header, with room to spare. Anything
/// bigger is a broken stream, and that node's port is closed.
const MAX_FRAME: usize = 65_536;

type Ports = Arc<Mutex<BTreeMap<usize, UnixStream>>>;

/// An Ethernet hub on a Unix socket, speaking QEMU's stream netdev framing.
pub struct Hub {
    path: PathBuf,
    ports: Ports,
    stopping: Arc<AtomicBool>,
}

impl Hub {
    /// Listens on `path` (which must not exist) and relays among whoever connects.
    pub fn start(path: &Path) -> Result<Hub> {
        let listener =
            UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
        let ports: Ports = Arc::default();
        let stopping = Arc::new(AtomicBool::new(false));
        let (p, s) = (ports.clone(), stopping.clone());
        std::thread::spawn(move || {
            for (id, conn) in listener.incoming().enumerate() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let Ok(writer) = conn.try_clone() else {
                    continue;
                };
                p.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, writer);
                let p = p.clone();
                std::thread::spawn(move || relay(id, conn, &p));
            }
        });
        Ok(Hub {
            path: path.to_path_buf(),
            ports,
            stopping,
        })
    }

    /// How many nodes are connected.
    pub fn ports(&self) -> usize {
        self.ports.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        for (_, port) in std::mem::take(&mut *self.ports.lock().unwrap_or_else(|e| e.into_inner()))
        {
            let _ = port.shutdown(std::net::Shutdown::Both);
        }
        // One last connection wakes the accept loop so it sees `stopping`.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads frames from port `id` and writes each, whole, to every other port.
fn relay(id: usize, mut conn: UnixStream, ports: &Ports) {
    let mut buf = vec![0u8; 4 + MAX_FRAME];
    loop {
        if conn.read_exact(&mut buf[..4]).is_err() {
            break;
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > MAX_FRAME || conn.read_exact(&mut buf[4..4 + len]).is_err() {
            break;
        }
        let mut ports = ports.lock().unwrap_or_else(|e| e.into_inner());
        // One write per frame under the lock, so frames from two nodes never interleave.
        ports.retain(|&other, w| other == id || w.write_all(&buf[..4 + len]).is_ok());
    }
    ports.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
}

/// What a node's console reader reports.
enum Event {
    Line(usize, String),
    Exited(usize),
}

/// One running node.
struct Running {
    boot: NodeBoot,
    child: Child,
    log: std::fs::File,
    lines: usize,
    up_after: Option<Duration>,
    exited: bool,
    stderr: PathBuf,
}

/// Boots every node and watches them until each has printed its `until`, one fails, the timeout
/// passes or `stop` is set (Ctrl-C); then stops them all.
pub fn run(o: &ClusterRun, stop: &AtomicBool) -> Result<()> {
    if o.nodes.is_empty() {
        bail!("no nodes to boot");
    }
    let tmp = tempfile::Builder::new().prefix("kiln-run-").tempdir()?;
    let hub = Hub::start(&tmp.path().join("hub.sock"))?;
    let (tx, rx) = mpsc::channel();
    let mut nodes = Vec::new();
    for (i, boot) in o.nodes.iter().enumerate() {
        match start_node(o, i, boot, tmp.path(), &hub.path, tx.clone()) {
            Ok(n) => nodes.push(n),
            Err(e) => {
                stop_all(&mut nodes);
                return Err(e.context(format!("starting node {}", boot.name)));
            }
        }
    }
    drop(tx);
    let outcome = watch(o, &mut nodes, &rx, stop);
    stop_all(&mut nodes);
    if outcome.is_err() {
        status_line(&nodes, true);
    }
    drop(hub);
    outcome.map_err(|why| failure(&nodes, &why))
}

fn start_node(
    o: &ClusterRun,
    i: usize,
    boot: &NodeBoot,
    tmp: &Path,
    socket: &Path,
    tx: mpsc::Sender<Event>,
) -> Result<Running> {
    let run = RunOptions {
        image: boot.image.clone(),
        arch: o.arch,
        seed: None,
        until: None,
        timeout: None,
        log: None,
        memory_mib: o.memory_mib,
        cpus: o.cpus,
        persist: o.persist,
        kvm: false,
        nic: Some(Nic {
            socket: socket.to_path_buf(),
            mac: boot.mac.clone(),
        }),
    };
    let vars = tmp.join(format!("{}.vars.fd", boot.name));
    let mut qemu = super::run::prepared_command(&run, &vars)?;
    let bin = qemu.get_program().to_string_lossy().into_owned();
    let stderr = tmp.join(format!("{}.qemu.err", boot.name));
    qemu.args(["-serial", "stdio", "-monitor", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr)?)
        // Its own process group: Ctrl-C on the terminal goes to kiln, which stops every node.
        .process_group(0);
    let log = std::fs::File::create(&boot.log)
        .with_context(|| format!("creating {}", boot.log.display()))?;
    let mut child = cmd::spawn(&mut qemu, &bin).context("starting qemu")?;
    let out = child.stdout.take().context("qemu's stdout")?;
    std::thread::spawn(move || {
        let (lines, reader) = super::run::console_lines(out);
        for line in lines {
            if tx.send(Event::Line(i, line)).is_err() {
                return;
            }
        }
        let _ = reader.join();
        let _ = tx.send(Event::Exited(i));
    });
    Ok(Running {
        boot: boot.clone(),
        child,
        log,
        lines: 0,
        up_after: None,
        exited: false,
        stderr,
    })
}

/// The watch loop: console lines to each node's log, the status line kept current.
fn watch(
    o: &ClusterRun,
    nodes: &mut [Running],
    rx: &mpsc::Receiver<Event>,
    stop: &AtomicBool,
) -> std::result::Result<(), String> {
    let started = Instant::now();
    let mut shown = Instant::now();
    loop {
        let waiting = nodes
            .iter()
            .any(|n| n.boot.until.is_some() && n.up_after.is_none());
        let any_until = nodes.iter().any(|n| n.boot.until.is_some());
        if any_until && !waiting {
            return Ok(());
        }
        if stop.load(Ordering::SeqCst) {
            return Err("interrupted".into());
        }
        if let Some(t) = o.timeout
            && started.elapsed() > t
        {
            return Err(format!("{} s passed", t.as_secs()));
        }
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(Event::Line(i, line)) => {
                let n = &mut nodes[i];
                n.log
                    .write_all(line.as_bytes())
                    .map_err(|e| e.to_string())?;
                n.lines += 1;
                if let Some(u) = &n.boot.until
                    && n.up_after.is_none()
                    && line.contains(u.as_str())
                {
                    n.up_after = Some(started.elapsed());
                    status_line(nodes, true);
                }
            }
            Ok(Event::Exited(i)) => {
                nodes[i].exited = true;
                if nodes[i].boot.until.is_some() && nodes[i].up_after.is_none() {
                    return Err(format!("node {}'s qemu exited", nodes[i].boot.name));
                }
                if nodes.iter().all(|n| n.exited) {
                    return Ok(());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
        if shown.elapsed() > Duration::from_secs(5) {
            status_line(nodes, false);
            shown = Instant::now();
        }
    }
}

/// `name state` for every node on one line: redrawn in place on a terminal, printed when a node
/// comes up (or at the end) otherwise, so a CI log is not flooded.
fn status_line(nodes: &[Running], changed: bool) {
    let tty = std::io::stderr().is_terminal();
    if !tty && !changed {
        return;
    }
    let parts: Vec<String> = nodes
        .iter()
        .map(|n| {
            let state = match (n.up_after, n.exited) {
                (Some(t), _) => format!("up ({} s)", t.as_secs()),
                (None, true) => "exited".to_string(),
                (None, false) => format!("booting ({} lines)", n.lines),
            };
            format!("{} {state}", n.boot.name)
        })
        .collect();
    if tty {
        eprint!("\r\x1b[2K{}", parts.join(" | "));
        if changed {
            eprintln!();
        }
    } else {
        eprintln!("{}", parts.join(" | "));
    }
}

fn stop_all(nodes: &mut [Running]) {
    for n in nodes.iter_mut() {
        let _ = n.child.kill();
    }
    for n in nodes.iter_mut() {
        let _ = n.child.wait();
    }
}

/// The error of a failed run: why, and for each node not up, its log and its console's last lines.
fn failure(nodes: &[Running], why: &str) -> anyhow::Error {
    let mut text = why.to_string();
    for n in nodes.iter().filter(|n| n.up_after.is_none()) {
        let console = std::fs::read(&n.boot.log).unwrap_or_default();
        let console = String::from_utf8_lossy(&console);
        let lines: Vec<&str> = console.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
        let err = std::fs::read_to_string(&n.stderr).unwrap_or_default();
        text.push_str(&format!(
            "\n{} (console {}):\n  {tail}",
            n.boot.name,
            n.boot.log.display()
        ));
        if !err.trim().is_empty() {
            text.push_str(&format!("\n  qemu: {}", err.trim()));
        }
    }
    anyhow::anyhow!(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(payload);
        f
    }

    fn read_frame(s: &mut UnixStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).unwrap();
        buf
    }

    #[test]
    fn the_hub_repeats_each_frame_to_every_other_port_whole() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::start(&dir.path().join("hub.sock")).unwrap();
        let mut ports: Vec<UnixStream> = (0..3)
            .map(|_| UnixStream::connect(dir.path().join("hub.sock")).unwrap())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while hub.ports() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in &ports {
            p.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let big = vec![0xab; 1514];
        ports[0].write_all(&frame(b"from zero")).unwrap();
        ports[0].write_all(&frame(&big)).unwrap();
        for p in &mut ports[1..] {
            assert_eq!(read_frame(p), b"from zero");
            assert_eq!(read_frame(p), big);
        }
        ports[2].write_all(&frame(b"from two")).unwrap();
        assert_eq!(read_frame(&mut ports[0]), b"from two");
        assert_eq!(read_frame(&mut ports[1]), b"from two");
        // Port 0 got nothing of its own back.
        ports[0]
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 1];
        assert!(ports[0].read(&mut b).is_err());
        // A port that dies leaves the others working.
        drop(ports.remove(1));
        ports[0].write_all(&frame(b"still")).unwrap();
        assert_eq!(read_frame(&mut ports[1]), b"still");
    }
}
