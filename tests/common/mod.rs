//! Test support: start the real binary on a free loopback port, talk to it, stop it by pid.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ReadDoc, ROOT};

pub struct Relay {
    pub child: Child,
    pub port: u16,
    pub data_dir: PathBuf,
    extra: Vec<String>,
}

impl Relay {
    /// Starts the relay on a fresh data dir.
    pub fn start(dir: &Path) -> Relay {
        Self::start_with(dir, &[])
    }

    pub fn start_with(dir: &Path, extra: &[&str]) -> Relay {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, port) = spawn(dir, &extra);
        Relay {
            child,
            port,
            data_dir: dir.to_path_buf(),
            extra,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{}", self.port, path)
    }

    /// kill -9, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!("relay did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts again on the same data dir (after kill9/terminate).
    pub fn restart(&mut self) {
        let (child, port) = spawn(&self.data_dir, &self.extra);
        self.child = child;
        self.port = port;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

fn spawn(dir: &Path, extra: &[String]) -> (Child, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_automerge-relay"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start relay binary");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read listening line");
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line from relay: {line:?}"));
    (child, port)
}

/// A raw HTTP/1.1 request, for paths an HTTP client library would normalise.
pub fn raw_request(port: u16, request_line: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "{request_line}\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// Polls `f` until it returns Some, or panics at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A document with a list of items under "items".
pub fn base_doc() -> AutoCommit {
    let mut doc = AutoCommit::new();
    let list = doc
        .put_object(ROOT, "items", automerge::ObjType::List)
        .unwrap();
    doc.insert(&list, 0, "base").unwrap();
    doc.commit();
    doc
}

pub fn add_item(doc: &mut AutoCommit, text: &str) {
    let (_, list) = doc.get(ROOT, "items").unwrap().expect("items");
    let len = doc.length(&list);
    doc.insert(&list, len, text).unwrap();
    doc.commit();
}

pub fn items(doc: &AutoCommit) -> Vec<String> {
    let Some((_, list)) = doc.get(ROOT, "items").unwrap() else {
        return vec![];
    };
    (0..doc.length(&list))
        .filter_map(|i| doc.get(&list, i).unwrap())
        .map(|(v, _)| v.into_string().unwrap_or_default())
        .collect()
}

pub fn heads_hex(doc: &mut AutoCommit) -> Vec<String> {
    let mut h: Vec<String> = doc.get_heads().iter().map(|h| h.to_string()).collect();
    h.sort();
    h
}

pub fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

pub fn json_heads(v: &serde_json::Value) -> Vec<String> {
    sorted(
        v["heads"]
            .as_array()
            .expect("heads")
            .iter()
            .map(|h| h.as_str().unwrap().to_string())
            .collect(),
    )
}
