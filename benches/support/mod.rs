//! Shared by the benchmarks: start the release relay on a free port, read its memory and CPU.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// The relay binary of this build, on a fresh data dir; killed when dropped.
pub struct Relay {
    pub child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Relay {
    pub fn start(extra: &[&str]) -> Relay {
        let dir = tempfile::tempdir().expect("temp dir");
        // BENCH_RELAY_WRAP runs the relay under a tool, e.g. "heaptrack -o relay.heaptrack".
        // BENCH_RELAY_BIN benchmarks another build (e.g. the previous commit's) with the same
        // load generator.
        let wrap = std::env::var("BENCH_RELAY_WRAP").unwrap_or_default();
        let bin = std::env::var("BENCH_RELAY_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_automerge-relay").to_owned());
        let mut words = wrap.split_whitespace();
        let mut command = match words.next() {
            Some(tool) => {
                let mut c = Command::new(tool);
                c.args(words).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        // BENCH_RELAY_TOKEN runs the relay with access control: a token file granting that
        // secret admin on every id (clients from `http_client` present it).
        if let Some(secret) = auth_token() {
            let file = dir.path().join("tokens.toml");
            let entry = format!(
                "[[token]]\nname = \"bench\"\ntoken = \"{secret}\"\ngrants = [ {{ ids = \"*\", access = \"admin\" }} ]\n"
            );
            std::fs::write(&file, entry).expect("write the token file");
            command.arg("--auth-tokens").arg(file);
        }
        let mut child = command
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start relay");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        // A wrapping tool may print first.
        while !line.starts_with("listening on") {
            line.clear();
            if stdout.read_line(&mut line).expect("listening line") == 0 {
                panic!("the relay exited before listening");
            }
        }
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
        Relay {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// SIGTERM to this relay's pid and a wait of at most `grace` for it to exit (SIGKILL
    /// then). Its exit status, `None` when it had to be killed.
    pub fn stop(mut self, grace: std::time::Duration) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
                Err(_) => break,
            }
        }
        None // Drop kills and reaps it.
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) of a process, in seconds (100 clock ticks per second here).
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// A process's command name and CPU time (user + system, seconds at 100 ticks per second),
/// or `None` once it has exited. For accounting the services a benchmark talks to.
pub fn proc_cpu(pid: u32) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Some((comm, (tick(11) + tick(12)) / 100.0))
}

/// CPU seconds of every process whose command name is one of `names`, by pid (e.g. every
/// `postgres` backend). Read-only: it only reads `/proc`.
pub fn cpu_by_name(names: &[&str]) -> std::collections::HashMap<u32, (String, f64)> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((comm, secs)) = proc_cpu(pid) {
            if names.contains(&comm.as_str()) {
                out.insert(pid, (comm, secs));
            }
        }
    }
    out
}

/// `--name value` from the command line, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// WebSocket settings for load generators: tungstenite zero-fills its whole read buffer
/// (128 KiB by default) before every read, which with hundreds of client sockets costs the
/// load generator more CPU than the relay spends serving them. Messages larger than the
/// buffer are still read whole.
pub fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(8 * 1024)
}

/// The secret benchmarks present when `BENCH_RELAY_TOKEN` is set.
pub fn auth_token() -> Option<String> {
    std::env::var("BENCH_RELAY_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
}

/// An HTTP client that presents `BENCH_RELAY_TOKEN`, if set, on every request.
pub fn http_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = auth_token() {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .expect("a token usable in a header");
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("http client")
}

/// The relay's `/_/stats` JSON (`Null` if it cannot be read).
pub async fn stats(c: &reqwest::Client, port: u16) -> serde_json::Value {
    match c
        .get(format!("http://127.0.0.1:{port}/_/stats"))
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

/// One small change on top of `doc` (a map put or a list insert in the middle).
pub fn small_change(doc: &mut automerge::AutoCommit, i: usize) {
    use automerge::transaction::Transactable;
    use automerge::{ReadDoc, ROOT};
    match doc.get(ROOT, "items").unwrap() {
        Some((_, list)) => {
            let len = doc.length(&list);
            doc.insert(&list, len / 2, format!("new {i}")).unwrap();
        }
        None => {
            doc.put(ROOT, format!("new{i}"), i as i64).unwrap();
        }
    }
    doc.commit();
}

/// A duration in milliseconds.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
