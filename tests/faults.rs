//! Storage faults against the real binary over real sockets: a full disk, a failing or wedged
//! store, a second server on the same data dir, a start on a full disk, SIGTERM while the
//! store hangs.
//!
//! The disk is really filled when the tests run as root and can mount a tmpfs (16 MiB) as the
//! data dir's file system. Otherwise (and for the failing and wedged store) they use the
//! relay's hidden, test-only fault injection (`--test-faults FILE`, `RELAY_TEST_FAULTS`): the
//! store's writes obey the word in FILE (`ok`, `fail`, `hang`, `full`, `disk-full`, where
//! `disk-full` makes the watermark read no free space). They say on stderr which path they
//! took; neither passes without checking the behaviour (`FAULTS_INJECTED=1` takes the injected
//! path as root too). Waits are deadlines, not sleeps.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use automerge::AutoCommit;
use common::*;
use reqwest::{Client, StatusCode};
use serde_json::Value;

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn post(c: &Client, url: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let r = c.post(url).body(body).send().await.expect("post");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(c: &Client, url: &str) -> (StatusCode, Vec<u8>) {
    let r = c.get(url).send().await.expect("get");
    (r.status(), r.bytes().await.expect("body").to_vec())
}

async fn get_json(c: &Client, url: &str) -> (StatusCode, Value) {
    let r = c.get(url).send().await.expect("get");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Polls `f` every 50 ms until it returns `Some`, or panics at the deadline. (Slower than
/// `common::wait_for`: some callers post a write on every poll.)
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `relay_store_operations_in_flight` on `/_/metrics` satisfies `ok`.
async fn until_store_in_flight(c: &Client, relay: &Relay, what: &str, ok: fn(f64) -> bool) {
    eventually(what, Duration::from_secs(10), || {
        let (c, url) = (c.clone(), relay.url("/_/metrics"));
        async move {
            let text = c.get(url).send().await.ok()?.text().await.ok()?;
            metric_value(&text, "relay_store_operations_in_flight")
                .filter(|v| ok(*v))
                .map(|_| ())
        }
    })
    .await
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

// The fields' types differ between platforms: the casts are not always no-ops.
#[allow(clippy::unnecessary_cast)]
fn free_bytes(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: a NUL-terminated path and a writable statvfs.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) }, 0);
    // SAFETY: statvfs succeeded.
    let s = unsafe { s.assume_init() };
    s.f_bavail as u64 * s.f_frsize as u64
}

/// A tmpfs of a few MiB mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (saying why on stderr) when not root or the mount fails.
    fn mount(mib: u64) -> Option<Tmpfs> {
        if !is_root() {
            eprintln!("faults: not root, so no tmpfs: using the injected disk-full fault");
            return None;
        }
        if std::env::var_os("FAULTS_INJECTED").is_some() {
            eprintln!("faults: FAULTS_INJECTED is set: using the injected disk-full fault");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(Tmpfs { dir }),
            other => {
                eprintln!(
                    "faults: cannot mount a tmpfs ({other:?}): using the injected disk-full fault"
                );
                None
            }
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn filler(&self) -> PathBuf {
        self.dir.path().join("filler")
    }

    /// Writes a filler file until `leave` bytes are free (or none can be written).
    fn fill_leaving(&self, leave: u64) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.filler())
            .unwrap();
        let block = vec![0xA5u8; 64 << 10];
        loop {
            let free = free_bytes(self.dir.path());
            if free <= leave {
                break;
            }
            let n = ((free - leave) as usize).min(block.len());
            if f.write_all(&block[..n]).is_err() {
                break;
            }
        }
        let _ = f.sync_all();
    }

    fn unfill(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A file naming the injected fault.
struct Faults {
    file: PathBuf,
}

impl Faults {
    fn new(dir: &Path) -> Faults {
        let file = dir.join("faults");
        std::fs::write(&file, "ok").unwrap();
        Faults { file }
    }

    fn set(&self, mode: &str) {
        std::fs::write(&self.file, mode).unwrap();
    }

    fn arg(&self) -> String {
        self.file.display().to_string()
    }
}

/// Either a real full disk (tmpfs) or the injected one.
enum Disk {
    Real(Tmpfs),
    Injected(tempfile::TempDir, Faults),
}

impl Disk {
    fn new() -> Disk {
        match Tmpfs::mount(16) {
            Some(t) => Disk::Real(t),
            None => {
                let dir = tempfile::tempdir().unwrap();
                let faults = Faults::new(dir.path());
                Disk::Injected(dir, faults)
            }
        }
    }

    fn data_dir(&self) -> PathBuf {
        match self {
            Disk::Real(t) => t.data_dir(),
            Disk::Injected(d, _) => d.path().join("data"),
        }
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec!["--min-free-disk".to_string(), "4MiB".to_string()];
        if let Disk::Injected(_, f) = self {
            args.extend(["--test-faults".to_string(), f.arg()]);
        }
        args
    }

    /// Under the 4 MiB watermark, with some room left (sled is never driven to ENOSPC).
    fn fill(&self) {
        match self {
            Disk::Real(t) => {
                t.fill_leaving(2 << 20);
                let free = free_bytes(t.dir.path());
                assert!(free < 4 << 20, "{free} bytes still free");
            }
            Disk::Injected(_, f) => f.set("disk-full"),
        }
    }

    fn free(&self) {
        match self {
            Disk::Real(t) => t.unfill(),
            Disk::Injected(_, f) => f.set("ok"),
        }
    }
}

fn start(data_dir: &Path, args: &[String]) -> Relay {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Relay::start_with(data_dir, &args)
}

async fn ready(c: &Client, relay: &Relay) -> (StatusCode, Value) {
    get_json(c, &relay.url("/_/ready")).await
}

/// Posts `doc`'s save to `url` until it is refused with `status`; returns the error body.
async fn until_refused(c: &Client, url: &str, doc: &mut AutoCommit, status: StatusCode) -> Value {
    let mut n = 0;
    eventually(
        &format!("a write refused with {status}"),
        Duration::from_secs(10),
        || {
            n += 1;
            add_item(doc, &format!("try-{n}"));
            let body = doc.save();
            async move {
                let (s, v) = post(c, url, body).await;
                assert!(s.is_success() || s == status, "{s} {v}");
                (s == status).then_some(v)
            }
        },
    )
    .await
}

/// Posts `doc`'s save to `url` until it is stored; returns the status.
async fn until_stored(c: &Client, url: &str, doc: &mut AutoCommit) -> StatusCode {
    let body = doc.save();
    eventually("a write stored again", Duration::from_secs(15), || {
        let body = body.clone();
        async move {
            let (s, _) = post(c, url, body).await;
            s.is_success().then_some(s)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_with_507_keeps_reads_and_recovers() {
    let disk = Disk::new();
    let relay = start(&disk.data_dir(), &disk.args());
    let c = client();
    let url = relay.url("/full");
    let mut doc = base_doc();
    assert_eq!(post(&c, &url, doc.save()).await.0, StatusCode::CREATED);
    let (_, stored) = get(&c, &url).await;
    assert_eq!(ready(&c, &relay).await.0, StatusCode::OK);

    disk.fill();
    let err = until_refused(&c, &url, &mut doc, StatusCode::INSUFFICIENT_STORAGE).await;
    assert_eq!(err["error"], "insufficient_storage", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("--min-free-disk"),
        "{err}"
    );
    // Refused writes store nothing, reads keep working, readiness says why.
    let (status, before) = get(&c, &url).await;
    assert_eq!(status, StatusCode::OK);
    add_item(&mut doc, "refused");
    let (s, v) = post(&c, &url, doc.save()).await;
    assert_eq!(s, StatusCode::INSUFFICIENT_STORAGE, "{v}");
    assert_eq!(get(&c, &url).await.1, before, "nothing stored");
    let loaded = AutoCommit::load(&before).unwrap();
    assert!(!items(&loaded).contains(&"refused".to_string()));
    let (status, body) = ready(&c, &relay).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "not_ready");
    assert_eq!(body["reason"], "insufficient_storage");
    assert_eq!(get(&c, &relay.url("/_/health")).await.0, StatusCode::OK);
    let new_doc = base_doc().save();
    assert_eq!(
        post(&c, &relay.url("/other"), new_doc).await.0,
        StatusCode::INSUFFICIENT_STORAGE,
        "every document"
    );
    assert!(!stored.is_empty());

    disk.free();
    until_stored(&c, &url, &mut doc).await;
    let (_, after) = get(&c, &url).await;
    let loaded = AutoCommit::load(&after).unwrap();
    assert!(items(&loaded).contains(&"refused".to_string()));
    eventually("ready again", Duration::from_secs(10), || async {
        (ready(&c, &relay).await.0 == StatusCode::OK).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_store_answers_503_at_once_serves_reads_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new(dir.path());
    let args = [
        "--test-faults".to_string(),
        faults.arg(),
        "--store-timeout-secs".to_string(),
        "1".to_string(),
    ];
    let relay = start(&dir.path().join("data"), &args);
    let c = client();
    let url = relay.url("/wedged");
    let mut doc = base_doc();
    assert_eq!(post(&c, &url, doc.save()).await.0, StatusCode::CREATED);
    let mut cold = base_doc();
    assert_eq!(
        post(&c, &relay.url("/cold"), cold.save()).await.0,
        StatusCode::CREATED
    );
    let (_, before) = get(&c, &url).await;

    faults.set("hang");
    // The first write waits for the bound (1 s), then fails and marks the store unhealthy.
    add_item(&mut doc, "hung");
    let t = Instant::now();
    let (s, v) = post(&c, &url, doc.save()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"], "storage_unavailable");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Later writes, to any document, are refused at once instead of queueing behind it.
    add_item(&mut cold, "refused");
    let t = Instant::now();
    let (s, v) = post(&c, &relay.url("/cold"), cold.save()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // Reads of loaded documents work, from the last durable state.
    assert_eq!(get(&c, &url).await, (StatusCode::OK, before));
    let (status, body) = ready(&c, &relay).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["reason"], "storage_unavailable");
    assert_eq!(get(&c, &relay.url("/_/health")).await.0, StatusCode::OK);

    faults.set("fail");
    let (s, _) = post(&c, &url, doc.save()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);

    // The fault clears: the store recovers by itself.
    faults.set("ok");
    until_stored(&c, &url, &mut doc).await;
    until_stored(&c, &relay.url("/cold"), &mut cold).await;
    let (_, after) = get(&c, &url).await;
    assert!(items(&AutoCommit::load(&after).unwrap()).contains(&"hung".to_string()));
    eventually("ready again", Duration::from_secs(10), || async {
        (ready(&c, &relay).await.0 == StatusCode::OK).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_grace_period_while_the_store_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new(dir.path());
    let grace = 2;
    let args = [
        "--test-faults".to_string(),
        faults.arg(),
        "--store-timeout-secs".to_string(),
        "60".to_string(),
        "--shutdown-grace-secs".to_string(),
        grace.to_string(),
    ];
    let mut relay = start(&dir.path().join("data"), &args);
    let c = client();
    let url = relay.url("/stuck");
    let mut doc = base_doc();
    assert_eq!(post(&c, &url, doc.save()).await.0, StatusCode::CREATED);
    until_store_in_flight(&c, &relay, "no store operation in flight", |n| n == 0.0).await;
    faults.set("hang");
    add_item(&mut doc, "never acknowledged");
    let hung = tokio::spawn({
        let (c, url, body) = (c.clone(), url.clone(), doc.save());
        async move { c.post(url).body(body).send().await.map(|r| r.status()) }
    });
    // The write is in the store (hanging) once a store operation is in flight.
    until_store_in_flight(&c, &relay, "the write to reach the store", |n| n >= 1.0).await;
    assert!(!hung.is_finished(), "the write hangs in the store");
    let t = Instant::now();
    let code = tokio::task::block_in_place(|| relay.terminate());
    let took = t.elapsed();
    assert_eq!(code, Some(0), "exit 0: everything acknowledged was durable");
    assert!(
        took < Duration::from_secs(grace) + Duration::from_millis(1500),
        "SIGTERM took {took:?} with a {grace} s grace period"
    );
    let answered = hung.await.unwrap();
    assert!(
        !matches!(answered, Ok(s) if s.is_success()),
        "the hung write was never acknowledged: {answered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_exits_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _first = Relay::start(&data);
    let mut second = Command::new(env!("CARGO_BIN_EXE_automerge-relay"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("the second server did not exit");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    let want = format!(
        "data dir {} is in use by another automerge-relay process (or another program holding its lock)",
        data.display()
    );
    assert!(stderr.contains(&want), "stderr: {stderr}");
    assert!(!stderr.contains("WouldBlock"), "stderr: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_starts_on_a_full_disk_serves_reads_and_refuses_writes() {
    let disk = Disk::new();
    let data = disk.data_dir();
    let c = client();
    let mut doc = base_doc();
    {
        let mut relay = start(&data, &disk.args());
        assert_eq!(
            post(&c, &relay.url("/kept"), doc.save()).await.0,
            StatusCode::CREATED
        );
        assert_eq!(tokio::task::block_in_place(|| relay.terminate()), Some(0));
    }
    let stored = {
        disk.fill();
        let mut relay = start(&data, &disk.args());
        let url = relay.url("/kept");
        let (status, stored) = get(&c, &url).await;
        assert_eq!(status, StatusCode::OK, "reads are served");
        assert_eq!(items(&AutoCommit::load(&stored).unwrap()), vec!["base"]);
        add_item(&mut doc, "while full");
        let (s, v) = post(&c, &url, doc.save()).await;
        assert_eq!(s, StatusCode::INSUFFICIENT_STORAGE, "{v}");
        let (s, body) = ready(&c, &relay).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["reason"], "insufficient_storage");
        assert_eq!(tokio::task::block_in_place(|| relay.terminate()), Some(0));
        stored
    };
    if let Disk::Real(tmpfs) = &disk {
        // No room at all, after a clean stop: sled opens without writing, so reads work.
        tmpfs.fill_leaving(0);
        {
            let mut relay = start(&data, &disk.args());
            let url = relay.url("/kept");
            assert_eq!(get(&c, &url).await, (StatusCode::OK, stored.clone()));
            let (s, _) = post(&c, &url, doc.save()).await;
            assert_eq!(s, StatusCode::INSUFFICIENT_STORAGE);
            assert_eq!(tokio::task::block_in_place(|| relay.terminate()), Some(0));
        }
        // After a crash sled must write to open (it zeroes the tail of its log segment and
        // writes a snapshot), so with no room it cannot. The relay starts anyway, answers
        // reads of documents 503 and writes 507, and opens the store by itself once space is
        // freed.
        tmpfs.unfill();
        let acknowledged = {
            let mut relay = start(&data, &disk.args());
            let url = relay.url("/kept");
            let s = until_stored(&c, &url, &mut doc).await;
            assert!(s.is_success());
            relay.kill9();
            items(&doc)
        };
        tmpfs.fill_leaving(0);
        let relay = start(&data, &disk.args());
        let url = relay.url("/kept");
        let (s, body) = get_json(&c, &url).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"], "storage_unavailable");
        let (s, _) = post(&c, &url, doc.save()).await;
        assert_eq!(s, StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(ready(&c, &relay).await.0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(get(&c, &relay.url("/_/health")).await.0, StatusCode::OK);
        disk.free();
        let served = eventually("the store to open", Duration::from_secs(10), || async {
            let (s, b) = get(&c, &url).await;
            (s == StatusCode::OK).then_some(b)
        })
        .await;
        assert_eq!(items(&AutoCommit::load(&served).unwrap()), acknowledged);
        add_item(&mut doc, "after");
        until_stored(&c, &url, &mut doc).await;
        eventually("ready", Duration::from_secs(10), || async {
            (ready(&c, &relay).await.0 == StatusCode::OK).then_some(())
        })
        .await;
    } else {
        eprintln!("faults: not on a tmpfs, so the start with no room at all is not tested");
        disk.free();
        let relay = start(&data, &disk.args());
        until_stored(&c, &relay.url("/kept"), &mut doc).await;
    }
}
